"""Faults at the worst moment, for every entry point (issue 21; the table is docs/faults.md).

A long run is judged by its worst hour. Each test here starts real processes of train.py, sft.py,
dpo.py, rl.py, merge.py, data.py, tokenizer.py or eval.py and hurts them: SIGKILL in the middle of a
step, of a metrics row, of a checkpoint's weights or DCP shards, between a checkpoint's manifest and
its rename, of a token shard; Ctrl-C (once, twice) and SIGTERM; a NaN loss; a full disk; a second
process on a run folder in use; flipped and truncated bytes; bad input of every kind. Then it checks
what is promised: the rerun with resume ends where an uninterrupted run ends (every logged figure
but the timings, each step once, and the weights), a refusal is one line naming the file and the
fix with a non-zero exit code and no traceback, and nothing already written has changed.

How faults are injected. Every process is forked from one server process that imported the
project once (`serve`): a scenario starts in milliseconds instead of the ~5 s an interpreter takes
to import torch on 2 cores. Each child is a real process with its own pid, exit code and output
files, and runs the command's main() with its arguments, as `python <command>.py ARGS` does. Its
fault is a hook installed before main() (`install`) around the one function the command calls at
the chosen moment (the metrics file's write, torch.save of a checkpoint, the fsync after its
manifest, the hashing of its files, the model's forward, a shard's write); there it sends its own
process SIGKILL, SIGINT or SIGTERM, raises ENOSPC or returns a NaN loss. A SIGKILL is real: no
finally block, no flush, no atexit runs, as after `kill -9` or the out-of-memory killer.
"""

import builtins
import dataclasses
import errno
import hashlib
import importlib
import io
import json
import math
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

from conftest import ROOT, TEST_VOCAB, tiny_overrides

COMMANDS = ("train", "sft", "dpo", "rl", "merge", "data", "tokenizer", "eval")
TIMINGS = ("tok_per_s", "mfu", "seconds")  # the only figures a resumed run may log differently


# --------------------------------------------------------------------------------------------
# The fork server and the faults it injects
# --------------------------------------------------------------------------------------------


def serve() -> None:
    """Import every command once, then answer JSON requests on stdin, one per line: "start" forks
    a child running one command with one fault (answer: its pid), "wait" reaps one (its exit code,
    negative for a signal; a child still running after two minutes is killed: "hung")."""
    modules = {name: importlib.import_module(name) for name in COMMANDS}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(modules[request["command"]], request)
            answer = {"pid": pid}
        else:
            answer = {"rc": _reap(request["pid"], deadline=time.time() + 120)}
        print(json.dumps(answer), flush=True)


