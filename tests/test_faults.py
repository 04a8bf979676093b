"""Faults at the worst moment, for every entry point (issue 21; the table is docs/faults.md).

A long run is judged by its worst hour. Each test here starts real processes of train.py, sft.py,
dpo.py, rl.py, merge.py, data.py, tokenizer.py or eval.py and hurts them: SIGKILL in the middle of a
step, of a metrics row, of a checkpoint's weights or DCP shards, between a checkpoint's manifest and
its rename, of a token shard; Ctrl-C (once, twice) and SIGTERM; a NaN loss; a full disk; a second
process on a run folder in use; flipped and truncated bytes; bad input of every kind. Then it checks
what is promised: the rerun with resume ends where an uninterrupted run ends (every logged figure
but the timings, each step once, and the weights), a refusal is one line naming the file and the
fix with a non-zero exit code and no traceback, and nothing already written has changed.

How faults are injected (a fork server and hooks around the moment chosen): tests/fault_server.py.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_overrides
from fault_server import Result, Server

pytestmark = pytest.mark.slow  # multi-process: every test but one runs children of the fork server
TIMINGS = ("tok_per_s", "mfu", "seconds")  # the only figures a resumed run may log differently


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fault_logs"))
    yield s
    s.close()


def rows(run_dir: Path) -> list[dict]:
    """Every row of metrics.jsonl, timings dropped (a torn line fails the test)."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from checkpoint import load_model
    return load_model(str(run_dir))[0].state_dict()


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under a folder and its SHA-256: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(run_dir: Path) -> list[str]:
    """What a clean finish leaves none of: temporaries and the lock."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp") or p.name == ".lock")


# --------------------------------------------------------------------------------------------
# Killed at any moment
# --------------------------------------------------------------------------------------------


def train_args(small_data, out: Path, name: str, *extra: str) -> list[str]:
    """6 steps, a checkpoint every 2 (the newest 2 kept), validation at 0, 3 and 6."""
    return [*tiny_overrides(small_data[0], out, name, **{"train.ckpt_interval": 2}), *extra]


@pytest.fixture(scope="module")
def train_reference(server, small_data, tmp_path_factory):
    """An uninterrupted run: (its folder, its wall time in seconds)."""
    out = tmp_path_factory.mktemp("train_reference")
    t0 = time.time()
    result = server.run("train", train_args(small_data, out, "ref"))
    assert result.rc == 0, result.report()
    return out / "ref", time.time() - t0


def test_train_killed_at_each_kind_of_moment_resumes_exactly(server, small_data, train_reference, tmp_path):
    """One run, killed five times at five kinds of moment, ends as the uninterrupted run does.
    On the way: a second process refuses the folder while the first runs, and each rerun takes
    over the stale lock the killed one left."""
    ref, _ = train_reference
    run_dir, args = tmp_path / "run", train_args(small_data, tmp_path, "run")
    resume = [*args, "--train.resume=true"]
    # 1. paused after step 3 (checkpoint 2 written): a second process refuses; then SIGKILL
    marker = tmp_path / "paused"
    first = server.start("train", args, {"at": "row", "step": 3, "do": "pause", "marker": str(marker)})
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert marker.exists(), server.wait(first).report()
    before = snapshot(run_dir)
    second = server.run("train", resume)
    second.refused(f"{run_dir} is in use by process {first} on {socket.gethostname()}", f"delete {run_dir}/.lock")
    assert snapshot(run_dir) == before
    os.kill(first, signal.SIGKILL)
    assert server.wait(first).rc == -signal.SIGKILL
    # 2. the rerun killed while it rewrites metrics.jsonl to the checkpoint's step: no row is lost
    killed = server.run("train", resume, {"at": "metrics_rewrite", "do": "kill"})
    assert killed.rc == -signal.SIGKILL and f"taking over the stale lock of process {first}" in killed.out
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2, 3], killed.report()
    # 3. killed with half of checkpoint 4's weights written
    killed = server.run("train", resume, {"at": "weights", "step": 4, "do": "kill"})
    assert killed.rc == -signal.SIGKILL and (run_dir / "ckpt_0000004.tmp" / "state.pt").is_file(), killed.report()
    # 4. the partial checkpoint is named and ignored; killed with half of step 5's row written
    killed = server.run("train", resume, {"at": "row", "step": 5, "do": "torn"})
    assert killed.rc == -signal.SIGKILL, killed.report()
    assert f"note: ignoring {run_dir / 'ckpt_0000004.tmp'}" in killed.out and "resum" not in killed.err
    assert not (run_dir / "ckpt_0000004.tmp").exists() and (run_dir / "ckpt_0000004" / "manifest.json").is_file()
    # 5. killed between checkpoint 6's manifest and its rename
    killed = server.run("train", resume, {"at": "manifest", "step": 6, "do": "kill"})
    assert killed.rc == -signal.SIGKILL and (run_dir / "ckpt_0000006.tmp" / "manifest.json").is_file()
    # 6. the last rerun finishes: the uninterrupted run's rows, once each, and its weights
    done = server.run("train", resume)
    assert done.rc == 0, done.report()
    assert f"note: ignoring {run_dir / 'ckpt_0000006.tmp'}" in done.out
    assert rows(run_dir) == rows(ref)
    assert same_weights(run_dir, ref)
    assert leftovers(run_dir) == [] and [p.name for p in sorted(run_dir.glob("ckpt_*"))] == [
        "ckpt_0000004", "ckpt_0000006"]


def test_train_killed_at_a_random_moment_resumes_exactly(server, small_data, train_reference, tmp_path):
    """SIGKILL from outside at a moment drawn anew each time over the length of a whole run: wherever
    it lands (setup, a step, validation, a checkpoint, the end), the rerun ends as the uninterrupted
    run does. The moment is in the failure message, to replay it."""
    ref, seconds = train_reference
    run_dir, args = tmp_path / "run", train_args(small_data, tmp_path, "run")
    delay = random.uniform(0, seconds)
    pid = server.start("train", args)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    killed = server.wait(pid)
    done = server.run("train", [*args, "--train.resume=true"])
    moment = f"killed {delay:.3f} s after the start (exit code {killed.rc})\n{done.report()}"
    assert done.rc == 0, moment
    assert rows(run_dir) == rows(ref), moment
    assert same_weights(run_dir, ref) and leftovers(run_dir) == [], moment


def test_fsdp_run_stopped_by_ctrl_c_a_full_disk_and_a_kill_mid_dcp_checkpoint_resumes_exactly(
        server, small_data, tmp_path):
    """FSDP2 (one gloo process) writes torch.distributed.checkpoint folders: Ctrl-C stops at a step
    boundary with one (DCP) checkpoint and one line; a disk that fills while the shards are written
    stops the run with one line, no partial folder and the previous checkpoint intact; a kill after
    the shards are written but before the manifest leaves a folder that is ignored; the end equals
    an uninterrupted FSDP run."""
    args = train_args(small_data, tmp_path, "run", "--train.parallelism=fsdp")
    ref = server.run("train", train_args(small_data, tmp_path, "ref", "--train.parallelism=fsdp"))
    assert ref.rc == 0, ref.report()
    run_dir, resume = tmp_path / "run", [*args, "--train.resume=true"]
    stopped = server.run("train", args, {"at": "row", "step": 3, "do": "sigint"})
    assert stopped.rc == 130 and stopped.refused("stopped at step 3 as asked, checkpoint written",
                                                 "--train.resume=true").startswith("interrupted: ")
    assert any(p.suffix == ".distcp" for p in (run_dir / "ckpt_0000003").iterdir()) and leftovers(run_dir) == []
    full = server.run("train", resume, {"at": "weights", "step": 4, "do": "disk_full"})
    full.refused(f"could not write checkpoint {run_dir / 'ckpt_0000004'}", "MB free on its disk",
                 f"the previous checkpoint {run_dir / 'ckpt_0000003'} is intact", "free space")
    assert full.rc == 2 and leftovers(run_dir) == [] and sorted(p.name for p in run_dir.glob("ckpt_*")) == [
        "ckpt_0000002", "ckpt_0000003"]
    killed = server.run("train", resume, {"at": "hashing", "step": 4, "do": "kill"})
    assert killed.rc == -signal.SIGKILL and any(p.suffix == ".distcp" for p in (run_dir / "ckpt_0000004.tmp").iterdir())
    done = server.run("train", resume)
    assert done.rc == 0 and f"note: ignoring {run_dir / 'ckpt_0000004.tmp'}" in done.out, done.report()
    assert rows(run_dir) == rows(tmp_path / "ref") and same_weights(run_dir, tmp_path / "ref")
    assert leftovers(run_dir) == []


def test_merge_killed_while_writing_leaves_no_output_and_the_rerun_writes_it(server, train_reference, tmp_path):
    """merge.py writes <name>.tmp and renames it: killed halfway through the merged weights, it leaves
    no <name> folder (nothing half-written looks like a result); the rerun clears the temporary and
    writes the merge (a model merged with itself: its own weights)."""
    ref = train_reference[0]
    args = [f"--merge.runs={json.dumps([str(ref), str(ref)])}", f"--merge.out_dir={tmp_path}",
            "--merge.eval_examples=0", "--merge.eval_batches=1"]
    killed = server.run("merge", args, {"at": "weights", "step": 0, "do": "kill"})
    assert killed.rc == -signal.SIGKILL and sorted(p.name for p in tmp_path.iterdir()) == ["merged.tmp"]
    done = server.run("merge", args)
    assert done.rc == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["merged"], done.report()
    assert same_weights(tmp_path / "merged", ref)


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------


def test_train_ctrl_c_sigterm_and_a_second_ctrl_c_stop_with_one_line_and_resume_exactly(
        server, small_data, train_reference, tmp_path):
    """Ctrl-C: a checkpoint at the step boundary, exit 130, one line. A second Ctrl-C stops at once
    (no checkpoint, the one before stays the newest), also in one line. SIGTERM (what Slurm sends
    before preempting a job) as Ctrl-C. The resumed run equals the uninterrupted one."""
    ref, _ = train_reference
    run_dir, args = tmp_path / "run", train_args(small_data, tmp_path, "run")
    resume = [*args, "--train.resume=true"]
    stopped = server.run("train", args, {"at": "row", "step": 3, "do": "sigint"})
    assert stopped.rc == 130, stopped.report()
    stopped.refused("interrupted: stopped at step 3 as asked, checkpoint written; continue with --train.resume=true")
    assert (run_dir / "ckpt_0000003" / "manifest.json").is_file() and leftovers(run_dir) == []
    twice = server.run("train", resume, {"at": "row", "step": 5, "do": "sigint_twice"})
    assert twice.rc == 130, twice.report()
    twice.refused("interrupted: stopped at once", "continue from " + str(run_dir / "ckpt_0000004"), "--train.resume=true")
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == ["ckpt_0000003", "ckpt_0000004"]
    assert leftovers(run_dir) == []
    term = server.run("train", resume, {"at": "row", "step": 5, "do": "sigterm"})
    assert term.rc == 130 and "stopped at step 5 as asked" in term.refused(), term.report()
    done = server.run("train", resume)
    assert done.rc == 0, done.report()
    assert rows(run_dir) == rows(ref) and same_weights(run_dir, ref) and leftovers(run_dir) == []


def test_ctrl_c_while_train_py_prepares_its_data_says_why_there_is_no_checkpoint(server, small_data, tmp_path):
    """Ctrl-C before the first step (here while tokenizing the corpus): no step, so no checkpoint;
    one line says so, and the data preparation continues where it stopped on the next run."""
    data_dir = tmp_path / "data"
    (data_dir / "vocab512").mkdir(parents=True)
    shutil.copy(Path(small_data[0].dir) / "vocab512" / "tokenizer.json", data_dir / "vocab512" / "tokenizer.json")
    args = [*train_args(small_data, tmp_path, "run"), f"--data.dir={data_dir}", "--data.max_docs=20"]
    stopped = server.run("train", args, {"at": "tokenize", "do": "sigint"})
    assert stopped.rc == 130, stopped.report()
    stopped.refused("interrupted: stopped at once, before any checkpoint", "rerun the same command")
    assert "prose: interrupted; the same command continues after shard 0" in stopped.out
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Post-training: killed, stopped, resumed
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start_model(small_data, tmp_path_factory) -> Path:
    """A run folder holding a tiny model, where every post-training stage can start."""
    from test_dpo import save_start, tiny_model
    return save_start(tiny_model(), small_data[0], tmp_path_factory.mktemp("start") / "base")


def stage_args(command: str, start: Path, out: Path, name: str) -> list[str]:
    """A few steps of each stage (sft 8, dpo 6, rl 6), a checkpoint every 2."""
    common = [f"--run.init={start}", f"--run.out_dir={out}", f"--run.name={name}", "--run.threads=1",
              "--run.ckpt_interval=2", "--optim.warmup_steps=1"]
    return common + {
        "sft": ["--sft.train_examples=24", "--sft.eval_examples=0", "--sft.rows_per_step=2", "--sft.epochs=1.0"],
        "dpo": ["--dpo.prompts=12", "--dpo.pairs_per_step=2", "--dpo.eval_examples=0"],
        "rl": ["--rl.prompts=8", "--rl.prompts_per_step=2", "--rl.group_size=3", "--rl.steps=6", "--rl.max_new_tokens=8",
               "--rl.overlong_buffer=4", "--rl.eval_examples=0"]}[command]


@pytest.mark.parametrize("command", ["sft", "dpo", "rl"])
def test_post_training_killed_torn_and_stopped_resumes_exactly(server, start_model, tmp_path, command):
    """Each stage: killed with half a metrics row written (its checkpoint 2 the newest), killed
    halfway through checkpoint 4's weights, stopped by Ctrl-C (SIGTERM for rl) with a checkpoint and
    one line; the resumed run logs the uninterrupted run's rows, once each, and ends on its weights."""
    ref = server.run(command, stage_args(command, start_model, tmp_path, "ref"))
    assert ref.rc == 0, ref.report()
    run_dir, args = tmp_path / "run", stage_args(command, start_model, tmp_path, "run")
    resume = [*args, "--run.resume=true"]
    torn = server.run(command, args, {"at": "row", "step": 3, "do": "torn"})
    assert torn.rc == -signal.SIGKILL and (run_dir / "ckpt_0000002").is_dir(), torn.report()
    killed = server.run(command, resume, {"at": "weights", "step": 4, "do": "kill"})
    assert killed.rc == -signal.SIGKILL and "resumed" in killed.out, killed.report()
    stop = "sigterm" if command == "rl" else "sigint"
    stopped = server.run(command, resume, {"at": "row", "step": 5, "do": stop})
    assert stopped.rc == 130, stopped.report()
    stopped.refused("interrupted: stopped at step 5 as asked, checkpoint written; continue with --run.resume=true")
    assert f"note: ignoring {run_dir / 'ckpt_0000004.tmp'}" in stopped.out
    assert (run_dir / "ckpt_0000005" / "manifest.json").is_file() and leftovers(run_dir) == []
    done = server.run(command, resume)
    assert done.rc == 0, done.report()
    assert rows(run_dir) == rows(tmp_path / "ref") and same_weights(run_dir, tmp_path / "ref")
    assert (run_dir / "report.json").is_file() and leftovers(run_dir) == []


