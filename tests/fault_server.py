"""The fork server of tests/test_faults.py and the faults it injects.

Every process is forked from one server process that imported the
project once (`serve`): a scenario starts in milliseconds instead of the ~5 s an interpreter takes
to import torch on 2 cores. Each child is a real process with its own pid, exit code and output
files, and runs the command's main() with its arguments, as `python <command>.py ARGS` does. Its
fault is a hook installed before main() (`install`) around the one function the command calls at
the chosen moment (the metrics file's write, torch.save of a checkpoint, the fsync after its
manifest, the hashing of its files, the model's forward, a shard's write); there it sends its own
process SIGKILL, SIGINT or SIGTERM, fills the disk (the kernel fails writes past a file-size limit)
or returns a NaN loss. A SIGKILL is real: no finally block, no flush, no atexit runs, as after
`kill -9` or the out-of-memory killer.
"""

import builtins
import dataclasses
import importlib
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from conftest import ROOT

COMMANDS = ("train", "sft", "dpo", "rl", "merge", "data", "tokenizer", "eval")

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
    """In the forked process: stdin closed, output to files, the fault armed, then main(), ending as
    the interpreter ends `python <command>.py`: SystemExit's code (its message printed, and 1, if it
    is one), else a traceback and 1. It leaves by os._exit: tearing down an interpreter that holds
    torch takes ~2 s, which would be most of this file's time."""
    code = 1
    try:
        # as `python <command>.py` from a terminal: Ctrl-C raises KeyboardInterrupt (a shell starts a
        # background job, `pytest &`, with SIGINT ignored, and Python then leaves it ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        for fd, path in ((1, request["out"]), (2, request["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        install(request["fault"])
        sys.argv = [f"{request['command']}.py", *request["args"]]
        module.main()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001  (printed as the interpreter would)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def install(fault: dict) -> None:
    """Arm a fault: at the point `fault["at"]` (of step `fault["step"]`), do `fault["do"]`.

    row              just after the step's metrics row is written: kill, torn (only half the row
                     written, then SIGKILL), sigint, sigint_twice, sigterm, or pause (create
                     fault["marker"], then wait to be killed)
    weights          the checkpoint's weights: kill (half of state.pt written, then SIGKILL), or
                     disk_full (state.pt or the DCP shards written with files limited to 200 kB:
                     the kernel fails the write past it, as on a full disk or a quota)
    manifest         the checkpoint complete with its manifest, not yet renamed: kill
    hashing          a DCP checkpoint's shards and meta.pt written, its manifest not: kill
    metrics_rewrite  metrics.jsonl (or its temporary) just opened to be rewritten on resume: kill
    forward          the step-th training forward: nan (its loss, or log-probs, become NaN)
    tokenize         the first chunk of documents handed to the tokenizer: sigint
    shard            once fault["bytes"] bytes went into shard temporaries, half the next write: kill"""
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
        seen = {"row": False, "shard_bytes": 0}

        class Watched:
            """A file the command writes, acting at the chosen write."""

            def __init__(self, file):
                self.file = file

            def write(self, data):
                if at == "row" and json.loads(data).get("step") == step and not seen["row"]:
                    seen["row"] = True  # the step's first row: training (validation, if any, comes after)
                    if do == "torn":
                        data = data[:len(data) // 2]
                    n = self.file.write(data)
                    self.file.flush()
                    act()
                    return n
                if at == "shard":
                    if seen["shard_bytes"] + len(data) > fault["bytes"]:
                        self.file.write(data[:len(data) // 2])
                        self.file.flush()
                        act()
                    seen["shard_bytes"] += len(data)
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
        import torch.distributed.checkpoint as dcp
        real_save, real_dcp_save = torch.save, dcp.save

        def fill_disk() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills instead of failing the write
            resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        def save(obj, f, *args, **kwargs):
            path = Path(f) if isinstance(f, (str, os.PathLike)) else None
            if path is None or path.parent.name != ckpt_tmp:
                return real_save(obj, f, *args, **kwargs)
            if do == "disk_full":
                fill_disk()
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(path, "wb") as out:
                out.write(buffer.getvalue()[:buffer.tell() // 2])
            act()

        def dcp_save(state, *args, checkpoint_id=None, **kwargs):
            if do == "disk_full" and Path(checkpoint_id).name == ckpt_tmp:
                fill_disk()
            return real_dcp_save(state, *args, checkpoint_id=checkpoint_id, **kwargs)

        torch.save, dcp.save = save, dcp_save
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
                if calls[0] == step:  # (loss, parts), or log-probs (dpo.py, rl.py)
                    return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")
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
        """Assert a refusal: non-zero exit, no traceback, stderr one line (progress bars aside) holding
        every word; the line."""
        assert self.rc not in (0, -signal.SIGKILL, "hung") and "Traceback" not in self.err, self.report()
        lines = [line for line in self.err.strip().splitlines() if line.strip() and not re.search(r"\d%\|", line)]
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
        # as from a fresh shell: an earlier test's process group may have left MASTER_PORT & co. in os.environ
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                                "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1",
                   TQDM_DISABLE="1")
        self.proc = subprocess.Popen([sys.executable, "-c", "import fault_server; fault_server.serve()"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.files = {}  # pid -> its stdout and stderr files

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the fork server died"
        return json.loads(answer)

    def start(self, command: str, args: list, fault: dict | None = None) -> int:
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        pid = self._ask({"op": "start", "command": command, "args": [str(a) for a in args], "fault": fault or {},
                         "cwd": str(self.logs), "out": str(out), "err": str(err)})["pid"]
        self.files[pid] = (out, err)
        return pid

    def wait(self, pid: int) -> Result:
        rc = self._ask({"op": "wait", "pid": pid})["rc"]
        out, err = self.files.pop(pid)
        return Result(rc, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def run(self, command: str, args: list, fault: dict | None = None) -> Result:
        return self.wait(self.start(command, args, fault))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
