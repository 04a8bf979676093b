"""Optimisation: AdamW with the playbook's parameter groups and defaults, Muon, LR schedules, and
the batch-size ramp.

- AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.1, gradient clipping at 1.0: the defaults the
  playbook's ablations (and most open LLM recipes) use.
- No weight decay on embeddings, norms and biases (OLMo 2's finding, adopted by SmolLM3): decaying
  an embedding row pulls it toward zero every step whether or not its token appeared.
- Schedules as pure functions of the step: linear warmup, then cosine to min_lr, WSD
  (warmup-stable-decay: constant, then a linear decay over the last fraction of training, so any
  stable-phase checkpoint can be annealed later), or DeepSeek's multi-step (drop to 31.6% at 80% of
  training and to 10% at 90%), or constant.
- Muon (optim.name = "muon"): momentum orthogonalised by Newton-Schulz for the blocks' weight
  matrices, AdamW for embeddings, output head, norms and router, in one optimizer.
- Batch-size warmup: the global batch grows linearly over the first tokens (DeepSeek-V3: 3072 ->
  15360 sequences over 469B tokens), with an optional square-root rule for the learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import distribute_tensor

SCHEDULES = ("cosine", "wsd", "multistep", "constant")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class OptimConfig:
    lr: float = 3e-3               # the peak learning rate, after warmup
    min_lr: float = 3e-4           # where cosine and WSD end
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's momentum coefficients (the playbook's)
    eps: float = 1e-8              # AdamW's denominator floor
    weight_decay: float = 0.1      # decoupled, on the blocks' matrices only (none on embeddings and norms)
    grad_clip: float = 1.0         # 0 disables clipping
    warmup_steps: int = 50         # linear warmup from 0 to lr
    schedule: str = "cosine"       # cosine | wsd (warmup-stable-decay) | multistep (DeepSeek) | constant
    decay_fraction: float = 0.2    # WSD: the last 10-20% of steps decay
    multistep_milestones: tuple[float, float] = (0.8, 0.9)  # multistep: fractions of the run where lr drops
    multistep_factors: tuple[float, float] = (0.316, 0.1)   # multistep: lr multipliers from each milestone on
    name: str = "adamw"            # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_momentum: float = 0.95    # Muon's momentum coefficient
    muon_nesterov: bool = True     # Nesterov momentum for Muon
    muon_ns_steps: int = 5         # Newton-Schulz iterations
    lr_base_batch: int = 0         # the global batch (sequences) lr was tuned at: each step's lr is
                                   # scaled by sqrt(batch / lr_base_batch); 0 = off

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.multistep_milestones = tuple(self.multistep_milestones)
        self.multistep_factors = tuple(self.multistep_factors)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r} is not one of {OPTIMIZERS}")
        if not 0 <= self.muon_momentum < 1 or self.muon_ns_steps < 1 or self.lr_base_batch < 0:
            raise ValueError(f"need optim.muon_momentum in [0, 1), optim.muon_ns_steps >= 1 and optim.lr_base_batch "
                             f">= 0, got {self.muon_momentum}, {self.muon_ns_steps}, {self.lr_base_batch}")
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


def lr_at(step: float, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate at a 0-based optimizer step of a run of max_steps steps. With a batch ramp
    train.py passes the tokens seen over the tokens of one full batch (a fractional step), so the
    warmup and the decay follow tokens, not the more numerous small steps of the ramp."""
    if step < cfg.warmup_steps:  # a fractional step past warmup_steps - 1 stays at the peak
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate, set each step from the schedule (the config's
    schedule, not the optimizer's state, decides it, also after a resume)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def batch_size_at(tokens: int, full: int, start: int, ramp_tokens: int, multiple: int = 1) -> int:
    """Global batch (sequences) for a step that begins after `tokens` training tokens: a linear ramp
    from `start` to `full` over the first `ramp_tokens` tokens, then `full` (DeepSeek-V3 ramps 3072
    -> 15360 sequences over the first 469B tokens). Rounded down to a multiple of `multiple`, the
    micro-batch x processes, since every rank runs whole micro-batches. ramp_tokens = 0: no ramp.
    Why ramp: early in training the gradient noise is small, so the critical batch (beyond which a
    larger batch no longer buys fewer steps) is small too, and a large batch would waste tokens.

    A function of tokens seen, not of the step, so a resumed run (which restores its token count)
    continues the ramp exactly."""
    if ramp_tokens <= 0 or tokens >= ramp_tokens:
        return full
    batch = (start * ramp_tokens + (full - start) * tokens) // ramp_tokens  # integers: no float rounding
    return max(multiple, min(full, batch // multiple * multiple))


def ramp_steps(token_budget: int, seq_len: int, full: int, start: int, ramp_tokens: int, multiple: int = 1) -> int:
    """Optimizer steps a run with this batch ramp takes to train on token_budget tokens: it keeps
    stepping while fewer have been seen, so the last step may go past the budget by less than one
    batch. train.py gives a ramped run the budget of the same run without the ramp."""
    steps = tokens = 0
    while tokens < token_budget:
        tokens += batch_size_at(tokens, full, start, ramp_tokens, multiple) * seq_len
        steps += 1
    return steps


def sqrt_lr_scale(batch: int, base_batch: int) -> float:
    """Factor on an Adam-type learning rate tuned at `base_batch` when the batch is `batch`: the
    square-root rule of Malladi et al. 2022 ("On the SDEs and scaling rules for adaptive gradient
    algorithms"; SGD's rule is linear). Derived for Adam, not Muon."""
    return math.sqrt(batch / base_batch)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: every matrix but the embedding decays (an untied lm_head and a router
    too); the embedding, norms and biases do not (OLMo 2's no weight decay on embeddings).

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


def matrix_shape(name: str, p: torch.Tensor) -> tuple[int, int]:
    """The shape of the matrices Muon orthogonalises one by one in parameter `p`. A linear weight is
    one matrix. A stacked MoE expert tensor (E, m, n) is E matrices, and w_gate_up's gate and up
    halves are orthogonalised apart, like the dense MLP's separate gate_proj and up_proj."""
    if p.ndim == 2:
        return tuple(p.shape)
    if name.endswith("w_gate_up"):
        return p.shape[1] // 2, p.shape[2]
    return tuple(p.shape[1:])


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """param_groups() with the blocks' weight matrices taken out into a Muon group.

    Muon is for hidden matrices: q/k/v/o (each its own matrix: the model keeps q_proj, k_proj and
    v_proj apart, so they are never orthogonalised as one fused QKV), the MLP's, MLA's and linear
    attention's projections, and routed experts (per expert). The embedding and an untied output
    head map tokens in and out rather than mix a hidden state, the MoE router is a small classifier
    over experts, and norms, biases and sinks are vectors: all stay on AdamW (Keller Jordan's split)."""
    decay, no_decay = param_groups(model, weight_decay)
    muon, adamw = [], []
    for n, p in zip(decay["names"], decay["params"]):
        (muon if n.startswith("blocks.") and ".router." not in n else adamw).append((n, p))
    groups = [{"params": [p for _, p in muon], "names": [n for n, _ in muon], "weight_decay": weight_decay,
               "muon": True, "matrix_shapes": [matrix_shape(n, p) for n, p in muon]},
              {"params": [p for _, p in adamw], "names": [n for n, _ in adamw], "weight_decay": weight_decay},
              no_decay]
    return [g for g in groups if g["params"]]


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for each matrix G = U S V^T in a batch (..., m, n): the nearest
    (semi-)orthogonal matrix, by Keller Jordan's quintic Newton-Schulz iteration. Its coefficients
    raise small singular values fast instead of converging: those above ~1e-3 of the Frobenius norm
    end in about [0.7, 1.2], not at 1, which trains as well (smaller ones are raised ~500x but stay
    below). bf16 on GPU (the iteration tolerates it), float32 on CPU."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide side: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups marked muon=True, AdamW for the others: one optimizer, so the LR schedule
    (train.py sets every group's lr), clipping, state_dict and FSDP's sharded checkpoints treat it
    like torch.optim.AdamW.

    Muon (Keller Jordan, github.com/KellerJordan/Muon): Nesterov momentum, then Newton-Schulz turns
    the momentum of each matrix into a near-orthogonal update, one that moves every singular
    direction equally instead of the few that dominate the gradient. Scaled by 0.2 sqrt(max(m, n))
    (Moonshot, "Muon is scalable", arXiv 2502.16982) its RMS is about 0.2, like AdamW's, so AdamW's
    lr and weight decay carry over. Weight decay is decoupled, as in AdamW.

    Under FSDP2 a parameter is a DTensor shard and Newton-Schulz needs the whole matrix: each rank
    gathers the full momentum (one all-gather per matrix), orthogonalises it, and keeps its own
    shard of the result. Every rank repeats the same Newton-Schulz work; large runs spread the
    matrices over ranks instead."""

    def __init__(self, params, lr: float = 3e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, betas=betas, eps=eps, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, beta = group["lr"], group["momentum"]
        for p, (m, n) in zip(group["params"], group["matrix_shapes"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - beta)
            update = p.grad.lerp(buf, beta) if group["nesterov"] else buf
            sharded = hasattr(update, "full_tensor")  # an FSDP2 DTensor shard
            full = update.full_tensor() if sharded else update
            ortho = newton_schulz(full.reshape(-1, m, n), group["ns_steps"]).reshape(full.shape)
            if sharded:  # every rank holds the same full result: keep this rank's shard, no communication
                ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(ortho, alpha=-lr * 0.2 * max(m, n) ** 0.5)

    def _adamw_step(self, group: dict) -> None:
        """torch.optim.AdamW's update, written out."""
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            p.mul_(1 - lr * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """optim.name = "adamw": AdamW over param_groups(), fused kernels on GPU (one launch for all
    parameters). "muon": Muon over muon_param_groups(), AdamW's settings for the AdamW groups."""
    if cfg.name == "muon":
        return Muon(muon_param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.muon_momentum,
                    nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps, betas=cfg.betas, eps=cfg.eps)
    groups = param_groups(model, cfg.weight_decay)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per group: its update (muon or adamw), weight decay, tensor count, parameter count,
    and names (abridged)."""
    lines = []
    for g in optimizer.param_groups:
        names = g.get("names", [])
        n = sum(p.numel() for p in g["params"])
        shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
        kind = "muon " if g.get("muon") else "adamw"
        lines.append(f"  {kind} wd={g['weight_decay']:<4} {len(names):>4} tensors {n:>12,} params: {shown}")
    return "\n".join(lines)
