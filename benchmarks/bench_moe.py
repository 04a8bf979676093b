"""GPU benchmark for moe.py: the grouped-GEMM path vs the reference loop, a MoE model vs the dense
model of the same active parameters, and checks that torch.compile and FSDP2 run MoE layers.

    python benchmarks/bench_moe.py --out runs/bench_moe.json          # one H100, a few minutes

1. paths: one MoE layer of 64 experts, top-8 (d_model 2048, d_expert 1024: OLMoE's layer), bf16
   autocast, forward + backward over 16k tokens: reference (a loop over experts), grouped with
   torch._grouped_mm, grouped with the padded batched matmul. Target: grouped >= 3x reference.
2. models: the playbook's 1B ablation shape (d_model 2048, 32 heads, 8 KV heads, d_ff 8192, vocab
   128256), a few layers, against the same shape with every MLP replaced by 64 experts of width
   1024, top-8 (8 x 1024 = d_ff: equal active parameters, plus the router). A training step of
   --accum micro-batches (forward + backward each) and one fused AdamW step, blocks compiled as
   train.py does. Target: MoE >= 60% of dense tok/s.
3. checks: a small MoE model's loss with torch.compile and with FSDP2 (fully_shard, bf16 mixed
   precision, one process) equals eager's, and three training steps run in each mode.

Each part records an error instead of stopping the others, so a partial run still writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import ModelConfig, Transformer, active_params, count_params, make_mlp  # noqa: E402
from moe import begin_moe_step, end_moe_step, grouped_kernel  # noqa: E402


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, iters: int) -> float:
    """Mean milliseconds per call, after warmup calls (compilation, autotuning)."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def bench_paths(args) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=args.d_model, n_heads=16, n_kv_heads=4, d_ff=4 * args.d_model, moe=True, moe_experts=64,
                      moe_top_k=8, moe_d_expert=args.d_model // 2)
    layer = make_mlp(cfg).to(DEVICE)
    x = torch.randn(args.tokens, cfg.d_model, device=DEVICE, requires_grad=True)
    grad = torch.randn(args.tokens, cfg.d_model, device=DEVICE)
    available = grouped_kernel(x, cfg.d_model, 2 * cfg.moe_d_expert, torch.bfloat16)
    out, rows = {}, {}
    for name, impl, kernel in (("reference", "reference", "auto"), ("grouped_mm", "grouped", "grouped_mm"),
                               ("padded_bmm", "grouped", "bmm")):
        if kernel == "grouped_mm" and available != "grouped_mm":
            rows[name] = {"skipped": "torch._grouped_mm is not available for bf16 on this device/torch"}
            continue
        layer.experts.impl, layer.experts.kernel = impl, kernel

        def step():
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                y = layer(x)
            y.backward(grad)
            return y

        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out[name] = layer(x).float().detach()
        ms = timed(step, args.warmup, args.iters)
        rows[name] = {"ms_fwd_bwd": ms, "tok_per_s": args.tokens / ms * 1e3}
    ref = rows["reference"]["ms_fwd_bwd"]
    for name, row in rows.items():
        if "ms_fwd_bwd" in row:
            row["speedup_vs_reference"] = ref / row["ms_fwd_bwd"]
            row["max_abs_diff_vs_reference"] = (out[name] - out["reference"]).abs().max().item()
    return {"shape": f"d_model {cfg.d_model}, 64 experts x {cfg.moe_d_expert}, top-8", "tokens": args.tokens,
            "paths": rows}