# --------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_the_run_before_the_update_or_is_skipped_as_configured(server, small_data, start_model,
                                                                                  tmp_path):
    """A NaN loss at step 3 (checkpoint 2 written): train.py stops with one line and exit 2; nothing
    after checkpoint 2 is written and every checkpoint left is finite. sft.py, dpo.py and rl.py too
    (rl.py: at its third training forward; batches with nothing to learn have none). With
    train.spike_sigma set, train.py skips that step's update instead and finishes with finite weights."""
    from checkpoint import checkpoint_paths, load_model, verify_checkpoint

    def finite(run_dir: Path, newest: str | None = None) -> bool:
        ckpts = checkpoint_paths(run_dir)
        for ckpt in ckpts:
            verify_checkpoint(ckpt)
        model = load_model(str(ckpts[-1]))[0]
        return ckpts[-1].name == (newest or ckpts[-1].name) and all(bool(torch.isfinite(p).all())
                                                                     for p in model.parameters())

    nan = {"at": "forward", "step": 3, "do": "nan"}
    stopped = server.run("train", train_args(small_data, tmp_path, "train"), nan)
    stopped.refused("error: step 3: loss nan and gradient norm nan: the run diverged and stops before any NaN "
                    "reaches a checkpoint", "lower optim.lr", "train.spike_sigma")
    assert stopped.rc == 2 and finite(tmp_path / "train", "ckpt_0000002") and leftovers(tmp_path / "train") == []
    skipped = server.run("train", train_args(small_data, tmp_path, "skip", "--train.spike_sigma=6"), nan)
    assert skipped.rc == 0 and "step      3 | update skipped: grad_norm is nan" in skipped.out, skipped.report()
    assert [r["skipped_steps"] for r in rows(tmp_path / "skip") if "loss" in r] == [0, 0, 1, 1, 1, 1]
    assert finite(tmp_path / "skip", "ckpt_0000006")
    for command in ("sft", "dpo", "rl"):
        stopped = server.run(command, stage_args(command, start_model, tmp_path, command), nan)
        stopped.refused("error: the gradient norm is nan: the run diverged and stops before this update",
                        "lower optim.lr")
        assert finite(tmp_path / command) and leftovers(tmp_path / command) == []


