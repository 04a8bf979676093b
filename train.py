"""Pretraining: one file from config to checkpoints, on a laptop CPU or under torchrun.

    python train.py                                   # configs/tiny.toml, one CPU process
    python train.py --config configs/tiny.toml --model.n_kv_heads=1 --train.name=mqa
    torchrun --nproc_per_node=8 train.py --config configs/ablation_1b.toml

The story, top to bottom: read a TOML config and `--section.key=value` overrides into the four
dataclasses (config.py stops on any unknown key or bad value before doing work); set up one
process or a DDP/FSDP2 group (distributed.py); build the tokenizer and shards if missing; build the
model with the same seed on every rank (identical weights) and then reseed per rank (different
randomness where it must differ); resume from the latest checkpoint if asked; then loop: one
global batch per step split into micro-batches, gradient accumulation, clipping, the LR schedule,
metrics to stdout and runs/<name>/metrics.jsonl (loss, lr, grad_norm, tok/s, MFU), periodic
validation loss, and checkpoints (checkpoint.py: atomic, checksummed, never with NaN weights). It
ends with the final validation loss and a text sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist

import eval as evals
from attention import use_flash_attention_4
from checkpoint import (CheckpointError, Diverged, Interrupted, RunLock, StopRequest, checkpoint_paths,
                        gather_rng_states, incomplete_checkpoints, load_meta, restore_state, save_checkpoint,
                        set_rng_state, stopped_at_once, truncate_metrics)
from config import ConfigError, config_dict, config_to_toml, parse_cli
from config import load_config as read_config
from data import DataConfig, MixtureLoader, prepare_data, tokenizer_fingerprint
from distributed import (all_reduce_mean, compute_dtype, full_state_dict, parallelize, peak_flops_per_device,
                         setup_distributed, teardown)
from generate import generate
from model import ModelConfig, Transformer, active_params, count_params, describe_layers, flops_per_token
from moe import begin_moe_step, end_moe_step
from optim import (OptimConfig, batch_size_at, build_optimizer, describe_groups, lr_at, ramp_steps, set_lr,
                   sqrt_lr_scale, wsd_decay_start)
from tokenizer import eot_id

@dataclass
class TrainConfig:
    name: str = "tiny"               # the run folder: <out_dir>/<name>
    out_dir: str = "runs"            # where run folders go
    max_steps: int = 500             # optimizer steps; with a batch ramp, full-batch steps: the run trains on
                                     # max_steps x global batch sequences, and the lr schedule follows tokens
    micro_batch_size: int = 16       # sequences per forward pass on one rank
    grad_accum_steps: int = 1        # global batch = micro_batch_size * grad_accum_steps * world_size
    global_batch_size: int = 0       # sequences per step; when set, grad_accum_steps follows from the world size
    batch_ramp_start: int = 0        # batch warmup: the global batch (sequences) of the first step, growing
    batch_ramp_tokens: int = 0       # linearly to the full one over this many tokens (0: no ramp)
    seq_len: int = 256               # tokens per training sequence (at most model.max_seq_len)
    log_interval: int = 10           # a log line and a metrics.jsonl row every N steps
    eval_interval: int = 100         # validation loss every N steps (and at step 0 and the end)
    eval_batches: int = 8            # micro-batches of validation windows per evaluation (always the same ones)
    ckpt_interval: int = 250         # a checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2        # the newest N checkpoints are kept
    resume: bool = False             # continue from the latest checkpoint in the run folder
    seed: int = 1337                 # weights init (the same on every rank), then per-rank randomness
    device: str = "auto"             # auto | cpu | cuda
    dtype: str = "auto"              # auto (bf16 on GPU, float32 on CPU) | float32 | bfloat16
    compile: str = "auto"            # torch.compile the training forward: auto (on GPU) | true | false
    document_masking: bool = True    # attend within each document only; false: plain causal over the packed window
    attention_kernel: str = "auto"   # SDPA on GPU: fa4 (FlashAttention-4) | pytorch (its own choice) | auto (fa4
                                     # where it can run: flash-attn-4 installed, Hopper/Blackwell, fa4_blocker None)
    peak_flops: float = 0.0          # per device, for MFU; 0 = look it up from the GPU's name
    sample_tokens: int = 200         # length of the text sample printed at the end (0: none)
    threads: int = 0                 # CPU threads per process; 0 = cores / processes
    parallelism: str = "ddp"         # ddp (replicated weights) | fsdp (FSDP2: sharded weights, grads, optimizer)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    reduce_every_micro_batch: bool = False  # FSDP: reduce-scatter after every micro-batch (sharded gradients,
                                            # more communication) instead of only the last (unsharded fp32 grads)
    spike_sigma: float = 0.0         # skip the update of a step whose loss or grad norm is this many std above
    spike_window: int = 128          # the mean of the last spike_window steps (OLMo-core: 6 and 128); sigma 0 = off
    eval_tasks: tuple[str, ...] = ()  # eval.py tasks scored every eval_interval steps (eval/<task>/<metric>)
    eval_task_items: int = 100       # a seeded sample of this many items per task
    stage_settings: tuple[dict[str, float], ...] = ()  # per later data stage (data.stage_starts), what changes from
                                     # its start on: seq_len, micro_batch_size, rope_base, yarn_factor,
                                     # yarn_original_seq_len, warmup_steps (a fresh warmup); each stage keeps the
                                     # previous one's other settings. {} changes nothing but the mixture

    def __post_init__(self):
        for k in ("max_steps", "micro_batch_size", "grad_accum_steps", "seq_len", "log_interval",
                  "eval_interval", "eval_batches", "keep_checkpoints"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("ckpt_interval", "sample_tokens", "threads", "global_batch_size", "batch_ramp_start",
                  "batch_ramp_tokens", "spike_sigma"):
            if getattr(self, k) < 0:
                raise ValueError(f"train.{k} must be >= 0, got {getattr(self, k)}")
        if not self.name.strip():
            raise ValueError("train.name must not be empty: it names the run folder <out_dir>/<name>")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device={self.device!r} must be auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"train.dtype={self.dtype!r} must be auto, float32 or bfloat16")
        if self.compile not in ("auto", "true", "false"):
            raise ValueError(f"train.compile={self.compile!r} must be auto, true or false")
        if self.attention_kernel not in ("auto", "fa4", "pytorch"):
            raise ValueError(f"train.attention_kernel={self.attention_kernel!r} must be auto, fa4 or pytorch")
        if self.spike_window < 4:
            raise ValueError(f"train.spike_window must be >= 4 steps, got {self.spike_window}")
        if self.parallelism not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallelism={self.parallelism!r} must be ddp or fsdp")
        if bool(self.batch_ramp_start) != bool(self.batch_ramp_tokens):
            raise ValueError(f"a batch ramp needs both train.batch_ramp_start and train.batch_ramp_tokens, got "
                             f"{self.batch_ramp_start} and {self.batch_ramp_tokens}")
        if self.reduce_every_micro_batch and self.parallelism != "fsdp":
            raise ValueError("train.reduce_every_micro_batch applies to train.parallelism=fsdp only (under DDP every "
                             "rank holds full gradients anyway, so reducing early would only add communication)")
        if self.global_batch_size and self.grad_accum_steps != 1:
            raise ValueError("set train.global_batch_size or train.grad_accum_steps, not both: with a global "
                             "batch size the accumulation follows from the number of processes")
        for k, changes in enumerate(self.stage_settings):
            unknown = set(changes) - set(STAGE_KEYS)
            if unknown or any(v < 0 for v in changes.values()):
                raise ValueError(f"train.stage_settings[{k}]={changes}: keys from {STAGE_KEYS}, values >= 0")
        if self.eval_tasks and self.parallelism == "fsdp":
            raise ValueError("train.eval_tasks scores on rank 0 alone, which FSDP's sharded weights do not allow; "
                             "score the checkpoints with eval.py instead")
        if self.eval_tasks:
            for task in self.eval_tasks:
                evals.check_task_name(task)
                if task == "humaneval":  # known before any data work; task files are checked when loaded
                    raise ValueError(evals.NO_CODE_TASKS_IN_TRAINING)
            if self.eval_task_items < 1:
                raise ValueError(f"train.eval_task_items must be >= 1, got {self.eval_task_items}")


# --------------------------------------------------------------------------------------------
# Configuration: four tables, checked before any work (config.py)
# --------------------------------------------------------------------------------------------

SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.toml"


def check_config(cfg: dict) -> None:
    """Settings that involve several tables, each stopped with one line."""
    if cfg["model"].moe and cfg["train"].activation_checkpointing:
        raise ConfigError("train.activation_checkpointing cannot be combined with model.moe: recomputing a MoE "
                          "layer in backward would count its tokens twice in the balance statistics")
    if cfg["train"].attention_kernel == "fa4" and (blocker := fa4_blocker(cfg["model"], cfg["train"])):
        raise ConfigError(f"train.attention_kernel=fa4 would never run: {blocker}")
    if cfg["train"].seq_len > cfg["model"].max_seq_len:
        raise ConfigError(f"train.seq_len={cfg['train'].seq_len} is longer than model.max_seq_len="
                          f"{cfg['model'].max_seq_len}; lower the first or raise the second")
    settings = cfg["train"].stage_settings
    if settings and len(settings) != len(cfg["data"].stage_starts):
        raise ConfigError(f"train.stage_settings has {len(settings)} entries and data.stage_starts "
                          f"{len(cfg['data'].stage_starts)}: give one per later stage ({{}} for none)")
    for k in range(1, len(settings) + 1):
        stage = stage_settings(cfg, k)
        if stage["seq_len"] > cfg["model"].max_seq_len:
            raise ConfigError(f"train.stage_settings[{k - 1}]: seq_len {stage['seq_len']} is longer than "
                              f"model.max_seq_len={cfg['model'].max_seq_len}; raise it to the longest stage's length")
        if stage["seq_len"] != cfg["train"].seq_len and cfg["train"].batch_ramp_tokens:
            raise ConfigError("a stage that changes seq_len cannot be combined with a batch ramp (the ramp counts "
                              "tokens of one sequence length)")
        if stage["micro_batch_size"] < 1 or stage["seq_len"] < 1:
            raise ConfigError(f"train.stage_settings[{k - 1}]: seq_len and micro_batch_size must be >= 1")
        stage_model_config(cfg["model"], stage)  # the model's own checks (YaRN with MLA, ...)


# What a later data stage may change (train.stage_settings), and the settings of each stage.
STAGE_KEYS = ("seq_len", "micro_batch_size", "rope_base", "yarn_factor", "yarn_original_seq_len", "warmup_steps")


def stage_settings(cfg: dict, stage: int) -> dict:
    """The settings in force during data stage `stage` (0: the config's own); each later stage
    changes what its train.stage_settings entry names and keeps the rest of the stage before it.
    warmup_steps is the fresh warmup from the stage's start (0: none)."""
    tcfg, mcfg = cfg["train"], cfg["model"]
    settings = {"seq_len": tcfg.seq_len, "micro_batch_size": tcfg.micro_batch_size, "rope_base": mcfg.rope_base,
                "yarn_factor": mcfg.yarn_factor, "yarn_original_seq_len": mcfg.yarn_original_seq_len, "warmup_steps": 0}
    for changes in tcfg.stage_settings[:stage]:
        settings.update(changes, warmup_steps=changes.get("warmup_steps", 0))
    return {k: int(v) if k in ("seq_len", "micro_batch_size", "yarn_original_seq_len", "warmup_steps") else float(v)
            for k, v in settings.items()}


def stage_model_config(mcfg: ModelConfig, settings: dict) -> ModelConfig:
    return dataclasses.replace(mcfg, rope_base=settings["rope_base"], yarn_factor=settings["yarn_factor"],
                               yarn_original_seq_len=settings["yarn_original_seq_len"])


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> dict:
    """{"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}; the
    config file defaults to configs/tiny.toml."""
    return read_config(path or DEFAULT_CONFIG, overrides, sections=SECTIONS, check=check_config)


class SpikeSkipper:
    """Skip the update of a step whose loss or gradient norm is far above the recent ones.

    The playbook's loss spikes often come from a bad batch: PaLM restarted ~100 steps before each
    spike and skipped 200-500 batches. OLMo-core's SkipStepOptimizer does it online, and so does
    this: a step whose loss or gradient norm is more than `sigma` standard deviations above the
    mean of the last `window` steps takes no optimizer update (its batch is used up, the schedule
    moves on; an MoE router's load-balancing bias still updates). A non-finite loss or norm is always
    skipped. Skipped values stay out of the history, so a spike cannot widen the band that judges
    the next step; but a quarter window of finite outliers in a row is a new level, not a spike
    (a new data stage, a re-warmed lr): that step is taken and the history restarts from it, so
    training never stalls. The loss is averaged over ranks and the norm is global, so every rank
    decides the same and the replicas never diverge."""

    def __init__(self, sigma: float, window: int):
        self.sigma, self.window = sigma, window
        self.restart()
        self.skipped = self.in_a_row = self.level_shifts = 0

    def restart(self) -> None:
        """Forget the history: judge from here on (a new level, a new data stage)."""
        self.history: dict[str, list[float]] = {"loss": [], "grad_norm": []}

    def check(self, loss: float, grad_norm: float) -> str:
        """'' to take the step, else why it is skipped (the step is then counted in `skipped`)."""
        why, finite = "", math.isfinite(loss) and math.isfinite(grad_norm)
        for name, value in (("loss", loss), ("grad_norm", grad_norm)):
            past = self.history[name]
            if not math.isfinite(value):
                why = f"{name} is {value}"
            elif len(past) >= self.window // 2:  # half a window of history before judging anything
                mean = sum(past) / len(past)
                std = math.sqrt(sum((v - mean) ** 2 for v in past) / len(past))
                if value > mean + self.sigma * std:
                    why = why or (f"{name} {value:.4g} is {(value - mean) / max(std, 1e-12):.1f} std above the "
                                  f"mean {mean:.4g} of the last {len(past)} steps")
        if why and finite and self.in_a_row + 1 >= self.window // 4:
            self.restart()  # a new level
            self.level_shifts += 1
            why = ""
        if why:
            self.skipped += 1
            self.in_a_row += 1
            return why
        self.in_a_row = 0
        for name, value in (("loss", loss), ("grad_norm", grad_norm)):
            self.history[name] = (self.history[name] + [value])[-self.window:]
        return ""

    def state_dict(self) -> dict:
        return {"history": self.history, "skipped": self.skipped, "in_a_row": self.in_a_row,
                "level_shifts": self.level_shifts}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.skipped = state["history"], state["skipped"]
        self.in_a_row, self.level_shifts = state["in_a_row"], state["level_shifts"]


# --------------------------------------------------------------------------------------------
# What a resume may change
# --------------------------------------------------------------------------------------------

# Keys that may change between stages of one run: long-context extension raises max_seq_len and
# the RoPE base (ABF), and the attention kernel does not change the math.
RESUMABLE_MODEL_CHANGES = {"max_seq_len", "rope_base", "attn_backend"}
# YaRN and DCA extend the context of trained weights without touching them.
RESUMABLE_MODEL_CHANGES |= {"yarn_factor", "yarn_original_seq_len", "dca_chunk_size", "dca_local_window"}
# FP8 training rounds the matmuls differently but trains the same float32 weights.
RESUMABLE_MODEL_CHANGES |= {"fp8", "fp8_skip_first_last"}
# The document split: changing it would move validation documents into training.
FIXED_DATA_KEYS = ("seed", "val_fraction", "max_docs")


def check_resumable(saved: dict, cfg: dict, path: Path) -> None:
    """Stop with one line if the checkpoint's model cannot be the current config's model, or its
    data split is not the current one. (New mixture weights are a new stage: MixtureLoader.)"""
    now = config_dict(cfg)
    fixed = [("model", k) for k in saved["model"] if k not in RESUMABLE_MODEL_CHANGES]
    fixed += [("data", k) for k in FIXED_DATA_KEYS if k in saved.get("data", {})]
    fixed += [("optim", "name")]  # AdamW and Muon keep other states
    for section, k in fixed:
        v = saved[section][k]
        if now[section].get(k) != v:
            raise ConfigError(f"cannot resume from {path}: {section}.{k} is {v!r} in the checkpoint but "
                              f"{now[section].get(k)!r} now; resume with the checkpoint's value or start a new "
                              f"run with another --train.name")


# --------------------------------------------------------------------------------------------
# Evaluation and sampling
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, loader: MixtureLoader, n_batches: int, micro_batch_size: int, device, autocast,
             document_masking: bool = True) -> float:
    """Mean validation loss over the same n_batches batches every time, whatever the world size:
    the loader restarts at sample 0 and batch i is scored by rank i % world_size. Ranks run the
    same number of forward passes (FSDP needs every rank in every forward), padding with a repeat
    that is not counted."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model.eval()
    loader.load_state_dict({"samples": 0, "counts": {}})
    batches = [loader.next_step(micro_batch_size, 1)[0] for _ in range(n_batches)]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of batch losses, batch count
    for i in range(rank, -(-n_batches // world) * world, world):
        x, y, doc = batches[min(i, n_batches - 1)]
        with autocast:  # the cross-entropy alone: z-loss and MoE balance terms are training aids
            _, parts = model(x.to(device), y.to(device), doc.to(device) if document_masking else None)
        if i < n_batches:
            total += torch.tensor([parts["ce"].item(), 1.0], dtype=torch.float64, device=device)
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def sample_text(model: Transformer, enc: tiktoken.Encoding, prompts: list[str], max_new_tokens: int,
                seed: int) -> list[str]:
    """One sampled continuation of each prompt (temperature 0.8, top-k 50), up to the end of a document."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ids = [enc.encode_ordinary(p) for p in prompts]
    out = generate(model, ids, max_new_tokens, temperature=0.8, top_k=50, stop_ids=[eot_id(enc)], generator=gen,
                   compiled=False)  # a few samples: compiling the decode step would cost more than it saves
    return [enc.decode(p + o).replace("<|endoftext|>", "") for p, o in zip(ids, out)]


