"""The model: a Llama-style decoder, its parameter and FLOP formulas, and generation.

This is the dense baseline the playbook ablates against (and SmolLM3's architecture before its
changes): pre-norm blocks of RMSNorm -> attention -> RMSNorm -> SwiGLU MLP, no biases, RoPE,
grouped-query attention, optional tied input/output embeddings, truncated-normal init, and an
optional z-loss. `count_params` is the playbook's parameter formula and `flops_per_token` feeds
the MFU that train.py logs, sitting next to the model it measures, as in nanoGPT.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from attention import (BACKENDS, CausalSelfAttention, GatedLinearAttention, KVCache, MultiHeadLatentAttention,
                       StaticKVCache, StreamingKVCache, attention_params, build_attention_mask, rope_frequencies,
                       rope_layers)
from blocks import RMSNorm, SwiGLU
from fp8 import FP8_RECIPES, convert_to_fp8
from moe import MoE, MoEShape, add_router_losses


@dataclass
class ModelConfig:
    vocab_size: int = 4096        # token ids; a multiple of 128 keeps the embedding matmuls efficient
    d_model: int = 256            # the residual stream width h
    n_layers: int = 4             # transformer blocks
    n_heads: int = 8              # query heads; head_dim = d_model / n_heads
    n_kv_heads: int = 4       # n_heads: MHA, 1: MQA, in between: GQA (SmolLM3: 4)
    d_ff: int = 768           # SwiGLU hidden width (three matrices of d_model x d_ff)
    max_seq_len: int = 512        # longest sequence: the RoPE tables and the KV cache are this long
    rope_base: float = 10_000.0   # RoPE base frequency (SmolLM3: 50k, raised to 2M and 5M for long context)
    tie_embeddings: bool = True   # the playbook kept tied embeddings for its 1-3B models
    init_std: float = 0.02        # std of the truncated-normal init of every matrix
    norm_eps: float = 1e-6        # SmolLM3's RMSNorm eps
    z_loss_coef: float = 0.0      # lambda in lambda * log^2(Z); 1e-5 where used, off in SmolLM3
    attn_backend: str = "sdpa"    # "sdpa" (everywhere) or "flex" (flex_attention, the GPU path)
    # Attention and position variants (attention.py); every default leaves the model above unchanged.
    rope_fraction: float = 1.0    # partial RoPE: share of each head's dims that rotate (GLM-4.5: 0.5)
    nope_every: int = 0           # RNoPE: no RoPE on layers k-1, 2k-1, ... (SmolLM3: 4); 1 = NoPE; 0 = off
    yarn_factor: float = 1.0      # YaRN context extension factor (1 = plain RoPE)
    yarn_original_seq_len: int = 0  # context the RoPE was trained at; 0 = max_seq_len / yarn_factor
    sliding_window: int = 0       # S layers see their last W tokens (self included); 0 = off
    attn_chunk_size: int = 0      # C layers attend within aligned chunks of this size (Llama 4); 0 = off
    layer_pattern: str = ""       # a letter per layer: G global, S sliding, C chunked, L linear (GLA);
                                  # "" = every layer G, or S / C when sliding_window / attn_chunk_size is set
    attn_sinks: bool = False      # gpt-oss learned per-head sink logits
    qk_norm: bool = False         # RMSNorm on each q and k head before RoPE
    attn_type: str = "gqa"        # "gqa" (MHA/GQA/MQA by n_kv_heads) or "mla" (DeepSeek latent attention)
    kv_lora_rank: int = 0         # MLA latent width; 0 = 4 * head_dim (DeepSeek-V2's ratio)
    mla_rope_dim: int = 0         # MLA decoupled RoPE key width; 0 = head_dim / 2
    dca_chunk_size: int = 0       # Dual Chunk Attention chunk (training-free extension); 0 = off
    dca_local_window: int = 0     # DCA: exact relative positions kept across a chunk boundary
    gla_chunk_size: int = 16      # chunk length of gated linear attention's parallel form
    # Mixture of experts (moe.py): off by default; on, every layer from moe_dense_layers on has a MoE MLP.
    moe: bool = False                 # a MoE MLP (router + experts) instead of the dense one
    moe_experts: int = 8              # routed experts per MoE layer
    moe_top_k: int = 2                # routed experts per token
    moe_d_expert: int = 0             # each expert's hidden width; 0 = d_ff. Granularity G = 2*d_model/d_expert
    moe_shared_experts: int = 0       # always-active experts of width d_expert (DeepSeek-V3, Kimi K2: 1)
    moe_dense_layers: int = 0         # the first layers keep the dense MLP (DeepSeek-V3: 3)
    moe_score: str = "softmax"        # "softmax" (Mixtral, Qwen3, OLMoE) or "sigmoid" (DeepSeek-V3)
    moe_renormalize: bool = True      # rescale the k chosen weights to sum to 1 (OLMoE: no; top-1: never)
    moe_balance_coef: float = 0.01    # alpha in alpha * sum_i f_i * P_i
    moe_balance_stats: str = "global"  # f, P over the global batch (all micro-batches, ranks) or "local"
    moe_router_z_coef: float = 0.0    # router z-loss coefficient (ST-MoE: 1e-3)
    moe_bias_rate: float = 0.0        # gamma of aux-loss-free bias balancing (DeepSeek-V3: 0.001)
    moe_impl: str = "grouped"         # "grouped" (sorted tokens, grouped GEMM) or "reference" (loop)
    # FP8 training (fp8.py): the blocks' linear layers multiply in FP8 while training; off by default.
    fp8: str = "off"                  # off | tensorwise (one scale per tensor) | rowwise (per token and feature)
    fp8_skip_first_last: bool = True  # keep the first and last blocks in bf16 (the head is never FP8)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            valid = [k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                             f"{self.n_kv_heads}; valid n_kv_heads: {valid}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"model.attn_backend={self.attn_backend!r} is not one of {BACKENDS}")
        if self.rope_base <= 1 or self.init_std <= 0 or self.norm_eps <= 0 or self.z_loss_coef < 0:
            raise ValueError("model.rope_base must be > 1, init_std and norm_eps > 0, z_loss_coef >= 0")
        self._check_attention_variants()
        if self.attn_backend == "flex" and self.head_dim < 16:
            raise ValueError(f"model.attn_backend='flex' needs head_dim >= 16 (its GPU kernel's minimum), "
                             f"got d_model / n_heads = {self.head_dim}; use fewer heads or 'sdpa'")

        if self.moe:
            self._check_moe()
        if self.fp8 not in FP8_RECIPES:
            raise ValueError(f"model.fp8={self.fp8!r} is not one of {FP8_RECIPES}")
        if self.fp8 != "off" and self.fp8_skip_first_last and self.n_layers < 3:
            raise ValueError(f"model.fp8={self.fp8!r} with model.fp8_skip_first_last leaves none of the "
                             f"{self.n_layers} blocks in FP8; set model.fp8_skip_first_last=false")

    def _check_moe(self):
        if self.moe_experts < 1:
            raise ValueError(f"model.moe_experts={self.moe_experts}: a MoE layer needs at least 1 expert "
                             f"(or set model.moe=false for a dense model)")
        if not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(f"model.moe_top_k={self.moe_top_k} must be between 1 and model.moe_experts="
                             f"{self.moe_experts}")
        if not 0 <= self.moe_dense_layers < self.n_layers:
            raise ValueError(f"model.moe_dense_layers={self.moe_dense_layers} must be in [0, n_layers="
                             f"{self.n_layers}) so that at least one layer is MoE")
        if self.moe_d_expert < 0 or self.moe_shared_experts < 0:
            raise ValueError("model.moe_d_expert (0 = d_ff) and model.moe_shared_experts must be >= 0")
        for key, value, valid in (("moe_score", self.moe_score, ("softmax", "sigmoid")),
                                  ("moe_balance_stats", self.moe_balance_stats, ("global", "local")),
                                  ("moe_impl", self.moe_impl, ("grouped", "reference"))):
            if value not in valid:
                raise ValueError(f"model.{key}={value!r} is not one of {valid}")
        if min(self.moe_balance_coef, self.moe_router_z_coef, self.moe_bias_rate) < 0:
            raise ValueError("model.moe_balance_coef, moe_router_z_coef and moe_bias_rate must be >= 0")

    def _check_attention_variants(self) -> None:
        """Invalid attention/position combinations stop here, one line each, before any work."""
        if not 0 < self.rope_fraction <= 1:
            raise ValueError(f"model.rope_fraction={self.rope_fraction} must be in (0, 1] (1 = full RoPE)")
        if self.yarn_factor < 1:
            raise ValueError(f"model.yarn_factor={self.yarn_factor} must be >= 1 (1 = plain RoPE, 2 = twice the "
                             f"context)")
        for name in ("nope_every", "yarn_original_seq_len", "sliding_window", "attn_chunk_size", "kv_lora_rank",
                     "mla_rope_dim", "dca_chunk_size", "dca_local_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0 (0 = off/default)")
        if not 1 <= self.gla_chunk_size <= 16:
            # the chunked form multiplies by exp(+-cumulative log decay) over a chunk; with decays
            # down to GLA_MIN_LOG_DECAY = -5 per step, 16 steps (e^80) is what float32 holds
            raise ValueError(f"model.gla_chunk_size={self.gla_chunk_size} must be in [1, 16] (longer chunks "
                             f"overflow float32 in the chunked form)")
        if self.dca_local_window and not self.dca_chunk_size:
            raise ValueError("model.dca_local_window is set but model.dca_chunk_size is 0 (DCA off); set both")
        if self.yarn_original_seq_len and self.yarn_factor == 1:
            raise ValueError("model.yarn_original_seq_len is set but model.yarn_factor is 1 (YaRN off); "
                             "set the factor too, or drop the length")
        if self.nope_every > self.n_layers:
            raise ValueError(f"model.nope_every={self.nope_every} is above model.n_layers={self.n_layers}: no "
                             f"layer would drop RoPE (SmolLM3 uses 4)")
        if self.attn_type not in ("gqa", "mla"):
            raise ValueError(f"model.attn_type={self.attn_type!r} is not one of ('gqa', 'mla')")
        bad = set(self.layer_pattern) - set("GSCL")
        if bad:
            raise ValueError(f"model.layer_pattern={self.layer_pattern!r} has letters {sorted(bad)}; use G (global), "
                             f"S (sliding window), C (chunked), L (linear attention)")
        if self.layer_pattern and len(self.layer_pattern) != self.n_layers:
            raise ValueError(f"model.layer_pattern={self.layer_pattern!r} has {len(self.layer_pattern)} letters but "
                             f"model.n_layers={self.n_layers}; give one letter per layer")
        if not self.layer_pattern and self.sliding_window and self.attn_chunk_size:
            raise ValueError("model.sliding_window and model.attn_chunk_size are both set; say which layers use "
                             "which with model.layer_pattern (e.g. 'SSSC')")
        kinds = self.layer_kinds()
        if "S" in kinds and self.sliding_window < 1:
            raise ValueError("model.layer_pattern has S layers but model.sliding_window is below 1; "
                             "set the window size")
        if "C" in kinds and self.attn_chunk_size < 1:
            raise ValueError("model.layer_pattern has C layers but model.attn_chunk_size is below 1; "
                             "set the chunk size")
        if self.sliding_window and "S" not in kinds:
            raise ValueError(f"model.sliding_window={self.sliding_window} but no S layer in model.layer_pattern")
        if self.attn_chunk_size and "C" not in kinds:
            raise ValueError(f"model.attn_chunk_size={self.attn_chunk_size} but no C layer in model.layer_pattern")
        if self.attn_type == "mla":
            rope_dim, rank = self.mla_dims
            if rope_dim % 2 or not 2 <= rope_dim <= self.head_dim:
                raise ValueError(f"model.mla_rope_dim={rope_dim} must be even and within [2, head_dim={self.head_dim}]")
            if rank + rope_dim > 2 * self.n_heads * self.head_dim:
                raise ValueError(f"model.kv_lora_rank + mla_rope_dim = {rank + rope_dim} is above 2 * n_heads * "
                                 f"head_dim = {2 * self.n_heads * self.head_dim}: MLA's cache would be larger "
                                 f"than MHA's")
            if self.rope_fraction != 1 or self.qk_norm or self.attn_sinks or self.dca_chunk_size:
                raise ValueError("model.attn_type='mla' has its own decoupled RoPE key and latent norm; leave "
                                 "rope_fraction at 1 and qk_norm, attn_sinks, dca_chunk_size off")
            if self.yarn_factor != 1:
                raise ValueError("model.yarn_factor with model.attn_type='mla' is not supported: YaRN's temperature "
                                 "rides on the RoPE tables here, which MLA applies to its small RoPE key only "
                                 "(DeepSeek-V2 scales the whole softmax instead)")
        if self.dca_chunk_size:
            if self.attn_backend != "sdpa":
                raise ValueError("model.dca_chunk_size needs model.attn_backend='sdpa' (DCA picks one of three "
                                 "scores per query-key pair, which flex's BlockMask cannot express)")
            if self.sliding_window or self.attn_chunk_size or self.attn_sinks or self.yarn_factor != 1:
                raise ValueError("model.dca_chunk_size cannot be combined with sliding_window, attn_chunk_size, "
                                 "attn_sinks or yarn_factor (DCA and YaRN are two ways to extend the context)")
            if self.dca_chunk_size + self.dca_local_window > self.max_seq_len:
                raise ValueError(f"model.dca_chunk_size + dca_local_window = "
                                 f"{self.dca_chunk_size + self.dca_local_window} exceeds model.max_seq_len="
                                 f"{self.max_seq_len}")

    def layer_kinds(self) -> str:
        """One letter per layer: G global attention, S sliding window, C chunked, L linear attention."""
        if self.layer_pattern:
            return self.layer_pattern
        return ("S" if self.sliding_window else "C" if self.attn_chunk_size else "G") * self.n_layers

    @property
    def mla_dims(self) -> tuple[int, int]:
        """(RoPE key width, latent width) of MLA, defaults resolved: (head_dim / 2, 4 * head_dim)."""
        return self.mla_rope_dim or self.head_dim // 2, self.kv_lora_rank or 4 * self.head_dim

    @property
    def rope_head_dim(self) -> int:
        """Width of the vectors RoPE rotates: a head, or MLA's decoupled RoPE key."""
        return self.mla_dims[0] if self.attn_type == "mla" else self.head_dim

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def count_params(cfg: ModelConfig) -> int:
    """The playbook's formula: N = V*h*(1 tied / 2 untied) + L*(2*h*n_h*d_h + 2*h*n_kv*d_h + 3*h*d_ff + 2h) + h.

    Per layer: Q and O projections, K and V projections, the three SwiGLU matrices, two norms; then
    the final norm. The 1B ablation model (h 2048, 16 layers, 32 heads, d_ff 8192, 128k vocab,
    tied): 1.21B with MQA, 1.22B with 4 KV heads, 1.24B with 8."""
    h = cfg.d_model
    per_layer = attention_params(h, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) + 3 * h * cfg.d_ff + 2 * h
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * per_layer + h + attention_variant_params(cfg) + moe_params_delta(cfg)


