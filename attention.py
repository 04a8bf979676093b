"""Attention: rotary positions, grouped-query attention, document masks, and a KV cache.

What a reader finds here, each piece the playbook's:

- RoPE with a configurable base. The playbook keeps base 10k-50k at 2-4k context and raises it
  ("ABF") for long-context stages (SmolLM3: 50k -> 2M -> 5M). Rotating q and k by their absolute
  positions makes q.k depend only on the offset between them.
- Causal self-attention with `n_kv_heads` key/value heads shared by groups of query heads: MHA when
  n_kv_heads == n_heads, MQA when it is 1, GQA in between. The playbook found GQA with ratios 2-8
  as good as MHA at a fraction of the KV cache; SmolLM3 uses 4 KV heads.
- Intra-document masking: `doc_ids` number the documents packed into a window, and a token may only
  attend to earlier tokens of its own document. Neutral at short context, needed for long context.
- Two back ends computing the same thing: PyTorch SDPA with an explicit boolean mask (works
  everywhere), and flex_attention with a BlockMask that skips fully-masked tiles (the GPU path).
- A KV cache for generation, and the playbook's cache-size formula to check it against.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    HAS_FLEX = True
except ImportError:  # torch < 2.5
    HAS_FLEX = False

# flex_attention runs eagerly on CPU (slow but exact) and warns each time it does; the CPU path is
# only for tests and tiny runs, so the warning is noise there.
warnings.filterwarnings("ignore", message=".*flex_attention.*compile.*")

BACKENDS = ("sdpa", "flex")

# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------


def rope_frequencies(head_dim: int, max_seq_len: int, base: float,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim // 2) for RoPE with the given base.

    Pair i of a head rotates with angular frequency base^(-2i/head_dim): a larger base stretches
    the slowest wavelengths, which is why raising it (ABF) helps at longer contexts."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, H, T, head_dim) by position; cos/sin are (T, head_dim // 2).

    The "rotate half" layout (first half of the head paired with the second half) is the Hugging
    Face Llama convention, so real Llama-family weights load without permuting q and k."""
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


def flex_block_mask(doc_ids: torch.Tensor | None, batch_size: int, seq_len: int,
                    device: torch.device) -> "BlockMask":
    """flex_attention's BlockMask for causal attention, within documents when doc_ids is given.

    The mask is described by a function of (batch, head, q_idx, kv_idx); flex evaluates it per
    tile and skips tiles that are fully masked, so packed short documents cost less, not more."""
    if not HAS_FLEX:
        raise RuntimeError("model.attn_backend='flex' needs torch >= 2.5; upgrade torch or use 'sdpa'")
    if doc_ids is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        return _create_block_mask(device)(mask_mod, None, None, seq_len, seq_len, device=device)

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
                         device: torch.device):
    """The mask object one forward pass shares across layers: None means plain causal (SDPA's
    fused is_causal path), a boolean tensor for SDPA with documents, a BlockMask for flex."""
    if backend == "flex":
        return flex_block_mask(doc_ids, batch_size, seq_len, device)
    return None if doc_ids is None else document_causal_mask(doc_ids)


_compiled_flex = None


def _flex(q, k, v, block_mask):
    # flex_attention is only fast when compiled (it then generates a fused Triton kernel); on CPU
    # the eager version is an exact reference, which is what the tests compare against SDPA.
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of every layer, (n_layers, B, n_kv_heads, max_len, head_dim).

    Only n_kv_heads heads are stored: that is the whole point of MQA/GQA at inference."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0  # tokens already stored; advanced by the model after every layer has written

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if self.pos + T > self.k.shape[3]:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens exceed its {self.k.shape[3]} slots")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch_size: int = 1,
                   bytes_per_value: int = 2) -> int:
    """The playbook's KV-cache size: 2 (K and V) * bytes * seq * L * n_kv * d_h (per sequence).

    SmolLM3 (36 layers, 4 KV heads, d_h 128, bf16): 72 KiB per token, 9 GiB at 128k tokens."""
    return 2 * bytes_per_value * seq_len * n_layers * n_kv_heads * head_dim * batch_size


# --------------------------------------------------------------------------------------------
# The attention layer
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head attention with n_kv_heads shared key/value heads (MHA, GQA, MQA), no biases."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, backend: str = "sdpa"):
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        # One matmul for Q, K and V (weights concatenated): the K and V projections are thin
        # (n_kv_heads * head_dim columns) and one wide GEMM keeps a GPU busier than three.
        w_qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        q, k, v = F.linear(x, w_qkv).split([self.q_proj.out_features, self.k_proj.out_features,
                                            self.v_proj.out_features], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if kv_cache is not None:
            offset = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)
            # Generation always uses SDPA: a query block at `offset` sees every cached key up to
            # its own position (generation works on one document at a time).
            if T == 1:
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:
                allowed = torch.arange(k.shape[2], device=x.device)[None, :] <= \
                    (offset + torch.arange(T, device=x.device))[:, None]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        elif self.backend == "flex":
            y = _flex(q, k, v, mask)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
