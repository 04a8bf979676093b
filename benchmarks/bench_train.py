"""Training throughput, MFU and peak memory of a config on the current GPU.

    python benchmarks/bench_train.py --config configs/ablation_1b.toml                 # ours
    python benchmarks/bench_train.py --config configs/ablation_1b.toml --vs-hf         # + HF Llama
    python benchmarks/bench_train.py --config configs/ablation_1b.toml --doc-masking   # flex docs vs SDPA causal
    python benchmarks/bench_train.py --vs-hf --backends sdpa-fa4,sdpa                  # FlashAttention-4 vs cuDNN
    python benchmarks/bench_train.py --vs-hf --fp8 rowwise,tensorwise                  # + FP8 linears (fp8.py)

One training step = forward and backward on --grad-accum micro-batches (default 1) and a fused
AdamW step, timed with CUDA synchronisation (a real run of configs/ablation_1b.toml accumulates
12-96 micro-batches per step, so its optimizer costs less per token than at --grad-accum 1); the
figure is the median over --steps steps after --warmup steps (compilation happens in the
warm-up). MFU uses model.flops_per_token (6N + 12 L h T, PaLM's definition) over the GPU's dense
bf16 peak (989 TFLOP/s on H100/H200). Each variant runs in the same process, one after the other,
with memory released in between. Our model compiles with train.py's Inductor settings
(INDUCTOR_GPU_SETTINGS) plus any --inductor variant; HF with Inductor's defaults. --fp8 adds our
model with model.fp8 set (the first --backends entry; `RECIPE:all` puts the first and last blocks
in FP8 too); its MFU still divides by the bf16 peak, so it compares step times, not FP8 utilisation.
Results go to stdout as a table and to --out as JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config  # noqa: F401  (bench --inductor patches it)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
from attention import use_flash_attention_4  # noqa: E402
from model import Transformer, flops_per_token  # noqa: E402
from optim import OptimConfig, build_optimizer  # noqa: E402
from distributed import INDUCTOR_GPU_SETTINGS, peak_flops_per_device  # noqa: E402
from tokenizer import tokenizer_training_text, train_bpe  # noqa: E402
from train import load_config  # noqa: E402


def corpus_doc_ids(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Document ids of packed windows whose document lengths are drawn from the embedded corpus
    (in the proportions of the 0.7/0.2/0.1 mix), tokenized with a 32k BPE trained on the spot."""
    enc = train_bpe(tokenizer_training_text(max_bytes=20_000_000), 32768, progress=False)
    rng = np.random.default_rng(seed)
    lengths = {s: np.array([len(t) + 1 for t in enc.encode_ordinary_batch(data.corpus_documents(s))])
               for s in data.DEFAULT_WEIGHTS}
    names, weights = list(data.DEFAULT_WEIGHTS), np.array(list(data.DEFAULT_WEIGHTS.values()))
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq_len:
            source = names[rng.choice(len(names), p=weights / weights.sum())]
            ids += [doc] * int(rng.choice(lengths[source]))
            doc += 1
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def time_steps(step_fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step_fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def bench_ours(cfg: dict, batch: int, steps: int, warmup: int, backend: str, doc_ids, compiled: bool,
               activation_checkpointing: bool = False, profile_dir: Path | None = None,
               compile_mode: str | None = None, compile_per_block: bool = False, grad_accum: int = 1,
               fp8: str = "off", fp8_all_blocks: bool = False) -> dict:
    mcfg = cfg["model"]
    mcfg.fp8, mcfg.fp8_skip_first_last = fp8, not fp8_all_blocks
    torch._dynamo.reset()  # SDPA's kernel is chosen at trace time: no graph reuse across variants
    # "sdpa-<kernel>" pins SDPA to one kernel (cudnn, flash, efficient) by disabling the others;
    # "sdpa-fa3" / "sdpa-fa4" are the flash kernel routed to FlashAttention-3 (the
    # flash_attn_interface package) or FlashAttention-4 (the flash-attn-4 package, CuTe DSL kernels
    # for Hopper and Blackwell). Plain "sdpa" lets PyTorch choose (cuDNN on H100 in torch 2.11).
    pinned = backend.removeprefix("sdpa-") if backend.startswith("sdpa-") else None
    if pinned not in (None, "cudnn", "flash", "efficient", "fa3", "fa4"):
        raise SystemExit(f"unknown back end {backend!r}: use sdpa, sdpa-cudnn, sdpa-flash, sdpa-efficient, "
                         "sdpa-fa3, sdpa-fa4 or flex")
    flash_impl = pinned.upper() if pinned in ("fa3", "fa4") else None
    torch.backends.cuda.enable_flash_sdp(pinned in (None, "flash", "fa3", "fa4"))
    torch.backends.cuda.enable_mem_efficient_sdp(pinned in (None, "efficient"))
    torch.backends.cuda.enable_cudnn_sdp(pinned in (None, "cudnn"))
    if flash_impl:
        from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl
        if flash_impl == "FA4":  # what train.py does on Hopper/Blackwell when flash-attn-4 is installed
            why_not = use_flash_attention_4(torch.device("cuda"))
            if why_not:
                raise RuntimeError(why_not)
        else:
            activate_flash_attention_impl(flash_impl)
    try:  # a failing variant must not leave FA3/FA4 switched on for the ones after it (HF included)
        mcfg.attn_backend = "sdpa" if backend.startswith("sdpa") else backend
        torch.manual_seed(0)
        model = Transformer(mcfg).cuda()
        model.activation_checkpointing = activation_checkpointing
        fwd = model
        if compiled and compile_per_block:  # what train.py does under FSDP
            for block in model.blocks:
                block.compile(mode=compile_mode)
        elif compiled:  # what train.py does otherwise: the whole forward as one graph
            fwd = torch.compile(model, mode=compile_mode)
        opt = build_optimizer(model, OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=0))
        T = cfg["train"].seq_len
        x = torch.randint(0, mcfg.vocab_size, (batch, T + 1), device="cuda")
        doc = doc_ids.cuda() if doc_ids is not None else None

        def step():
            for _ in range(grad_accum):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, _ = fwd(x[:, :-1], x[:, 1:], doc)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        times = time_steps(step, steps, warmup)
        if profile_dir is not None:
            profile_top_kernels(step, profile_dir / f"profile_{backend}{'' if fp8 == 'off' else '_fp8_' + fp8}.txt")
        result = summarize(times, grad_accum * batch * T, flops_per_token(mcfg, T))
    finally:
        if flash_impl:
            restore_flash_attention_impl()
    del model, fwd, opt
    return result


