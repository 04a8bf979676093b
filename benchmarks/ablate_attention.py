"""The playbook's attention ablations in miniature, on CPU: MHA vs GQA vs MQA, RoPE vs RNoPE.

    python benchmarks/ablate_attention.py                     # the four runs, ~1.5 min each on 1 thread
    python benchmarks/ablate_attention.py --variants mha,gqa4,mqa,rnope,nope,swa,qk_norm,mla,hybrid
    python benchmarks/ablate_attention.py --variants gqa4 --extend   # + reading it at 2x context

Each variant trains the same small model (configs/tiny.toml, shrunk to run in about a minute and a
half on one CPU thread) on the default corpus with the same seed, data order and schedule; only
the attention line changes. Printed at the end: final validation loss, parameters, KV-cache values
per token, and throughput, side by side. At this scale differences of a few hundredths are within
seed noise (the playbook's 1B ablations ran 45B tokens): run --seeds 2 or more to see the spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention import kv_values_per_token  # noqa: E402
from checkpoint import checkpoint_paths  # noqa: E402
from data import MixtureLoader, prepare_data, tokenizer_fingerprint  # noqa: E402
from model import Transformer, count_params  # noqa: E402
from tokenizer import eot_id  # noqa: E402
from train import load_config, train  # noqa: E402

# The small shared model: 8 heads of 16 dims, 4 layers; GQA-4 (4 KV heads) is the baseline.
BASE = {"model.d_model": 128, "model.n_layers": 4, "model.n_heads": 8, "model.n_kv_heads": 4, "model.d_ff": 384,
        "model.max_seq_len": 256, "train.seq_len": 256, "train.micro_batch_size": 8, "train.max_steps": 150,
        "train.eval_interval": 1000, "train.eval_batches": 16, "train.log_interval": 25, "train.ckpt_interval": 0,
        "train.sample_tokens": 0, "optim.warmup_steps": 15}

VARIANTS = {
    "mha": ("MHA (8 KV heads)", {"model.n_kv_heads": 8}),
    "gqa4": ("GQA-4 (4 KV heads), RoPE: baseline", {}),
    "gqa2": ("GQA (2 KV heads)", {"model.n_kv_heads": 2}),
    "mqa": ("MQA (1 KV head)", {"model.n_kv_heads": 1}),
    "rnope": ("RNoPE: no RoPE on layer 3", {"model.nope_every": 4}),
    "nope": ("NoPE: no RoPE anywhere", {"model.nope_every": 1}),
    "partial": ("partial RoPE, fraction 0.5", {"model.rope_fraction": 0.5}),
    "swa": ("sliding window 64 on layers 0-2", {"model.sliding_window": 64, "model.layer_pattern": "SSSG"}),
    "qk_norm": ("QK-norm", {"model.qk_norm": True}),
    "sinks": ("learned attention sinks", {"model.attn_sinks": True}),
    "mla": ("MLA (latent 64, RoPE key 8)", {"model.attn_type": "mla"}),
    "hybrid": ("hybrid: GLA on layers 0 and 2", {"model.layer_pattern": "LGLG"}),
}


def run_variant(name: str, seed: int, out_dir: str, steps: int, threads: int) -> dict:
    label, changes = VARIANTS[name]
    overrides = {**BASE, **changes, "train.max_steps": steps, "train.threads": threads, "train.seed": seed,
                 "train.out_dir": out_dir, "train.name": f"{name}-seed{seed}"}
    args = [f"--{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in overrides.items()]
    cfg = load_config(None, args)
    t0 = time.time()
    summary = train(cfg)
    seconds = time.time() - t0
    m = cfg["model"]
    attn_layers = sum(kind != "L" for kind in m.layer_kinds())
    if m.attn_type == "mla":
        rope_dim, rank = m.mla_dims
        kv = kv_values_per_token(attn_layers, m.head_dim, kv_lora_rank=rank, rope_dim=rope_dim)
    else:
        kv = kv_values_per_token(attn_layers, m.head_dim, m.n_kv_heads)
    return {"variant": name, "label": label, "seed": seed, "val_loss": summary["val_loss"],
            "params": count_params(m), "kv_values_per_token": kv, "tokens": summary["tokens"], "seconds": seconds}


@torch.no_grad()
def context_extension(out_dir: str, seed: int, n_batches: int = 16) -> list[dict]:
    """The baseline checkpoint (trained at 256 tokens) read at 512 tokens, three ways: plain RoPE
    (extrapolation to unseen positions), YaRN x2 (yarn_factor=2), DCA (chunk 192 + local window 64,
    no position beyond 255). Mean loss on positions 256-511 of validation windows, and on positions
    0-255 (inside the trained length) for reference; documents masked as in training."""
    run = Path(out_dir) / f"gqa4-seed{seed}"
    state = torch.load(checkpoint_paths(run)[-1] / "state.pt", map_location="cpu", weights_only=False)["model"]
    cfg = load_config(run / "config.toml")
    dcfg, mcfg = cfg["data"], cfg["model"]
    enc = prepare_data(dcfg, mcfg.vocab_size, log=lambda *a: None)
    fingerprint = tokenizer_fingerprint(dcfg.tokenizer_path(mcfg.vocab_size))
    rows = []
    for label, changes in [("plain RoPE (extrapolation)", {}),
                           ("YaRN, factor 2", {"yarn_factor": 2.0, "yarn_original_seq_len": 256}),
                           ("DCA, chunk 192 + window 64", {"dca_chunk_size": 192, "dca_local_window": 64})]:
        model = Transformer(dataclasses.replace(mcfg, max_seq_len=512, **changes)).eval()
        model.load_state_dict(state)
        loader = MixtureLoader(dcfg.shard_dir(mcfg.vocab_size), dcfg.weights, "val", 512, dcfg.seed, eot_id(enc),
                               fingerprint=fingerprint)
        sums = torch.zeros(2)
        for _ in range(n_batches):
            x, y, doc = loader.next_step(8, 1)[0]
            ce = F.cross_entropy(model(x, doc_ids=doc).transpose(1, 2), y, reduction="none")  # (B, 512)
            sums += torch.stack([ce[:, :256].mean(), ce[:, 256:].mean()])
        rows.append({"method": label, "loss_0_255": (sums[0] / n_batches).item(),
                     "loss_256_511": (sums[1] / n_batches).item()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="mha,gqa4,mqa,rnope", help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds 1337, 1338, ...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=None, help="run folders (default: a fresh temporary folder)")
    p.add_argument("--extend", action="store_true",
                   help="also read the gqa4 baseline at twice its context: plain RoPE vs YaRN vs DCA")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="ablate_attention_")
    rows = [run_variant(n, 1337 + s, out_dir, args.steps, args.threads) for n in names for s in range(args.seeds)]

    print(f"\nAttention ablation in miniature: {args.steps} steps x {BASE['train.micro_batch_size']} x "
          f"{BASE['train.seq_len']} tokens, {args.threads} thread(s), runs in {out_dir}")
    print("| variant | change | params | KV values/token | final val loss | seconds |")
    print("|---|---|---|---|---|---|")
    for n in names:
        mine = [r for r in rows if r["variant"] == n]
        losses = [r["val_loss"] for r in mine]
        loss = f"{sum(losses) / len(losses):.4f}"
        if len(losses) > 1:
            loss += f" ({', '.join(f'{x:.4f}' for x in losses)})"
        print(f"| {n} | {mine[0]['label']} | {mine[0]['params']:,} | {mine[0]['kv_values_per_token']:,} | {loss} | "
              f"{sum(r['seconds'] for r in mine) / len(mine):.0f} |")
    extension = []
    if args.extend:
        if "gqa4" not in names:
            sys.exit("error: --extend reads the gqa4 baseline; include gqa4 in --variants")
        torch.set_num_threads(args.threads)
        extension = context_extension(out_dir, 1337)
        print("\nThe gqa4 model (trained at 256 tokens) read at 512 tokens:")
        print("| method | loss, positions 0-255 | loss, positions 256-511 |")
        print("|---|---|---|")
        for r in extension:
            print(f"| {r['method']} | {r['loss_0_255']:.4f} | {r['loss_256_511']:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": rows, "context_extension": extension}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
