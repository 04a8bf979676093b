"""Attention: every attention and position choice of the playbook, each one config line away.

What a reader finds here, each piece the playbook's:

- RoPE with a configurable base. The playbook keeps base 10k-50k at 2-4k context and raises it
  ("ABF") for long-context stages (SmolLM3: 50k -> 2M -> 5M). Rotating q and k by their absolute
  positions makes q.k depend only on the offset between them. Variants: partial RoPE (only a
  fraction of each head's dims rotate: GLM-4.5, MLA), YaRN (stretch the slow frequencies by a
  factor to run past the trained context), NoPE and RNoPE (no RoPE on every k-th layer; SmolLM3
  drops it on layers 3, 7, ..., 35), and Dual Chunk Attention (training-free extension that keeps
  every relative position inside the trained range).
- Causal self-attention with `n_kv_heads` key/value heads shared by groups of query heads: MHA when
  n_kv_heads == n_heads, MQA when it is 1, GQA in between. The playbook found GQA with ratios 2-8
  as good as MHA at a fraction of the KV cache; SmolLM3 uses 4 KV heads. MLA (DeepSeek-V2) caches
  one compressed latent per token instead, plus a small shared RoPE key.
- Masks: intra-document (a token attends only to its own document: neutral at short context,
  needed for long context), sliding window (Mistral, Gemma 3's local layers), chunked (Llama 4),
  each composable with documents; learned per-head attention sinks (gpt-oss) and StreamingLLM
  generation (keep the first tokens plus a window). QK-norm as an option.
- Two back ends computing the same thing: PyTorch SDPA with an explicit boolean mask (works
  everywhere), and flex_attention with a BlockMask that skips fully-masked tiles (the GPU path).
- KV caches for generation, and the playbook's cache-size formulas to check them against.
- Gated linear attention for hybrid models: a fixed-size state instead of a growing cache, in a
  recurrent form (generation) and a chunked parallel form (training) that compute the same thing.
"""

from __future__ import annotations

import importlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from blocks import RMSNorm, fused_projections

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    HAS_FLEX = True
except ImportError:  # torch < 2.5
    HAS_FLEX = False
try:  # torch >= 2.9 asks for flex's log-sum-exp this way; return_lse is its deprecated spelling
    from torch.nn.attention.flex_attention import AuxRequest
    HAS_AUX_REQUEST = True
except ImportError:
    HAS_AUX_REQUEST = False

# flex_attention runs eagerly on CPU (slow but exact) and warns each time it does; the CPU path is
# only for tests and tiny runs, so the warning is noise there.
warnings.filterwarnings("ignore", message=".*flex_attention.*compile.*")

BACKENDS = ("sdpa", "flex")

# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------


def rope_frequencies(head_dim: int, max_seq_len: int, base: float,
                     device: torch.device | str | None = None, fraction: float = 1.0,
                     yarn_factor: float = 1.0, yarn_original_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, rotary_dim // 2) for RoPE with the given base.

    Pair i of a head rotates with angular frequency base^(-2i/rotary_dim): a larger base stretches
    the slowest wavelengths, which is why raising it (ABF) helps at longer contexts. `fraction` < 1
    is partial RoPE (only the first rotary_dim dims of a head rotate, the rest carry no position);
    `yarn_factor` > 1 rescales the frequencies with YaRN (see `yarn_frequencies`)."""
    rot = rotary_dim(head_dim, fraction)
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float64, device=device) / rot))
    inv_freq, mscale = yarn_frequencies(inv_freq, yarn_factor, yarn_original_len or max_seq_len, base)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq)
    # YaRN's attention temperature multiplies q and k alike, so scores scale by mscale^2.
    return (angles.cos() * mscale).float(), (angles.sin() * mscale).float()


def rotary_dim(head_dim: int, fraction: float) -> int:
    """How many of a head's dims rotate under partial RoPE: the fraction, rounded to an even count."""
    return 2 * max(1, round(head_dim * fraction / 2))


def yarn_frequencies(inv_freq: torch.Tensor, factor: float, original_len: int, base: float,
                     beta_fast: float = 32.0, beta_slow: float = 1.0) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): (new inverse frequencies, attention scale) for context x factor.

    A pair that turns many times within the original context (r = original_len / wavelength above
    beta_fast) encodes local order: it keeps its frequency. A pair that turns less than beta_slow
    times has never seen longer distances: its frequency is divided by the factor (position
    interpolation). Pairs in between blend, linearly in the pair index between the (rounded) pairs
    where r crosses beta_fast and beta_slow: the YaRN authors' code and Hugging Face's
    `_compute_yarn_parameters` do this, so real checkpoints extended with YaRN behave the same here
    (the paper writes the ramp linear in r instead). q and k are each scaled by
    mscale = 0.1 ln(factor) + 1, so scores on the rotated dims get mscale^2.
    With factor 1 every frequency and the scale are unchanged: plain RoPE."""
    if factor <= 1:
        return inv_freq, 1.0
    n = inv_freq.shape[0]

    def pair_index(turns: float) -> float:  # pair i turns original_len / (2 pi) * base^(-i / n) times
        return n * math.log(original_len / (2 * math.pi * turns)) / math.log(base)

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), 2 * n - 1)
    high = high + 0.001 if high == low else high
    ramp = ((torch.arange(n, dtype=inv_freq.dtype, device=inv_freq.device) - low) / (high - low)).clamp(0.0, 1.0)
    keep = 1 - ramp  # 1: keep the frequency, 0: interpolate
    new_inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    return new_inv_freq, 0.1 * math.log(factor) + 1.0


def rope_layers(n_layers: int, nope_every: int) -> list[bool]:
    """Which layers apply RoPE. nope_every = k drops it on layers k-1, 2k-1, ... (RNoPE; SmolLM3
    uses k = 4: layers 3, 7, ..., 35 have no positional encoding); 1 is NoPE everywhere; 0 keeps
    RoPE on every layer."""
    return [not (nope_every and (i + 1) % nope_every == 0) for i in range(n_layers)]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, H, T, head_dim) by position; cos/sin are (T, rotary_dim // 2). For x
    laid out (B, T, H, head_dim), pass cos[:, None] and sin[:, None].

    The "rotate half" layout (first half of the head paired with the second half) is the Hugging
    Face Llama convention, so real Llama-family weights load without permuting q and k. Under
    partial RoPE only the first rotary_dim dims rotate; the others pass through unchanged."""
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, 1, T, T), True where query t may attend to key s: s <= t, same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