def _reap(pid: int, deadline: float) -> int | str:
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def _child(module, request: dict) -> None:
    """In the forked process: stdin closed, output to files, the fault armed, then main(). Whatever
    main() raises leaves through serve() to the interpreter, which prints and exits as it would for
    `python <command>.py` (SystemExit's code or message, a traceback and 1 for anything else), with
    the same interpreter teardown."""
    os.chdir(request["cwd"])
    for fd, path in ((1, request["out"]), (2, request["err"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    install(request["fault"])
    sys.argv = [f"{request['command']}.py", *request["args"]]
    module.main()
    sys.exit(0)


def install(fault: dict) -> None:
    """Arm a fault: at the point `fault["at"]` (of step `fault["step"]`), do `fault["do"]`.

    at: row (just after the metrics row of the step is written; do kill, torn (half the row, then
        SIGKILL), sigint, sigint_twice, sigterm, pause (create fault["marker"], then wait to be killed));
        weights (half of the checkpoint's state.pt written; do kill, or enospc: then an OSError ENOSPC);
        manifest (the checkpoint complete with its manifest, not yet renamed; kill);
        hashing (a DCP checkpoint's shards and meta.pt written, before the manifest; kill);
        metrics_rewrite (metrics.jsonl, or its temporary, just opened to be rewritten; kill);
        forward (the step-th training forward returns a NaN loss);
        tokenize (the first chunk of documents to tokenize; sigint);
        shard (once fault["bytes"] bytes went into shard temporaries, half of the next write; kill)."""
    at, step, do = fault.get("at"), fault.get("step"), fault.get("do")
    if at is None:
        return
    ckpt_tmp = f"ckpt_{step:07d}.tmp" if step is not None else None
    real_open = io.open

    def act() -> None:
        if do == "pause":
            Path(fault["marker"]).touch()
            while True:
                time.sleep(0.05)
        for _ in range(2 if do == "sigint_twice" else 1):
            os.kill(os.getpid(), {"kill": signal.SIGKILL, "torn": signal.SIGKILL, "sigterm": signal.SIGTERM}.get(
                do, signal.SIGINT))
            time.sleep(0.01)  # the handler runs between two bytecodes: let it, before the second

    if at in ("row", "metrics_rewrite", "shard"):
        written = [0]

        class Watched:
            """A file the command writes, acting at the chosen write."""

            def __init__(self, file):
                self.file = file

            def write(self, data):
                if at == "row" and json.loads(data).get("step") == step and not written[0]:
                    written[0] = 1
                    if do == "torn":
                        data = data[:len(data) // 2]
                    n = self.file.write(data)
                    self.file.flush()
                    act()
                    return n
                if at == "shard" and written[0] + len(data) > fault["bytes"]:
                    self.file.write(data[:len(data) // 2])
                    self.file.flush()
                    act()
                written[0] += len(data) if at == "shard" else 0
                return self.file.write(data)

            def __getattr__(self, name):
                return getattr(self.file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

        def watched_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            name = os.path.basename(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
            if at == "row" and name == "metrics.jsonl" and "a" in mode:
                return Watched(f)
            if at == "metrics_rewrite" and "metrics.jsonl" in name and "w" in mode:
                act()
            if at == "shard" and name.endswith(".bin.tmp") and "w" in mode:
                return Watched(f)
            return f

        builtins.open = io.open = watched_open
    elif at == "weights":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            path = Path(f) if isinstance(f, (str, os.PathLike)) else None
            if path is None or path.parent.name != ckpt_tmp:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(path, "wb") as out:
                out.write(buffer.getvalue()[:buffer.tell() // 2])
            if do == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            act()

        torch.save = save
    elif at in ("manifest", "hashing"):
        import checkpoint
        name = "_fsync_dir" if at == "manifest" else "_sha256"
        real = getattr(checkpoint, name)

        def hooked(path):
            if (path.name if at == "manifest" else path.parent.name) == ckpt_tmp:
                act()
            return real(path)

        setattr(checkpoint, name, hooked)
    elif at == "forward":
        from model import Transformer
        real_forward, calls = Transformer.forward, [0]

        def forward(self, *args, **kwargs):
            out = real_forward(self, *args, **kwargs)
            if self.training:
                calls[0] += 1
                if calls[0] == step:
                    return out[0] * float("nan"), out[1]
            return out

        Transformer.forward = forward
    elif at == "tokenize":
        import data
        real_call = data.ChunkTokenizer.__call__

        def tokenize(self, texts):
            act()
            return real_call(self, texts)

        data.ChunkTokenizer.__call__ = tokenize
    else:
        raise ValueError(f"unknown fault point {at!r}")


@dataclasses.dataclass
class Result:
    """A finished child: its exit code (negative: killed by that signal) and output."""
    rc: int
    out: str
    err: str

    def refused(self, *words: str) -> str:
        """Assert a refusal: non-zero exit, no traceback, stderr one line holding every word; the line."""
        assert self.rc not in (0, -signal.SIGKILL, "hung") and "Traceback" not in self.err, self.report()
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.report()
        for word in words:
            assert word in lines[0], f"{word!r} not in the error line\n{self.report()}"
        return lines[0]

    def usage_error(self, *words: str) -> str:
        """argparse's refusal: exit 2, the usage, then one line 'prog: error: ...' holding every word."""
        assert self.rc == 2 and "Traceback" not in self.err, self.report()
        line = self.err.strip().splitlines()[-1]
        assert ": error: " in line and all(w in line for w in words), self.report()
        return line

    def report(self) -> str:
        return f"exit code {self.rc}\n--- stdout (end) ---\n{self.out[-1500:]}\n--- stderr ---\n{self.err[-3000:]}"


class Server:
    """The test's side of `serve`: start a command with a fault, wait for it, or both."""

    def __init__(self, logs: Path):
        self.logs, self.count = logs, 0
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", "import test_faults; test_faults.serve()"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.files = {}

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the fork server died"
        return json.loads(answer)

    def start(self, command: str, args: list, fault: dict | None = None, cwd: Path | None = None) -> int:
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        pid = self._ask({"op": "start", "command": command, "args": [str(a) for a in args], "fault": fault or {},
                         "cwd": str(cwd or self.logs), "out": str(out), "err": str(err)})["pid"]
        self.files[pid] = (out, err)
        return pid

    def wait(self, pid: int) -> Result:
        rc = self._ask({"op": "wait", "pid": pid})["rc"]
        out, err = self.files.pop(pid)
        return Result(rc, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def run(self, command: str, args: list, fault: dict | None = None, cwd: Path | None = None) -> Result:
        return self.wait(self.start(command, args, fault, cwd))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


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


def test_fsdp_run_stopped_by_ctrl_c_then_killed_mid_dcp_checkpoint_resumes_exactly(server, small_data, tmp_path):
    """FSDP2 (one gloo process) writes torch.distributed.checkpoint folders: Ctrl-C stops at a step
    boundary with one (DCP) checkpoint and one line; a kill after the shards are written but before
    the manifest leaves a folder that is ignored; the end equals an uninterrupted FSDP run."""
    args = train_args(small_data, tmp_path, "run", "--train.parallelism=fsdp")
    ref = server.run("train", train_args(small_data, tmp_path, "ref", "--train.parallelism=fsdp"))
    assert ref.rc == 0, ref.report()
    run_dir, resume = tmp_path / "run", [*args, "--train.resume=true"]
    stopped = server.run("train", args, {"at": "row", "step": 3, "do": "sigint"})
    assert stopped.rc == 130 and stopped.refused("stopped at step 3 as asked, checkpoint written",
                                                 "--train.resume=true").startswith("interrupted: ")
    assert any(p.suffix == ".distcp" for p in (run_dir / "ckpt_0000003").iterdir()) and leftovers(run_dir) == []
    killed = server.run("train", resume, {"at": "hashing", "step": 4, "do": "kill"})
    assert killed.rc == -signal.SIGKILL and any(p.suffix == ".distcp" for p in (run_dir / "ckpt_0000004.tmp").iterdir())
    done = server.run("train", resume)
    assert done.rc == 0 and f"note: ignoring {run_dir / 'ckpt_0000004.tmp'}" in done.out, done.report()
    assert rows(run_dir) == rows(tmp_path / "ref") and same_weights(run_dir, tmp_path / "ref")
    assert leftovers(run_dir) == []


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
