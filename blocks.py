"""Building blocks shared by the attention layers, the MLPs and the experts.

RMSNorm (SmolLM3's eps 1e-6) normalises the residual stream before every sub-layer, and also each
query/key head (QK-norm), MLA's latent and gated linear attention's output. SwiGLU is the gated MLP
of Llama, SmolLM and nearly every recent LLM, and of each MoE expert. `fused_projections` runs
several thin projections of the same input as one wide GEMM (attention's Q/K/V, the MLP's
gate/up), which keeps a GPU busier than three small ones. They sit below attention.py, moe.py and
model.py, which all use them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim: LayerNorm without mean-centering or bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the reduction in float32 even under bf16, as every Llama implementation does
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def fused_projections(x: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    """x through several bias-free linear layers with one GEMM on their concatenated weights.

    A layer carrying a low-rank adapter (sft.LoRALinear) adds its own s (x A^T) B^T to its output,
    so the adapted (out x in) weight is never formed and the frozen weight gets no weight-sized
    gradient. Layers that bring their own `matmul` (fp8.FP8Linear) run the fused GEMM with it, in FP8."""
    bases = [getattr(layer, "base", layer) for layer in layers]
    weights = [base.weight for base in bases]
    matmul = getattr(bases[0], "matmul", F.linear)
    outs = matmul(x, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1)
    return [out + layer.low_rank(x) if hasattr(layer, "low_rank") else out for out, layer in zip(outs, layers)]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the gated MLP of Llama, SmolLM and nearly every recent LLM."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_projections(x, [self.gate_proj, self.up_proj])  # one wide GEMM instead of two
        return self.down_proj(F.silu(gate) * up)