def fa4_blocker(mcfg: ModelConfig, tcfg: TrainConfig) -> str | None:
    """Why SDPA's flash kernel, where FlashAttention-4 sits, would never see this model's training
    attention, or None. Flash kernels take no mask: only plain causal softmax attention reaches
    them, so document masking (a boolean mask for SDPA) has to be off."""
    if mcfg.attn_backend != "sdpa":
        return (f"model.attn_backend={mcfg.attn_backend!r}, and FlashAttention-4 sits behind SDPA "
                f"(--model.attn_backend=sdpa)")
    if tcfg.document_masking:
        return ("train.document_masking=true hands SDPA a mask, which flash kernels do not take "
                "(--train.document_masking=false for plain causal attention over packed windows)")
    if tcfg.dtype == "float32":
        return "train.dtype=float32, and flash kernels run bf16 only (--train.dtype=auto)"
    others = [name for name, used in (("model.attn_type='mla'", mcfg.attn_type == "mla"),
                                      (f"model.layer_pattern {mcfg.layer_kinds()!r}", set(mcfg.layer_kinds()) != {"G"}),
                                      ("model.attn_sinks", mcfg.attn_sinks),
                                      ("model.dca_chunk_size", bool(mcfg.dca_chunk_size))) if used]
    if others:
        return (f"{', '.join(others)}: attention other than plain causal softmax, which flash kernels do not "
                f"compute (train.attention_kernel=auto or pytorch)")
    return None