def mask_predicate(doc_ids: torch.Tensor | None, window: int = 0, chunk: int = 0):
    """The one definition of who may attend to whom, as a function of (batch, q_idx, kv_idx).

    Causal always; within `window` tokens (the query itself included) for sliding-window layers;
    within the same aligned block of `chunk` tokens for chunked layers (Llama 4); within the same
    document when doc_ids is given. Both back ends evaluate this same function: SDPA on index grids
    to get a boolean tensor, flex_attention per tile to build its BlockMask."""
    def allowed(b, q_idx, kv_idx):
        ok = q_idx >= kv_idx
        if window:
            ok = ok & (q_idx - kv_idx < window)
        if chunk:
            ok = ok & (q_idx // chunk == kv_idx // chunk)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return ok
    return allowed


def attention_mask(doc_ids: torch.Tensor | None, n_queries: int, n_keys: int, window: int = 0,
                   chunk: int = 0, q_offset: int = 0, device: torch.device | str | None = None,
                   k_offset: int = 0) -> torch.Tensor:
    """Boolean mask (B or 1, 1, n_queries, n_keys) from `mask_predicate`; query i sits at position
    q_offset + i (generation with a cache), key j at position k_offset + j (a windowed cache keeps
    only the latest keys)."""
    device = doc_ids.device if doc_ids is not None else device
    B = doc_ids.shape[0] if doc_ids is not None else 1
    b = torch.arange(B, device=device)[:, None, None]
    q_idx = torch.arange(q_offset, q_offset + n_queries, device=device)[None, :, None]
    kv_idx = torch.arange(k_offset, k_offset + n_keys, device=device)[None, None, :]
    return mask_predicate(doc_ids, window, chunk)(b, q_idx, kv_idx)[:, None]


def flex_block_mask(doc_ids: torch.Tensor | None, batch_size: int, seq_len: int,
                    device: torch.device, window: int = 0, chunk: int = 0) -> "BlockMask":
    """flex_attention's BlockMask for causal attention, within documents when doc_ids is given,
    limited to a window or a chunk when those are set.

    The mask is described by a function of (batch, head, q_idx, kv_idx); flex evaluates it per
    tile and skips tiles that are fully masked, so packed short documents (and sliding windows)
    cost less, not more."""
    if not HAS_FLEX:
        raise RuntimeError("model.attn_backend='flex' needs torch >= 2.5; upgrade torch or use 'sdpa'")
    if doc_ids is None and not window and not chunk:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        return _create_block_mask(device)(mask_mod, None, None, seq_len, seq_len, device=device)
    if window or chunk:
        allowed = mask_predicate(doc_ids, window, chunk)
        return _create_block_mask(device)(lambda b, h, q_idx, kv_idx: allowed(b, q_idx, kv_idx),
                                 None if doc_ids is None else batch_size, None, seq_len, seq_len, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
    return _create_block_mask(device)(mask_mod, batch_size, None, seq_len, seq_len, device=device)


_compiled_create_block_mask = None


def _create_block_mask(device: torch.device):
    # Compiled, the mask is evaluated tile by tile on the GPU instead of as a dense B x T x T tensor.
    global _compiled_create_block_mask
    if device.type != "cuda":
        return create_block_mask
    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask)
    return _compiled_create_block_mask


def build_attention_mask(backend: str, doc_ids: torch.Tensor | None, batch_size: int, seq_len: int,
                         device: torch.device, window: int = 0, chunk: int = 0):
    """The mask object one forward pass shares across the layers of one kind: None means plain
    causal (SDPA's fused is_causal path), a boolean tensor for SDPA, a BlockMask for flex."""
    if backend == "flex":
        return flex_block_mask(doc_ids, batch_size, seq_len, device, window, chunk)
    if window or chunk:
        return attention_mask(doc_ids, seq_len, seq_len, window, chunk, device=device)
    return None if doc_ids is None else document_causal_mask(doc_ids)


_compiled_flex = None


def _flex(q, k, v, block_mask, scale: float | None = None, return_lse: bool = False):
    # flex_attention is only fast when compiled (it then generates a fused Triton kernel); on CPU
    # the eager version is an exact reference, which is what the tests compare against SDPA.
    global _compiled_flex
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    if not return_lse:
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    if HAS_AUX_REQUEST:
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True)


