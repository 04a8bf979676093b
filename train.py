"""Pretraining: one file from config to checkpoints, on a laptop CPU or under torchrun.

    python train.py                                   # configs/tiny.toml, one CPU process
    python train.py --config configs/tiny.toml --model.n_kv_heads=1 --train.name=mqa
    torchrun --nproc_per_node=8 train.py --config configs/ablation_1b.toml

The story, top to bottom: read a TOML config and `--section.key=value` overrides into the four
dataclasses (stopping on any unknown key or bad value before doing work); set up one process or a
DDP group (gloo on CPU, nccl on GPU); build the tokenizer and shards if missing; build the model
with the same seed on every rank (identical weights) and then reseed per rank (different
randomness where it must differ); resume from the latest checkpoint if asked; then loop: one
global batch per step split into micro-batches, gradient accumulation, clipping, the LR schedule,
metrics to stdout and runs/<name>/metrics.jsonl (loss, lr, grad_norm, tok/s, MFU), periodic
validation loss, and checkpoints written to a temporary name and renamed. It ends with the final
validation loss and a text sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import shutil
import sys
import time
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from attention import use_flash_attention_4
from data import DataConfig, MixtureLoader, prepare_data, tokenizer_fingerprint
from model import ModelConfig, Transformer, count_params, describe_layers, flops_per_token
from moe import active_params, begin_moe_step, end_moe_step
from optim import (OptimConfig, batch_size_at, build_optimizer, describe_groups, lr_at, ramp_steps,
                   sqrt_lr_scale, wsd_decay_start)


@dataclass
class TrainConfig:
    name: str = "tiny"               # the run folder: <out_dir>/<name>
    out_dir: str = "runs"
    max_steps: int = 500             # optimizer steps; with a batch ramp, full-batch steps: the run trains on
                                     # max_steps x global batch sequences, and the lr schedule follows tokens
    micro_batch_size: int = 16       # sequences per forward pass on one rank
    grad_accum_steps: int = 1        # global batch = micro_batch_size * grad_accum_steps * world_size
    global_batch_size: int = 0       # sequences per step; when set, grad_accum_steps follows from the world size
    batch_ramp_start: int = 0        # batch warmup: the global batch (sequences) of the first step, growing
    batch_ramp_tokens: int = 0       # linearly to the full one over this many tokens (0: no ramp)
    seq_len: int = 256
    log_interval: int = 10
    eval_interval: int = 100         # validation loss every N steps (and at step 0 and the end)
    eval_batches: int = 8
    ckpt_interval: int = 250         # a checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False             # continue from the latest checkpoint in the run folder
    seed: int = 1337
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
        if self.eval_tasks and self.parallelism == "fsdp":
            raise ValueError("train.eval_tasks scores on rank 0 alone, which FSDP's sharded weights do not allow; "
                             "score the checkpoints with eval.py instead")
        if self.eval_tasks:
            import eval as evals  # here, so that configs without eval tasks never import it
            for task in self.eval_tasks:
                evals.check_task_name(task)
                if task == "humaneval":  # known before any data work; task files are checked when loaded
                    raise ValueError(evals.NO_CODE_TASKS_IN_TRAINING)
            if self.eval_task_items < 1:
                raise ValueError(f"train.eval_task_items must be >= 1, got {self.eval_task_items}")


# --------------------------------------------------------------------------------------------
# Configuration: TOML + overrides -> dataclasses, validated before any work
# --------------------------------------------------------------------------------------------

SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.toml"


class ConfigError(ValueError):
    pass


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _coerce(key: str, value, hint):
    """Check a TOML value against a dataclass field's type; ints widen to floats, lists to tuples."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, bool)):
            return str(value).lower() if isinstance(value, bool) else value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(key, v, typing.get_args(hint)[0]) for v in value)
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(key, v, typing.get_args(hint)[1]) for k, v in value.items()}
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be of type {name}, got {value!r} ({type(value).__name__})")


