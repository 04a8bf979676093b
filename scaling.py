"""Scaling laws and memory/compute estimates: how big, how long, which lr and batch, and will it fit.

    python scaling.py                                             # the playbook's figures, recomputed
    python scaling.py --config configs/ablation_1b.toml [--tokens 1e11] [--gpus 8]

Compute: C = 6ND (Kaplan et al. 2020), or model.flops_per_token x D with attention. Allocation:
Chinchilla's fitted loss L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, approach 3) and
its closed-form optimum, next to the 20 tokens/parameter rule. Hyperparameters: DeepSeek LLM's
lr and batch laws in C. Fits of all three from your own points (numpy least squares, torch L-BFGS).
Memory: what one rank holds at the peak of a training step, counted from model.py's code.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from config import ConfigError
from model import LOSS_CHUNK_TOKENS, ModelConfig, count_params, flops_per_token
from train import load_config  # train.py's checks and messages, one source of truth

GIB = 2 ** 30


# --------------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------------

def matmul_params(cfg: ModelConfig) -> float:
    """The N of C = 6ND for this codebase: every weight a token is multiplied by (the output head
    included, embedding lookups and norm weights excluded), i.e. flops_per_token without attention's
    T-dependent term. For a tied dense model this is count_params minus the (2L + 1) h norm weights."""
    return flops_per_token(cfg, 0) / 6


def training_flops(cfg: ModelConfig, tokens: float, seq_len: int, attention: bool = True) -> float:
    """Training compute of `tokens` tokens: 6ND (Kaplan et al. 2020, sec. 2.1: forward 2N, backward
    twice that), plus with `attention` the 12 L h T term of QK^T and AV (PaLM's MFU convention)."""
    return (flops_per_token(cfg, seq_len) if attention else 6 * matmul_params(cfg)) * tokens


def deepseek_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """DeepSeek LLM's model scale M, "non-embedding FLOPs/token" (arXiv 2401.02954, sec. 3.2; for
    their blocks 72 n_layer d^2 + 12 n_layer d l_seq): attention's FLOPs in, the vocabulary's out.
    Here: flops_per_token minus the output head's 6 V h."""
    return flops_per_token(cfg, seq_len) - 6 * cfg.vocab_size * cfg.d_model


def tokens_for(compute: float, n_params: float) -> float:
    """D such that 6 N D = C."""
    return compute / (6 * n_params)


# --------------------------------------------------------------------------------------------
# Chinchilla: L(N, D) and the compute-optimal split
# --------------------------------------------------------------------------------------------

# Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", arXiv 2203.15556),
# sec. 3.3: approach 3's fit. Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt",
# arXiv 2404.10102) refit the paper's own points: E=1.82, A=482.0, B=2085.4, alpha=0.35, beta=0.37,
# which agrees with the ~20 tokens/parameter of approaches 1 and 2; this keeps the published fit.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla_loss(n: float | np.ndarray, d: float | np.ndarray, E: float = 1.69, A: float = 406.4,
                    B: float = 410.7, alpha: float = 0.34, beta: float = 0.28):
    """L(N, D) = E + A / N^alpha + B / D^beta: irreducible loss + finite model + finite data."""
    return E + A / np.power(n, alpha) + B / np.power(d, beta)


def chinchilla_optimal(compute: float, E: float = 1.69, A: float = 406.4, B: float = 410.7,
                       alpha: float = 0.34, beta: float = 0.28) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L(N, D) on 6ND = C (Hoffmann et al., sec. 3.3):
    N_opt = G (C/6)^a, D_opt = (C/6)^b / G, G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta / (alpha+beta), b = alpha / (alpha+beta). E drops out; it is accepted so that a fit's
    dict can be passed as **fit."""
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n = G * (compute / 6) ** (beta / (alpha + beta))
    return n, tokens_for(compute, n)


def twenty_tokens_per_param(compute: float) -> tuple[float, float]:
    """The rule of thumb read off Chinchilla's approaches 1-2: D = 20 N, so N = sqrt(C / 120)."""
    n = math.sqrt(compute / 120)
    return n, 20 * n