def moe_shape(cfg: ModelConfig) -> MoEShape:
    """The MoE calculator's view of a config (moe.MoEShape: total and active parameter counts)."""
    return MoEShape("config", cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                    cfg.moe_experts, cfg.moe_top_k, cfg.moe_d_expert or cfg.d_ff, cfg.moe_shared_experts,
                    cfg.moe_dense_layers, cfg.d_ff, cfg.tie_embeddings)


def moe_params_delta(cfg: ModelConfig, active: bool = False) -> int:
    """What the MoE layers add to the dense count: router + experts (all, or the top-k and shared
    ones a token visits) instead of the dense MLP; 0 for a dense model."""
    if not cfg.moe:
        return 0
    shape = moe_shape(cfg)
    return shape.n_moe_layers * (shape.moe_mlp_params(active) - 3 * cfg.d_model * cfg.d_ff)


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses: count_params minus the routed experts it does not visit."""
    return count_params(cfg) - moe_params_delta(cfg) + moe_params_delta(cfg, active=True)


def _attention_matmul_params(cfg: ModelConfig, kind: str) -> int:
    """Weights of one layer's attention (or linear attention) matrices."""
    h, n_h, d_h = cfg.d_model, cfg.n_heads, cfg.head_dim
    if kind == "L":  # q, k, v, forget gate, output gate, output
        return 6 * h * n_h * d_h
    if cfg.attn_type == "mla":  # q (nope + rope), down to latent + RoPE key, up to K and V, output
        rope_dim, rank = cfg.mla_dims
        return h * n_h * (d_h + rope_dim) + h * (rank + rope_dim) + 2 * rank * n_h * d_h + n_h * d_h * h
    return attention_params(h, n_h, cfg.n_kv_heads, d_h)