def parse_override(arg: str) -> tuple[str, object]:
    """'--model.n_kv_heads=4' -> ('model.n_kv_heads', 4); values are read as TOML, else as strings.
    A bare '--train.resume' means true."""
    if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
        raise ConfigError(f"cannot read argument {arg!r}; overrides look like --section.key=value, "
                          f"e.g. --model.n_kv_heads=4")
    if "=" not in arg:
        return arg[2:], True
    key, raw = arg[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            value = float(raw)  # numbers TOML does not accept, like .001
        except ValueError:
            value = raw
    return key, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> dict:
    """{"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        configs = sorted(p.name for p in (Path(__file__).parent / "configs").glob("*.toml"))
        raise ConfigError(f"config file {path} not found; the shipped configs are {configs} in configs/")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    flat = {}
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a table like [model]")
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, list(SECTIONS), n=1)
            raise ConfigError(f"{path}: unknown section [{section}]"
                              + (f"; did you mean [{close[0]}]?" if close else f"; sections are {list(SECTIONS)}"))
        for k, v in table.items():
            flat[f"{section}.{k}"] = v
    raw_text = {}  # an override's text as typed: a string field takes it as is (--train.name=2024)
    for arg in overrides:
        k, v = parse_override(arg)
        flat[k] = v
        raw_text[k] = arg.split("=", 1)[1] if "=" in arg else None
    valid = set(_all_keys())
    for key in flat:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else f"; sections are {list(SECTIONS)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
    cfg = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in flat.items():
            if k.startswith(section + "."):
                hint = hints[k.split(".", 1)[1]]
                if hint is str and not isinstance(v, str) and raw_text.get(k) is not None:
                    v = raw_text[k]
                kwargs[k.split(".", 1)[1]] = _coerce(k, v, hint)
        try:
            cfg[section] = cls(**kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if cfg["model"].moe and cfg["train"].activation_checkpointing:
        raise ConfigError("train.activation_checkpointing cannot be combined with model.moe: recomputing a MoE "
                          "layer in backward would count its tokens twice in the balance statistics")
    if cfg["train"].attention_kernel == "fa4" and (blocker := fa4_blocker(cfg["model"], cfg["train"])):
        raise ConfigError(f"train.attention_kernel=fa4 would never run: {blocker}")
    if cfg["train"].seq_len > cfg["model"].max_seq_len:
        raise ConfigError(f"train.seq_len={cfg['train'].seq_len} is longer than model.max_seq_len="
                          f"{cfg['model'].max_seq_len}; lower the first or raise the second")
    return cfg


def config_to_toml(cfg: dict) -> str:
    """The resolved config as TOML, so any run can be reproduced from its folder."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {fmt(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} as TOML")
    out = []
    for section, obj in cfg.items():
        out.append(f"[{section}]")
        out += [f"{k} = {fmt(v)}" for k, v in dataclasses.asdict(obj).items()]
        out.append("")
    return "\n".join(out)


def config_dict(cfg: dict) -> dict:
    return {s: dataclasses.asdict(obj) for s, obj in cfg.items()}


# --------------------------------------------------------------------------------------------
# Distributed setup, devices, MFU
# --------------------------------------------------------------------------------------------

# Dense bf16 peak FLOP/s per device (no sparsity), for MFU; matched against the GPU's name.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops_per_device(device: torch.device, configured: float) -> float | None:
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def setup_distributed(tcfg: TrainConfig) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available())
    if tcfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(tcfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    if world == 1 and tcfg.parallelism == "fsdp" and "MASTER_ADDR" not in os.environ:
        # fully_shard needs a process group even for one process (e.g. to resume a sharded run)
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    if world > 1 or tcfg.parallelism == "fsdp":
        # Multi-node: torchrun on every node (scripts/slurm.sh) sets RANK, WORLD_SIZE and the
        # c10d rendezvous; this process group spans all nodes' GPUs.
        # A rank that dies makes the others' next collective fail after this timeout instead of
        # hanging for the default 30+ minutes; torchrun then stops the whole job.
        from datetime import timedelta
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                timeout=timedelta(minutes=10))
    return rank, local_rank, world, device