# --------------------------------------------------------------------------------------------
# DeepSeek's hyperparameter laws
# --------------------------------------------------------------------------------------------

def deepseek_lr(compute: float) -> float:
    """eta_opt = 0.3118 C^-0.1250 (DeepSeek LLM, arXiv 2401.02954, sec. 3.1, fig. 3), C = M D in
    FLOPs with M from deepseek_flops_per_token (their grid-search points are labelled in M, e.g.
    "177M FLOPs/token"). Fit on small budgets with a multi-step schedule and AdamW (0.9, 0.95), then
    used for their 7B and 67B runs. Counting M as 6 N instead moves the lr by only (M / 6N)^0.125."""
    return 0.3118 * compute ** -0.1250


def deepseek_batch_tokens(compute: float) -> float:
    """B_opt = 0.2920 C^0.3271 tokens per step (same section and units as deepseek_lr)."""
    return 0.2920 * compute ** 0.3271


# --------------------------------------------------------------------------------------------
# Fits
# --------------------------------------------------------------------------------------------

def fit_power_law(x, y) -> tuple[float, float]:
    """(a, b) of y = a x^b by least squares on log y = log a + b log x: a straight line on a log-log
    plot. Kaplan's L(N), L(D), L(C) and DeepSeek's eta(C), B(C) are fits of this kind (DeepSeek fit
    the near-optimal region of each budget's grid; pass the best (C, lr) per budget here)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.size < 2 or (x <= 0).any() or (y <= 0).any():
        raise ValueError("fit_power_law needs two or more positive (x, y) pairs of equal length")
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_a)), float(b)


def fit_chinchilla(n, d, loss, delta: float = 1e-3, starts: int = 8) -> dict[str, float]:
    """E, A, B, alpha, beta of L = E + A/N^alpha + B/D^beta from (N, D, L) runs, as Hoffmann et al.
    do (sec. 3.3): minimise sum Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L)
    with A = e^a, B = e^b, E = e^e by L-BFGS from a grid of starting points, keeping the best. The
    Huber loss on log-loss (delta 1e-3) keeps a few bad runs from steering the fit.

    Their grid has 4,500 points; here the whole grid is scored in one batched evaluation and
    L-BFGS runs from the `starts` best (float64 throughout)."""
    log_n, log_d, log_l = (torch.as_tensor(np.log(np.asarray(v, dtype=np.float64))) for v in (n, d, loss))
    if not log_n.shape == log_d.shape == log_l.shape or log_n.ndim != 1 or len(log_n) < 5:
        raise ValueError("fit_chinchilla needs five or more (N, D, loss) runs as 1-d arrays of equal length")

    def objective(p: torch.Tensor) -> torch.Tensor:  # p (starts, 5) -> (starts,)
        a, b, e, alpha, beta = p.T[..., None]
        pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e.expand(-1, len(log_n))]), 0)
        # divided by delta: the same minimum, with gradients of order 1 for L-BFGS's tolerances
        return F.huber_loss(pred, log_l.expand_as(pred), delta=delta, reduction="none").sum(-1) / delta

    # Hoffmann et al.'s grid: a, b in {0, 5, ..., 25}, e in {-1, -0.5, ..., 1}, alpha, beta in {0, 0.5, ..., 2}
    # (0 left out: a start at alpha = 0 has no gradient in a)
    grid = [np.arange(0, 26, 5), np.arange(0, 26, 5), np.arange(-1, 1.1, 0.5), np.arange(0.5, 2.1, 0.5),
            np.arange(0.5, 2.1, 0.5)]
    grid = torch.cartesian_prod(*[torch.as_tensor(g, dtype=torch.float64) for g in grid])
    best, best_value = None, math.inf
    for start in grid[objective(grid).argsort()[:starts]]:
        p = start.clone()[None].requires_grad_()
        lbfgs = torch.optim.LBFGS([p], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

        def closure():
            lbfgs.zero_grad()
            value = objective(p).sum()
            value.backward()
            return value

        lbfgs.step(closure)
        value = float(objective(p.detach()))
        if math.isfinite(value) and value < best_value:
            best, best_value = p.detach()[0], value
    if best is None:
        raise ValueError("fit_chinchilla found no finite fit; are the losses positive and the runs varied in N and D?")
    a, b, e, alpha, beta = best.tolist()
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


# --------------------------------------------------------------------------------------------
# Memory of one training rank
# --------------------------------------------------------------------------------------------

def block_activation_bytes(cfg: ModelConfig, compiled: bool = True) -> float:
    """Bytes per token that one dense Block keeps for backward under bf16 (autocast or FSDP's bf16
    parameters), read off model.py and attention.py:

    - each RMSNorm: its input and output in bf16 and 1/rms in fp32 (4h + 4). Eager PyTorch keeps
      more: the fp32 copy that x.float() makes, the bf16 normalised x, and the bf16 cast the next
      matmul saves (8h + 4);
    - attention: the fused QKV output (v is a view of it, so all of it stays), the rotated q and k,
      the output, and the kernel's fp32 log-sum-exp per head;
    - SwiGLU: the gate|up output (2 d_ff) and the product down_proj reads (d_ff); eager also keeps
      silu(gate) (d_ff), which a compiled graph recomputes.

    The eager count equals what autograd saves on CPU (tests/test_scaling.py) and is within 1% of
    an H100's eager slope; the compiled count matches the compiled slope (19.6 vs 19.8 h-sized bf16
    tensors per token at the 1B shape) but describes Inductor's choices only as far as that goes."""
    h, q, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    norm = 4 * h + 4 if compiled else 8 * h + 4
    attention = 2 * (q + 2 * kv) + 2 * (q + kv) + 2 * q + 4 * cfg.n_heads
    mlp = 2 * (2 * f) + 2 * f + (0 if compiled else 2 * f)
    return 2 * norm + attention + mlp