def attention_variant_params(cfg: ModelConfig) -> int:
    """What the attention variants add to (or remove from) the plain formula above; 0 by default.

    MLA: its matrices instead of Q/K/V/O, plus the latent's norm weights; linear layers: six
    matrices and a per-head norm; QK-norm: two d_h weight vectors per layer; sinks: one per head."""
    plain = attention_params(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    extra = 0
    for kind in cfg.layer_kinds():
        extra += _attention_matmul_params(cfg, kind) - plain
        if kind == "L":
            extra += cfg.head_dim
        else:
            extra += (cfg.mla_dims[1] if cfg.attn_type == "mla" else 0) + 2 * cfg.head_dim * cfg.qk_norm \
                + cfg.n_heads * cfg.attn_sinks
    return extra


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * matmul params + 12 * L * n_h * d_h * T.

    The first term is the 6N rule over every weight a token is multiplied by (the output head
    included, embeddings lookups excluded); the second is attention's QK^T and AV, counted over the
    full T x T square as PaLM's MFU definition does, so figures compare across codebases."""
    h = cfg.d_model
    matmul_per_layer = attention_params(h, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) + 3 * h * cfg.d_ff
    # a MoE token meets the router, its top-k experts and the shared ones: active weights only
    n_matmul = cfg.n_layers * matmul_per_layer + cfg.vocab_size * h + moe_params_delta(cfg, active=True)
    return (6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
            + attention_variant_flops(cfg, seq_len))


def attention_variant_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token that the attention variants add to flops_per_token; 0 by default.

    Matmul weights change as in attention_variant_params. The score term 12 * n_h * d_h * T is
    6 * n_h * T * (qk width + v width): MLA's qk width is d_h + rope_dim; a linear-attention layer
    writes and reads a d_h x d_h state instead of T keys, so T becomes d_h there."""
    h, n_h, d_h = cfg.d_model, cfg.n_heads, cfg.head_dim
    plain_matmul = attention_params(h, n_h, cfg.n_kv_heads, d_h)
    plain_scores = 12 * n_h * d_h * seq_len
    extra = 0
    for kind in cfg.layer_kinds():
        extra += 6 * (_attention_matmul_params(cfg, kind) - plain_matmul)
        if kind == "L":
            extra += 12 * n_h * d_h * d_h - plain_scores
        elif cfg.attn_type == "mla":
            extra += 6 * n_h * seq_len * cfg.mla_dims[0]
    return extra


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = make_attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = make_mlp(cfg, layer)

    def forward(self, x, cos, sin, mask=None, kv_cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, self.layer)
        return x + self.mlp(self.mlp_norm(x))


def make_mlp(cfg: ModelConfig, layer: int = 0) -> nn.Module:
    """The MLP of one layer: SwiGLU, or from moe_dense_layers on in a MoE model, router + experts."""
    if not (cfg.moe and layer >= cfg.moe_dense_layers):
        return SwiGLU(cfg.d_model, cfg.d_ff)
    return MoE(cfg.d_model, cfg.moe_experts, cfg.moe_top_k, cfg.moe_d_expert or cfg.d_ff, cfg.moe_shared_experts,
               cfg.moe_score, cfg.moe_renormalize, cfg.moe_balance_stats, cfg.moe_bias_rate, cfg.moe_impl, layer)


def make_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """The attention module of one layer, from its kind (cfg.layer_kinds()) and the variant fields."""
    kind = cfg.layer_kinds()[layer]
    if kind == "L":
        return GatedLinearAttention(cfg.d_model, cfg.n_heads, cfg.gla_chunk_size, cfg.norm_eps)
    use_rope = rope_layers(cfg.n_layers, cfg.nope_every)[layer]
    window = cfg.sliding_window if kind == "S" else 0
    chunk = cfg.attn_chunk_size if kind == "C" else 0
    if cfg.attn_type == "mla":
        rope_dim, rank = cfg.mla_dims
        return MultiHeadLatentAttention(cfg.d_model, cfg.n_heads, rank, rope_dim, cfg.attn_backend,
                                        use_rope=use_rope, window=window, chunk=chunk, norm_eps=cfg.norm_eps)
    dca_rope = None
    if cfg.dca_chunk_size:
        dca_rope = rope_frequencies(cfg.head_dim, cfg.dca_chunk_size + cfg.dca_local_window, cfg.rope_base,
                                    fraction=cfg.rope_fraction)
    return CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.attn_backend, use_rope=use_rope,
                               qk_norm=cfg.qk_norm, sinks=cfg.attn_sinks, window=window, chunk=chunk,
                               dca_chunk=cfg.dca_chunk_size, dca_local_window=cfg.dca_local_window,
                               dca_rope=dca_rope, norm_eps=cfg.norm_eps)


def describe_layers(cfg: ModelConfig) -> str:
    """One token per layer, e.g. 'G G G G/nope': the layer pattern as the model summary shows it."""
    rope = rope_layers(cfg.n_layers, cfg.nope_every)
    return " ".join(kind + ("" if kind == "L" or rope[i] else "/nope") for i, kind in enumerate(cfg.layer_kinds()))


def cross_entropy_with_z_loss(logits: torch.Tensor, targets: torch.Tensor,
                              z_loss_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy over targets != -100, plus z_loss_coef * mean(log(Z)^2).

    log Z is the log-partition (logsumexp of the logits); the z-loss keeps it near 0 so the softmax
    does not drift into large logits (PaLM). Both parts are returned for logging."""
    logits = logits.float().view(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    valid = targets != -100
    n = valid.sum().clamp(min=1)
    log_z = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    ce = ((log_z - target_logit) * valid).sum() / n
    z_loss = (log_z.pow(2) * valid).sum() / n
    loss = ce + z_loss_coef * z_loss if z_loss_coef > 0 else ce
    return loss, {"ce": ce.detach(), "z_loss": z_loss.detach()}


LOSS_CHUNK_TOKENS = 16384  # rows of logits alive at once in the fused loss (16k x 128k bf16 = 4 GiB)


def _loss_and_logit_grads(logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor,
                          z_loss_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one chunk of rows: sum of row_weight * CE, sum of row_weight * log(Z)^2, and the gradient
    of (CE + z * log(Z)^2) weighted by row, with respect to the logits.

    d(CE)/d(logits) = softmax - onehot(target) and d(log(Z)^2)/d(logits) = 2 log(Z) softmax. On GPU
    this function is compiled into two fused kernels, so the float32 softmax never reaches memory."""
    lf = logits.float()
    log_z = torch.logsumexp(lf, dim=-1)
    target_logit = lf.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    ce_part = ((log_z - target_logit) * row_weight).sum()
    z_part = (log_z.pow(2) * row_weight).sum()
    is_target = torch.arange(lf.shape[1], device=lf.device)[None, :] == targets[:, None]
    grad = (torch.exp(lf - log_z[:, None]) * (1 + 2 * z_loss_coef * log_z)[:, None] - is_target.float())
    return ce_part, z_part, (grad * row_weight[:, None]).to(logits.dtype)


_compiled_loss_and_logit_grads = None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Output projection + cross-entropy + z-loss without ever holding all logits.

    With a 128k vocabulary, B*T x V float32 logits are the largest tensor of the step (8 GiB at
    micro-batch 4 x 4096). Here the logits of LOSS_CHUNK_TOKENS rows at a time are formed, turned
    into their loss and, in the same pass, into the gradients of h and of the weight, then freed.
    Backward only scales the stored gradients. The FLOPs are those of the plain version."""

    @staticmethod
    def forward(ctx, h, weight, targets, z_loss_coef):
        global _compiled_loss_and_logit_grads
        chunk_fn = _loss_and_logit_grads
        if h.is_cuda:
            if _compiled_loss_and_logit_grads is None:
                _compiled_loss_and_logit_grads = torch.compile(_loss_and_logit_grads)
            chunk_fn = _compiled_loss_and_logit_grads
        compute_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        h_c, w_c = h.to(compute_dtype), weight.to(compute_dtype)
        valid = targets != -100
        n = valid.sum().clamp(min=1)
        row_weight = valid.float() / n  # each valid row's share of the mean
        grad_h = torch.empty_like(h_c)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ce = torch.zeros((), dtype=torch.float32, device=h.device)
        z_loss = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], LOSS_CHUNK_TOKENS):
                rows = slice(start, start + LOSS_CHUNK_TOKENS)
                ce_part, z_part, grad_logits = chunk_fn(h_c[rows] @ w_c.t(), targets[rows], row_weight[rows],
                                                        z_loss_coef)
                ce += ce_part
                z_loss += z_part
                grad_h[rows] = grad_logits @ w_c
                grad_w += grad_logits.t() @ h_c[rows]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return ce + z_loss_coef * z_loss, ce, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss).to(ctx.h_dtype), (grad_w * grad_loss).to(ctx.w_dtype), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         z_loss_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """cross_entropy_with_z_loss(h @ weight.T, targets) computed chunk by chunk (same values and
    gradients); h is (N, d), targets (N,). Without gradients it is a plain chunked loop."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        loss, ce, z_loss = _ChunkedLinearCrossEntropy.apply(h, weight, targets, z_loss_coef)
        return loss, {"ce": ce.detach(), "z_loss": z_loss.detach()}
    n = (targets != -100).sum().clamp(min=1)
    ce = z = 0.0
    for start in range(0, h.shape[0], LOSS_CHUNK_TOKENS):
        rows = slice(start, start + LOSS_CHUNK_TOKENS)
        _, parts = cross_entropy_with_z_loss(h[rows] @ weight.t(), targets[rows], 0.0)
        k = (targets[rows] != -100).sum()
        ce, z = ce + parts["ce"] * k, z + parts["z_loss"] * k
    ce, z = ce / n, z / n
    return ce + z_loss_coef * z, {"ce": ce, "z_loss": z}


LOGPROB_CHUNK_TOKENS = 4096  # positions whose logits and float32 log-softmax exist at once (~7 GiB at a 128k vocab)


def _picked_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = F.log_softmax(F.linear(h, weight).float() / temperature, dim=-1)
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def token_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(h @ weight.T / temperature)[target] per position, 0 where targets is -100.

    What preference and policy-gradient losses need (dpo.py, rl.py): one log-prob per response
    token, in float32 (they sum hundreds of them, where bf16 would drown the signal). The output
    head, the log-softmax and the pick run LOGPROB_CHUNK_TOKENS positions at a time and are
    recomputed in backward, so at a 128k vocabulary no (N, T, V) tensor ever exists."""
    flat, flat_targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    picked = torch.cat([
        torch.utils.checkpoint.checkpoint(_picked_logprobs, flat[start:start + LOGPROB_CHUNK_TOKENS], weight,
                                          flat_targets[start:start + LOGPROB_CHUNK_TOKENS], temperature,
                                          use_reentrant=False)
        for start in range(0, flat.shape[0], LOGPROB_CHUNK_TOKENS)]).view_as(targets)
    return torch.where(targets != -100, picked, 0.0)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        if cfg.fp8 != "off":  # the blocks' linear layers train in FP8; same parameters, same state dict keys
            convert_to_fp8(self.blocks, cfg.fp8, cfg.fp8_skip_first_last)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one tensor, seen by both
        self.activation_checkpointing = False  # set by train.py; recompute blocks in backward
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        original_len = cfg.yarn_original_seq_len or round(cfg.max_seq_len / cfg.yarn_factor)
        return rope_frequencies(cfg.rope_head_dim, cfg.max_seq_len, cfg.rope_base, fraction=cfg.rope_fraction,
                                yarn_factor=cfg.yarn_factor, yarn_original_len=original_len)

    def set_rope(self, rope_base: float, yarn_factor: float = 1.0, yarn_original_seq_len: int = 0) -> None:
        """A new RoPE base (ABF) and YaRN scaling for the same weights, in place: the long-context
        stage of a run (train.stage_settings; SmolLM3: base 50k -> 2M at 32k tokens, 5M at 64k)."""
        if self.cfg.dca_chunk_size:
            raise ValueError("a new RoPE base with Dual Chunk Attention is not supported (its chunk tables keep the old one)")
        self.cfg = dataclasses.replace(self.cfg, rope_base=rope_base, yarn_factor=yarn_factor,
                                       yarn_original_seq_len=yarn_original_seq_len)
        cos, sin = self._rope_tables()
        self.rope_cos.copy_(cos)  # in place: compiled graphs read the buffers, their shapes stay
        self.rope_sin.copy_(sin)

    def reset_parameters(self) -> None:
        """Truncated normal (+-3 std) for every matrix and the embedding; norms at 1."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=self.cfg.init_std, a=-3 * self.cfg.init_std,
                                      b=3 * self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif hasattr(module, "reset_expert_parameters"):  # moe.RoutedExperts: stacked expert matrices
                module.reset_expert_parameters(self.cfg.init_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None, *,
                logprobs: bool = False, temperature: float = 1.0):
        """Logits (B, T, V) when targets is None, else (loss, {"ce", "z_loss"}) (MoE models add
        "balance_loss" and "router_z_loss", moe.add_router_losses), or with logprobs=True the
        (B, T) log-probs of the targets at this temperature (token_logprobs).

        doc_ids (B, T) restricts attention to tokens of the same document. Every output goes through
        forward, so DDP and FSDP2 wrappers see every use of the weights."""
        h = self.hidden_states(idx, doc_ids, kv_cache)
        if targets is None:
            return self.lm_head(h)
        if logprobs:
            return token_logprobs(h, self.lm_head.weight, targets, temperature)
        loss_and_parts = linear_cross_entropy(h, self.lm_head.weight, targets, self.cfg.z_loss_coef)
        if not self.cfg.moe:
            return loss_and_parts
        return add_router_losses(self, *loss_and_parts, self.cfg.moe_balance_coef, self.cfg.moe_router_z_coef)

    def hidden_states(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None,
                      kv_cache: KVCache | StaticKVCache | None = None) -> torch.Tensor:
        """(B, T, d_model): the final norm's output, which the output head turns into logits. Losses
        that need only some of the logits (the fused loss here, dpo.token_logps) start from it.

        With a StaticKVCache, the first call prefills right-padded prompts with the training masks
        and kernels; every later call decodes one token per row, each row at its own position."""
        B, T = idx.shape
        decoding = isinstance(kv_cache, StaticKVCache) and kv_cache.decoding
        if decoding:  # (B, 1, rotary_dim / 2): positions are a tensor, so the step's shapes never change
            cos, sin = self.rope_cos[kv_cache.lengths][:, None], self.rope_sin[kv_cache.lengths][:, None]
        else:
            start = kv_cache.reserve(T) if kv_cache is not None else 0
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len="
                                 f"{self.cfg.max_seq_len}; raise model.max_seq_len or shorten the input")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        masks = {}  # one mask per kind of layer, shared by the layers of that kind
        for kind in set(self.cfg.layer_kinds()):
            window = self.cfg.sliding_window if kind == "S" else 0
            chunk = self.cfg.attn_chunk_size if kind == "C" else 0
            if kind == "L":
                masks[kind] = doc_ids if kv_cache is None else None
            elif decoding:
                masks[kind] = kv_cache.decode_mask(window, chunk)
            elif kv_cache is None:
                masks[kind] = build_attention_mask(self.cfg.attn_backend, doc_ids, B, T, idx.device, window, chunk)
            elif isinstance(kv_cache, StaticKVCache):  # the prefill, on SDPA: flex would compile per prompt shape
                masks[kind] = build_attention_mask("sdpa", None, B, T, idx.device, window, chunk)
            else:
                masks[kind] = None
        x = self.embed_tokens(idx)
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the compute dtype (bf16), as under FSDP's mixed precision: half
            # the memory traffic of every norm and residual add
            x = x.to(torch.get_autocast_dtype(x.device.type))
        kinds = self.cfg.layer_kinds()
        for block in self.blocks:
            mask = masks[kinds[block.layer]]
            if self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache)
        if isinstance(kv_cache, StaticKVCache):
            kv_cache.advance()
        elif kv_cache is not None:
            kv_cache.pos += T
        return self.norm(x)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """The cache generate() uses: K/V per attention layer (MLA: latent + RoPE key), and a
        fixed-size state per linear-attention layer."""
        cfg, p = self.cfg, self.lm_head.weight
        kinds = cfg.layer_kinds()
        attn_layers = [i for i, kind in enumerate(kinds) if kind != "L"]
        # sliding-window and chunked layers keep only their last span - 1 keys (KVCache.recent)
        spans = {} if cfg.dca_chunk_size else {i: cfg.sliding_window if kinds[i] == "S" else cfg.attn_chunk_size
                                                 for i in attn_layers if kinds[i] in "SC"}
        if cfg.attn_type == "mla":
            rope_dim, rank = cfg.mla_dims
            cache = KVCache(len(attn_layers), batch_size, 1, max_len or cfg.max_seq_len, rank, p.dtype, p.device,
                            value_dim=rope_dim, layers=attn_layers, spans=spans)
        else:
            cache = KVCache(len(attn_layers), batch_size, cfg.n_kv_heads, max_len or cfg.max_seq_len,
                            cfg.head_dim, p.dtype, p.device, layers=attn_layers, spans=spans)
        for i, kind in enumerate(kinds):
            if kind == "L":
                cache.states[i] = torch.zeros(batch_size, cfg.n_heads, cfg.head_dim, cfg.head_dim,
                                              dtype=p.dtype, device=p.device)
        return cache

    def new_static_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        """The fixed-shape cache of generate.py (attention.StaticKVCache): a ring per attention layer
        (max_len slots, or a sliding-window or chunked layer's span), a float32 state per
        linear-attention layer."""
        cfg, p = self.cfg, self.lm_head.weight
        kinds = cfg.layer_kinds()
        spans = {"S": cfg.sliding_window, "C": cfg.attn_chunk_size}
        if cfg.attn_type == "mla":
            rope_dim, rank = cfg.mla_dims
            heads, key_dim, value_dim = 1, rank, rope_dim
        else:
            heads, key_dim, value_dim = cfg.n_kv_heads, cfg.head_dim, cfg.head_dim
        return StaticKVCache(batch_size, max_len, heads, key_dim, value_dim,
                             {i: spans.get(kind, 0) for i, kind in enumerate(kinds) if kind != "L"},
                             [i for i, kind in enumerate(kinds) if kind == "L"],
                             (cfg.n_heads, cfg.head_dim, cfg.head_dim), p.dtype, p.device)

    def new_streaming_cache(self, batch_size: int, n_sink: int, window: int) -> StreamingKVCache:
        """StreamingLLM's bounded cache: the first n_sink tokens plus the last `window`."""
        cfg, p = self.cfg, self.lm_head.weight
        if cfg.attn_type != "gqa" or cfg.dca_chunk_size or set(cfg.layer_kinds()) != {"G"}:
            raise ValueError("streaming generation needs global gqa attention layers (no MLA, DCA, window, "
                             "chunk or linear layers)")
        if n_sink < 0 or window < 1 or n_sink + window > cfg.max_seq_len:
            raise ValueError(f"streaming needs n_sink >= 0, window >= 1 and n_sink + window <= "
                             f"model.max_seq_len={cfg.max_seq_len}; got {n_sink} + {window}")
        return StreamingKVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, p.dtype, p.device,
                                n_sink, window, self.rope_cos, self.rope_sin)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True, eos_id: int | None = None,
                 generator: torch.Generator | None = None, stream_window: int = 0,
                 stream_sinks: int = 4) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens; temperature 0 is greedy, top_k keeps the k best.

        With use_cache the prompt is processed once and each new token attends to cached keys and
        values; without it the whole sequence is recomputed every step. Both give the same tokens.
        stream_window > 0 generates StreamingLLM-style in a bounded cache (stream_sinks first
        tokens + the last stream_window), past max_seq_len if asked.
        Stops early once every row has produced eos_id."""
        if not stream_window and idx.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"model.max_seq_len={self.cfg.max_seq_len}")
        step_input = idx
        if stream_window:
            cache, use_cache = self.new_streaming_cache(idx.shape[0], stream_sinks, stream_window), True
            *head, step_input = idx.split(stream_window, dim=1)
            for piece in head:  # a long prompt enters the bounded cache one window at a time
                self(piece, kv_cache=cache)
        else:
            cache = self.new_kv_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else idx, kv_cache=cache)[:, -1, :].float()
            next_id = sample_next_token(logits, temperature, top_k, generator)
            if eos_id is not None:
                next_id = torch.where(done[:, None], torch.full_like(next_id, eos_id), next_id)
                done |= next_id[:, 0] == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            step_input = next_id
            if eos_id is not None and bool(done.all()):
                break
        return idx


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row from (B, V) logits: argmax at temperature 0, else softmax sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)

