"""Optimisation: AdamW with the playbook's parameter groups and defaults, and LR schedules.

- AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.1, gradient clipping at 1.0: the defaults the
  playbook's ablations (and most open LLM recipes) use.
- No weight decay on embeddings, norms and biases (OLMo 2's finding, adopted by SmolLM3): decaying
  an embedding row pulls it toward zero every step whether or not its token appeared.
- Schedules as pure functions of the step: linear warmup, then cosine to min_lr, WSD
  (warmup-stable-decay: constant, then a linear decay over the last fraction of training, so any
  stable-phase checkpoint can be annealed later), or DeepSeek's multi-step (drop to 31.6% at 80% of
  training and to 10% at 90%), or constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

SCHEDULES = ("cosine", "wsd", "multistep", "constant")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4           # where cosine and WSD end
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0         # 0 disables clipping
    warmup_steps: int = 50
    schedule: str = "cosine"
    decay_fraction: float = 0.2    # WSD: the last 10-20% of steps decay
    multistep_milestones: tuple[float, float] = (0.8, 0.9)
    multistep_factors: tuple[float, float] = (0.316, 0.1)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.multistep_milestones = tuple(self.multistep_milestones)
        self.multistep_factors = tuple(self.multistep_factors)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= optim.min_lr <= optim.lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, grad_clip and weight_decay must be >= 0")
        if len(self.betas) != 2 or len(self.multistep_milestones) != len(self.multistep_factors):
            raise ValueError("optim.betas needs 2 values; multistep_milestones and multistep_factors the same count")
        if not all(0 <= b < 1 for b in self.betas) or self.eps <= 0:
            raise ValueError(f"optim.betas must be in [0, 1) and optim.eps > 0, got betas={self.betas}, eps={self.eps}")
        m = self.multistep_milestones
        if not all(0 < x < 1 for x in m) or list(m) != sorted(m):
            raise ValueError(f"optim.multistep_milestones are fractions of training in (0, 1), ascending; got {m}")


def wsd_decay_start(cfg: OptimConfig, max_steps: int) -> int:
    """The step where WSD's decay begins: the last decay_fraction of the run (at least one step)."""
    return max_steps - max(1, round(cfg.decay_fraction * max_steps))


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate at a 0-based optimizer step of a run of max_steps steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, max_steps - 1 - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_start = wsd_decay_start(cfg, max_steps)
        decay_steps = max_steps - decay_start
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    factor = 1.0  # multistep
    for milestone, f in zip(cfg.multistep_milestones, cfg.multistep_factors):
        if step >= milestone * max_steps:
            factor = f
    return cfg.lr * factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices of the blocks decay; embeddings, norms and biases do not.

    Each group carries the parameter names so that the run log can list them."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied embedding is one tensor: it is listed once, under no decay
        (no_decay if p.ndim < 2 or "embed" in name else decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over param_groups(); fused kernels on GPU (one launch for all parameters)."""
    groups = param_groups(model, cfg.weight_decay)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per group: weight decay, tensor count, parameter count, and names (abridged)."""
    lines = []
    for g in optimizer.param_groups:
        names = g.get("names", [])
        n = sum(p.numel() for p in g["params"])
        shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
        lines.append(f"  wd={g['weight_decay']:<4} {len(names):>4} tensors {n:>12,} params: {shown}")
    return "\n".join(lines)