def all_reduce_mean(x: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


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
# Checkpoints
# --------------------------------------------------------------------------------------------

# Keys that may change between stages of one run: long-context extension raises max_seq_len and
# the RoPE base (ABF), and the attention kernel does not change the math.
RESUMABLE_MODEL_CHANGES = {"max_seq_len", "rope_base", "attn_backend"}
# YaRN and DCA extend the context of trained weights without touching them.
RESUMABLE_MODEL_CHANGES |= {"yarn_factor", "yarn_original_seq_len", "dca_chunk_size", "dca_local_window"}


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: ckpt_<step>.pt files (one process or DDP) and
    ckpt_<step>/ folders (FSDP, one shard per rank, torch.distributed.checkpoint format)."""
    found = [p for p in run_dir.glob("ckpt_*") if p.suffix in (".pt", "") and p.stem[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[5:]))


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    if not (dist.is_available() and dist.is_initialized()):
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(run_dir: Path, step: int, model, optimizer, loader, cfg: dict, tokens: int,
                    keep: int, sharded: bool, spikes: SpikeSkipper | None = None) -> Path:
    """Everything a resumed run needs to continue exactly, written under a temporary name and then
    renamed, so a crash mid-write never leaves a broken or half-overwritten checkpoint.

    Sharded (FSDP): every rank writes its own shards with torch.distributed.checkpoint, which can
    be read back by any number of ranks (it reshards on load). Otherwise rank 0 writes one file."""
    meta = {"step": step, "tokens": tokens, "loader": loader.state_dict(), "rng": gather_rng_states(),
            "config": config_dict(cfg), "spikes": spikes.state_dict() if spikes else None}
    master = not dist.is_initialized() or dist.get_rank() == 0
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        path, tmp = run_dir / f"ckpt_{step:07d}", run_dir / f"ckpt_{step:07d}.tmp"
        if master and tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        if master:
            torch.save(meta, tmp / "meta.pt")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        dist.barrier()
    else:
        path, tmp = run_dir / f"ckpt_{step:07d}.pt", run_dir / f"ckpt_{step:07d}.pt.tmp"
        if master:
            torch.save({**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
            os.replace(tmp, path)
    if master:
        stale = checkpoint_paths(run_dir)[:-keep] + list(run_dir.glob("ckpt_*.tmp"))  # .tmp: left by a crash
        for old in stale:
            old.unlink() if old.is_file() else shutil.rmtree(old)
    return path


# The document split: changing it would move validation documents into training.
FIXED_DATA_KEYS = ("seed", "val_fraction", "max_docs")


def check_resumable(saved: dict, cfg: dict, path: Path) -> None:
    """Stop with one line if the checkpoint's model cannot be the current config's model, or its
    data split is not the current one. (New mixture weights are a new stage: MixtureLoader.)"""
    now = config_dict(cfg)
    fixed = [("model", k) for k in saved["model"] if k not in RESUMABLE_MODEL_CHANGES]
    fixed += [("data", k) for k in FIXED_DATA_KEYS if k in saved.get("data", {})]
    saved.setdefault("optim", {}).setdefault("name", "adamw")  # written before Muon existed
    fixed += [("optim", "name")]  # AdamW and Muon keep other states
    for section, k in fixed:
        v = saved[section][k]
        if now[section].get(k) != v:
            raise ConfigError(f"cannot resume from {path}: {section}.{k} is {v!r} in the checkpoint but "
                              f"{now[section].get(k)!r} now; resume with the checkpoint's value or start a new "
                              f"run with another --train.name")


def load_checkpoint(path: Path) -> dict:
    """The checkpoint's metadata (and, for a .pt file, its model and optimizer states)."""
    try:
        return torch.load(path / "meta.pt" if path.is_dir() else path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: say which one and how to recover
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to resume "
                          f"from the one before") from e


def restore_weights(path: Path, saved: dict, model, optimizer) -> None:
    """Load model and optimizer state into the (possibly sharded) model, from either format."""
    if path.is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    elif any(getattr(p, "device_mesh", None) is not None for p in model.parameters()):
        raise ConfigError(f"{path} was written without FSDP; resume it with --train.parallelism=ddp "
                          f"(sharded runs write ckpt_<step>/ folders)")
    else:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])


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


def sample_text(model: Transformer, enc, prompts: list[str], max_new_tokens: int, device, seed: int) -> list[str]:
    from tokenizer import eot_id
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = torch.tensor([enc.encode_ordinary(prompt)], device=device)
        n = min(max_new_tokens, model.cfg.max_seq_len - ids.shape[1])
        toks = model.generate(ids, n, temperature=0.8, top_k=50, eos_id=eot_id(enc), generator=gen)
        out.append(enc.decode(toks[0].tolist()).replace("<|endoftext|>", ""))
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


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