# --------------------------------------------------------------------------------------------
# The run: set-up in named steps, then the loop
# --------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """How steps, batches and tokens relate. A batch ramp trains on the tokens of the unramped run
    (max_steps full batches) in more, smaller steps, and ends on tokens, not on a step count (a
    resume may change the shape of the remaining steps); its lr schedule and data stages run on
    tokens too: a step's position is the tokens seen over the tokens of one full step."""
    max_steps: int
    seq_len: int
    global_batch: int           # sequences per full step, all ranks and micro-batches together
    per_micro: int              # sequences one micro-batch on every rank adds to a step
    ramp_start: int = 0
    ramp_tokens: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def position(self, step: int, tokens: int) -> float:
        """Where a step stands in the run, in full-batch steps: the clock of the lr and the stages."""
        return tokens / self.tokens_per_step if self.ramp_tokens else step

    def batch_at(self, tokens: int) -> int:
        return batch_size_at(tokens, self.global_batch, self.ramp_start, self.ramp_tokens, self.per_micro)

    def finished(self, step: int, tokens: int) -> bool:
        return tokens >= self.max_steps * self.tokens_per_step if self.ramp_tokens else step >= self.max_steps

    def total_steps(self) -> int:
        if not self.ramp_tokens:
            return self.max_steps
        return ramp_steps(self.max_steps * self.tokens_per_step, self.seq_len, self.global_batch, self.ramp_start,
                          self.ramp_tokens, self.per_micro)