def softmax_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       sinks: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention whose softmax has one extra logit per head, `sinks[h]`, with no value behind it.

    gpt-oss's learned attention sinks: a head can put probability on "nothing" instead of being
    forced to spread it over the keys (StreamingLLM found models dump it on the first tokens
    otherwise). Written out with explicit scores, the SDPA path; flex gets the same result from
    its log-sum-exp (see `attend`)."""
    B, H, Tq, _ = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is None:
        mask = torch.ones(Tq, k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, H, 1, 1).expand(B, H, Tq, 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return (probs @ v.float()).type_as(q)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, backend: str, *, window: int = 0,
           chunk: int = 0, sinks: torch.Tensor | None = None, q_offset: int | None = None,
           scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (B, H, Tq, d), k (B, Hkv, Tk, d), v (B, Hkv, Tk, dv).

    Training passes the mask `build_attention_mask` made for the layer's kind. Generation with a
    cache passes q_offset (the position of the first query) instead, and the mask is rebuilt here
    from positions, on SDPA (decoding one document at a time, never across documents). The keys
    are always the latest ones, ending with the queries' own: a windowed cache passes fewer. A
    static cache (StaticKVCache) passes its boolean mask of valid slots instead of q_offset. A mask
    of None (plain causal) or a boolean tensor runs on SDPA whatever the back end; flex takes
    BlockMasks."""
    if mask is None or isinstance(mask, torch.Tensor):
        backend = "sdpa"
        if mask is not None and q.shape[2] == 1 and sinks is None:
            return one_query_attention(q, k, v, mask, scale)
    if q_offset is not None:
        Tq, Tk = q.shape[2], k.shape[2]
        if sinks is None and not window and not chunk:
            if Tq == 1:  # one new token sees every cached key
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
            allowed = torch.arange(Tk, device=q.device)[None, :] <= \
                (q_offset + torch.arange(Tq, device=q.device))[:, None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
        mask, backend = attention_mask(None, Tq, Tk, window, chunk, q_offset, q.device,
                                       k_offset=q_offset + Tq - Tk), "sdpa"
    if sinks is not None:
        if backend == "flex":
            # With Z the softmax sum, adding exp(sink) to it rescales the output by Z / (Z + e^sink).
            out, lse = _flex(q, k, v, mask, scale, return_lse=True)
            return out * torch.sigmoid(lse - sinks.view(1, -1, 1)).unsqueeze(-1).to(out.dtype)
        return softmax_with_sinks(q, k, v, mask, sinks, scale)
    if backend == "flex":
        return _flex(q, k, v, mask, scale)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """Attention of one new token per row (a decode step): q (B, H, 1, d), k (B, Hkv, S, d), mask
    broadcastable to (B, 1, 1, S). The H / Hkv query heads that share a key/value head ride as that
    head's queries, so each cached key and value is read once, never copied per query head (as
    SDPA's enable_gqa may do on kernels without native GQA)."""
    B, H, _, d = q.shape
    y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], H // k.shape[1], d), k, v, attn_mask=mask,
                                       scale=scale)
    return y.reshape(B, H, 1, v.shape[-1])


# --------------------------------------------------------------------------------------------
# FlashAttention-4 behind SDPA (optional, Hopper and Blackwell GPUs)
# --------------------------------------------------------------------------------------------

FA4_INSTALL = "pip install -r requirements-gpu.txt (flash-attn-4 and nvidia-cutlass-dsl)"


def _flash_attn_fwd(q, k, v, **kwargs):
    """flash-attn-4's forward in the form torch's FA4 hook calls it: recent flash-attn-4 releases
    return (out, lse) and three optional tensors, torch 2.11-2.13 unpack two."""
    from flash_attn.cute.interface import _flash_attn_fwd as fa4_forward
    out, lse = fa4_forward(q, k, v, **kwargs)[:2]
    return out, lse


def _flash_attn_bwd(*args, **kwargs):
    from flash_attn.cute.interface import _flash_attn_bwd as fa4_backward
    return fa4_backward(*args, **kwargs)[:3]  # (dq, dk, dv), and dsink when sinks are learned