def test_weights_with_a_nan_are_never_saved(small_data, tmp_path):
    """save_checkpoint itself refuses NaN weights, naming a parameter: the checkpoint before stays
    the newest, and no partial folder is left."""
    from checkpoint import CheckpointError, checkpoint_paths, save_checkpoint
    from test_dpo import tiny_model
    model = tiny_model()
    save_checkpoint(tmp_path, 1, model, None, {"step": 1})
    with torch.no_grad():
        model.blocks[1].mlp_norm.weight[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not saving step 2: 1 parameter\(s\) hold NaN or inf \(e\.g\. "
                                              r"blocks\.1\.mlp_norm\.weight\)"):
        save_checkpoint(tmp_path, 2, model, None, {"step": 2})
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt_0000001"] and sorted(tmp_path.iterdir()) == [
        tmp_path / "ckpt_0000001"]


# --------------------------------------------------------------------------------------------
# Disk full
# --------------------------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_fails_in_one_line_and_keeps_the_previous_checkpoint(
        server, small_data, train_reference, start_model, tmp_path):
    """The disk fills as a checkpoint's weights are written (the kernel fails the write): train.py
    stops with one line naming the checkpoint, the free space and the intact previous checkpoint,
    leaves no partial folder nor lock, and resumes to the uninterrupted run once there is room.
    sft.py's final checkpoint and merge.py's output fail the same way (the DCP case is in the FSDP
    test above)."""
    ref, _ = train_reference
    run_dir, args = tmp_path / "run", train_args(small_data, tmp_path, "run")
    full = server.run("train", args, {"at": "weights", "step": 4, "do": "disk_full"})
    full.refused(f"error: could not write checkpoint {run_dir / 'ckpt_0000004'}", "MB free on its disk",
                 f"the previous checkpoint {run_dir / 'ckpt_0000002'} is intact")
    assert full.rc == 2 and leftovers(run_dir) == [] and [p.name for p in run_dir.glob("ckpt_*")] == ["ckpt_0000002"]
    done = server.run("train", [*args, "--train.resume=true"])
    assert done.rc == 0 and rows(run_dir) == rows(ref) and same_weights(run_dir, ref), done.report()
    sft_dir = tmp_path / "sft"
    full = server.run("sft", stage_args("sft", start_model, tmp_path, "sft"), {"at": "weights", "step": 8,
                                                                              "do": "disk_full"})
    full.refused(f"error: could not write checkpoint {sft_dir / 'ckpt_0000008'}",
                 f"the previous checkpoint {sft_dir / 'ckpt_0000006'} is intact")
    assert not (sft_dir / "report.json").exists() and leftovers(sft_dir) == []
    before = snapshot(tmp_path)
    full = server.run("merge", [f"--merge.runs={json.dumps([str(ref), str(run_dir)])}", f"--merge.out_dir={tmp_path}",
                                "--merge.eval_examples=0", "--merge.eval_batches=1"],
                      {"at": "weights", "step": 0, "do": "disk_full"})
    full.refused("error: could not write checkpoint", "merged.tmp", "no earlier checkpoint exists")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Corruption