def batch_schedule(tcfg: TrainConfig, world: int) -> Schedule:
    """The global batch on this many processes (train.global_batch_size sets the accumulation)."""
    accum = tcfg.grad_accum_steps
    if tcfg.global_batch_size:  # the same global batch on any number of GPUs
        accum, rest = divmod(tcfg.global_batch_size, tcfg.micro_batch_size * world)
        if rest or accum < 1:
            raise ConfigError(f"train.global_batch_size={tcfg.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size x processes = {tcfg.micro_batch_size} x {world}; "
                              f"change one of them")
    schedule = Schedule(tcfg.max_steps, tcfg.seq_len, tcfg.micro_batch_size * accum * world,
                        tcfg.micro_batch_size * world, tcfg.batch_ramp_start, tcfg.batch_ramp_tokens)
    if tcfg.batch_ramp_start and (tcfg.batch_ramp_start % schedule.per_micro
                                  or tcfg.batch_ramp_start >= schedule.global_batch):
        raise ConfigError(f"train.batch_ramp_start={tcfg.batch_ramp_start} must be a multiple of train.micro_batch_size "
                          f"x processes = {tcfg.micro_batch_size} x {world} and below the global batch "
                          f"{schedule.global_batch}")
    return schedule


def choose_attention_kernel(mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device) -> str:
    """Route SDPA to FlashAttention-4 where asked and possible; the log line says which kernel runs."""
    if not (tcfg.attention_kernel == "fa4" or (tcfg.attention_kernel == "auto" and device.type == "cuda")):
        return "PyTorch's choice"
    why_not = fa4_blocker(mcfg, tcfg) or use_flash_attention_4(device)
    if why_not and tcfg.attention_kernel == "fa4":
        raise ConfigError(f"train.attention_kernel=fa4: {why_not} (or set train.attention_kernel=auto)")
    return f"PyTorch's choice, not FlashAttention-4: {why_not}" if why_not else "FlashAttention-4"


def train_loader(cfg: dict, enc: tiktoken.Encoding, seq_len: int, weights: dict[str, float], rank: int,
                 world: int) -> MixtureLoader:
    """This rank's share of the training windows of seq_len + 1 tokens, every source a stage uses."""
    mcfg, dcfg = cfg["model"], cfg["data"]
    return MixtureLoader(dcfg.shard_dir(mcfg.vocab_size), weights, "train", seq_len, dcfg.seed, eot_id(enc), rank,
                         world, tokenizer_fingerprint(dcfg.tokenizer_path(mcfg.vocab_size)), sources=dcfg.sources())


def build_data(cfg: dict, weights: dict[str, float], seq_len: int, rank: int, world: int, log):
    """(tokenizer, train loader, validation loader, task evaluations or None). Rank 0 builds the
    tokenizer and shards while the others wait, so a missing or broken corpus stops before the model."""
    mcfg, dcfg, tcfg = cfg["model"], cfg["data"], cfg["train"]
    try:
        if rank == 0:
            enc = prepare_data(dcfg, mcfg.vocab_size, log)
        if world > 1:
            dist.barrier()
        if rank != 0:
            enc = prepare_data(dcfg, mcfg.vocab_size, log)
        loader = train_loader(cfg, enc, seq_len, weights, rank, world)
        # every rank walks the whole validation sequence at the first stage's length (one curve for the
        # whole run); evaluate() deals its batches out
        val_loader = MixtureLoader(dcfg.shard_dir(mcfg.vocab_size), dcfg.weights, "val", tcfg.seq_len, dcfg.seed,
                                   eot_id(enc), fingerprint=tokenizer_fingerprint(dcfg.tokenizer_path(mcfg.vocab_size)))
        task_evals = evals.TrainingEvals(tcfg.eval_tasks, dcfg, enc, tcfg.eval_task_items) \
            if rank == 0 and tcfg.eval_tasks else None
    except (ValueError, RuntimeError) as e:  # empty corpus, truncated shard, stale tokenizer...
        raise ConfigError(str(e)) from e
    return enc, loader, val_loader, task_evals