def memory_estimate(cfg: ModelConfig, micro_batch: int, seq_len: int, *, world: int = 1,
                    parallelism: str = "ddp", grad_accum: int = 1, checkpointing: bool = False,
                    compiled: bool = True, optimizer_states: int = 2,
                    reduce_every_micro_batch: bool = False) -> dict[str, float]:
    """Bytes one rank holds during a training step, by part, and the peak.

    Mixed precision as train.py runs it on GPU: fp32 master weights (4 B/param), fp32 gradients (4),
    AdamW's two fp32 moments (8; Muon keeps one for the blocks' matrices: optimizer_states=1 counts
    every parameter so, 4 B short for each one AdamW still handles: embeddings, norms, router) = 16
    B/param; FSDP2 shards all
    three over `world` ranks. The bf16 copies of the weights that the matmuls read are 2 B/param
    more (the playbook's "16-20 bytes/param"): autocast casts every block weight and autograd keeps
    the copy until backward; FSDP2 all-gathers bf16 blocks one at a time (counted: the root's
    embedding + two blocks in flight) and frees them after each block.

    Activations: L x block_activation_bytes x b T (with activation checkpointing, only each block's
    bf16 input; its activations return one block at a time in backward). The fused loss keeps the
    final norm's tensors, dL/dh (bf16) and dL/dW_head (fp32 V h) from forward to backward, and for
    a moment holds a chunk of LOSS_CHUNK_TOKENS rows of bf16 logits plus their gradient.

    The peak is the larger of two moments: the forward's loss chunk (where an H100 measured it at
    the 1B shape: compiled, eager, and eager with checkpointing) and the end of backward. Only
    with grad_accum > 1 do gradients live through a forward; set_to_none frees them after each step.
    Under FSDP2 they are then unsharded fp32 (4 N per rank): train.py skips the reduce-scatter on
    all but the last micro-batch, unless reduce_every_micro_batch (train.reduce_every_micro_batch)
    keeps them sharded. DDP's all-reduce buckets add nothing: train.py makes the gradients
    views into them (gradient_as_bucket_view).
    Counts a dense GQA block (MoE, MLA and linear-attention layers keep other tensors)."""
    if micro_batch < 1 or seq_len < 1 or world < 1 or grad_accum < 1:
        raise ValueError("micro_batch, seq_len, world and grad_accum must be >= 1")
    if parallelism not in ("ddp", "fsdp"):
        raise ValueError(f"parallelism={parallelism!r} is not 'ddp' or 'fsdp'")
    n = count_params(cfg)
    tokens, h, V = micro_batch * seq_len, cfg.d_model, cfg.vocab_size
    shard = world if parallelism == "fsdp" else 1
    block_weights = (matmul_params(cfg) - V * h) / cfg.n_layers
    if parallelism == "fsdp":
        copies = 2 * (V * h + 2 * block_weights)
    else:
        copies = 0.0 if checkpointing else 2 * cfg.n_layers * block_weights
    block = block_activation_bytes(cfg, compiled) * tokens
    norm = (4 * h + 4 if compiled else 8 * h + 4) * tokens
    per_param = {
        "weights (fp32)": 4 * n / shard,
        "gradients (fp32)": 4 * n / (1 if grad_accum > 1 and not reduce_every_micro_batch else shard),
        "optimizer states (fp32)": 4 * optimizer_states * n / shard,
    }
    step = {
        "bf16 weight copies": copies,
        "activations (all blocks)": cfg.n_layers * (2 * h * tokens if checkpointing else block),
        "loss: kept for backward": norm + 2 * h * tokens + 4 * V * h,
        "loss: logits chunk + grad (bf16)": 2 * 2 * min(tokens, LOSS_CHUNK_TOKENS) * V,
    }
    grads = per_param["gradients (fp32)"]
    always = sum(per_param.values()) - grads
    forward_peak = always + sum(step.values()) + (grads if grad_accum > 1 else 0)
    # with checkpointing, backward rebuilds one block (its activations and bf16 weights) at a time
    backward_end = always + grads + (block + 2 * block_weights if checkpointing else 0)
    return {**per_param, **step, "peak": max(forward_peak, backward_end)}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