# --------------------------------------------------------------------------------------------


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_named_the_previous_one_offered_and_nothing_touched(
        server, small_data, train_reference, tmp_path):
    """Flipped bytes, a truncated file, a garbage manifest: every command that reads the checkpoint
    (train.py resuming, eval.py, sft.py starting from it, merge.py) stops with one line naming the
    checkpoint, the file and the previous checkpoint, and writes nothing. When the previous one is
    corrupt too, the line says none is left. Following the advice (move the corrupt one away) resumes
    to the uninterrupted run."""
    ref, _ = train_reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    newest, previous = run_dir / "ckpt_0000006", run_dir / "ckpt_0000004"
    resume = train_args(small_data, tmp_path, "run", "--train.resume=true")
    offer = f"move it away to resume from the previous checkpoint, {previous}"
    flip_byte(newest / "state.pt", 5000)
    before = snapshot(tmp_path)
    why = f"checkpoint {newest} is corrupt: state.pt does not match its SHA-256 (flipped bytes); {offer}"
    assert server.run("train", resume).refused(f"error: {why}").endswith(why)
    server.run("eval", ["--model", run_dir, "--task", "prose_cloze"]).refused(why)
    server.run("sft", [f"--run.init={run_dir}", f"--run.out_dir={tmp_path}", "--run.name=sft"]).refused(
        f"cannot load the start model '{run_dir}'", why)
    server.run("merge", [f"--merge.runs={json.dumps([str(run_dir), str(ref)])}", f"--merge.out_dir={tmp_path}"]).refused(
        f"cannot load '{run_dir}'", why)
    assert snapshot(tmp_path) == before
    shutil.copy(ref / "ckpt_0000006" / "state.pt", newest / "state.pt")
    meta = newest / "meta.pt"
    size = meta.stat().st_size
    meta.write_bytes(meta.read_bytes()[:size // 2])
    server.run("train", resume).refused(f"{newest} is corrupt: meta.pt has {size // 2} bytes, the manifest says {size}",
                                        offer)
    shutil.copy(ref / "ckpt_0000006" / "meta.pt", meta)
    (newest / "manifest.json").write_text('{"files": ')
    server.run("train", resume).refused(f"{newest} is corrupt: its manifest.json is unreadable (JSONDecodeError", offer)
    shutil.move(newest, tmp_path / "aside")  # the advice; and the previous checkpoint is corrupt too
    flip_byte(previous / "state.pt", 100)
    server.run("train", resume).refused(f"{previous} is corrupt", "no earlier checkpoint is left: start the run again")
    shutil.copy(ref / "ckpt_0000004" / "state.pt", previous / "state.pt")
    done = server.run("train", resume)
    assert done.rc == 0 and rows(run_dir) == rows(ref) and same_weights(run_dir, ref), done.report()


# --------------------------------------------------------------------------------------------
# Two runs, one folder
# --------------------------------------------------------------------------------------------


def test_a_locked_run_folder_is_refused_by_every_stage_and_a_stale_lock_taken_over(server, start_model, tmp_path):
    """A lock held by a live process of this host, one from another host, one that cannot be read:
    sft.py, dpo.py and rl.py refuse in one line (owner, host, how to remove it) and write nothing; a
    lock whose process is gone is stale and taken over. (train.py's refusal while its first process
    really runs is in the test of the kills above.)"""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host, lock = socket.gethostname(), run_dir / ".lock"
    holders = [({"pid": os.getpid(), "host": host, "since": "today"}, f"in use by process {os.getpid()} on {host}"),
               ({"pid": 1, "host": "node-17", "since": "today"}, "in use by process 1 on node-17"),
               ("{not json", "in use by another process")]
    for command in ("sft", "dpo", "rl"):
        for owner, words in holders:
            lock.write_text(owner if isinstance(owner, str) else json.dumps(owner))
            before = snapshot(run_dir)
            server.run(command, stage_args(command, start_model, tmp_path, "run")).refused(
                f"{run_dir} is {words}", f"if that run is gone, delete {lock}")
            assert snapshot(run_dir) == before
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": host}))
    done = server.run("sft", stage_args("sft", start_model, tmp_path, "run"))
    assert done.rc == 0 and f"taking over the stale lock of process {int(dead.stdout)}" in done.out, done.report()
    assert leftovers(run_dir) == []


# --------------------------------------------------------------------------------------------
# Bad inputs on every command
# --------------------------------------------------------------------------------------------

# Per command: (arguments after the command's usual ones, then the words its one error line must
# hold). "{x}" names a file of bad_files(); USAGE marks argparse's own refusal (usage, then the line).
USAGE = "usage"
BAD_INPUTS = {
    "train": [
        (["--config", "{missing}.toml"], "config file {missing}.toml not found"),
        (["--config", "{garbage}"], "config file {garbage} is not valid TOML", "fix it"),
        (["--config", "{latin1}"], "config file {latin1} is not valid TOML", "'utf-8' codec"),
        (["--config", "{run_config}"], "config file {run_config} is not valid TOML"),
        (["--train.max_steps=abc"], "train.max_steps must be of type int, got 'abc'"),
        (["--train.max_steps=0"], "train.max_steps must be >= 1, got 0"),
        (["--train.micro_batch_size=-4"], "train.micro_batch_size must be >= 1, got -4"),
        (["--train.seq_len=128"], "train.seq_len=128 is longer than model.max_seq_len=64"),
        (["--model.vocab_size=100", "--data.dir={tmp}/fresh"], "vocab"),
        (["--model.vocab_size=0"], "model.vocab_size"),
        (["--model.d_model=-64"], "model.d_model"),
        (["--bogus"], "cannot read argument '--bogus'", "--section.key=value"),
        (["--train.nmae=x"], "unknown config key 'train.nmae'; did you mean train.name?"),
        (["--data.dir={file}/data"], "{file}"),
        (["--train.out_dir={file}"], "{file}"),
        (["--data.tokenizer={missing}.json"], "data.tokenizer={missing}.json: no such file"),
    ],
    "sft": [
        (["--run.init={missing}"], "cannot load the start model '{missing}'", "make it first: python train.py"),
        (["--sft.data={missing}.jsonl"], "data file {missing}.jsonl not found"),
        (["--sft.data={empty}"], "{empty} holds no rows"),
        (["--sft.data={broken}"], "{broken}:1: not a JSON object"),
        (["--sft.data={latin1_jsonl}"], "{latin1_jsonl} is not UTF-8 text"),
        (["--sft.rows_per_step=0"], "sft.rows_per_step must be >= 1"),
        (["--sft.seq_len=100000"], "sft.seq_len=100000 exceeds the model's max_seq_len 256"),
        (["--sft.epochs=abc"], "sft.epochs must be of type float"),
        (["--sft.lora_rank=-1"], "sft.lora_rank >= 0"),
        (["--config", "{garbage}"], "config file {garbage} is not valid TOML"),
        (["--bogus"], "cannot read argument '--bogus'"),
        (["--run.out_dir={file}"], "{file}"),
    ],
    "dpo": [
        (["--dpo.pairs={missing}.jsonl"], "an existing preference file"),
        (["--dpo.pairs={empty}"], "{empty} holds no rows"),
        (["--dpo.pairs={broken}"], "{broken}:1: not a JSON object"),
        (["--dpo.pairs={latin1_jsonl}"], "{latin1_jsonl} is not UTF-8 text"),
        (["--dpo.pairs_per_step=0"], "dpo.pairs_per_step"),
        (["--dpo.beta=-1"], "beta"),
        (["--dpo.loss=xyz"], "xyz"),
        (["--dpo.betta=1"], "unknown config key 'dpo.betta'; did you mean dpo.beta?"),
    ],
    "rl": [
        (["--rl.data={missing}.jsonl"], "rl.data='{missing}.jsonl' is not a file"),
        (["--rl.data={empty}"], "{empty} holds no rows"),
        (["--rl.data={broken}"], "{broken}:1: not a JSON object"),
        (["--rl.data={latin1_jsonl}"], "{latin1_jsonl} is not UTF-8 text"),
        (["--rl.steps=0"], "rl.steps"),
        (["--rl.group_size=1"], "rl.group_size"),
        (["--rl.max_new_tokens=100000"], "rl.max_new_tokens=100000 exceed the model's max_seq_len 256"),
        (["--run.init={start}", "--run.device=cuda"], "cuda"),
    ],
    "merge": [
        ([], "merge.runs is empty"),
        (["--merge.runs=[\"{missing}\"]"], "cannot load '{missing}'"),
        (["--merge.runs=abc"], "merge.runs must be of type tuple"),
        (["--merge.runs=[\"{start}\", \"{start}\"]", "--merge.weights=[-1.0, 2.0]"], "weights"),
        (["--merge.runs=[\"{start}\"]", "--merge.method=xyz"], "merge.method='xyz'"),
        (["--merge.runs=[\"{start}\"]", "--merge.name=base"], "{start} exists already"),
        (["--merge.runs=[\"{start}\"]", "--merge.out_dir={file}"], "{file}"),
        (["--bogus"], "cannot read argument '--bogus'"),
    ],
    "eval": [
        (["--model", "{missing}", "--task", "prose_cloze"], "model '{missing}' not found"),
        (["--model", "{start}", "--task", "{missing}.jsonl"], "{missing}.jsonl"),
        (["--model", "{start}", "--task", "{empty}"], "{empty}"),
        (["--model", "{start}", "--task", "{broken}"], "{broken}:1"),
        (["--model", "{start}", "--task", "{latin1_jsonl}"], "{latin1_jsonl}"),
        (["--model", "{start}", "--task", "no_such_task"], "no_such_task"),
        (["--model", "{start}", "--task", "prose_cloze", "--limit", "0"], "--limit"),
        (["--model", "{start}", "--task", "prose_cloze", "--batch-size", "-1"], "--batch-size"),
        (["--model", "{start}", "--task", "prose_cloze", "--bogus"], USAGE, "unrecognized arguments: --bogus"),
        (["--model", "{start}"], USAGE, "--task"),
        (["compare", "{missing}"], "{missing}"),
        (["quality", "{missing}", "--metric", "val_loss"], "{missing}"),
        (["decontaminate", "--task", "prose_cloze", "--shards", "{missing}"], "no training shards found"),
    ],
    "tokenizer": [
        (["--vocab-size", "10", "--out", "{tmp}/tok.json"], USAGE, "vocab"),
        (["--vocab-size", "-5", "--out", "{tmp}/tok.json"], USAGE, "vocab"),
        (["--vocab-size", "300", "--out", "{tmp}/tok.json", "--files", "{missing}"], USAGE, "{missing}"),
        (["--vocab-size", "300", "--out", "{tmp}/tok.json", "--files", "{latin1_txt}"], USAGE, "{latin1_txt}"),
        (["--vocab-size", "300", "--out", "{tmp}/tok.json", "--files", "{empty}"], USAGE, "no documents in {empty}"),
        (["--vocab-size", "300", "--out", "{file}/tok.json", "--files", "{text}"], USAGE, "{file}"),
        (["--vocab-size", "300"], USAGE, "--out"),
        (["--vocab-size", "300", "--out", "{tmp}/tok.json", "--bogus"], USAGE, "unrecognized arguments: --bogus"),
    ],
    "data": [
        (["--dir", "{data}", "--vocab-size", "512", "--source", "web", "--files", "{missing}"], "{missing}"),
        (["--dir", "{data}", "--vocab-size", "512", "--source", "web", "--files", "{empty}"], "has no documents"),
        (["--dir", "{data}", "--vocab-size", "512", "--source", "web", "--files", "{broken}"], "{broken}:1"),
        (["--dir", "{data}", "--vocab-size", "512", "--source", "web", "--files", "{latin1_txt}"], "{latin1_txt}"),
        (["--dir", "{data}", "--vocab-size", "512", "--source", "web", "--files", "{text}", "--shard-tokens", "0"],
         "--shard-tokens must be positive"),
        (["--dir", "{data}", "--vocab-size", "512", "--source", "web", "--files", "{text}", "--workers", "-1"],
         "num_workers"),
        (["--dir", "{data}", "--vocab-size", "512", "--source", "web", "--files", "{text}", "--val-fraction", "2"],
         "val_fraction"),
        (["--dir", "{data}", "--vocab-size", "512", "--source", "web"], "--source needs --files"),
        (["--dir", "{tmp}/nothing", "--vocab-size", "512", "--source", "web", "--files", "{text}"],
         "no tokenizer at {tmp}/nothing/vocab512/tokenizer.json"),
        (["--dir", "{data}", "--bogus"], USAGE, "unrecognized arguments: --bogus"),
    ],
}


@pytest.fixture(scope="module")
def bad_files(small_data, train_reference, start_model, tmp_path_factory) -> dict[str, str]:
    """Bad inputs of every kind, by name ({start}: a good run folder, which none of them may change)."""
    tmp = tmp_path_factory.mktemp("bad")
    data = tmp / "data"
    (data / "vocab512").mkdir(parents=True)
    shutil.copy(Path(small_data[0].dir) / "vocab512" / "tokenizer.json", data / "vocab512" / "tokenizer.json")
    run_copy = tmp / "runcopy"
    shutil.copytree(train_reference[0], run_copy)
    files = {"tmp": tmp, "missing": tmp / "missing", "file": tmp / "a_file", "data": data, "start": start_model,
             "garbage": tmp / "garbage.toml", "latin1": tmp / "latin1.toml", "run_config": run_copy / "config.toml",
             "empty": tmp / "empty.jsonl", "broken": tmp / "broken.jsonl", "latin1_jsonl": tmp / "latin1.jsonl",
             "latin1_txt": tmp / "latin1.txt", "text": tmp / "text.txt"}
    files["file"].write_text("a file, not a folder\n")
    files["garbage"].write_text("[train\nmax_steps = =\n")
    files["latin1"].write_bytes('[train]\nname = "caf\xe9"\n'.encode("latin-1"))
    files["run_config"].write_bytes(b"\x00\x01 garbage \xff")
    files["empty"].write_text("")
    files["broken"].write_text('{"messages": [\n')
    files["latin1_jsonl"].write_bytes('{"prompt": "caf\xe9", "chosen": "a", "rejected": "b", "answer": "1"}\n'.encode("latin-1"))
    files["latin1_txt"].write_bytes(("caf\xe9 " * 2000).encode("latin-1"))
    files["text"].write_text((ROOT / "README.md").read_text())
    return {k: str(v) for k, v in files.items()}


@pytest.mark.parametrize("command", list(BAD_INPUTS))
def test_bad_input_stops_every_command_with_one_line_and_writes_nothing(server, small_data, start_model, bad_files,
                                                                        command):
    tmp = Path(bad_files["tmp"])
    usual = {"train": train_args(small_data, tmp, "bad"), "sft": stage_args("sft", start_model, tmp, "bad"),
             "dpo": stage_args("dpo", start_model, tmp, "bad"), "rl": stage_args("rl", start_model, tmp, "bad"),
             "merge": [f"--merge.out_dir={Path(start_model).parent}", "--merge.eval_examples=0"]}.get(command, [])
    before, failed = (snapshot(tmp), snapshot(start_model)), []
    for args, *words in BAD_INPUTS[command]:
        args, words = [a.format(**bad_files) for a in args], [w.format(**bad_files) for w in words]
        result = server.run(command, usual + args)
        try:
            result.usage_error(*words[1:]) if words[0] == USAGE else result.refused(*words)
        except AssertionError as e:  # every case's outcome in one report
            failed.append(f"{command}.py {' '.join(args)}: {e}")
    assert not failed, "\n\n".join(failed)
    assert not (tmp / "bad").exists() and not (tmp / "tok.json").exists()
    assert (snapshot(tmp), snapshot(start_model)) == before


# --------------------------------------------------------------------------------------------
# Shards and tokenizers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_files(small_data, tmp_path_factory) -> Path:
    """A JSONL file of 201 documents (the embedded prose), a few chunks of data.py's ingest."""
    from corpus import corpus_documents
    path = tmp_path_factory.mktemp("own") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents("prose")))
    return path