def use_flash_attention_4(device: torch.device) -> str | None:
    """Route SDPA's flash kernel to FlashAttention-4 (the flash-attn-4 package: CuTe DSL kernels
    written for Hopper and Blackwell) for the rest of the process. Returns None when it is on,
    else why not (no package, another GPU, a torch without the hook).

    Exact attention like every SDPA kernel (same values up to bf16 rounding, tested on GPU), and
    the fastest one at the 1B ablation shape on an H200 (benchmarks/README.md, Training
    throughput). PyTorch picks cuDNN before flash on Hopper, so cuDNN's SDPA is switched
    off: causal, unmasked attention then takes the flash slot, and masked SDPA calls (generation
    with a cache) fall to the memory-efficient kernel, as flash takes no mask."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return "FlashAttention-4 needs a Hopper (sm90) or Blackwell (sm100) GPU"
    try:
        from torch.nn.attention import (activate_flash_attention_impl, list_flash_attention_impls,
                                        register_flash_attention_impl)
        from torch.nn.attention._fa4 import register_flash_attention_fa4
    except ImportError:
        return f"torch {torch.__version__} has no FlashAttention-4 hook for SDPA (torch >= 2.11 has)"
    try:
        importlib.import_module("flash_attn.cute.interface")  # the kernels (compiled on first use) and CUTLASS
    except ImportError as e:
        return f"{e.msg}; install it with {FA4_INSTALL}"
    except Exception as e:  # noqa: BLE001  (CUTLASS's CUDA checks at import: a wrong flavour, an old driver)
        return f"flash-attn-4 does not load here ({type(e).__name__}: {e}); see {FA4_INSTALL}"
    if "FA4-nanoplaybook" not in list_flash_attention_impls():
        # torch imports the module named here and calls its _flash_attn_fwd/_bwd: the adapters above
        register_flash_attention_impl("FA4-nanoplaybook", register_fn=lambda: register_flash_attention_fa4(__name__))
    activate_flash_attention_impl("FA4-nanoplaybook")
    torch.backends.cuda.enable_cudnn_sdp(False)
    return None


# --------------------------------------------------------------------------------------------
# Dual Chunk Attention (training-free context extension, Qwen2.5-1M / ChunkLlama)
# --------------------------------------------------------------------------------------------


def dca_query_positions(q_positions: torch.Tensor, chunk: int, local_window: int) -> tuple[torch.Tensor, ...]:
    """The three RoPE positions DCA gives a query at absolute position i (keys sit at j mod chunk).

    intra (key in the query's chunk): i mod chunk, so the relative distance is the true i - j;
    successive (key in the chunk just before): min(chunk + i mod chunk, chunk + local_window - 1),
    true distances for the first local_window queries of a chunk, capped after;
    inter (any earlier chunk): chunk + local_window - 1, the largest position ever used.
    No relative distance ever exceeds chunk + local_window - 1: the model never sees a position it
    was not trained on, however long the sequence."""
    inner = q_positions % chunk
    top = chunk + local_window - 1
    return inner, (inner + chunk).clamp(max=top), torch.full_like(inner, top)


def dual_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                         k_positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunk: int,
                         local_window: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DCA scores: q unrotated (B, H, Tq, d), k already rotated at (position mod chunk); positions
    (Tq,) and (Tk,), or (B, 1, Tq) for queries whose rows sit at different positions.

    Each query is rotated three ways (`dca_query_positions`) and each query-key pair takes the
    score of its relation; then one causal (and document) masked softmax over all keys."""
    H = q.shape[1]
    k = k.repeat_interleave(H // k.shape[1], dim=1).float()
    v = v.repeat_interleave(H // v.shape[1], dim=1).float()
    intra, succ, inter = (apply_rope(q, cos[p], sin[p]).float() @ k.transpose(-1, -2)
                          for p in dca_query_positions(q_positions, chunk, local_window))
    gap = q_positions[..., :, None] // chunk - k_positions[..., None, :] // chunk
    scores = torch.where(gap == 0, intra, torch.where(gap == 1, succ, inter)) * q.shape[-1] ** -0.5
    allowed = q_positions[..., :, None] >= k_positions[..., None, :]
    if mask is not None:
        allowed = allowed & mask
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).type_as(q)


# --------------------------------------------------------------------------------------------
# KV caches and their sizes
# --------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of every cached layer, (n_layers, B, n_kv_heads, max_len, head_dim).

    Only n_kv_heads heads are stored: that is the whole point of MQA/GQA at inference. MLA stores
    its latent in the key slot and its shared RoPE key in the value slot (one "head", value_dim =
    the RoPE width). `layers` lists the layers that own a slot when some layers need none (linear
    attention keeps a fixed-size state per layer in `states` instead). `spans` gives layers that
    see at most `span` tokens (a sliding window, or a chunk) a buffer of their last span - 1 keys
    instead of a slot: Gemma 3's and Llama 4's local layers then cache a constant amount, whatever
    the length, which is why those models interleave them."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, value_dim: int | None = None,
                 layers: list[int] | None = None, spans: dict[int, int] | None = None):
        spans = spans or {}
        layers = [i for i in (range(n_layers) if layers is None else layers) if i not in spans]
        self.slot = {layer: i for i, layer in enumerate(layers)}
        shape = (len(self.slot), batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape[:-1] + (value_dim or head_dim,), dtype=dtype, device=device)
        # right-aligned: the newest key last, the last min(pos, span - 1) positions valid
        self.recent = {layer: (torch.zeros(shape[1:3] + (span - 1, head_dim), dtype=dtype, device=device),
                               torch.zeros(shape[1:3] + (span - 1, value_dim or head_dim), dtype=dtype, device=device))
                       for layer, span in spans.items()}
        self.states: dict[int, torch.Tensor] = {}
        self.pos = 0  # tokens already stored; advanced by the model after every layer has written

    def reserve(self, n_new: int) -> int:
        """Make room for n_new tokens; returns the slot (= RoPE position) of the first one."""
        if self.pos + n_new > self.k.shape[3]:
            raise ValueError(f"KV cache full: {self.pos} + {n_new} tokens exceed its {self.k.shape[3]} slots")
        return self.pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's keys and values; return every key and value its queries may see, the
        latest ones, ending with the new (all of them from position 0 for a layer with a slot)."""
        if layer in self.recent:
            return self._update_recent(layer, k, v)
        T, i = k.shape[2], self.slot[layer]
        if self.pos + T > self.k.shape[3]:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens exceed its {self.k.shape[3]} slots")
        self.k[i, :, :, self.pos:self.pos + T] = k
        self.v[i, :, :, self.pos:self.pos + T] = v
        return self.k[i, :, :, :self.pos + T], self.v[i, :, :, :self.pos + T]

    def _update_recent(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept_k, kept_v = self.recent[layer]
        keep = kept_k.shape[2]
        n_prev = min(self.pos, keep)
        k_all = torch.cat([kept_k[:, :, keep - n_prev:], k], dim=2)
        v_all = torch.cat([kept_v[:, :, keep - n_prev:], v], dim=2)
        n_new = min(keep, k_all.shape[2])  # the latest span - 1 positions are what the next tokens need
        if n_new:
            kept_k[:, :, keep - n_new:] = k_all[:, :, k_all.shape[2] - n_new:]
            kept_v[:, :, keep - n_new:] = v_all[:, :, v_all.shape[2] - n_new:]
        return k_all, v_all

    def nbytes(self) -> int:
        buffers = [t for pair in self.recent.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in [self.k, self.v, *buffers, *self.states.values()])


class StreamingKVCache(KVCache):
    """StreamingLLM (Xiao et al. 2023): a bounded cache of the first n_sink tokens plus the last
    `window` tokens. Generation runs forever in fixed memory: when full, the oldest non-sink
    tokens are evicted. Keys are stored before RoPE and rotated by their slot in the cache when
    read, so positions never exceed n_sink + window (the paper's rule); the first tokens stay
    because softmax parks attention on them, and evicting them breaks the model."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, n_sink: int, window: int, rope_cos: torch.Tensor,
                 rope_sin: torch.Tensor, layers: list[int] | None = None):
        super().__init__(n_layers, batch_size, n_kv_heads, n_sink + window, head_dim, dtype, device, layers=layers)
        self.n_sink, self.window = n_sink, window
        self.rope_cos, self.rope_sin = rope_cos, rope_sin

    def reserve(self, n_new: int) -> int:
        excess = self.pos + n_new - self.k.shape[3]
        if excess > 0:
            if n_new > self.window:
                raise ValueError(f"streaming cache: feed at most window={self.window} tokens at a time once full")
            keep = slice(self.n_sink + excess, self.pos)
            self.k[:, :, :, self.n_sink:self.pos - excess] = self.k[:, :, :, keep].clone()
            self.v[:, :, :, self.n_sink:self.pos - excess] = self.v[:, :, :, keep].clone()
            self.pos -= excess
        return self.pos


class StaticKVCache:
    """The cache of fast generation (generate.py): every tensor allocated once, every position a tensor.

    Each row sits at its own position (`lengths`: the tokens a row has stored, which is where its
    next token goes), so prompts of different lengths share one batch, right-padded: a padding
    token's key is overwritten or masked before any query could see it. Every attention layer
    keeps a ring of slots, position p in slot p mod n: global layers have n = max_len (they never
    wrap), sliding-window and chunked layers n = their span (KVCache.recent's bound, at a fixed
    shape); MLA stores its latent as the key and its RoPE key as the value; linear-attention layers
    a float32 state. The prompt goes in with one prefill forward that attends with the training
    kernels. After it, every call takes one token per row and attends over the whole ring through
    a boolean mask of the slots it may see (`decode_mask`): a decode step has the same shapes each
    time, so it compiles once, to one CUDA graph (gpt-fast's recipe)."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, key_dim: int, value_dim: int,
                 spans: dict[int, int], linear_layers: list[int], state_shape: tuple[int, int, int],
                 dtype: torch.dtype, device: torch.device | str):
        self.max_len = max_len
        self.k, self.v = {}, {}
        for layer, span in spans.items():  # span 0: a global layer
            n = min(span or max_len, max_len)
            self.k[layer] = torch.zeros(batch_size, n_kv_heads, n, key_dim, dtype=dtype, device=device)
            self.v[layer] = torch.zeros(batch_size, n_kv_heads, n, value_dim, dtype=dtype, device=device)
        self.states = {layer: torch.zeros(batch_size, *state_shape, dtype=torch.float32, device=device)
                       for layer in linear_layers}
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = torch.arange(batch_size, device=device)
        self.decoding = False  # False until the prefill has stored the prompts

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer (a compiled decode step treats them as fixed addresses it may write)."""
        return [*self.k.values(), *self.v.values(), *self.states.values(), self.lengths, self.rows]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k.values(), *self.v.values(), *self.states.values()])

    def reset(self, prompt_lengths: torch.Tensor) -> None:
        """Start a batch: the next forward prefills right-padded prompts of these lengths (B,)."""
        self.lengths.copy_(prompt_lengths)
        for state in self.states.values():
            state.zero_()
        self.decoding = False

    def reserve(self, n_new: int) -> int:
        """The prefill's check: its prompts start at position 0 and must fit."""
        if n_new > self.max_len:
            raise ValueError(f"static KV cache: a prompt of {n_new} tokens exceeds its {self.max_len} slots")
        return 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill: store the last n positions of each row's prompt and return this call's keys and
        values (the prompt attends to itself). Decode: write each row's key at its position's slot
        and return the whole ring."""
        k_ring, v_ring = self.k[layer], self.v[layer]
        n = k_ring.shape[2]
        if not self.decoding:
            slot_pos = ring_positions(self.lengths - 1, n).clamp(min=0)[:, None, :, None]  # empty slots: garbage
            k_ring.copy_(k.gather(2, slot_pos.expand(-1, k.shape[1], -1, k.shape[3])))
            v_ring.copy_(v.gather(2, slot_pos.expand(-1, v.shape[1], -1, v.shape[3])))
            return k, v
        slot = self.lengths % n
        k_ring[self.rows, :, slot] = k[:, :, 0]
        v_ring[self.rows, :, slot] = v[:, :, 0]
        return k_ring, v_ring

    def decode_mask(self, window: int = 0, chunk: int = 0) -> torch.Tensor:
        """(B, 1, 1, n): the slots each row's new token may see in the rings of the layers with this
        window / chunk (both 0: global layers), from `mask_predicate` on the slots' positions."""
        n = min(window or chunk or self.max_len, self.max_len)
        key_pos = ring_positions(self.lengths, n)
        allowed = (key_pos >= 0) & mask_predicate(None, window, chunk)(None, self.lengths[:, None], key_pos)
        return allowed[:, None, None]

    def advance(self) -> None:
        """After a forward has run every layer: the prefill is done, or every row moved one position
        on. A row past its last slot (done, its budget spent) keeps rewriting that slot."""
        if self.decoding:
            self.lengths.add_(1).clamp_(max=self.max_len - 1)
        self.decoding = True