# SmolLM3's shape (tests/test_model.py checks its 3.075B); no configs/smollm3.toml ships yet
SMOLLM3 = ModelConfig(vocab_size=128256, d_model=2048, n_layers=36, n_heads=16, n_kv_heads=4, d_ff=11008,
                      max_seq_len=4096, nope_every=4)


def _human(x: float) -> str:
    """1.24B, 31.5B, 4.2M: counts of parameters and tokens as people say them."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def playbook_table() -> str:
    """The playbook's compute figures recomputed: SmolLM3 ~2e23 FLOPs, and what the laws say."""
    rows = [("SmolLM3 3B, 11.2T tokens", SMOLLM3, count_params(SMOLLM3), 11.2e12, "lr 2e-4, 2.36M tok"),
            ("Chinchilla 70B, 1.4T tokens", None, 70e9, 1.4e12, "paper: 5.76e23 FLOPs")]
    lines = [f"{'run':<28} {'params':>7} {'tok/param':>9} {'6ND':>9} {'+attn':>9} {'Chin. N*':>8} "
             f"{'DS lr':>8} {'DS batch':>8}  used"]
    for name, cfg, n, d, used in rows:
        c = 6 * n * d
        attn = f"{training_flops(cfg, d, cfg.max_seq_len):9.2e}" if cfg else f"{'-':>9}"
        c_ds = deepseek_flops_per_token(cfg, cfg.max_seq_len) * d if cfg else c
        lines.append(f"{name:<28} {_human(n):>7} {d / n:9.0f} {c:9.2e} {attn} {_human(chinchilla_optimal(c)[0]):>8} "
                     f"{deepseek_lr(c_ds):8.1e} {_human(deepseek_batch_tokens(c_ds)):>8}  {used}")
    return "\n".join(lines)