def build_model(mcfg: ModelConfig, tcfg: TrainConfig, rank: int, device: torch.device) -> Transformer:
    """The same seed on every rank for the weights (identical replicas), then a per-rank seed for
    everything random after (the playbook's restart-costing seed bug is two ranks agreeing here)."""
    torch.manual_seed(tcfg.seed)
    model = Transformer(mcfg).to(device)
    torch.manual_seed(tcfg.seed + rank)
    random.seed(tcfg.seed + rank)
    np.random.seed((tcfg.seed + rank) % 2 ** 32)
    model.activation_checkpointing = tcfg.activation_checkpointing
    return model


@dataclass
class Run:
    """Everything the loop reads, built once by `start_run`."""
    cfg: dict
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    master: bool
    log: object
    schedule: Schedule
    enc: tiktoken.Encoding
    loader: MixtureLoader
    val_loader: MixtureLoader
    task_evals: evals.TrainingEvals | None
    model: Transformer                  # the module whose parameters the optimizer holds
    train_model: torch.nn.Module        # what the loop calls: compiled, DDP-wrapped, or the model itself
    autocast: torch.autocast
    optimizer: torch.optim.Optimizer
    spikes: SpikeSkipper | None
    metrics: object                     # metrics.jsonl on rank 0, else None
    lock: RunLock | None
    stage: int                          # the data stage in force (data.stage_starts)
    settings: dict                      # its settings: seq_len, micro_batch_size, RoPE, warmup (stage_settings)
    owns_group: bool = True             # the process group is this run's to end (a caller's group is left alone)

    def record(self, row: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()


def start_run(cfg: dict) -> tuple[Run, int, int]:
    """Set up processes, data, model and optimizer, resume if asked; (run, first step, tokens seen)."""
    mcfg, ocfg, tcfg = cfg["model"], cfg["optim"], cfg["train"]
    joined = dist.is_initialized()  # a caller's group (the speedrun's): re-creating one races on the store's keys
    try:
        rank, _, world, device = setup_distributed(tcfg.device, tcfg.threads, tcfg.parallelism)
    except ValueError as e:
        raise ConfigError(f"train.{e}") from e
    if mcfg.attn_backend == "flex" and device.type == "cpu":
        raise ConfigError("model.attn_backend='flex' cannot train on CPU (flex_attention has no CPU backward); "
                          "use --model.attn_backend=sdpa on CPU")
    attention_kernel = choose_attention_kernel(mcfg, tcfg, device)  # before any data work
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    run_dir = Path(tcfg.out_dir) / tcfg.name
    schedule = batch_schedule(tcfg, world)
    ckpts = checkpoint_paths(run_dir)
    if ckpts and not tcfg.resume:
        raise ConfigError(f"{run_dir} already holds checkpoints; continue it with --train.resume=true, "
                          f"or pick a new --train.name (nothing there was touched)")
    lock = RunLock(run_dir, log).acquire() if master else None
    try:
        for partial in incomplete_checkpoints(run_dir):
            log(f"note: ignoring {partial} (a save that was interrupted; the next save removes it)")
        if tcfg.resume and not ckpts:
            log(f"train.resume: no checkpoint in {run_dir} yet, starting fresh")
        saved = None
        if tcfg.resume and ckpts:  # before any data work: a checkpoint that does not fit stops at once
            saved = load_meta(ckpts[-1])
            check_resumable(saved["config"], cfg, ckpts[-1])
        resume_position = schedule.position(saved["step"], saved["tokens"]) if saved else 0
        stage = cfg["data"].stage_at(resume_position / tcfg.max_steps)
        settings = stage_settings(cfg, stage)
        enc, loader, val_loader, task_evals = build_data(cfg, cfg["data"].weights_at(resume_position / tcfg.max_steps),
                                                         settings["seq_len"], rank, world, log)
        fingerprint = tokenizer_fingerprint(cfg["data"].tokenizer_path(mcfg.vocab_size))
        if saved and saved.get("tokenizer_fingerprint", fingerprint) != fingerprint:
            raise ConfigError(f"cannot resume from {ckpts[-1]}: it was trained with another tokenizer than "
                              f"{cfg['data'].tokenizer_path(mcfg.vocab_size)} (fingerprint {fingerprint}); resume with "
                              f"that run's tokenizer, or start a new run with another --train.name")
        log(f"tokenizer: {cfg['data'].tokenizer_path(mcfg.vocab_size)} (fingerprint {fingerprint})")
        model = build_model(stage_model_config(mcfg, settings), tcfg, rank, device)
        compiled = tcfg.compile == "true" or (tcfg.compile == "auto" and device.type == "cuda")
        train_model, autocast = parallelize(model, tcfg.parallelism, compute_dtype(tcfg.dtype, device), device,
                                            compiled, world)
        optimizer = build_optimizer(model, ocfg)  # no weight decay on embeddings and norms (optim.param_groups)
        spikes = SpikeSkipper(tcfg.spike_sigma, tcfg.spike_window) if tcfg.spike_sigma else None
        run = Run(cfg, run_dir, device, rank, world, master, log, schedule, enc, loader, val_loader, task_evals, model,
                  train_model, autocast, optimizer, spikes, None, lock, stage, settings, not joined)
        step, tokens = resume(run, ckpts[-1], saved) if saved else (0, 0)
        if master:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(config_to_toml(cfg))
            truncate_metrics(run_dir / "metrics.jsonl", step)
            run.metrics = open(run_dir / "metrics.jsonl", "a")
        describe_run(run, attention_kernel)
    except BaseException:
        if lock:
            lock.release()
        raise
    return run, step, tokens


def resume(run: Run, path: Path, saved: dict) -> tuple[int, int]:
    """Load a checkpoint into the run: weights and optimizer, data position, spike history, RNG."""
    tcfg = run.cfg["train"]
    # the optimizer's state dict carries its hyperparameters too; the config's win (lr is set each step)
    settings = [{k: g[k] for k in ("betas", "eps", "weight_decay", "momentum", "nesterov", "ns_steps") if k in g}
                for g in run.optimizer.param_groups]
    restore_state(path, run.model, run.optimizer)
    for group, setting in zip(run.optimizer.param_groups, settings):
        group.update(setting)
    new_stage = run.loader.load_state_dict(saved["loader"])
    if new_stage:  # a curriculum stage, or an annealing run: resume a mid checkpoint with a new mix
        run.log(f"the mixture differs from the checkpoint's: a new mixture stage starts at sample "
                f"{run.loader.samples:,}")
    if saved["config"]["train"]["seq_len"] != tcfg.seq_len and not tcfg.stage_settings:
        run.log(f"train.seq_len {saved['config']['train']['seq_len']} -> {tcfg.seq_len}: windows are cut anew, "
                f"each source continues at the same position of its new window order")
    if run.spikes and saved.get("spikes") and not new_stage:  # a new mixture has losses of its own
        run.spikes.load_state_dict(saved["spikes"])
    if len(saved["rng"]) == run.world:
        set_rng_state(saved["rng"][dist.get_rank() if dist.is_initialized() else 0])
    else:
        run.log(f"note: checkpoint was written by {len(saved['rng'])} ranks, resuming on {run.world}: RNG reseeded")
    return saved["step"], saved["tokens"]


def describe_run(run: Run, attention_kernel: str) -> None:
    """The model, optimizer, data and batch a run will train, in a few log lines."""
    mcfg, dcfg, ocfg, tcfg = run.cfg["model"], run.cfg["data"], run.cfg["optim"], run.cfg["train"]
    s, log = run.schedule, run.log
    log(f"model: {count_params(mcfg):,} parameters ({mcfg.n_layers} layers, d_model {mcfg.d_model}, "
        f"{mcfg.n_heads} heads / {mcfg.n_kv_heads} KV heads, {'tied' if mcfg.tie_embeddings else 'untied'} embeddings)")
    log(f"layers ({mcfg.attn_type}): {describe_layers(mcfg)} (G global, S sliding, C chunked, L linear; "
        f"/nope: no RoPE)")
    if mcfg.moe:
        log(f"moe: {mcfg.moe_experts} experts, top-{mcfg.moe_top_k}, {mcfg.moe_shared_experts} shared, in layers "
            f"{mcfg.moe_dense_layers}..{mcfg.n_layers - 1}; {active_params(mcfg):,} parameters active per token")
    log(f"optimizer groups ({ocfg.name}; no decay on embeddings and norms):\n{describe_groups(run.optimizer)}")
    if ocfg.warmup_steps > tcfg.max_steps:  # allowed (a smoke test), but rarely meant
        log(f"note: optim.warmup_steps={ocfg.warmup_steps} is above train.max_steps={tcfg.max_steps}: the learning "
            f"rate never reaches optim.lr={ocfg.lr:g}")
    elif ocfg.schedule == "wsd" and ocfg.warmup_steps > wsd_decay_start(ocfg, tcfg.max_steps):
        log(f"note: the WSD decay starts at step {wsd_decay_start(ocfg, tcfg.max_steps)}, "
            f"before warmup ends at {ocfg.warmup_steps}: the learning rate jumps when warmup hands over")
    log(f"data: {', '.join(f'{n} {w:.2f}' for n, w in zip(run.loader.names, run.loader.weights))}; "
        f"{sum(src.n_tokens for src in run.loader.sources):,} train tokens")
    for k, (start, weights) in enumerate(zip(dcfg.stage_starts, dcfg.stage_weights)):
        changes = tcfg.stage_settings[k] if tcfg.stage_settings else {}
        log(f"data stage from {start:.0%} of the run: {', '.join(f'{n} {w:g}' for n, w in weights.items())}"
            + "".join(f"; {key} {value:g}" for key, value in changes.items()))
    dtype = compute_dtype(tcfg.dtype, run.device)
    log(f"run: {run.world} process(es) on {run.device.type}, {dtype}, global batch {tcfg.micro_batch_size} x "
        f"{s.global_batch // s.per_micro} accumulation x {run.world} = {s.global_batch} sequences x {tcfg.seq_len} = "
        f"{s.tokens_per_step:,} tokens/step, {tcfg.max_steps} steps -> {run.run_dir}")
    if run.device.type == "cuda" and mcfg.attn_backend == "sdpa":
        log(f"attention kernel: {attention_kernel}")
    if tcfg.batch_ramp_tokens:
        log(f"batch ramp: {tcfg.batch_ramp_start} -> {s.global_batch} sequences over the first "
            f"{tcfg.batch_ramp_tokens:,} tokens, in steps of {s.per_micro}; {s.total_steps()} optimizer steps (from "
            f"the start) train the {tcfg.max_steps} full batches' {tcfg.max_steps * s.tokens_per_step:,} tokens, lr "
            f"schedule on tokens")
    if ocfg.lr_base_batch:
        log(f"lr scaled by sqrt(batch / {ocfg.lr_base_batch}): x{sqrt_lr_scale(s.global_batch, ocfg.lr_base_batch):.3f} "
            f"at the full batch" + (" (Adam's rule, applied to Muon's groups too)" if ocfg.name == "muon" else ""))


def forward_backward(run: Run, micro_batches: list) -> dict[str, float]:
    """Accumulate the gradients of one step's micro-batches; the mean loss and its parts.

    Gradients are reduced across ranks on every backward unless told not to: only the last
    micro-batch of a step needs to. Under FSDP2 skipping it keeps unsharded fp32 gradients between
    micro-batches (4N bytes per rank); reducing every time keeps them sharded at the price of one
    reduce-scatter per micro-batch (torchtitan's choice, train.reduce_every_micro_batch)."""
    tcfg = run.cfg["train"]
    sharded = tcfg.parallelism == "fsdp"
    parts_sum = {"loss": 0.0, "ce": 0.0, "z_loss": 0.0}
    n = len(micro_batches)
    for i, (x, y, doc) in enumerate(micro_batches):
        x, y, doc = (t.to(run.device, non_blocking=True) for t in (x, y, doc))
        last = i == n - 1
        sync = contextlib.nullcontext()
        if sharded:
            run.model.set_requires_gradient_sync(last or tcfg.reduce_every_micro_batch)
        elif run.world > 1 and not last:
            sync = run.train_model.no_sync()
        with sync, run.autocast:
            loss, parts = run.train_model(x, y, doc if tcfg.document_masking else None)
            (loss / n).backward()
        parts_sum["loss"] += loss.item() / n
        parts_sum["ce"] += parts["ce"].item() / n
        parts_sum["z_loss"] += parts["z_loss"].item() / n
    return parts_sum


def clip_and_step(run: Run, loss: float, step: int) -> float:
    """Clip the gradients, then take the optimizer step unless the step is a spike to skip, or stop
    the run if it diverged; the global gradient norm before clipping."""
    ocfg, tcfg = run.cfg["optim"], run.cfg["train"]
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                               ocfg.grad_clip if ocfg.grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
        grad_norm = grad_norm.full_tensor()
    grad_norm, loss = float(grad_norm), all_reduce_mean(loss, run.device)
    if run.spikes:
        shifts = run.spikes.level_shifts
        skip = run.spikes.check(loss, grad_norm)
        if run.spikes.level_shifts > shifts:
            run.log(f"step {step:>6} | {tcfg.spike_window // 4} steps in a row above the spike band: a new "
                    f"level, not a spike; update taken, spike history restarted")
        if skip:
            run.log(f"step {step:>6} | update skipped: {skip}")
    elif not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise Diverged(f"step {step}: loss {loss} and gradient norm {grad_norm}: the run diverged and stops before "
                       f"any NaN reaches a checkpoint; resume from the last checkpoint with a lower optim.lr, or set "
                       f"train.spike_sigma (e.g. 6) to skip such steps")
    else:
        skip = ""
    if not skip:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def out_of_memory(cfg: dict, step: int) -> ConfigError:
    mcfg, tcfg = cfg["model"], cfg["train"]
    return ConfigError(
        f"out of GPU memory at step {step} ({count_params(mcfg) / 1e9:.2f}B parameters, micro-batch "
        f"{tcfg.micro_batch_size} x {tcfg.seq_len} tokens, parallelism={tcfg.parallelism}); lower "
        f"train.micro_batch_size (raise train.grad_accum_steps to keep the global batch), "
        f"{'' if mcfg.moe else 'set train.activation_checkpointing=true, '}use train.parallelism=fsdp, "
        f"or shorten train.seq_len")


def log_step(run: Run, step: int, tokens: int, lr: float, parts: dict, grad_norm: float, batch: int,
             tok_per_s: float, moe_row: dict) -> None:
    """One row of metrics.jsonl and one log line: loss, lr, gradient norm, throughput, MFU."""
    mcfg, tcfg = run.cfg["model"], run.cfg["train"]
    loss = all_reduce_mean(parts["loss"], run.device)
    row = {"step": step, "tokens": tokens, "loss": loss, "ce": all_reduce_mean(parts["ce"], run.device),
           "z_loss": all_reduce_mean(parts["z_loss"], run.device), "lr": lr, "grad_norm": grad_norm,
           "tok_per_s": tok_per_s, "batch_size": batch}
    if run.spikes:
        row["skipped_steps"] = run.spikes.skipped
    peak = peak_flops_per_device(run.device, tcfg.peak_flops)
    if peak:
        row["mfu"] = tok_per_s * flops_per_token(mcfg, run.settings["seq_len"]) / (peak * run.world)
    row.update(moe_row)
    run.record(row)
    extra = f" | mfu {100 * row['mfu']:.1f}%" if "mfu" in row else ""
    if moe_row:
        extra += (f" | moe imbalance {moe_row['moe/imbalance']:.2f} dead {moe_row['moe/dead_experts']} "
                  f"balance {moe_row['moe/balance_loss']:.3f}")
    if tcfg.batch_ramp_tokens:
        extra += f" | batch {batch}"
    run.log(f"step {step:>6} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
            f"{tok_per_s:,.0f} tok/s{extra}")


def validate(run: Run, step: int, tokens: int) -> float:
    """Validation loss (and the configured task scores) at this step, logged and recorded."""
    tcfg = run.cfg["train"]
    val_loss = evaluate(run.model, run.val_loader, tcfg.eval_batches, tcfg.micro_batch_size, run.device,
                        run.autocast, tcfg.document_masking)
    run.record({"step": step, "tokens": tokens, "val_loss": val_loss})
    run.log(f"step {step:>6} | val_loss {val_loss:.4f}")
    if run.task_evals:
        with run.autocast:
            row = run.task_evals.run(run.model)
        run.record({"step": step, "tokens": tokens, **row})
        run.log(f"step {step:>6} | " + " | ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return val_loss


def save(run: Run, step: int, tokens: int) -> Path:
    """A checkpoint of everything a resumed run needs to continue exactly (checkpoint.py)."""
    # the model as the stage in force has it: load_model rebuilds a long-context checkpoint with its RoPE base
    config = config_dict({**run.cfg, "model": stage_model_config(run.cfg["model"], run.settings)})
    meta = {"step": step, "tokens": tokens, "loader": run.loader.state_dict(), "rng": gather_rng_states(),
            "config": config, "spikes": run.spikes.state_dict() if run.spikes else None,
            "tokenizer_fingerprint": tokenizer_fingerprint(run.cfg["data"].tokenizer_path(run.cfg["model"].vocab_size))}
    path = save_checkpoint(run.run_dir, step, run.model, run.optimizer, meta, run.cfg["train"].keep_checkpoints)
    run.log(f"saved {path}")
    return path


def train(cfg: dict) -> dict:
    """Run (or resume) the configured training; returns a summary of the final figures."""
    run, step, tokens = start_run(cfg)
    tcfg, ocfg, s = cfg["train"], cfg["optim"], run.schedule
    val_loss = validate(run, 0, 0) if step == 0 else None
    t_last, tokens_last, paused = time.time(), tokens, 0.0  # paused: eval and checkpoint time, not training
    try:
        with StopRequest() as stop:
            while not s.finished(step, tokens):
                # schedule: data stage, batch size and learning rate at this point of the run
                position = s.position(step, tokens)
                enter_stage(run, position, step)
                batch = s.batch_at(tokens)
                lr = lr_at(position, ocfg, tcfg.max_steps) * stage_warmup(run, position)
                if ocfg.lr_base_batch:
                    lr *= sqrt_lr_scale(batch, ocfg.lr_base_batch)
                set_lr(run.optimizer, lr)
                # forward and backward over the step's micro-batches (a stage may change their shape)
                accum = batch // s.per_micro
                micro_batches = run.loader.next_step(run.settings["micro_batch_size"], accum)
                if cfg["model"].moe:  # balance statistics cover every micro-batch of the step (moe.py)
                    begin_moe_step(run.model, len(micro_batches))
                try:
                    parts = forward_backward(run, micro_batches)
                    # clip and step (or skip a spike, or stop a diverged run)
                    grad_norm = clip_and_step(run, parts["loss"], step + 1)
                except torch.OutOfMemoryError as e:
                    raise out_of_memory(cfg, step + 1) from e
                moe_row = end_moe_step(run.model) if cfg["model"].moe else {}  # load metrics; the bias update
                step = step + 1
                tokens += accum * run.world * run.settings["micro_batch_size"] * run.settings["seq_len"]
                last = s.finished(step, tokens)
                # log: throughput over training time only
                if step % tcfg.log_interval == 0 or last:
                    if run.device.type == "cuda":
                        torch.cuda.synchronize()
                    tok_per_s = (tokens - tokens_last) / max(time.time() - t_last - paused, 1e-9)
                    log_step(run, step, tokens, lr, parts, grad_norm, batch, tok_per_s, moe_row)
                    t_last, tokens_last, paused = time.time(), tokens, 0.0
                # evaluate and checkpoint
                t_pause = time.time()
                if step % tcfg.eval_interval == 0 or last:
                    val_loss = validate(run, step, tokens)
                interrupted = stop.agreed(run.device)
                if (tcfg.ckpt_interval and step % tcfg.ckpt_interval == 0) or last or interrupted:
                    save(run, step, tokens)
                if interrupted:
                    raise Interrupted(f"stopped at step {step} as asked, checkpoint written; continue with "
                                      f"--train.resume=true")
                paused += time.time() - t_pause
        return finish(run, step, tokens, val_loss)
    finally:
        if run.metrics:
            run.metrics.close()
        if run.lock:
            run.lock.release()


def enter_stage(run: Run, position: float, step: int) -> None:
    """At a data stage's boundary (data.stage_starts), switch the mixture's weights and, for a
    long-context stage, the sequence length (windows cut anew, each source continuing at its
    position, as on a resume), the micro-batch size and the RoPE base / YaRN scaling."""
    dcfg, tcfg = run.cfg["data"], run.cfg["train"]
    progress = position / tcfg.max_steps
    stage = dcfg.stage_at(progress)
    if stage == run.stage:
        return
    before, run.stage, run.settings = run.settings, stage, stage_settings(run.cfg, stage)
    if run.settings["seq_len"] != before["seq_len"]:
        state = run.loader.state_dict()
        run.loader = train_loader(run.cfg, run.enc, run.settings["seq_len"], dcfg.weights_at(progress), run.rank,
                                  run.world)
        run.loader.load_state_dict(state)
    if any(run.settings[k] != before[k] for k in ("rope_base", "yarn_factor", "yarn_original_seq_len")):
        run.model.set_rope(run.settings["rope_base"], run.settings["yarn_factor"],
                           run.settings["yarn_original_seq_len"])
    run.loader.set_weights(dcfg.weights_at(progress))
    changed = {k: v for k, v in run.settings.items() if v != before[k]}
    run.log(f"step {step:>6} | data stage {stage + 1}: "
            f"{', '.join(f'{n} {w:.2f}' for n, w in zip(run.loader.names, run.loader.weights))}"
            + "".join(f" | {k} {v:g}" for k, v in changed.items()))
    if run.spikes:  # a new mixture has losses of its own
        run.spikes.restart()


def stage_warmup(run: Run, position: float) -> float:
    """The lr multiplier of a stage's fresh warmup: linear from its start over its warmup_steps."""
    warmup = run.settings["warmup_steps"]
    if not warmup or not run.stage:
        return 1.0
    start = run.cfg["data"].stage_starts[run.stage - 1] * run.cfg["train"].max_steps
    return min(1.0, (position - start + 1) / warmup)


def finish(run: Run, step: int, tokens: int, val_loss: float | None) -> dict:
    """Samples of text, the final line, and the process group torn down if the run made it; the run's summary."""
    tcfg = run.cfg["train"]
    summary = {"run_dir": str(run.run_dir), "steps": step, "tokens": tokens, "val_loss": val_loss}
    if tcfg.sample_tokens:
        # generation is sequential and small: gather the full weights into a plain model on rank 0
        state = full_state_dict(run.model) if tcfg.parallelism == "fsdp" else None
        if run.master:
            sample_model = run.model
            if state is not None:
                sample_model = Transformer(run.cfg["model"]).to(run.device)
                sample_model.load_state_dict(state)
            samples = sample_text(sample_model, run.enc, ["The ", "def ", "Question: "], tcfg.sample_tokens, tcfg.seed)
            (run.run_dir / "samples.txt").write_text("\n\n----\n\n".join(samples))
            run.log("\n----- samples -----\n" + "\n\n----\n\n".join(samples) + "\n-------------------")
    if val_loss is not None:
        run.log(f"final val_loss {val_loss:.4f} after {tokens:,} tokens")
    if dist.is_initialized() and run.owns_group:
        run.train_model = None  # DDP's reducer goes before the process group it uses
        teardown()
        summary["process_group"] = True
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, doc=__doc__, sections=SECTIONS,
                    default_config=DEFAULT_CONFIG, check=check_config)
    try:
        summary = train(cfg)
    except (ConfigError, CheckpointError, OSError, Diverged) as e:  # OSError names its file: missing, not a folder
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop
        print(f"interrupted: {stopped_at_once(Path(cfg['train'].out_dir) / cfg['train'].name, '--train.resume=true')}",
              file=sys.stderr)
        sys.exit(130)
    if summary.get("process_group"):
        # The run is complete and its process group destroyed, but gloo's worker threads outlive
        # destroy_process_group and may drop the last collective's tensors while Python is already
        # finalizing; taking the GIL then aborts the process (pytorch/pytorch#179291), and torchrun
        # reports a finished run as failed. Leave without interpreter teardown instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