def ring_positions(last: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n): the position held in each of a ring's n slots once positions up to `last` (B,) are
    written (slot j holds the latest p <= last with p mod n = j); negative where none is yet."""
    slots = torch.arange(n, device=last.device)
    return last[:, None] - (last[:, None] - slots) % n


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch_size: int = 1,
                   bytes_per_value: int = 2) -> int:
    """The playbook's KV-cache size: 2 (K and V) * bytes * seq * L * n_kv * d_h (per sequence).

    SmolLM3 (36 layers, 4 KV heads, d_h 128, bf16): 72 KiB per token, 9 GiB at 128k tokens."""
    return 2 * bytes_per_value * seq_len * n_layers * n_kv_heads * head_dim * batch_size


def kv_values_per_token(n_layers: int, head_dim: int, n_kv_heads: int = 0, kv_lora_rank: int = 0,
                        rope_dim: int = 0) -> int:
    """Cached values per token, the playbook's formulas: MHA 2*n_h*L*d_h, GQA 2*g*L*d_h, MQA 2*L*d_h
    (all 2*n_kv*L*d_h), MLA (kv_lora_rank + rope_dim)*L, which is 4.5*L*d_h at DeepSeek's
    kv_lora_rank = 4*d_h and rope_dim = d_h/2: the cache of GQA with 2.25 groups."""
    if kv_lora_rank:
        return n_layers * (kv_lora_rank + rope_dim)
    return 2 * n_layers * n_kv_heads * head_dim


def attention_params(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """Weights of one MHA/GQA/MQA layer, the playbook's 2*h*n_h*d_h + 2*h*n_kv*d_h: Q and O project
    to and from all n_h heads, K and V to the n_kv shared ones (what GQA saves)."""
    return 2 * d_model * n_heads * head_dim + 2 * d_model * n_kv_heads * head_dim


# --------------------------------------------------------------------------------------------
# The attention layers
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head attention with n_kv_heads shared key/value heads (MHA, GQA, MQA), no biases.

    Options, all off by default: use_rope=False (a NoPE layer), qk_norm (RMSNorm of each q and k
    head before RoPE: bounds the logits; OLMo 2, Qwen3), sinks (gpt-oss learned sink logits), window
    / chunk (which mask this layer's kind uses at generation), dca_chunk (Dual Chunk Attention,
    with RoPE tables dca_rope covering dca_chunk + dca_local_window positions)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, backend: str = "sdpa", *,
                 use_rope: bool = True, qk_norm: bool = False, sinks: bool = False, window: int = 0,
                 chunk: int = 0, dca_chunk: int = 0, dca_local_window: int = 0,
                 dca_rope: tuple[torch.Tensor, torch.Tensor] | None = None, norm_eps: float = 1e-6):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.backend = backend
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.use_rope, self.window, self.chunk = use_rope, window, chunk
        self.q_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None
        self.dca_chunk, self.dca_local_window = dca_chunk, dca_local_window
        if dca_chunk:
            self.register_buffer("dca_cos", dca_rope[0], persistent=False)
            self.register_buffer("dca_sin", dca_rope[1], persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None,
                kv_cache: KVCache | StaticKVCache | None = None, layer: int = 0) -> torch.Tensor:
        """cos, sin: (T, rotary_dim / 2), or (B, T, rotary_dim / 2) when rows sit at different positions."""
        B, T, _ = x.shape
        # One matmul for Q, K and V: the K and V projections are thin (n_kv_heads * head_dim
        # columns) and one wide GEMM keeps a GPU busier than three.
        q, k, v = fused_projections(x, [self.q_proj, self.k_proj, self.v_proj])
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = kv_cache.pos if isinstance(kv_cache, KVCache) else None  # a static cache brings a mask
        if self.dca_chunk and self.use_rope:
            y = self._dual_chunk(q.transpose(1, 2), k.transpose(1, 2), v, mask, kv_cache, layer)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        streaming = isinstance(kv_cache, StreamingKVCache)
        if self.use_rope:
            # Rotated while still (B, T, heads, head_dim): the new q and k are then laid out token by
            # token, as the attention kernels read them, and so is their output, which o_proj then
            # reads without a transposing copy (one copy fewer per layer, forward and backward).
            q = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
            k = k if streaming else apply_rope(k, cos.unsqueeze(-2), sin.unsqueeze(-2))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            if streaming and self.use_rope:  # rotate every kept key by its slot in the cache
                k = apply_rope(k, kv_cache.rope_cos[:k.shape[2]], kv_cache.rope_sin[:k.shape[2]])
        y = attend(q, k, v, mask, self.backend, window=self.window, chunk=self.chunk, sinks=self.sinks,
                   q_offset=offset)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _dual_chunk(self, q, k, v, mask, kv_cache, layer):
        if isinstance(kv_cache, StaticKVCache) and kv_cache.decoding:
            q_pos = kv_cache.lengths[:, None, None]  # (B, 1, 1): each row's new token
        else:
            offset = kv_cache.pos if isinstance(kv_cache, KVCache) else 0
            q_pos = offset + torch.arange(q.shape[2], device=q.device)
        key_pos = q_pos % self.dca_chunk
        k = apply_rope(k, self.dca_cos[key_pos], self.dca_sin[key_pos])
        if kv_cache is not None:  # keys are cached already rotated: their DCA position is fixed
            k, v = kv_cache.update(layer, k, v)
            mask = None
        return dual_chunk_attention(q, k, v, q_pos, torch.arange(k.shape[2], device=q.device), self.dca_cos,
                                    self.dca_sin, self.dca_chunk, self.dca_local_window, mask)


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2): keys and values are rebuilt from one compressed latent per token.

    c = RMSNorm(W_dkv x) has kv_lora_rank values; head h's key is [W_uk_h c, RoPE(W_kr x)] (the
    RoPE part is one small key shared by all heads, "decoupled" because RoPE cannot pass through
    the up-projection) and its value is W_uv_h c. The cache holds only c and the RoPE key.

    Naive path (training): expand c into full keys and values, then ordinary attention. Absorbed
    path (generation): q_h . (W_uk_h c) = (W_uk_h^T q_h) . c, so each query is moved into latent
    space once, attention runs as MQA over the cached latents directly, and W_uv_h is applied to
    the attention-weighted latent. Same result, and the cache is never expanded."""

    def __init__(self, d_model: int, n_heads: int, kv_lora_rank: int, rope_dim: int, backend: str = "sdpa", *,
                 use_rope: bool = True, window: int = 0, chunk: int = 0, norm_eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.kv_lora_rank, self.rope_dim, self.backend = kv_lora_rank, rope_dim, backend
        self.use_rope, self.window, self.chunk = use_rope, window, chunk
        self.q_proj = nn.Linear(d_model, n_heads * (self.head_dim + rope_dim), bias=False)
        self.kv_down = nn.Linear(d_model, kv_lora_rank + rope_dim, bias=False)  # W_dkv and W_kr in one matmul
        self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps)
        self.k_up = nn.Linear(kv_lora_rank, n_heads * self.head_dim, bias=False)  # W_uk
        self.v_up = nn.Linear(kv_lora_rank, n_heads * self.head_dim, bias=False)  # W_uv
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None,
                kv_cache: KVCache | StaticKVCache | None = None, layer: int = 0,
                absorbed: bool | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, dn, dr, r = self.n_heads, self.head_dim, self.rope_dim, self.kv_lora_rank
        q_nope, q_rope = self.q_proj(x).view(B, T, H, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)
        latent, k_rope = self.kv_down(x).split([r, dr], dim=-1)
        latent, k_rope = self.kv_norm(latent)[:, None], k_rope[:, None]  # (B, 1, T, .): one "head"
        if self.use_rope:  # laid out (B, heads, T, .): per-row tables (B, T, .) need their head axis
            cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        offset = kv_cache.pos if isinstance(kv_cache, KVCache) else None
        if kv_cache is not None:
            latent, k_rope = kv_cache.update(layer, latent, k_rope)
        scale = (dn + dr) ** -0.5
        limits = dict(window=self.window, chunk=self.chunk, q_offset=offset, scale=scale)
        if kv_cache is not None if absorbed is None else absorbed:
            w_uk = self.k_up.weight.view(H, dn, r)
            w_uv = self.v_up.weight.view(H, dn, r)
            q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
            y_latent = attend(torch.cat([q_latent, q_rope], -1), torch.cat([latent, k_rope], -1), latent,
                              mask, self.backend, **limits)
            y = torch.einsum("bhtr,hdr->bhtd", y_latent, w_uv)
        else:
            S = latent.shape[2]
            k_nope = self.k_up(latent[:, 0]).view(B, S, H, dn).transpose(1, 2)
            v = self.v_up(latent[:, 0]).view(B, S, H, dn).transpose(1, 2)
            k = torch.cat([k_nope, k_rope.expand(B, H, S, dr)], dim=-1)
            y = attend(torch.cat([q_nope, q_rope], -1), k, v, mask, self.backend, **limits)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dn))