def report(cfg: dict, tokens: float | None, gpus: int) -> str:
    m, t = cfg["model"], cfg["train"]
    T, b = t.seq_len, t.micro_batch_size
    if t.global_batch_size:
        if t.global_batch_size % (b * gpus):
            raise ValueError(f"train.global_batch_size={t.global_batch_size} is not a multiple of micro-batch {b} "
                             f"x {gpus} GPUs; pick --gpus that divides it")
        accum = t.global_batch_size // (b * gpus)
    else:
        accum = t.grad_accum_steps
    batch_tokens = b * accum * gpus * T
    tokens = tokens or t.max_steps * batch_tokens
    n, n6 = count_params(m), matmul_params(m)
    fpt, m_ds = flops_per_token(m, T), deepseek_flops_per_token(m, T)
    c6, c_ds = 6 * n * tokens, m_ds * tokens
    n_opt, d_opt = chinchilla_optimal(c6)
    n_20, _ = twenty_tokens_per_param(c6)
    out = [f"model        {_human(n)} parameters ({n:,}; {n6:,.0f} multiply each token: the N of 6ND), "
           f"seq_len {T}",
           f"FLOPs/token  {fpt:.3e} = 6N {6 * n6:.3e} + attention {fpt - 6 * n6:.3e}; DeepSeek's M "
           f"(non-embedding) {m_ds:.3e}",
           f"tokens       {_human(tokens)} ({tokens / n:.1f} per parameter; {tokens / batch_tokens:,.0f} steps of "
           f"{batch_tokens:,} tokens)",
           f"compute      6ND {c6:.3e} FLOPs; with attention {fpt * tokens:.3e}; DeepSeek's C = MD {c_ds:.3e}",
           f"Chinchilla   optimum for this 6ND: N {_human(n_opt)}, D {_human(d_opt)} "
           f"({d_opt / n_opt:.0f} tokens/param), "
           f"loss {chinchilla_loss(n_opt, d_opt):.3f} vs {chinchilla_loss(n, tokens):.3f} for this run; "
           f"20 tokens/param: N {_human(n_20)}",
           f"DeepSeek     lr {deepseek_lr(c_ds):.2e} (config {cfg['optim'].lr:g}), batch "
           f"{_human(deepseek_batch_tokens(c_ds))} tokens (config {_human(batch_tokens)})"]
    compiled = t.compile != "false"
    est = {ac: memory_estimate(m, b, T, world=gpus, parallelism=t.parallelism, grad_accum=accum,
                               checkpointing=ac, compiled=compiled) for ac in (False, True)}
    out.append(f"\nmemory per GPU, GiB ({gpus} GPU{'s' * (gpus > 1)}, {t.parallelism}, micro-batch {b} x {T}, "
               f"accumulation {accum}, bf16, {'compiled' if compiled else 'eager'}):")
    out.append(f"  {'':<34} {'no checkpointing':>17} {'checkpointing':>14}")
    for key in (k for k in est[False] if est[False][k] or est[True][k]):
        out.append(f"  {key:<34} {est[False][key] / GIB:17.2f} {est[True][key] / GIB:14.2f}")
    if m.moe or m.attn_type != "gqa" or "L" in m.layer_kinds():
        out.append("  (activations counted for a dense GQA block; this model's MoE/MLA/linear layers differ)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a TOML config (configs/*.toml); without it, the playbook's figures")
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens (default: train.max_steps x the global batch)")
    p.add_argument("--gpus", type=int, default=1, help="ranks the global batch and FSDP shards spread over")
    args, overrides = p.parse_known_args(argv)
    if args.config is None:
        print(playbook_table())
        return
    try:
        if args.gpus < 1 or (args.tokens is not None and not args.tokens > 0):
            raise ValueError(f"--gpus must be >= 1 and --tokens > 0, got --gpus {args.gpus} --tokens {args.tokens}")
        cfg = load_config(args.config, overrides)
        text = report(cfg, args.tokens, args.gpus)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    main()
