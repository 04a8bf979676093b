"""Training throughput of every attention variant at the playbook's 1B shape, relative to GQA on flex.

    python benchmarks/bench_attention.py --out bench_attention.json        # one H100, a few minutes
    python benchmarks/bench_attention.py --variants gqa,mla,hybrid --layers 2

The 1B ablation model's attention shape (d_model 2048, 32 heads of 64, 8 KV heads, d_ff 8192,
sequence 4096), cut to a few layers and a small vocabulary so that the blocks, not the output
layer, dominate; batches are packed documents (lengths drawn around 1,000 tokens) with document
masking on. Each variant runs forward + backward in bf16 autocast, as train.py does; tokens/s is
the median over the timed steps after warm-up (which includes compiling flex_attention's kernel
for that mask). DCA is a training-free inference method: it is timed forward only, next to a
forward-only GQA line. KV KiB/token is the cache the full 16-layer model would hold in bf16.
Prints a table and writes JSON (--out). Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention import kv_values_per_token  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

SHAPE = dict(d_model=2048, n_heads=32, n_kv_heads=8, d_ff=8192, vocab_size=8192, tie_embeddings=True)

# name -> (description, ModelConfig changes, timed mode)
VARIANTS = {
    "gqa": ("GQA, 8 KV heads (baseline)", {}, "train"),
    "gqa_sdpa": ("GQA on SDPA (boolean mask)", {"attn_backend": "sdpa"}, "train"),
    "mha": ("MHA, 32 KV heads", {"n_kv_heads": 32}, "train"),
    "mqa": ("MQA, 1 KV head", {"n_kv_heads": 1}, "train"),
    "rnope": ("RNoPE, every 4th layer", {"nope_every": 4}, "train"),
    "partial_rope": ("partial RoPE 0.5", {"rope_fraction": 0.5}, "train"),
    "yarn": ("YaRN factor 2", {"yarn_factor": 2.0}, "train"),
    "swa": ("sliding window 1024, all layers", {"sliding_window": 1024}, "train"),
    "swa_3to1": ("sliding window 1024, 3 of 4 layers", {"sliding_window": 1024, "layer_pattern": "SSSG"}, "train"),
    "chunked": ("chunked 1024 (Llama 4)", {"attn_chunk_size": 1024}, "train"),
    "sinks": ("learned sinks", {"attn_sinks": True}, "train"),
    "qk_norm": ("QK-norm", {"qk_norm": True}, "train"),
    "mla": ("MLA, latent 256 + RoPE key 32", {"attn_type": "mla"}, "train"),
    "hybrid": ("GLA on half the layers", {"layer_pattern": "LG"}, "train"),
    "gqa_fwd": ("GQA, forward only", {}, "forward"),
    "dca_fwd": ("DCA chunk 2048 (SDPA), forward only", {"attn_backend": "sdpa", "dca_chunk_size": 2048,
                                                         "dca_local_window": 512}, "forward"),
}


def packed_doc_ids(batch: int, seq_len: int, mean_len: int, generator: torch.Generator) -> torch.Tensor:
    lengths = -torch.rand(batch, seq_len, generator=generator).log() * mean_len  # exponential lengths
    rows = []
    for b in range(batch):
        ids, n, doc = [], 0, 0
        for length in lengths[b].long().clamp(min=16).tolist():
            take = min(length, seq_len - n)
            ids += [doc] * take
            n, doc = n + take, doc + 1
            if n == seq_len:
                break
        rows.append(ids)
    return torch.tensor(rows)


def bench(name: str, layers: int, batch: int, seq_len: int, steps: int, warmup: int, compile_blocks: bool) -> dict:
    label, changes, mode = VARIANTS[name]
    kw = {**SHAPE, "n_layers": layers, "max_seq_len": seq_len, "attn_backend": "flex", **changes}
    if "layer_pattern" in kw:  # repeat the pattern over the layers
        kw["layer_pattern"] = (kw["layer_pattern"] * layers)[:layers]
    cfg = ModelConfig(**kw)
    full = ModelConfig(**{**kw, "n_layers": 16, "layer_pattern": (kw.get("layer_pattern", "") * 16)[:16]
                          if kw.get("layer_pattern") else ""})
    kinds = full.layer_kinds()
    if cfg.attn_type == "mla":
        rope_dim, rank = cfg.mla_dims
        kv = kv_values_per_token(sum(k != "L" for k in kinds), cfg.head_dim, kv_lora_rank=rank, rope_dim=rope_dim)
    else:
        kv = kv_values_per_token(sum(k != "L" for k in kinds), cfg.head_dim, cfg.n_kv_heads)
    row = {"variant": name, "label": label, "mode": mode, "backend": cfg.attn_backend,
           "kv_kib_per_token_16_layers": kv * 2 / 1024}
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = Transformer(cfg).cuda()
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g).cuda()
    doc_ids = packed_doc_ids(batch, seq_len, 1000, g).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if mode == "train":
                loss, _ = model(idx[:, :-1], idx[:, 1:], doc_ids)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(idx[:, :-1], doc_ids=doc_ids)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    row.update(ms_per_step=1000 * step, tok_per_s=batch * seq_len / step,
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    del model, opt
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block (train.py compiles the whole forward, or each block under FSDP)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench_attention.py needs a CUDA GPU (it times the GPU path)")
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    rows = []
    for name in names:
        try:
            rows.append(bench(name, args.layers, args.batch, args.seq_len, args.steps, args.warmup, args.compile))
        except Exception as e:  # one variant failing (OOM, a kernel limit) must not hide the others
            rows.append({"variant": name, "label": VARIANTS[name][0], "mode": VARIANTS[name][2],
                         "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"})
        torch.cuda.empty_cache()
        r = rows[-1]
        result = r["error"] if "error" in r else f"{r['tok_per_s']:,.0f} tok/s, {r['peak_mem_gib']:.1f} GiB"
        print(f"{name}: {result}", flush=True)
    base = {m: next((r["tok_per_s"] for r in rows if r["variant"] == b and "error" not in r), None)
            for m, b in (("train", "gqa"), ("forward", "gqa_fwd"))}
    for r in rows:
        if "error" not in r and base[r["mode"]]:
            r["relative_to_gqa_flex"] = r["tok_per_s"] / base[r["mode"]]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.layers} layers of d_model 2048, "
          f"32 heads, seq {args.seq_len}, batch {args.batch}, packed documents, bf16"
          f"{', blocks compiled' if args.compile else ''}")
    print("| variant | back end | mode | tokens/s | vs GQA flex | peak GiB | KV KiB/token (16 layers) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | | {r['mode']} | failed: {r['error']} | | | |")
            continue
        rel = f"{r['relative_to_gqa_flex']:.2f}" if "relative_to_gqa_flex" in r else "-"
        print(f"| {r['label']} | {r['backend']} | {r['mode']} | {r['tok_per_s']:,.0f} | {rel} | "
              f"{r['peak_mem_gib']:.1f} | {r['kv_kib_per_token_16_layers']:.0f} |")
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args)}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