def data_dir_with_tokenizer(small_data, path: Path) -> Path:
    (path / "vocab512").mkdir(parents=True)
    shutil.copy(Path(small_data[0].dir) / "vocab512" / "tokenizer.json", path / "vocab512" / "tokenizer.json")
    return path


def test_data_py_killed_mid_shard_then_stopped_by_ctrl_c_ends_with_the_same_shards(server, small_data, own_files,
                                                                                  tmp_path):
    """data.py killed halfway through writing a shard, then stopped by Ctrl-C in the rerun (exit 130,
    where it will continue), then rerun: it resumes after the last complete shard and ends with
    the bytes of an uninterrupted ingest, with no temporary left."""
    from data import DataConfig, ingest_state

    def ingest(data_dir: Path, fault: dict | None = None) -> Result:
        return server.run("data", ["--dir", data_dir, "--vocab-size", 512, "--source", "web", "--files", own_files,
                                   "--workers", 1, "--shard-tokens", 20_000], fault)

    def shards(data_dir: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(DataConfig(dir=str(data_dir)).shard_dir(512).glob("web_*"))}

    whole, cut = (data_dir_with_tokenizer(small_data, tmp_path / name) for name in ("whole", "cut"))
    assert ingest(whole).rc == 0
    killed = ingest(cut, {"at": "shard", "bytes": 250_000, "do": "kill"})
    state = ingest_state(DataConfig(dir=str(cut)).shard_dir(512), "web")
    assert killed.rc == -signal.SIGKILL and not state["complete"] and state["shards"]["train"] >= 1, killed.report()
    assert any(name.endswith(".bin.tmp") for name in shards(cut))
    stopped = ingest(cut, {"at": "tokenize", "do": "sigint"})
    complete = sum(state["shards"].values())
    assert stopped.rc == 130 and f"web: interrupted; the same command continues after shard {complete}" in stopped.out
    assert "Traceback" not in stopped.err, stopped.report()
    done = ingest(cut)
    assert done.rc == 0 and f"web: resuming after {complete} complete shards" in done.out, done.report()
    assert shards(cut) == shards(whole) and len(shards(whole)) > 3


