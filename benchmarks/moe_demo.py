"""MoE in miniature on CPU: a tiny MoE against a tiny dense model, and the balancing variants.

    python benchmarks/moe_demo.py                      # dense vs moe, 150 steps each
    python benchmarks/moe_demo.py --runs dense moe "moe, bias balancing" --steps 300

Each run trains with train.py on the embedded corpus (one CPU thread), then loss and balance
figures are printed side by side: global vs local balance statistics, no balancing, and
DeepSeek-V3's auxiliary-loss-free bias (docs/moe.md has measured results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import active_params, count_params  # noqa: E402
from train import load_config, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

DEMO_RUNS = {  # name: (config, extra overrides)
    "dense": ("configs/tiny.toml", []),
    "moe": ("configs/moe_tiny.toml", []),
    # Global and local statistics only differ when a step has several micro-batches (or ranks):
    "moe, global, 4 micro": ("configs/moe_tiny.toml", ["--train.micro_batch_size=2", "--train.grad_accum_steps=4"]),
    "moe, local, 4 micro": ("configs/moe_tiny.toml", ["--train.micro_batch_size=2", "--train.grad_accum_steps=4",
                                                      "--model.moe_balance_stats=local"]),
    "moe, no balancing": ("configs/moe_tiny.toml", ["--model.moe_balance_coef=0.0"]),
    "moe, bias balancing": ("configs/moe_tiny.toml", ["--model.moe_balance_coef=0.0", "--model.moe_bias_rate=0.001"]),
}


def demo(steps: int, micro_batch_size: int, runs: list[str], out_dir: str) -> None:
    """Train each run on the default corpus (one CPU thread), then print loss and balance side by side."""
    every = max(1, steps // 5)
    table = {}
    for name in runs:
        config, extra = DEMO_RUNS[name]
        cfg = load_config(ROOT / config, [
            f"--train.name={name.replace(', ', '_').replace(' ', '_')}", f"--train.out_dir={out_dir}",
            f"--train.max_steps={steps}", f"--train.micro_batch_size={micro_batch_size}", "--train.threads=1",
            f"--train.log_interval={every}", f"--train.eval_interval={every}", "--train.ckpt_interval=0",
            "--train.sample_tokens=0", "--optim.warmup_steps=20", *extra])
        print(f"\n=== {name}: {count_params(cfg['model']):,} parameters, "
              f"{active_params(cfg['model']) if cfg['model'].moe else count_params(cfg['model']):,} active ===")
        summary = train(cfg)
        rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        table[name] = {}
        for r in rows:  # a step's training row and its validation row merge
            table[name].setdefault(r["step"], {}).update(r)
    print("\nstep | " + " | ".join(f"{n}: train loss / val loss / imbalance / dead / balance" if n != "dense"
                                    else "dense: train loss / val loss" for n in runs))
    for step in sorted(table[runs[0]]):
        cells = []
        for n in runs:
            r = table[n].get(step, {})
            cell = f"{r.get('loss', float('nan')):.3f} / {r.get('val_loss', float('nan')):.3f}"
            if "moe/imbalance" in r:
                cell += f" / {r['moe/imbalance']:.2f} / {r['moe/dead_experts']} / {r['moe/balance_loss']:.3f}"
            cells.append(cell)
        print(f"{step:>4} | " + " | ".join(cells))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train tiny dense and MoE models on CPU and compare them.")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--runs", nargs="+", default=["dense", "moe"], choices=list(DEMO_RUNS))
    p.add_argument("--out-dir", default=None, help="where the runs go (default: a fresh temporary folder)")
    args = p.parse_args(argv)
    demo(args.steps, args.micro_batch_size, args.runs, args.out_dir or tempfile.mkdtemp(prefix="moe_demo_"))


if __name__ == "__main__":
    main()
