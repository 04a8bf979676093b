"""Loss parity: the same model trained in bf16 and with each FP8 recipe (fp8.py), curves side by side.

    python benchmarks/fp8_parity.py --out fp8_parity.json             # one GPU, about 4 minutes
    python benchmarks/fp8_parity.py --out p.json --steps 4 --model.d_model=64 --model.n_layers=3 \\
        --model.n_heads=4 --model.d_ff=128 --train.seq_len=64 --train.micro_batch_size=4 \\
        --train.eval_interval=2 --model.vocab_size=512     # a smoke run on CPU (emulated FP8)

Each recipe is one train.py run (train.load_config + train.train, nothing else) of the same
configuration from the same seed, so the runs see the same initial weights and the same batches in
the same order; only model.fp8 differs. The model is a 109M-parameter Llama (12 layers, d_model 768,
12 heads / 4 KV heads, d_ff 3072, 8192-token BPE trained on the embedded corpus), trained on the
embedded corpus's code and math (0.7 / 0.3, their sizes' ratio: both are read about twice over in
300 steps of 32 x 1024 tokens; the 98k-token prose source would be read ~30 times at the default
mix). FP8's first and last blocks stay bf16 (train.py's default). Validation losses are computed
without FP8 (fp8.py: an FP8 layer without gradients is a plain one), so they compare the weights
each recipe trained. Extra `--section.key=value` arguments override the configuration for every run.

Writes --out (JSON: every run's training and validation curves, tokens/s, final validation loss and
its difference to bf16) and a markdown table next to it (.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import load_config, train  # noqa: E402

PARITY_OVERRIDES = [
    "--model.vocab_size=8192", "--model.d_model=768", "--model.n_layers=12", "--model.n_heads=12",
    "--model.n_kv_heads=4", "--model.d_ff=3072", "--model.max_seq_len=1024", "--model.attn_backend=sdpa",
    "--data.weights={ code = 0.7, math = 0.3 }",
    "--optim.lr=1.5e-3", "--optim.min_lr=1.5e-4", "--optim.warmup_steps=30", "--optim.schedule=cosine",
    "--train.seq_len=1024", "--train.micro_batch_size=32", "--train.max_steps=300", "--train.log_interval=10",
    "--train.eval_interval=50", "--train.eval_batches=8", "--train.ckpt_interval=0", "--train.keep_checkpoints=1",
    "--train.sample_tokens=0", "--train.document_masking=false",
]


def run_recipe(recipe: str, steps: int, extra: list[str], out_dir: Path) -> dict:
    """One training run with model.fp8 = recipe: its curves, speed and final validation loss."""
    cfg = load_config(None, [*PARITY_OVERRIDES, f"--train.max_steps={steps}", *extra, f"--model.fp8={recipe}",
                             f"--train.name=fp8_{recipe}", f"--train.out_dir={out_dir}"])
    t0 = time.time()
    summary = train(cfg)
    wall = time.time() - t0
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tok_per_s"] for r in rows if "tok_per_s" in r][1:]  # the first log interval holds the compile
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"final_val_loss": summary["val_loss"], "wall_s": wall,
            "tok_per_s_median": statistics.median(speeds) if speeds else None,
            "val_loss": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r],
            "loss": [[r["step"], r["loss"]] for r in rows if "loss" in r]}


def markdown(meta: dict, runs: dict[str, dict]) -> str:
    names = list(runs)
    steps = [step for step, _ in runs[names[0]]["val_loss"]]
    val = {name: dict(map(tuple, run["val_loss"])) for name, run in runs.items()}
    header = "| step | " + " | ".join(f"val loss, {n}" for n in names) + " |"
    lines = [f"{meta['device']}, torch {meta['torch']}, {meta['date']}", "", header, "|" + "---|" * (len(names) + 1)]
    lines += [f"| {s} | " + " | ".join(f"{val[n].get(s, float('nan')):.4f}" for n in names) + " |" for s in steps]
    lines += ["", "| recipe | final val loss | vs bf16 | tokens/s (median) | wall time |", "|---|---|---|---|---|"]
    for name, run in runs.items():
        delta = run.get("vs_bf16")
        lines.append(f"| {name} | {run['final_val_loss']:.4f} | {'-' if delta is None else f'{100 * delta:+.2f}%'} | "
                     f"{run['tok_per_s_median'] or 0:,.0f} | {run['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="fp8_parity.json")
    p.add_argument("--recipes", default="off,tensorwise,rowwise", help="model.fp8 values, bf16 ('off') first")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--runs-dir", default="", help="keep the run folders here (default: a temporary folder, removed)")
    args, extra = p.parse_known_args()
    recipes = args.recipes.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="fp8_parity_"))
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (FP8 emulated)",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
            "overrides": [*PARITY_OVERRIDES, f"--train.max_steps={args.steps}", *extra]}
    runs: dict[str, dict] = {}
    try:
        for recipe in recipes:
            runs[recipe] = run_recipe(recipe, args.steps, extra, runs_dir)
            print(f"fp8={recipe}: final val loss {runs[recipe]['final_val_loss']:.4f}, "
                  f"{runs[recipe]['tok_per_s_median'] or 0:,.0f} tok/s, {runs[recipe]['wall_s']:.0f} s", flush=True)
    finally:
        if not args.runs_dir:
            shutil.rmtree(runs_dir, ignore_errors=True)
    if "off" in runs:
        for run in runs.values():
            run["vs_bf16"] = run["final_val_loss"] / runs["off"]["final_val_loss"] - 1
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    tmp.replace(out)
    table = markdown(meta, runs)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