def test_a_foreign_shard_is_named_and_deleting_it_as_advised_rebuilds_it(server, small_data, train_reference, tmp_path):
    """A shard replaced by another file: train.py stops with one line naming it and the fix, writes
    nothing; deleting it, as the line says, and rerunning rebuilds it byte for byte and trains as
    before. (A truncated shard: tests/test_train.py.)"""
    from data import DataConfig
    data_dir = tmp_path / "data"
    shutil.copytree(small_data[0].dir, data_dir)
    args = train_args(small_data, tmp_path, "run", f"--data.dir={data_dir}")
    shard = DataConfig(dir=str(data_dir), max_docs=small_data[0].max_docs,
                       val_fraction=small_data[0].val_fraction).shard_dir(512) / "code_train_000.bin"
    original = shard.read_bytes()
    shard.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 20)  # a zip file, say
    before = snapshot(data_dir)
    server.run("train", args).refused(f"error: {shard} is not a nanoplaybook token shard (bad header); delete it and "
                                      f"rerun to rebuild")
    assert snapshot(data_dir) == before and not (tmp_path / "run").exists()
    shard.unlink()
    done = server.run("train", args)
    assert done.rc == 0 and "code: shards that code.ingest.json lists are missing" in done.out, done.report()
    assert shard.read_bytes() == original and rows(tmp_path / "run") == rows(train_reference[0])