# --------------------------------------------------------------------------------------------
# Gated linear attention (for hybrid models)
# --------------------------------------------------------------------------------------------

GLA_MIN_LOG_DECAY = -5.0  # forget at most 1 - e^-5 per step: exp(+-cumsum) over a chunk of <= 16 fits float32


def gla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                  state: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None):
    """Gated linear attention, one step at a time: S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

    q, k, log_decay (B, H, T, dk); v (B, H, T, dv); state (B, H, dk, dv). A new document starts
    from an empty state. Returns (outputs (B, H, T, dv), final state). O(T dk dv): no cache grows."""
    B, H, T, dk = q.shape
    S = q.new_zeros(B, H, dk, v.shape[-1], dtype=torch.float32) if state is None else state.float()
    out = []
    for t in range(T):
        if doc_ids is not None and t > 0:
            S = S * (doc_ids[:, t] == doc_ids[:, t - 1]).reshape(B, 1, 1, 1)
        S = log_decay[:, :, t, :, None].float().exp() * S + k[:, :, t, :, None].float() * v[:, :, t, None, :].float()
        out.append((q[:, :, t, :, None].float() * S).sum(-2))
    return torch.stack(out, dim=2).type_as(v), S


@torch.compiler.disable  # eager inside a compiled block: compiling would unroll the chunk loop
def gla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, chunk: int,
                state: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None):
    """The same outputs and final state as `gla_recurrent`, computed chunk-parallel.

    Within a chunk, with b_t the running sum of log a: token s reaches query t with weight
    exp(b_t - b_s) = exp(b_t) * exp(-b_s), so intra-chunk attention is one masked matmul of
    (q * e^b) and (k * e^-b); the state entering the chunk reaches t through q_t * e^(b_t). Only the
    state is carried from chunk to chunk (a short loop of elementwise updates): O(T C d + T d^2)."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    pad = (-T) % chunk
    doc = torch.zeros(B, T, dtype=torch.long, device=q.device) if doc_ids is None else doc_ids
    if pad:  # padded tokens carry k = v = 0 and no decay: they change nothing
        q, k, v, log_decay = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, log_decay))
        doc = torch.cat([doc, doc[:, -1:].expand(B, pad)], dim=1)
    N = (T + pad) // chunk
    q, k, v, log_decay = (t.float().reshape(B, H, N, chunk, t.shape[-1]) for t in (q, k, v, log_decay))
    doc = doc.reshape(B, 1, N, chunk)
    b = log_decay.cumsum(dim=3)
    q_dec, k_inv = q * b.exp(), k * (-b).exp()
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    same_doc = doc[..., :, None] == doc[..., None, :]
    scores = (q_dec @ k_inv.transpose(-1, -2)).masked_fill(~(causal & same_doc), 0.0)
    out = scores @ v
    # Chunk n's state contribution: tokens of the chunk's last document, decayed to the chunk end.
    last_doc = doc[..., -1:]
    k_to_end = k * (b[..., -1:, :] - b).exp() * (doc == last_doc)[..., None]
    contrib = k_to_end.transpose(-1, -2) @ v  # (B, H, N, dk, dv)
    chunk_decay = b[..., -1, :].exp()  # (B, H, N, dk)
    prev_doc = torch.cat([doc[..., :1, 0], doc[..., :-1, -1]], dim=-1)  # document alive at each chunk's start
    S = q.new_zeros(B, H, dk, dv) if state is None else state.float()
    carries = (last_doc[..., 0] == prev_doc).reshape(B, 1, N, 1, 1)  # the state survives chunk n
    entering, S = _gla_state_scan(S, chunk_decay, contrib, carries)
    continues = (doc == prev_doc[..., None])[..., None]
    out = out + (q_dec @ entering) * continues
    return out.reshape(B, H, N * chunk, dv)[:, :, :T].contiguous().type_as(v), S


def _gla_state_scan(S: torch.Tensor, chunk_decay: torch.Tensor, contrib: torch.Tensor,
                    carries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering each chunk (B, H, N, dk, dv), and the final state."""
    states = []
    for n in range(contrib.shape[2]):
        states.append(S)
        S = chunk_decay[:, :, n, :, None] * S * carries[:, :, n] + contrib[:, :, n]
    return torch.stack(states, dim=2), S