def model_step_fns(cfg: ModelConfig, batch: int, seq: int, compile_blocks: bool):
    """(forward + backward of one micro-batch, optimizer step), as train.py runs them."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE)
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=DEVICE)
    x, y = idx[:, :-1], idx[:, 1:]

    def forward_backward():
        if cfg.moe:
            begin_moe_step(model, 1)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss, _ = model(x, y)
        loss.backward()

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the grads: the next forward_backward accumulates
        if cfg.moe:
            end_moe_step(model)

    return model, forward_backward, optimizer_step


def bench_models(args) -> dict:
    """Tokens/s of a training step of --accum micro-batches: accum * fwd_bwd + one optimizer step.
    MoE holds ~3x the dense model's parameters, so its optimizer step costs ~3x: it is timed apart
    and amortised over the micro-batches of a step, as in real training (the 1B ablation's ~1M-token
    batch on 8 GPUs is 16 micro-batches of 8k tokens per GPU)."""
    h = args.d_model
    base = dict(vocab_size=args.vocab, d_model=h, n_layers=args.layers, n_heads=32, n_kv_heads=8, d_ff=4 * h,
                max_seq_len=args.seq_len, tie_embeddings=True)
    configs = {"dense": ModelConfig(**base),  # 64 experts of width d_ff / 8, top-8: the dense model's active MLP
               "moe": ModelConfig(**base, moe=True, moe_experts=64, moe_top_k=8, moe_d_expert=h // 2)}
    rows = {}
    tokens = args.batch * args.seq_len
    for name, cfg in configs.items():
        model, forward_backward, optimizer_step = model_step_fns(cfg, args.batch, args.seq_len, not args.no_compile)
        forward_backward()
        optimizer_step()
        ms_fb = timed(forward_backward, args.warmup, args.iters)
        ms_opt = timed(optimizer_step, 1, 3)
        ms_step = args.accum * ms_fb + ms_opt
        rows[name] = {"params": count_params(cfg), "active_params": active_params(cfg) if cfg.moe else count_params(cfg),
                      "ms_fwd_bwd": ms_fb, "ms_optimizer": ms_opt, "fwd_bwd_tok_per_s": tokens / ms_fb * 1e3,
                      "tok_per_s": args.accum * tokens / ms_step * 1e3,
                      "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else 0.0}
        del model, forward_backward, optimizer_step
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    rows["moe_over_dense_tok_per_s"] = rows["moe"]["tok_per_s"] / rows["dense"]["tok_per_s"]
    rows["moe_over_dense_fwd_bwd"] = rows["moe"]["fwd_bwd_tok_per_s"] / rows["dense"]["fwd_bwd_tok_per_s"]
    return {"layers": args.layers, "batch": args.batch, "seq_len": args.seq_len, "accum": args.accum,
            "compiled": not args.no_compile, "models": rows}


def check_compile_and_fsdp2(args) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = ModelConfig(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=1536, max_seq_len=512,
                      moe=True, moe_experts=16, moe_top_k=4, moe_d_expert=384, moe_shared_experts=1,
                      moe_dense_layers=1, moe_bias_rate=0.001)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (8, 513), device=DEVICE)
    x, y = idx[:, :-1], idx[:, 1:]
    results = {}
    for mode in args.check_modes:
        torch.manual_seed(0)
        model = Transformer(cfg).to(DEVICE)
        if mode.startswith("fsdp2"):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in model.blocks:
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        if mode.endswith("compile"):
            for block in model.blocks:
                block.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(4):
            begin_moe_step(model, 1)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss, parts = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            metrics = end_moe_step(model)
            losses.append(loss.item())
        results[mode] = {"losses": losses, "imbalance": metrics["moe/imbalance"], "balance_loss": parts["balance_loss"].item()}
    eager = results["eager"]["losses"]
    for mode, r in results.items():
        r["first_loss_rel_diff_vs_eager"] = abs(r["losses"][0] - eager[0]) / eager[0]
        r["ok"] = r["first_loss_rel_diff_vs_eager"] < 1e-2 and r["losses"][-1] < r["losses"][0]
    dist.destroy_process_group()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--tokens", type=int, default=16384, help="tokens through the MoE layer (paths)")
    p.add_argument("--d-model", type=int, default=2048, help="d_model (1B shape: 2048; experts are d_model / 2 wide)")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--layers", type=int, default=4, help="layers of the 1B-shape models")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--accum", type=int, default=16, help="micro-batches per optimizer step (models)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="time the models in eager mode")
    p.add_argument("--parts", nargs="+", default=["paths", "models", "checks"], choices=["paths", "models", "checks"])
    p.add_argument("--check-modes", nargs="+", default=["eager", "compile", "fsdp2", "fsdp2+compile"])
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script at tiny sizes")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("error: bench_moe.py needs a CUDA device (or --device=cpu for a smoke test at tiny sizes)")
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__}
    for part, fn in (("paths", bench_paths), ("models", bench_models), ("checks", check_compile_and_fsdp2)):
        if part not in args.parts:
            continue
        try:
            report[part] = fn(args)
        except Exception as e:  # keep going: the other parts still measure
            report[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        print(f"\n[{part}]\n" + json.dumps(report[part], indent=1)[:4000], flush=True)

    print(f"\n{report['device']}, torch {report['torch']}")
    paths = report.get("paths", {}).get("paths", {})
    if paths:
        print(f"\nMoE layer, {report['paths']['shape']}, {args.tokens} tokens, fwd+bwd, bf16")
        print(f"{'path':<12} {'ms':>8} {'tok/s':>12} {'speedup':>8}")
        for name, r in paths.items():
            if "ms_fwd_bwd" in r:
                print(f"{name:<12} {r['ms_fwd_bwd']:>8.2f} {r['tok_per_s']:>12,.0f} {r['speedup_vs_reference']:>7.2f}x")
            else:
                print(f"{name:<12} {r}")
    models = report.get("models", {}).get("models", {})
    if models:
        print(f"\n1B shape (d_model {args.d_model}), {args.layers} layers, batch {args.batch} x {args.seq_len}, training step")
        print(f"{'model':<6} {'params':>14} {'active':>14} {'ms fwd+bwd':>11} {'ms optim':>9} "
              f"{'tok/s':>10} {'GiB':>6}")
        for name in ("dense", "moe"):
            r = models[name]
            print(f"{name:<6} {r['params']:>14,} {r['active_params']:>14,} {r['ms_fwd_bwd']:>11.1f} "
                  f"{r['ms_optimizer']:>9.1f} {r['tok_per_s']:>10,.0f} {r['peak_mem_gib']:>6.1f}")
        print(f"MoE / dense tokens/s, steps of {args.accum} micro-batches: {models['moe_over_dense_tok_per_s']:.2f} "
              f"(target >= 0.60); forward+backward alone: {models['moe_over_dense_fwd_bwd']:.2f}")
    checks = report.get("checks", {})
    if checks and "error" not in checks:
        print("\ncompile / FSDP2 with MoE layers (4 steps):")
        for mode, r in checks.items():
            print(f"{mode:<14} losses {' '.join(f'{v:.4f}' for v in r['losses'])}  ok={r['ok']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
