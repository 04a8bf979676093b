"""The model: a Llama-style decoder, its parameter and FLOP formulas, and generation.

This is the dense baseline the playbook ablates against (and SmolLM3's architecture before its
changes): pre-norm blocks of RMSNorm -> attention -> RMSNorm -> SwiGLU MLP, no biases, RoPE,
grouped-query attention, optional tied input/output embeddings, truncated-normal init, and an
optional z-loss. `count_params` is the playbook's parameter formula and `flops_per_token` feeds
the MFU that train.py logs, sitting next to the model it measures, as in nanoGPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import BACKENDS, CausalSelfAttention, KVCache, build_attention_mask, rope_frequencies


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4       # n_heads: MHA, 1: MQA, in between: GQA (SmolLM3: 4)
    d_ff: int = 768           # SwiGLU hidden width (three matrices of d_model x d_ff)
    max_seq_len: int = 512
    rope_base: float = 10_000.0
    tie_embeddings: bool = True   # the playbook kept tied embeddings for its 1-3B models
    init_std: float = 0.02
    norm_eps: float = 1e-6        # SmolLM3's RMSNorm eps
    z_loss_coef: float = 0.0      # lambda in lambda * log^2(Z); 1e-5 where used, off in SmolLM3
    attn_backend: str = "sdpa"    # "sdpa" (everywhere) or "flex" (flex_attention, the GPU path)
    # Mixture of experts (moe.py): off by default; on, every layer from moe_dense_layers on has a MoE MLP.
    moe: bool = False
    moe_experts: int = 8              # routed experts per MoE layer
    moe_top_k: int = 2                # routed experts per token
    moe_d_expert: int = 0             # each expert's hidden width; 0 = d_ff. Granularity G = 2*d_model/d_expert
    moe_shared_experts: int = 0       # always-active experts of width d_expert (DeepSeek-V3, Kimi K2: 1)
    moe_dense_layers: int = 0         # the first layers keep the dense MLP (DeepSeek-V3: 3)
    moe_score: str = "softmax"        # "softmax" (Mixtral, Qwen3, OLMoE) or "sigmoid" (DeepSeek-V3)
    moe_renormalize: bool = True      # rescale the k chosen weights to sum to 1 (OLMoE: no)
    moe_balance_coef: float = 0.01    # alpha in alpha * sum_i f_i * P_i
    moe_balance_stats: str = "global"  # f, P over the global batch (all micro-batches, ranks) or "local"
    moe_router_z_coef: float = 0.0    # router z-loss coefficient (ST-MoE: 1e-3)
    moe_bias_rate: float = 0.0        # gamma of aux-loss-free bias balancing (DeepSeek-V3: 0.001)
    moe_impl: str = "grouped"         # "grouped" (sorted tokens, grouped GEMM) or "reference" (loop)

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
        if self.moe:
            self._check_moe()

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

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def count_params(cfg: ModelConfig) -> int:
    """The playbook's formula: N = V*h*(1 tied / 2 untied) + L*(2*h*n_h*d_h + 2*h*n_kv*d_h + 3*h*d_ff + 2h) + h.

    Per layer: Q and O projections, K and V projections, the three SwiGLU matrices, two norms; then
    the final norm. The 1B ablation model (h 2048, 16 layers, 32 heads, d_ff 8192, 128k vocab,
    tied): 1.21B with MQA, 1.22B with 4 KV heads, 1.24B with 8."""
    h, d_h = cfg.d_model, cfg.head_dim
    per_layer = 2 * h * cfg.n_heads * d_h + 2 * h * cfg.n_kv_heads * d_h + 3 * h * cfg.d_ff + 2 * h
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)
    if cfg.moe:  # MoE layers swap their dense MLP for router + experts (moe.py)
        from moe import moe_params_delta
        return embeddings + cfg.n_layers * per_layer + h + moe_params_delta(cfg)
    return embeddings + cfg.n_layers * per_layer + h


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * matmul params + 12 * L * n_h * d_h * T.

    The first term is the 6N rule over every weight a token is multiplied by (the output head
    included, embeddings lookups excluded); the second is attention's QK^T and AV, counted over the
    full T x T square as PaLM's MFU definition does, so figures compare across codebases."""
    h = cfg.d_model
    matmul_per_layer = 2 * h * cfg.n_heads * cfg.head_dim + 2 * h * cfg.n_kv_heads * cfg.head_dim + 3 * h * cfg.d_ff
    n_matmul = cfg.n_layers * matmul_per_layer + cfg.vocab_size * h
    if cfg.moe:  # a token meets the router, its top-k experts and the shared ones: active weights only
        from moe import moe_params_delta
        n_matmul += moe_params_delta(cfg, active=True)
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without mean-centering or bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the reduction in float32 even under bf16, as every Llama implementation does
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the gated MLP of Llama, SmolLM and nearly every recent LLM."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.attn_backend)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.moe and layer >= cfg.moe_dense_layers:
            from moe import MoE  # moe.py builds on this file (SwiGLU, ModelConfig)
            self.mlp = MoE(cfg, layer)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cos, sin, mask=None, kv_cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, self.layer)
        return x + self.mlp(self.mlp_norm(x))


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


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one tensor, seen by both
        cos, sin = rope_frequencies(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

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
                doc_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None):
        """Logits (B, T, V) when targets is None, else (loss, {"ce", "z_loss"}) (MoE models add
        "balance_loss" and "router_z_loss", moe.add_router_losses).

        doc_ids (B, T) restricts attention to tokens of the same document."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len="
                             f"{self.cfg.max_seq_len}; raise model.max_seq_len or shorten the input")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = None if kv_cache is not None else build_attention_mask(
            self.cfg.attn_backend, doc_ids, B, T, idx.device)
        x = self.embed_tokens(idx)
        for block in self.blocks:
            x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        if not self.cfg.moe:
            return cross_entropy_with_z_loss(logits, targets, self.cfg.z_loss_coef)
        from moe import add_router_losses
        return add_router_losses(self, *cross_entropy_with_z_loss(logits, targets, self.cfg.z_loss_coef))

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len or self.cfg.max_seq_len,
                       self.cfg.head_dim, p.dtype, p.device)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens; temperature 0 is greedy, top_k keeps the k best.

        With use_cache the prompt is processed once and each new token attends to cached keys and
        values; without it the whole sequence is recomputed every step. Both give the same tokens.
        Stops early once every row has produced eos_id."""
        if idx.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"model.max_seq_len={self.cfg.max_seq_len}")
        cache = self.new_kv_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        step_input = idx
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


def model_config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in known})