class GatedLinearAttention(nn.Module):
    """A gated linear attention layer (GLA, Yang et al. 2023) for hybrid models.

    Per head, a dk x dv state forgets with a data-dependent per-channel gate
    a_t = sigmoid(W_a x)^(1/16) and accumulates k_t v_t^T; the output reads it with q_t, then a
    per-head RMSNorm and a SiLU output gate. Training runs the chunked form; generation keeps one
    state per layer (constant memory at any length) and runs the recurrent form."""

    def __init__(self, d_model: int, n_heads: int, chunk_size: int = 16, norm_eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.head_dim, self.chunk_size = n_heads, d_model // n_heads, chunk_size
        inner = n_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.gate_proj = nn.Linear(d_model, inner, bias=False)  # the forget gate, per key channel
        self.out_gate = nn.Linear(d_model, inner, bias=False)
        self.norm = RMSNorm(self.head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos=None, sin=None, mask=None, kv_cache: KVCache | StaticKVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """`mask` is the batch's doc_ids here (or None): a linear layer has no attention matrix."""
        B, T, _ = x.shape
        heads = lambda t: t.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2).contiguous()  # noqa: E731
        q = heads(self.q_proj(x)) * self.head_dim ** -0.5
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        log_decay = (F.logsigmoid(heads(self.gate_proj(x)).float()) / 16).clamp(min=GLA_MIN_LOG_DECAY)
        if kv_cache is not None:
            state = kv_cache.states[layer]
            if T == 1:
                y, new_state = gla_recurrent(q, k, v, log_decay, state)
            else:
                if isinstance(kv_cache, StaticKVCache):  # right-padded prompts: padding gets k = v = 0, no decay
                    real = (torch.arange(T, device=x.device) < kv_cache.lengths[:, None])[:, None, :, None]
                    k, v, log_decay = k * real, v * real, log_decay * real
                y, new_state = gla_chunked(q, k, v, log_decay, self.chunk_size, state)
            state.copy_(new_state)
        else:
            y, _ = gla_chunked(q, k, v, log_decay, self.chunk_size, doc_ids=mask)
        y = self.norm(y) * F.silu(heads(self.out_gate(x)))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
