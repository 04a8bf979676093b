"""Collective bandwidth: all-reduce, reduce-scatter and all-gather over message sizes, as nccl-tests
reports it. The playbook's infrastructure check before any long run: a link that delivers a
fraction of its peak makes every data-parallel step wait.

    torchrun --nproc_per_node=8 benchmarks/bench_comm.py --out comm.json       # GPUs of one host (NCCL)
    torchrun --nproc_per_node=2 benchmarks/bench_comm.py --device cpu --max-mb 8   # gloo, anywhere

For a message of S bytes (the largest buffer: the all-reduce's, the reduce-scatter's input, the
all-gather's output) that takes t seconds, algbw = S / t, and the bus bandwidth, which compares with
the link's peak whatever the rank count n, is busbw = algbw x 2(n-1)/n for all-reduce (a ring sends
each byte 2(n-1)/n times) and algbw x (n-1)/n for reduce-scatter and all-gather (nccl-tests'
PERFORMANCE.md). Each figure is the median of --iters timed calls after --warmup. Every call is
checked: the reduced values must equal the sum over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distributed import setup_distributed  # noqa: E402

OPS = ("all_reduce", "reduce_scatter", "all_gather")


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw for a collective over n ranks (nccl-tests)."""
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def run_op(op: str, size_bytes: int, device: torch.device, rank: int, world: int) -> tuple[torch.Tensor, callable]:
    """The buffers of one collective of size_bytes (the largest buffer) and the call that runs it;
    rank r contributes the value r + 1, so every result is known in advance."""
    numel = max(world, size_bytes // 4 // world * world)
    if op == "all_reduce":
        buf = torch.full((numel,), float(rank + 1), device=device)
        return buf, lambda: dist.all_reduce(buf)
    if op == "reduce_scatter":
        inp = torch.full((numel,), float(rank + 1), device=device)
        out = torch.empty(numel // world, device=device)
        return out, lambda: dist.reduce_scatter_tensor(out, inp)
    inp = torch.full((numel // world,), float(rank + 1), device=device)
    out = torch.empty(numel, device=device)
    return out, lambda: dist.all_gather_into_tensor(out, inp)


def check(op: str, result: torch.Tensor, world: int, calls: int) -> None:
    """all-reduce: the sum over ranks, repeated `calls` times in place; reduce-scatter: the sum;
    all-gather: each rank's chunk holds its value."""
    total = world * (world + 1) / 2
    if op == "all_reduce":
        expected = torch.full_like(result, total * world ** (calls - 1))
    elif op == "reduce_scatter":
        expected = torch.full_like(result, total)
    else:
        expected = torch.arange(1, world + 1, device=result.device, dtype=result.dtype).repeat_interleave(
            result.numel() // world)
    if not torch.allclose(result, expected, rtol=1e-5):
        raise RuntimeError(f"{op} gave wrong values: the collective is broken on this machine")


def measure(op: str, size_bytes: int, device: torch.device, rank: int, world: int, warmup: int, iters: int) -> dict:
    buf, call = run_op(op, size_bytes, device, rank, world)
    calls = 0
    times = []
    for i in range(warmup + iters):
        if op == "all_reduce":  # restart from the known values, so the check stays exact
            buf.fill_(float(rank + 1))
            calls = 0
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        calls += 1
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    check(op, buf, world, calls)
    t = statistics.median(times)
    size = buf.numel() * 4 if op != "reduce_scatter" else buf.numel() * 4 * world
    algbw = size / t / 1e9
    return {"op": op, "bytes": size, "seconds": t, "algbw_gbps": algbw, "busbw_gbps": algbw * bus_factor(op, world)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (GPUs with NCCL where there are some) | cpu (gloo) | cuda")
    p.add_argument("--min-mb", type=float, default=1.0)
    p.add_argument("--max-mb", type=float, default=1024.0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-gbps", type=float, default=450.0,
                   help="the link's peak per direction, for the %% column (H100/H200 NVLink 4: 450 GB/s)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        sys.exit("error: run it under torchrun with 2 or more processes, e.g. torchrun --nproc_per_node=8 "
                 "benchmarks/bench_comm.py")
    rank, _, world, device = setup_distributed(args.device, 1, "ddp")
    sizes, mb = [], args.min_mb
    while mb <= args.max_mb:
        sizes.append(int(mb * 2 ** 20))
        mb *= 4
    rows = [measure(op, size, device, rank, world, args.warmup, args.iters) for op in OPS for size in sizes]
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
        print(f"{world} x {name}; busbw = algbw x 2(n-1)/n (all-reduce) or (n-1)/n (the others); "
              f"% of {args.peak_gbps:g} GB/s")
        print(f"{'op':<15}{'size':>10}{'time (ms)':>12}{'algbw GB/s':>12}{'busbw GB/s':>12}{'% peak':>8}")
        for r in rows:
            print(f"{r['op']:<15}{r['bytes'] / 2 ** 20:>8.0f}MB{r['seconds'] * 1e3:>12.3f}{r['algbw_gbps']:>12.1f}"
                  f"{r['busbw_gbps']:>12.1f}{100 * r['busbw_gbps'] / args.peak_gbps:>7.0f}%")
        if args.out:
            Path(args.out).write_text(json.dumps({"world": world, "device": name, "rows": rows}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