def test_shards_of_another_tokenizer_are_refused_in_one_line_and_kept(server, small_data, own_files, tmp_path):
    """Your own source's shards made with one tokenizer, then the tokenizer file replaced by another
    (two merges swapped): train.py names the source, says it was made with another tokenizer and
    gives the command that remakes it; eval.py decontaminate refuses the mismatched tokenizer; no
    shard is touched. (The embedded sources' shards are a cache: rebuilt for the new tokenizer.)"""
    from data import DataConfig
    data_dir = data_dir_with_tokenizer(small_data, tmp_path / "data")
    made = server.run("data", ["--dir", data_dir, "--vocab-size", 512, "--source", "web", "--files", own_files,
                               "--workers", 1])
    assert made.rc == 0, made.report()
    tok = data_dir / "vocab512" / "tokenizer.json"
    payload = json.loads(tok.read_text())
    ranks = payload["mergeable_ranks"]
    ranks[-1], ranks[-2] = ranks[-2], ranks[-1]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(payload))
    shard_dir, original = DataConfig(dir=str(data_dir)).shard_dir(512), tok.read_bytes()
    args = train_args(small_data, tmp_path, "run", f"--data.dir={data_dir}", "--data.weights={ web = 1.0 }",
                      "--data.max_docs=0", "--data.val_fraction=0.05")
    shutil.copy(other, tok)
    before = snapshot(data_dir)
    server.run("train", args).refused(f"data source 'web' was made with another tokenizer in {shard_dir}",
                                      "`python data.py --source web --files ")
    assert snapshot(data_dir) == before
    tok.write_bytes(original)
    before = snapshot(data_dir)
    server.run("eval", ["decontaminate", "--task", "prose_cloze", "--shards", shard_dir, "--tokenizer", other]).refused(
        "web_train_000.bin was tokenized with a different tokenizer")
    assert snapshot(data_dir) == before
