"""GEMM throughput in bf16 and FP8 on the current GPU: the playbook's infrastructure table.

    python benchmarks/bench_gemm.py --out gemm.md      # writes gemm.md and gemm.json
    python benchmarks/bench_gemm.py --smoke            # tiny shapes on any device: checks the script, measures nothing

Table 1, one GEMM: TFLOP/s = 2 M N K / time of torch.mm in bf16 and of torch._scaled_mm in FP8
(e4m3 x e4m3, bf16 output) with tensorwise scales (one per operand) and rowwise scales ((M, 1) and
(1, N)), each with cuBLAS's fast FP8 accumulation and without it (fp8.py uses fast accumulation
in the forward and the precise one in the two backward GEMMs). Operands are quantised beforehand,
so this is the tensor cores' rate. The shapes: Llama-70B's projections split 8 ways by tensor
parallelism, as SemiAnalysis benchmarked them for the playbook's table (QKV 8192 -> 1280, O 1024 ->
8192, gate/up 8192 -> 7168, down 3584 -> 8192, M = 16384 tokens) and 8192^3; then the 1B ablation
model's (configs/ablation_1b.toml, micro-batch 4 x 4096 = 16384 tokens; Q/K/V and gate/up fused as
blocks.fused_projections runs them; the output head, which stays bf16 in fp8.py, for scale).

Table 2, what training sees: forward + backward of one linear layer at the 1B shapes, compiled,
under bf16 autocast with a float32 weight (train.py's one-GPU and DDP path): bf16 F.linear against
fp8.fp8_linear, whose time includes every amax and cast (three FP8 GEMMs and their quantisations).
Effective TFLOP/s = 6 M N K / time. Median of --iters timed repetitions after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8 import E4M3, fp8_linear, quantize, scaled_mm  # noqa: E402

LLAMA_70B_TP8 = [("70B qkv", 16384, 1280, 8192), ("70B o", 16384, 8192, 1024), ("70B gate/up", 16384, 7168, 8192),
                 ("70B down", 16384, 8192, 3584), ("8192^3", 8192, 8192, 8192)]
ABLATION_1B = [("1B qkv", 16384, 3072, 2048), ("1B o", 16384, 2048, 2048), ("1B gate/up", 16384, 16384, 2048),
               ("1B down", 16384, 2048, 8192)]
ABLATION_1B_HEAD = [("1B head (bf16 in fp8.py)", 16384, 128256, 2048)]
GEMM_VARIANTS = ("bf16", "tensorwise fast", "tensorwise precise", "rowwise fast", "rowwise precise")


def median_seconds(fn, iters: int, warmup: int = 3) -> float:
    """Median time of fn() over iters calls, each ended by a device synchronisation."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_tflops(m: int, n: int, k: int, variant: str, device: torch.device, iters: int) -> float:
    """TFLOP/s of one (M, K) @ (K, N) product: a row-major, b column-major (a weight's transpose),
    as F.linear and torch._scaled_mm read them."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    if variant == "bf16":
        fn = lambda: a @ w.t()  # noqa: E731
    else:
        recipe, accumulation = variant.split()
        along_k = 1 if recipe == "rowwise" else None
        (a_q, a_s), (w_q, w_s) = quantize(a, E4M3, along_k), quantize(w, E4M3, along_k)
        fn = lambda: scaled_mm(a_q, a_s, w_q.t(), w_s.t(), torch.bfloat16, accumulation == "fast")  # noqa: E731
    return 2 * m * n * k / median_seconds(fn, iters) / 1e12


def linear_training_tflops(m: int, n: int, k: int, recipe: str, device: torch.device, iters: int) -> float:
    """Effective TFLOP/s (6 M N K per step) of a compiled linear layer's forward and backward."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU (smoke): float32, no autocast
    w = torch.nn.Parameter(0.02 * torch.randn(n, k, device=device))
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, n, device=device, dtype=dtype)
    layer = F.linear if recipe == "bf16" else (lambda x, w: fp8_linear(x, w, recipe))
    compiled = torch.compile(layer, dynamic=False)

    def step():
        x.grad = w.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = compiled(x, w)
        y.backward(g)

    return 6 * m * n * k / median_seconds(step, iters) / 1e12


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gemm.md", help="markdown tables; the JSON goes next to it (.json)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="shapes divided by 64, any device: checks the script runs")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_gemm.py measures a GPU; on CPU only --smoke runs (FP8 is emulated there)")
    shrink = (lambda shapes: [(name, max(16, m // 64), max(16, n // 64), max(16, k // 64))
                              for name, m, n, k in shapes]) if args.smoke else (lambda shapes: shapes)
    iters = 2 if args.smoke else args.iters
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke: emulated FP8)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
            "iters": iters, "smoke": args.smoke}
    print(json.dumps(meta), flush=True)

    gemms = []
    for name, m, n, k in shrink(LLAMA_70B_TP8 + ABLATION_1B + ABLATION_1B_HEAD):
        row = {"shape": name, "m": m, "n": n, "k": k}
        for variant in GEMM_VARIANTS:
            try:
                row[variant] = gemm_tflops(m, n, k, variant, device, iters)
            except Exception as e:  # one unsupported kernel must not hide the others
                row[variant] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        gemms.append(row)
        print(row, flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None

    linears = []
    for name, m, n, k in shrink(ABLATION_1B):
        row = {"shape": name, "m": m, "n": n, "k": k}
        for recipe in ("bf16", "tensorwise", "rowwise"):
            try:
                row[recipe] = linear_training_tflops(m, n, k, recipe, device, iters)
            except Exception as e:
                row[recipe] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        linears.append(row)
        print(row, flush=True)

    def cell(value) -> str:
        return (f"{value:,.0f}" if value >= 10 else f"{value:.2g}") if isinstance(value, float) else "failed"

    def speedup(row: dict, over: str, names) -> str:
        fp8 = [row[v] for v in names if isinstance(row[v], float)]
        return f"{max(fp8) / row[over]:.2f}x" if fp8 and isinstance(row[over], float) else "-"

    table1 = markdown_table(["shape (M x N x K)", *GEMM_VARIANTS, "best FP8 / bf16"],
                            [[f"{r['shape']} ({r['m']} x {r['n']} x {r['k']})", *(cell(r[v]) for v in GEMM_VARIANTS),
                              speedup(r, "bf16", GEMM_VARIANTS[1:])] for r in gemms])
    table2 = markdown_table(["1B layer (M x N x K)", "bf16", "FP8 tensorwise", "FP8 rowwise", "tensorwise / bf16",
                             "rowwise / bf16"],
                            [[f"{r['shape']} ({r['m']} x {r['n']} x {r['k']})", cell(r["bf16"]), cell(r["tensorwise"]),
                              cell(r["rowwise"]), speedup(r, "bf16", ["tensorwise"]), speedup(r, "bf16", ["rowwise"])]
                             for r in linears])
    errors = [f"- {r['shape']} {k}: {v}" for r in gemms + linears for k, v in r.items() if isinstance(v, str)
              and k != "shape"]
    text = (f"{meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), {meta['date']}\n\n"
            f"One GEMM, TFLOP/s (operands already in FP8):\n\n{table1}\n\n"
            f"Forward + backward of a compiled linear layer, effective TFLOP/s (casts included):\n\n{table2}\n"
            + ("\nFailures:\n" + "\n".join(errors) + "\n" if errors else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "gemm": gemms, "linear": linears}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