# Inductor on GPU: autotune the launch settings (block sizes, warps) of its fused elementwise and
# reduction kernels (the matmuls stay cuBLAS's): +1% tokens/s at the 1B shape for a longer first
# compile (README, Benchmarks). bench_train.py uses the same.
INDUCTOR_GPU_SETTINGS = {"max_autotune_pointwise": True}


def train(cfg: dict) -> dict:
    """Run (or resume) the configured training; returns a summary of the final figures."""
    mcfg, dcfg, ocfg, tcfg = cfg["model"], cfg["data"], cfg["optim"], cfg["train"]
    rank, local_rank, world, device = setup_distributed(tcfg)
    if mcfg.attn_backend == "flex" and device.type == "cpu":
        raise ConfigError("model.attn_backend='flex' cannot train on CPU (flex_attention has no CPU backward); "
                          "use --model.attn_backend=sdpa on CPU")
    attention_kernel = "PyTorch's choice"
    if tcfg.attention_kernel == "fa4" or (tcfg.attention_kernel == "auto" and device.type == "cuda"):
        why_not = fa4_blocker(mcfg, tcfg) or use_flash_attention_4(device)  # before any data work
        if why_not and tcfg.attention_kernel == "fa4":
            raise ConfigError(f"train.attention_kernel=fa4: {why_not} (or set train.attention_kernel=auto)")
        attention_kernel = f"PyTorch's choice, not FlashAttention-4: {why_not}" if why_not else "FlashAttention-4"
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    run_dir = Path(tcfg.out_dir) / tcfg.name
    ckpts = checkpoint_paths(run_dir)
    if ckpts and not tcfg.resume:
        raise ConfigError(f"{run_dir} already holds checkpoints; continue it with --train.resume=true, "
                          f"or pick a new --train.name (nothing there was touched)")
    if tcfg.resume and not ckpts:
        log(f"train.resume: no checkpoint in {run_dir} yet, starting fresh")
    accum = tcfg.grad_accum_steps
    if tcfg.global_batch_size:  # the same global batch on any number of GPUs
        accum, rest = divmod(tcfg.global_batch_size, tcfg.micro_batch_size * world)
        if rest or accum < 1:
            raise ConfigError(f"train.global_batch_size={tcfg.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size x processes = {tcfg.micro_batch_size} x {world}; "
                              f"change one of them")
    global_batch = tcfg.micro_batch_size * accum * world
    per_micro = tcfg.micro_batch_size * world  # sequences one micro-batch on every rank adds to a step

    def schedule_position(step: int, tokens_seen: int) -> float:
        """Where a step stands in the run, in full-batch steps: the clock of the lr schedule and of
        the data stages (with a batch ramp it counts tokens, not the more numerous small steps)."""
        return tokens_seen / (global_batch * tcfg.seq_len) if tcfg.batch_ramp_tokens else step
    if tcfg.batch_ramp_start and (tcfg.batch_ramp_start % per_micro or tcfg.batch_ramp_start >= global_batch):
        raise ConfigError(f"train.batch_ramp_start={tcfg.batch_ramp_start} must be a multiple of train.micro_batch_size "
                          f"x processes = {tcfg.micro_batch_size} x {world} and below the global batch {global_batch}")

    saved = None
    if tcfg.resume and ckpts:  # before any data work: a checkpoint that does not fit stops at once
        saved = load_checkpoint(ckpts[-1])
        check_resumable(saved["config"], cfg, ckpts[-1])

    # Data first (rank 0 builds, others wait), so a missing or broken corpus stops before the model.
    from tokenizer import eot_id
    try:
        if master:
            enc = prepare_data(dcfg, mcfg.vocab_size, log)
        if world > 1:
            dist.barrier()
        if not master:
            enc = prepare_data(dcfg, mcfg.vocab_size, log)
        fingerprint = tokenizer_fingerprint(dcfg.tokenizer_path(mcfg.vocab_size))
        shard_dir = dcfg.shard_dir(mcfg.vocab_size)
        resume_position = schedule_position(saved["step"], saved["tokens"]) if saved else 0
        loader = MixtureLoader(shard_dir, dcfg.weights_at(resume_position / tcfg.max_steps), "train", tcfg.seq_len,
                               dcfg.seed, eot_id(enc), rank, world, fingerprint, sources=dcfg.sources())
        # every rank walks the whole validation sequence; evaluate() deals its batches out
        val_loader = MixtureLoader(shard_dir, dcfg.weights, "val", tcfg.seq_len, dcfg.seed, eot_id(enc),
                                   fingerprint=fingerprint)
        task_evals = None
        if master and tcfg.eval_tasks:
            import eval as evals
            task_evals = evals.TrainingEvals(tcfg.eval_tasks, dcfg, enc, tcfg.eval_task_items)
    except (ValueError, RuntimeError) as e:  # empty corpus, truncated shard, stale tokenizer...
        raise ConfigError(str(e)) from e

    # Same seed on every rank for the weights, then a per-rank seed for everything random after.
    torch.manual_seed(tcfg.seed)
    model = Transformer(mcfg).to(device)
    torch.manual_seed(tcfg.seed + rank)
    random.seed(tcfg.seed + rank)
    np.random.seed((tcfg.seed + rank) % 2 ** 32)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[tcfg.dtype]
    model.activation_checkpointing = tcfg.activation_checkpointing
    compiled = tcfg.compile == "true" or (tcfg.compile == "auto" and device.type == "cuda")
    sharded = tcfg.parallelism == "fsdp"
    if compiled and sharded:
        for block in model.blocks:
            block.compile()  # per block, as torchtitan does: FSDP's all-gathers sit between the graphs
    train_model = model
    if sharded:
        # FSDP2: each block's parameters are one all-gathered unit, the root holds the rest
        # (embeddings, final norm). bf16 parameters for compute, float32 master weights and
        # float32 gradient reduction; the optimizer then sees only this rank's shard.
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # gradient_as_bucket_view: .grad tensors are views into DDP's all-reduce buckets, so the
        # gradients are held once (4N bytes), not once in .grad and again in the buckets
        train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
                          gradient_as_bucket_view=True)
    if compiled and device.type == "cuda":
        import torch._inductor.config as inductor_config
        for key, value in INDUCTOR_GPU_SETTINGS.items():
            setattr(inductor_config, key, value)
    if compiled and not sharded:
        # The whole training forward as one graph (DDP's own graph breaks keep its overlap): the
        # embedding, the final norm and the loss's casts fuse too, 3% faster than block by block at
        # the 1B shape (README, Benchmarks). Generation keeps the eager `model`: a KV cache changes
        # shapes every token.
        train_model = torch.compile(train_model)
    # DDP / one process: float32 master weights, autocast runs the matmuls in bf16. FSDP casts
    # parameters itself.
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and not sharded)
    optimizer = build_optimizer(model, ocfg)  # no weight decay on embeddings and norms (optim.param_groups)
    start_step, tokens = 0, 0
    spikes = SpikeSkipper(tcfg.spike_sigma, tcfg.spike_window) if tcfg.spike_sigma else None
    if saved is not None:
        # the optimizer's state dict carries its hyperparameters too; the config's win (lr is set each step)
        settings = [{k: g[k] for k in ("betas", "eps", "weight_decay", "momentum", "nesterov", "ns_steps") if k in g}
                    for g in optimizer.param_groups]
        restore_weights(ckpts[-1], saved, model, optimizer)
        for group, setting in zip(optimizer.param_groups, settings):
            group.update(setting)
        new_stage = loader.load_state_dict(saved["loader"])
        if new_stage:  # a curriculum stage, or an annealing run: resume a mid checkpoint with a new mix
            log(f"the mixture differs from the checkpoint's: a new mixture stage starts at sample {loader.samples:,}")
        if saved["config"]["train"]["seq_len"] != tcfg.seq_len:
            log(f"train.seq_len {saved['config']['train']['seq_len']} -> {tcfg.seq_len}: windows are cut anew, "
                f"each source continues at the same position of its new window order")
        start_step, tokens = saved["step"], saved["tokens"]
        if spikes and saved.get("spikes") and not new_stage:  # a new mixture has losses of its own
            spikes.load_state_dict(saved["spikes"])
        if len(saved["rng"]) == world:
            set_rng_state(saved["rng"][rank])
        else:
            log(f"note: checkpoint was written by {len(saved['rng'])} ranks, resuming on {world}: RNG reseeded")

    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config_to_toml(cfg))
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)
    metrics = open(run_dir / "metrics.jsonl", "a") if master else None

    def record(row: dict):
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    tokens_per_step = global_batch * tcfg.seq_len
    fpt = flops_per_token(mcfg, tcfg.seq_len)
    peak = peak_flops_per_device(device, tcfg.peak_flops)
    log(f"model: {count_params(mcfg):,} parameters ({mcfg.n_layers} layers, d_model {mcfg.d_model}, "
        f"{mcfg.n_heads} heads / {mcfg.n_kv_heads} KV heads, {'tied' if mcfg.tie_embeddings else 'untied'} embeddings)")
    log(f"layers ({mcfg.attn_type}): {describe_layers(mcfg)} (G global, S sliding, C chunked, L linear; "
        f"/nope: no RoPE)")
    if mcfg.moe:
        log(f"moe: {mcfg.moe_experts} experts, top-{mcfg.moe_top_k}, {mcfg.moe_shared_experts} shared, in layers "
            f"{mcfg.moe_dense_layers}..{mcfg.n_layers - 1}; {active_params(mcfg):,} parameters active per token")
    log(f"optimizer groups ({ocfg.name}; no decay on embeddings and norms):\n{describe_groups(optimizer)}")
    if ocfg.warmup_steps > tcfg.max_steps:  # allowed (a smoke test), but rarely meant
        log(f"note: optim.warmup_steps={ocfg.warmup_steps} is above train.max_steps={tcfg.max_steps}: the learning "
            f"rate never reaches optim.lr={ocfg.lr:g}")
    elif ocfg.schedule == "wsd" and ocfg.warmup_steps > wsd_decay_start(ocfg, tcfg.max_steps):
        log(f"note: the WSD decay starts at step {wsd_decay_start(ocfg, tcfg.max_steps)}, "
            f"before warmup ends at {ocfg.warmup_steps}: the learning rate jumps when warmup hands over")
    log(f"data: {', '.join(f'{n} {w:.2f}' for n, w in zip(loader.names, loader.weights))}; "
        f"{sum(s.n_tokens for s in loader.sources):,} train tokens")
    for start, weights in zip(dcfg.stage_starts, dcfg.stage_weights):
        log(f"data stage from {start:.0%} of the run: {', '.join(f'{n} {w:g}' for n, w in weights.items())}")
    log(f"run: {world} process(es) on {device.type}, {dtype}, global batch {tcfg.micro_batch_size} x {accum} "
        f"accumulation x {world} = {global_batch} sequences x {tcfg.seq_len} = "
        f"{tokens_per_step:,} tokens/step, {tcfg.max_steps} steps -> {run_dir}")
    # A batch ramp trains on the tokens of the unramped run (max_steps full batches), in more steps,
    # and ends on tokens, not on a step count (a resume may change the shape of the remaining steps);
    # its lr schedule runs on tokens too: a step's position is tokens seen / tokens of a full step.
    token_budget = tcfg.max_steps * tokens_per_step

    def finished(steps_done: int, tokens_seen: int) -> bool:
        return tokens_seen >= token_budget if tcfg.batch_ramp_tokens else steps_done >= tcfg.max_steps
    total_steps = tcfg.max_steps
    if tcfg.batch_ramp_tokens:
        total_steps = ramp_steps(token_budget, tcfg.seq_len, global_batch, tcfg.batch_ramp_start,
                                 tcfg.batch_ramp_tokens, per_micro)
    if device.type == "cuda" and mcfg.attn_backend == "sdpa":
        log(f"attention kernel: {attention_kernel}")
    if tcfg.batch_ramp_tokens:
        log(f"batch ramp: {tcfg.batch_ramp_start} -> {global_batch} sequences over the first "
            f"{tcfg.batch_ramp_tokens:,} tokens, in steps of {per_micro}; {total_steps} optimizer steps (from the "
            f"start) train the {tcfg.max_steps} full batches' {token_budget:,} tokens, lr schedule on tokens")
    if ocfg.lr_base_batch:
        log(f"lr scaled by sqrt(batch / {ocfg.lr_base_batch}): x{sqrt_lr_scale(global_batch, ocfg.lr_base_batch):.3f} "
            f"at the full batch" + (" (Adam's rule, applied to Muon's groups too)" if ocfg.name == "muon" else ""))

    def run_task_evals(step: int):
        if task_evals:
            with autocast:
                row = task_evals.run(model)
            record({"step": step, "tokens": tokens, **row})
            log(f"step {step:>6} | " + " | ".join(f"{k} {v:.3f}" for k, v in row.items()))

    val_loss = None
    if start_step == 0:
        val_loss = evaluate(model, val_loader, tcfg.eval_batches, tcfg.micro_batch_size, device, autocast,
                            tcfg.document_masking)
        record({"step": 0, "tokens": 0, "val_loss": val_loss})
        log(f"step {0:>6} | val_loss {val_loss:.4f}")
        run_task_evals(0)

    t_last, tokens_last, paused = time.time(), tokens, 0.0  # paused: eval and checkpoint time, not training
    step = start_step
    while not finished(step, tokens):
        batch = batch_size_at(tokens, global_batch, tcfg.batch_ramp_start, tcfg.batch_ramp_tokens, per_micro)
        position = schedule_position(step, tokens)
        lr = lr_at(position, ocfg, tcfg.max_steps)
        progress = position / tcfg.max_steps
        if dcfg.stage_starts and loader.set_weights(dcfg.weights_at(progress)):
            log(f"step {step:>6} | data stage {dcfg.stage_at(progress) + 1}: "
                f"{', '.join(f'{n} {w:.2f}' for n, w in zip(loader.names, loader.weights))}")
            if spikes:  # a new mixture has losses of its own
                spikes.restart()
        if ocfg.lr_base_batch:
            lr *= sqrt_lr_scale(batch, ocfg.lr_base_batch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        parts_sum = {"loss": 0.0, "ce": 0.0, "z_loss": 0.0}
        micro_batches = loader.next_step(tcfg.micro_batch_size, batch // per_micro)
        if mcfg.moe:  # balance statistics cover every micro-batch of the step (moe.py)
            begin_moe_step(model, len(micro_batches))
        try:
            for i, (x, y, doc) in enumerate(micro_batches):
                x, y, doc = (t.to(device, non_blocking=True) for t in (x, y, doc))
                last = i == len(micro_batches) - 1
                # Gradients are reduced across ranks on every backward unless told not to: only
                # the last micro-batch of a step needs to. Under FSDP2 skipping it keeps unsharded
                # fp32 gradients between micro-batches (4N bytes per rank); reducing every time keeps
                # them sharded at the price of one reduce-scatter per micro-batch (torchtitan's choice).
                sync = contextlib.nullcontext()
                if sharded:
                    model.set_requires_gradient_sync(last or tcfg.reduce_every_micro_batch)
                elif world > 1 and not last:
                    sync = train_model.no_sync()
                with sync, autocast:
                    loss, parts = train_model(x, y, doc if tcfg.document_masking else None)
                    (loss / len(micro_batches)).backward()
                parts_sum["loss"] += loss.item() / len(micro_batches)
                parts_sum["ce"] += parts["ce"].item() / len(micro_batches)
                parts_sum["z_loss"] += parts["z_loss"].item() / len(micro_batches)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       ocfg.grad_clip if ocfg.grad_clip > 0 else math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
                grad_norm = grad_norm.full_tensor()
            shifts = spikes.level_shifts if spikes else 0
            skip = spikes.check(all_reduce_mean(parts_sum["loss"], device), float(grad_norm)) if spikes else ""
            if spikes and spikes.level_shifts > shifts:
                log(f"step {step + 1:>6} | {tcfg.spike_window // 4} steps in a row above the spike band: a new "
                    f"level, not a spike; update taken, spike history restarted")
            if skip:
                log(f"step {step + 1:>6} | update skipped: {skip}")
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError as e:
            raise ConfigError(
                f"out of GPU memory at step {step + 1} ({count_params(mcfg) / 1e9:.2f}B parameters, micro-batch "
                f"{tcfg.micro_batch_size} x {tcfg.seq_len} tokens, parallelism={tcfg.parallelism}); lower "
                f"train.micro_batch_size (raise train.grad_accum_steps to keep the global batch), "
                f"{'' if mcfg.moe else 'set train.activation_checkpointing=true, '}use train.parallelism=fsdp, "
                f"or shorten train.seq_len") from e
        moe_row = end_moe_step(model) if mcfg.moe else {}  # load metrics; the aux-loss-free bias update
        tokens += batch * tcfg.seq_len
        done = step + 1
        last = finished(done, tokens)

        if done % tcfg.log_interval == 0 or last:
            loss_avg = all_reduce_mean(parts_sum["loss"], device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.time() - t_last - paused
            tok_per_s = (tokens - tokens_last) / max(elapsed, 1e-9)
            row = {"step": done, "tokens": tokens, "loss": loss_avg, "ce": all_reduce_mean(parts_sum["ce"], device),
                   "z_loss": all_reduce_mean(parts_sum["z_loss"], device), "lr": lr,
                   "grad_norm": float(grad_norm), "tok_per_s": tok_per_s, "batch_size": batch}
            if spikes:
                row["skipped_steps"] = spikes.skipped
            if peak:
                row["mfu"] = tok_per_s * fpt / (peak * world)
            row.update(moe_row)
            record(row)
            mfu = f" | mfu {100 * row['mfu']:.1f}%" if "mfu" in row else ""
            if moe_row:
                mfu += (f" | moe imbalance {moe_row['moe/imbalance']:.2f} dead {moe_row['moe/dead_experts']} "
                        f"balance {moe_row['moe/balance_loss']:.3f}")
            ramp = f" | batch {batch}" if tcfg.batch_ramp_tokens else ""
            log(f"step {done:>6} | loss {loss_avg:.4f} | lr {lr:.2e} | grad_norm {row['grad_norm']:.3f} | "
                f"{tok_per_s:,.0f} tok/s{mfu}{ramp}")
            t_last, tokens_last, paused = time.time(), tokens, 0.0

        t_pause = time.time()
        if done % tcfg.eval_interval == 0 or last:
            val_loss = evaluate(model, val_loader, tcfg.eval_batches, tcfg.micro_batch_size, device, autocast,
                                tcfg.document_masking)
            record({"step": done, "tokens": tokens, "val_loss": val_loss})
            log(f"step {done:>6} | val_loss {val_loss:.4f}")
            run_task_evals(done)
        if (tcfg.ckpt_interval and done % tcfg.ckpt_interval == 0) or last:
            path = save_checkpoint(run_dir, done, model, optimizer, loader, cfg, tokens, tcfg.keep_checkpoints, sharded,
                                   spikes)
            log(f"saved {path}")
        paused += time.time() - t_pause
        step = done

    summary = {"run_dir": str(run_dir), "steps": step, "tokens": tokens, "val_loss": val_loss}
    sample_model = model
    if sharded and tcfg.sample_tokens:
        # generation is sequential and small: gather the full weights into a plain model on rank 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            sample_model = Transformer(mcfg).to(device)
            sample_model.load_state_dict(full)
    if master and tcfg.sample_tokens:
        samples = sample_text(sample_model, enc, ["The ", "def ", "Question: "], tcfg.sample_tokens, device, tcfg.seed)
        (run_dir / "samples.txt").write_text("\n\n----\n\n".join(samples))
        log("\n----- samples -----\n" + "\n\n----\n\n".join(samples) + "\n-------------------")
    if metrics:
        metrics.close()
    if val_loss is not None:
        log(f"final val_loss {val_loss:.4f} after {tokens:,} tokens")
    if dist.is_initialized():
        # Tear down in order: DDP's reducer before the process group it uses, and ranks together;
        # left to the garbage collector after destroy, a gloo rank could hang or abort at exit.
        del train_model
        dist.barrier()
        dist.destroy_process_group()
        summary["process_group"] = True
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint's step: they will be logged again. A run
    that starts at step 0 (nothing was saved before a crash) starts a fresh file."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line torn by a crash mid-write
    path.write_text("".join(r + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config_path, overrides = None, []
    it = iter(argv)
    for arg in it:
        if arg == "--config" or arg.startswith("--config="):
            config_path = next(it, None) if arg == "--config" else arg.split("=", 1)[1]
            if not config_path or config_path.startswith("--"):
                print("error: --config needs a file, e.g. --config configs/tiny.toml", file=sys.stderr)
                sys.exit(2)
        elif arg in ("-h", "--help"):
            print(__doc__ + "\nConfig keys:\n  " + "\n  ".join(_all_keys()))
            return
        else:
            overrides.append(arg)
    try:
        cfg = load_config(config_path, overrides)
        summary = train(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