def bench_fsdp(cfg: dict, batch: int, steps: int, warmup: int, backend: str, compiled: bool) -> dict:
    """Our model under FSDP2 (launched with torchrun): per-GPU throughput of a sharded step."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mcfg = cfg["model"]
    mcfg.attn_backend = backend
    torch.manual_seed(0)
    model = Transformer(mcfg).cuda()
    if compiled:
        for block in model.blocks:
            block.compile()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = build_optimizer(model, OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=0))
    T = cfg["train"].seq_len
    x = torch.randint(0, mcfg.vocab_size, (batch, T + 1), device="cuda",
                      generator=torch.Generator("cuda").manual_seed(dist.get_rank()))

    def step():
        loss, _ = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, steps, warmup)
    times = [max(t) for t in zip(*_all_gather(times))]  # a step ends when the slowest rank ends
    return summarize(times, batch * T, flops_per_token(mcfg, T))


def _all_gather(values: list[float]) -> list[list[float]]:
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def bench_hf(cfg: dict, batch: int, steps: int, warmup: int, compile_model: bool, grad_accum: int = 1) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    m = cfg["model"]
    torch._dynamo.reset()
    for enable in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                   torch.backends.cuda.enable_cudnn_sdp):
        enable(True)
    hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                         max_position_embeddings=m.max_seq_len, rope_theta=m.rope_base, rms_norm_eps=m.norm_eps,
                         tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).cuda()
    model.config.use_cache = False
    if compile_model:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    T = cfg["train"].seq_len
    x = torch.randint(0, m.vocab_size, (batch, T), device="cuda")

    def step():
        for _ in range(grad_accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, steps, warmup)
    result = summarize(times, grad_accum * batch * T, flops_per_token(m, T))
    del model, opt
    return result


def summarize(times: list[float], tokens_per_step: int, fpt: float) -> dict:
    median = statistics.median(times)
    tok_s = tokens_per_step / median
    peak = peak_flops_per_device(torch.device("cuda"), 0.0)
    return {"step_s": median, "step_s_min": min(times), "step_s_max": max(times), "tok_per_s": tok_s,
            "mfu": tok_s * fpt / peak if peak else None, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def profile_top_kernels(step_fn, path: Path) -> None:
    """Kernel time by category over 3 steps: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step_fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    categories: dict[str, float] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        name = evt.key.lower()
        cat = ("gemm" if any(k in name for k in ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")) else
               "attention" if any(k in name for k in ("flash", "fmha", "attention", "cudnn", "flex")) else
               "optimizer" if "adam" in name else
               "triton/elementwise" if any(k in name for k in ("triton", "elementwise", "vectorized", "reduce")) else
               "other")
        categories[cat] = categories.get(cat, 0.0) + t
    total = sum(categories.values()) or 1.0
    summary = "\n".join(f"{k:>20}: {v / 3e3:9.1f} ms/step  {100 * v / total:5.1f}%" for k, v in
                        sorted(categories.items(), key=lambda kv: -kv[1]))
    path.write_text(summary + "\n\n" + table)
    print(f"profile ({path.name}):\n{summary}")


def inductor_settings(spec: str) -> dict:
    """'a=True,triton.b=4' -> {'a': True, 'triton.b': 4}, each key checked against Inductor's config."""
    import ast
    import torch._inductor.config as inductor_config
    settings = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        try:
            settings[key.strip()] = ast.literal_eval(value.strip()) if sep else True
        except (ValueError, SyntaxError):
            raise SystemExit(f"--inductor {spec!r}: {value!r} is not a Python literal (True, 4, 'x')") from None
        owner = inductor_config
        for part in key.strip().split("."):
            if not hasattr(owner, part):
                raise SystemExit(f"--inductor {spec!r}: torch._inductor.config has no setting {key.strip()!r}")
            owner = getattr(owner, part)
    return settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ablation_1b.toml")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (not with --fsdp)")
    p.add_argument("--layers", type=int, default=0, help="override n_layers (0: the config's)")
    p.add_argument("--backends", default="sdpa",
                   help="comma-separated attention back ends for our model: sdpa, sdpa-cudnn, sdpa-flash, "
                        "sdpa-efficient, sdpa-fa3, sdpa-fa4, flex")
    p.add_argument("--vs-hf", action="store_true", help="also time HF transformers' LlamaForCausalLM")
    p.add_argument("--doc-masking", action="store_true",
                   help="compare flex with corpus document masks against SDPA/flex plain causal")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--compile-per-block", action="store_true",
                   help="compile our model block by block (train.py's way under FSDP), not as one graph")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also time our model with these torch._inductor.config settings (one variant per flag, "
                        "after the default one), e.g. max_autotune_pointwise=True")
    p.add_argument("--fp8", default="", metavar="RECIPE[:all],...",
                   help="also time our model with FP8 linears (fp8.py): tensorwise, rowwise; ':all' converts the "
                        "first and last blocks too, e.g. rowwise,tensorwise,rowwise:all")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--profile", action="store_true", help="write a kernel-time breakdown next to --out")
    p.add_argument("--fsdp", action="store_true",
                   help="run our model under FSDP2; launch with torchrun (tokens/s are per GPU)")
    p.add_argument("--out", default="bench_train.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    for spec in args.inductor:  # a bad setting stops here, not after the first variant has run
        inductor_settings(spec)
    fp8_specs = [spec.partition(":")[::2] for spec in filter(None, args.fp8.split(","))]
    for recipe, scope in fp8_specs:  # a bad entry stops here, before the first variant has run
        if recipe not in ("tensorwise", "rowwise") or scope not in ("", "all") or args.fsdp:
            raise SystemExit(f"--fp8 {args.fp8!r}: entries are tensorwise or rowwise, optionally with ':all' "
                             f"(and not with --fsdp)")
    if args.grad_accum < 1 or (args.fsdp and args.grad_accum != 1):
        raise SystemExit(f"--grad-accum {args.grad_accum}: give a count >= 1 (and leave it at 1 with --fsdp)")
    if args.fsdp:
        import os
        import torch.distributed as dist
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    overrides = [f"--model.n_layers={args.layers}"] if args.layers else []
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "config": args.config, "micro_batch": args.micro_batch, "seq_len": cfg["train"].seq_len,
            "n_layers": cfg["model"].n_layers, "grad_accum": args.grad_accum}
    results: dict[str, dict] = {}

    def run(name, fn, *a, **kw):
        try:
            results[name] = r = fn(copy.deepcopy(cfg), *a, **kw)
            print(f"{name:<28} {r['tok_per_s']:>10,.0f} tok/s  MFU {100 * (r['mfu'] or 0):5.1f}%  "
                  f"peak {r['peak_mem_gib']:6.1f} GiB  step {1e3 * r['step_s']:7.1f} ms", flush=True)
        except Exception as e:  # one variant failing (a missing kernel, OOM) must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
            print(f"{name:<28} failed: {results[name]['error']}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()

    compiled = not args.no_compile
    prof = out.parent if args.profile else None
    if args.fsdp:
        import torch.distributed as dist
        world = dist.get_world_size()
        meta["world_size"] = world
        for backend in args.backends.split(","):
            with torch._inductor.config.patch(INDUCTOR_GPU_SETTINGS):
                results[f"ours[{backend}, fsdp x{world}]"] = r = bench_fsdp(
                    copy.deepcopy(cfg), args.micro_batch, args.steps, args.warmup, backend, compiled)
            if dist.get_rank() == 0:
                print(f"ours[{backend}, fsdp x{world}]  {r['tok_per_s']:>10,.0f} tok/s per GPU  MFU "
                      f"{100 * (r['mfu'] or 0):5.1f}%  peak {r['peak_mem_gib']:6.1f} GiB", flush=True)
        if dist.get_rank() == 0:
            out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        dist.destroy_process_group()
        return
    for backend in args.backends.split(","):
        for spec in [""] + args.inductor:
            # train.py's Inductor settings, then the variant's; HF below compiles with Inductor's defaults
            with torch._inductor.config.patch({**INDUCTOR_GPU_SETTINGS, **inductor_settings(spec)}):
                run(f"ours[{backend}{', ' + spec if spec else ''}]", bench_ours, args.micro_batch, args.steps,
                    args.warmup, backend, None, compiled, args.activation_checkpointing, prof, args.compile_mode,
                    args.compile_per_block, args.grad_accum)
    for recipe, scope in fp8_specs:
        backend = args.backends.split(",")[0]
        with torch._inductor.config.patch(INDUCTOR_GPU_SETTINGS):
            run(f"ours[{backend}, fp8 {recipe}{', all blocks' if scope else ''}]", bench_ours, args.micro_batch,
                args.steps, args.warmup, backend, None, compiled, args.activation_checkpointing, prof,
                args.compile_mode, args.compile_per_block, args.grad_accum, recipe, bool(scope))
    if args.doc_masking:
        doc = corpus_doc_ids(args.micro_batch, cfg["train"].seq_len)
        meta["docs_per_window"] = float((doc[:, -1] + 1).float().mean())
        with torch._inductor.config.patch(INDUCTOR_GPU_SETTINGS):
            run("ours[flex, doc mask]", bench_ours, args.micro_batch, args.steps, args.warmup, "flex", doc, compiled,
                args.activation_checkpointing, None, args.compile_mode, args.compile_per_block, args.grad_accum)
    if args.vs_hf:
        run("hf[llama, compiled]", bench_hf, args.micro_batch, args.steps, args.warmup, not args.no_compile,
            args.grad_accum)
        hf = results["hf[llama, compiled]"]
        ours = [v["tok_per_s"] for k, v in results.items() if k.startswith("ours[") and "doc" not in k
                and "fp8" not in k and "error" not in v]
        if ours and "error" not in hf:
            meta["speedup_vs_hf"] = max(ours) / hf["tok_per_s"]
            print(f"speed-up of our best bf16 over HF: {meta['speedup_vs_hf']:.3f}x")
            fp8 = {k: v["tok_per_s"] / hf["tok_per_s"] for k, v in results.items() if "fp8" in k and "error" not in v}
            if fp8:
                meta["speedup_vs_hf_fp8"] = fp8
                print("speed-up over HF: " + ", ".join(f"{k} {v:.3f}x" for k, v in fp8.items()))
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
