"""Post-training, shared: verifiable tasks, the ecosystem's data files, and the run every stage makes.

sft.py, dpo.py and rl.py each tell one concept (the chat format and its loss mask; preference
losses and pairs; rollouts and advantages). What they share lives here, in three parts:

1. Verifiable tasks. Built-in ones (addition, sorting, reversing words), each with a short
   reasoning trace for think mode, and named verifiers (an exact number, an exact string, a
   multiple-choice letter): programs, not reward models, check the answers (the playbook's RLVR).
   One held-out set of questions serves every stage, so runs compare.
2. Data files in the formats TRL and the Hugging Face hub use, as JSONL (parquet with pyarrow):
   conversations (`messages`, optional `tools`; or `prompt`/`completion`), preferences
   (`prompt`/`chosen`/`rejected`, strings or message lists), and prompts with an `answer` for RL.
   The built-in tasks export to each (`python posttrain.py export --kind sft --out sft.jsonl`).
3. The run: the [run] table of every stage's config (start model, output folder, device,
   parallelism, checkpoints, resume); one process or torchrun with DDP or FSDP2 (distributed.py);
   the learning-rate schedule; metrics.jsonl; checkpoints that resume exactly (checkpoint.py); the
   result in this project's format and, with run.save_hf, Hugging Face's (transformers loads it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch
import torch.distributed as dist

from chat import render_chat
from checkpoint import (CheckpointError, Diverged, Interrupted, RunLock, StopRequest, checkpoint_paths,
                        gather_rng_states, incomplete_checkpoints, load_meta, load_model, restore_state,
                        save_checkpoint, set_rng_state, stopped_at_once, truncate_metrics)
from config import ConfigError, config_dict, config_to_toml
from distributed import (all_reduce_mean, barrier, compute_dtype, full_state_dict, is_sharded, parallelize,
                         setup_distributed)
from generate import generate
from gguf_file import require
from model import Transformer
from optim import OptimConfig, build_optimizer, lr_at, set_lr
from tokenizer import save_hf_tokenizer, special_id
from weights import save_hf

# --------------------------------------------------------------------------------------------
# 1. Verifiable tasks
# --------------------------------------------------------------------------------------------

WORDS = ("apple river stone cloud tiger paper green light music ocean table winter garden silver "
         "window candle forest bridge yellow market planet sugar rabbit castle").split()
TASKS = ("add", "sort", "reverse")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def strip_think(completion: str) -> str:
    """The answer part of a completion: after </think> (all of it without a think block), before <|im_end|>."""
    answer = completion.split("</think>", 1)[1] if "</think>" in completion else completion
    return answer.split("<|im_end|>", 1)[0]


def verify_string(answer: str, expected: str) -> bool:
    """The same words, whitespace aside."""
    return " ".join(answer.split()) == " ".join(expected.split())


def verify_number(answer: str, expected: str) -> bool:
    """The last number of the answer equals the expected one (commas as thousands separators)."""
    numbers = _NUMBER.findall(answer)
    try:
        return bool(numbers) and float(numbers[-1].replace(",", "")) == float(expected.replace(",", ""))
    except ValueError:
        return False


def verify_choice(answer: str, expected: str) -> bool:
    """The first standalone capital letter of the answer is the expected choice (A, B, ...)."""
    found = re.search(r"\b([A-Z])\b", answer)
    return found is not None and found.group(1) == expected.strip().upper()


VERIFIERS = {"string": verify_string, "number": verify_number, "choice": verify_choice}


@dataclass(frozen=True)
class Example:
    """One task instance: a question, the reasoning a think-mode answer writes first ("" when
    unknown), the answer, and the verifier that checks a completion's answer against it."""
    task: str
    question: str
    reasoning: str
    answer: str
    verifier: str = "string"
    system: str = ""  # a system prompt of its own ("": the chat template's default)

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": self.question},
                         {"role": "assistant", "content": self.answer, "reasoning": self.reasoning}]


def make_example(task: str, rng: random.Random) -> Example:
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        ones = a % 10 + b % 10
        steps = f"ones: {a % 10} + {b % 10} = {ones}. tens and up: {a // 10} + {b // 10} + {ones // 10} = " \
                f"{a // 10 + b // 10 + ones // 10}."
        return Example(task, f"What is {a} + {b}?", steps, str(a + b))
    if task == "sort":
        xs = rng.sample(range(1, 100), rng.randint(3, 4))
        steps = " ".join(f"smallest left: {x}." for x in sorted(xs))
        return Example(task, "Sort ascending: " + " ".join(map(str, xs)), steps, " ".join(map(str, sorted(xs))))
    if task == "reverse":
        ws = rng.sample(WORDS, rng.randint(3, 4))
        steps = " ".join(f"word {len(ws) - i}: {w}." for i, w in enumerate(reversed(ws)))
        return Example(task, "Reverse the words: " + " ".join(ws), steps, " ".join(reversed(ws)))
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def make_examples(n: int, seed: int, tasks: tuple[str, ...] = TASKS, exclude: set[str] = frozenset()) -> list[Example]:
    """n examples, tasks in turn; questions in exclude (a held-out set) are never produced."""
    rng, out, seen, misses = random.Random(seed), [], set(exclude), 0
    while len(out) < n:
        ex = make_example(tasks[len(out) % len(tasks)], rng)
        if ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
            misses = 0
        elif (misses := misses + 1) > 10_000:  # the task has run out of new questions
            raise ValueError(f"task {ex.task!r} has no more distinct questions after {len(out):,} examples; "
                             f"ask for fewer")
    return out


def check_answer(example: Example, completion: str) -> bool:
    """The example's verifier on the answer part of a completion (after any think block)."""
    return VERIFIERS[example.verifier](strip_think(completion), example.answer)


# The reasoning modes a prompt can be rendered in (chat.render_chat's `thinking`): SmolLM3's /think
# and /no_think, or plain ChatML (SmolLM2, which knows neither flag).
MODES = {"think": True, "no_think": False, "plain": None}


def follows_mode(completion: str, thinking: bool | None) -> bool:
    """Think mode: the completion opens with a non-empty think block. No-think mode (whose prompt
    already holds the empty block) and plain ChatML: it writes no think block of its own."""
    if not thinking:
        return "<think>" not in completion
    return completion.startswith("<think>\n") and "</think>" in completion and \
        completion.split("</think>", 1)[0].strip() != "<think>"


HELD_OUT_SEED = 1  # one evaluation set for every run, whatever its seed: runs of different seeds compare


def held_out_examples(per_task: int) -> list[Example]:
    """The evaluation questions, the same for sft.py, dpo.py, rl.py and merge.py and for every
    seed; their training data excludes them."""
    return make_examples(per_task * len(TASKS), seed=HELD_OUT_SEED)


def prompt_ids(enc: tiktoken.Encoding, example: Example, thinking: bool | None) -> list[int]:
    """The question as the chat template renders it, up to and including the assistant header
    (in no-think mode that header holds the empty think block, as at generation time)."""
    prompt = example.messages()[:-1]
    return enc.encode(render_chat(prompt, thinking=thinking, add_generation_prompt=True), allowed_special="all")


def answers(model: Transformer, enc: tiktoken.Encoding, examples: list[Example], thinking: bool | None,
            max_new_tokens: int) -> list[str]:
    """Greedy completions of each question in the given mode, up to <|im_end|> (not included)."""
    end = special_id(enc, "<|im_end|>")
    prompts = [prompt_ids(enc, ex, thinking) for ex in examples]
    return [enc.decode(c[:-1] if c[-1:] == [end] else c)
            for c in generate(model, prompts, max_new_tokens, stop_ids=[end])]


def accuracy(model: Transformer, enc: tiktoken.Encoding, examples: list[Example], max_new_tokens: int,
             modes: tuple[str, ...] = ("think", "no_think")) -> dict[str, float]:
    """Share of correct answers per task and mode (think / no_think / plain), and per mode the share
    of completions that follow it (format/think, format/no_think: the /think switch works)."""
    result = {}
    for mode in modes:
        thinking = MODES[mode]
        completions = answers(model, enc, examples, thinking, max_new_tokens)
        for task in sorted({ex.task for ex in examples}):
            pairs = [(ex, c) for ex, c in zip(examples, completions) if ex.task == task]
            result[f"{task}/{mode}"] = sum(check_answer(e, c) for e, c in pairs) / len(pairs)
        result[f"format/{mode}"] = sum(follows_mode(c, thinking) for c in completions) / len(completions)
    return result


def accuracy_table(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Lines of 'task/mode  before -> after' for a report."""
    return ["", "task/mode           accuracy before -> after"] + [
        f"{key:20s} {before[key]:6.0%} -> {after[key]:6.0%}" for key in after]


def interval95(successes: float, n: int) -> tuple[float, float]:
    """Wilson's 95% interval of a share of n trials (fine at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    z, p = 1.96, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------------------------
# 2. Data files: conversations, preferences, prompts with answers
# --------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A data file that cannot be read as its format: the message names the file and the line."""


def read_rows(path: str | os.PathLike):
    """(line number, JSON object) of a .jsonl / .jsonl.gz file, or (row number, dict) of a .parquet
    file (with pyarrow); a malformed line stops with the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    if path.suffix == ".parquet":
        pq = require("pyarrow.parquet", "pyarrow")
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001  (pyarrow raises its own error types)
            raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
        yield from enumerate(table.to_pylist(), 1)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                yield n, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def _as_messages(value, role: str, where: str) -> list[dict]:
    """A string becomes one message of `role`; a list of {"role", "content"} messages is checked."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and m.get("role") in ("system", "user", "assistant", "tool")
                                                 for m in value):
        return value
    raise DataError(f"{where}: expected a string or a list of {{'role', 'content'}} messages, got {value!r:.80}")


def load_conversations(path: str | os.PathLike) -> list[tuple[list[dict], list[dict] | None]]:
    """(messages, tools) per row of an SFT file: {"messages": [...], "tools": [...]?} or
    {"prompt": ..., "completion": ...} (strings or message lists, TRL's two SFT formats)."""
    out = []
    for n, row in read_rows(path):
        where = f"{path}:{n}"
        if "messages" in row:
            messages = _as_messages(row["messages"], "user", where)
        elif "prompt" in row and "completion" in row:
            messages = _as_messages(row["prompt"], "user", where) + _as_messages(row["completion"], "assistant", where)
        else:
            raise DataError(f"{where}: an SFT row needs 'messages', or 'prompt' and 'completion'; it has {sorted(row)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing would carry loss")
        tools = row.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise DataError(f"{where}: 'tools' must be a list of JSON schemas (objects)")
        out.append((messages, tools))
    if not out:
        raise DataError(f"{path} holds no rows")
    return out


def load_preferences(path: str | os.PathLike) -> list[tuple[list[dict], list[dict], list[dict]]]:
    """(prompt messages, chosen messages, rejected messages) per row of {"prompt", "chosen",
    "rejected"}, each a string or a list of messages (TRL's standard and conversational formats)."""
    out = []
    for n, row in read_rows(path):
        where = f"{path}:{n}"
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise DataError(f"{where}: a preference row needs 'prompt', 'chosen' and 'rejected'; missing {missing}")
        out.append((_as_messages(row["prompt"], "user", where), _as_messages(row["chosen"], "assistant", where),
                    _as_messages(row["rejected"], "assistant", where)))
    if not out:
        raise DataError(f"{path} holds no rows")
    return out


def load_prompts(path: str | os.PathLike, verifier: str) -> list[Example]:
    """Examples of {"prompt", "answer"} rows (a prompt string, or [system?, user] messages), checked
    by the named verifier."""
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; choose from {', '.join(VERIFIERS)}")
    out = []
    for n, row in read_rows(path):
        where = f"{path}:{n}"
        if "prompt" not in row or "answer" not in row:
            raise DataError(f"{where}: an RL row needs 'prompt' and 'answer'; it has {sorted(row)}")
        messages = _as_messages(row["prompt"], "user", where)
        roles = [m["role"] for m in messages]
        if roles not in (["user"], ["system", "user"]):
            raise DataError(f"{where}: an RL prompt is a user message, optionally after a system one; got roles {roles}")
        out.append(Example(Path(path).name.split(".")[0], messages[-1]["content"], "", str(row["answer"]), verifier,
                           messages[0]["content"] if len(messages) == 2 else ""))
    if not out:
        raise DataError(f"{path} holds no rows")
    return out


def export_builtin(kind: str, path: str | os.PathLike, n: int, seed: int) -> Path:
    """Write n built-in examples (none of the held-out ones) in one of the formats above, so the
    examples of the docs run from files as well as from the built-in tasks."""
    examples = make_examples(n, seed, exclude={e.question for e in held_out_examples(50)})
    rows = []
    for ex in examples:
        if kind == "sft":
            rows.append({"messages": [{"role": "user", "content": ex.question},
                                      {"role": "assistant", "content": ex.answer}]})
        elif kind == "preference":
            wrong = " ".join(reversed(ex.answer.split())) if ex.task != "add" else str(int(ex.answer) + 1)
            rows.append({"prompt": ex.question, "chosen": ex.answer, "rejected": wrong})
        elif kind == "rl":
            rows.append({"prompt": ex.question, "answer": ex.answer})
        else:
            raise ValueError(f"unknown kind {kind!r}; choose from sft, preference, rl")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# 3. The run
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    init: str = "runs/tiny"        # the model to start from: a run folder or ckpt_* checkpoint, gguf:PATH, or a
                                   # Hugging Face folder
    name: str = "tiny-post"        # the output run folder: <out_dir>/<name>
    out_dir: str = "runs"          # where run folders go
    seed: int = 0                  # data order, sampling and adapter initialisation
    device: str = "auto"           # auto (a GPU when there is one) | cpu | cuda
    dtype: str = "auto"            # auto (bf16 on GPU, float32 on CPU) | float32 | bfloat16
    parallelism: str = "ddp"       # under torchrun: ddp (replicated weights) | fsdp (FSDP2: sharded)
    compile: bool = False          # torch.compile the training forward (GPU)
    threads: int = 0               # CPU threads per process; 0 = cores / processes
    micro_batch: int = 0           # rows (sft), pairs (dpo) or completions (rl) per forward and backward on each
                                   # process, gradients accumulated over the step; 0 = the process's whole share
    log_interval: int = 10         # a log line every N steps (every step goes to metrics.jsonl)
    ckpt_interval: int = 0         # a checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2      # the newest N checkpoints are kept
    resume: bool = False           # continue from the latest checkpoint in the run folder
    save_hf: bool = False          # also write <run>/hf: config.json, model.safetensors, tokenizer.json (safetensors)
    eval_max_new_tokens: int = 64  # the held-out accuracy's answer length

    def __post_init__(self):
        for key in ("init", "name"):
            if not getattr(self, key).strip():
                raise ValueError(f"run.{key} must not be empty")
        for key in ("log_interval", "keep_checkpoints", "eval_max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"run.{key} must be >= 1, got {getattr(self, key)}")
        if self.ckpt_interval < 0 or self.threads < 0 or self.micro_batch < 0:
            raise ValueError("run.ckpt_interval, run.threads and run.micro_batch must be >= 0")
        for key, valid in (("device", ("auto", "cpu", "cuda")), ("dtype", ("auto", "float32", "bfloat16")),
                           ("parallelism", ("ddp", "fsdp"))):
            if getattr(self, key) not in valid:
                raise ValueError(f"run.{key}={getattr(self, key)!r} must be one of {valid}")


def global_mean_scale(local_count: float, device: torch.device) -> float:
    """The factor that turns this rank's mean (over local_count items) into its share of the mean
    over every rank's items: world * local / total. DDP and FSDP average gradients over ranks, so
    ranks holding different numbers of tokens still train exactly as one process with the whole
    batch would; 1.0 in one process."""
    if not dist.is_initialized():
        return 1.0
    total = all_reduce_mean(float(local_count), device) * dist.get_world_size()
    return dist.get_world_size() * local_count / max(total, 1e-12)


def micro_slices(n: int, size: int) -> list[slice]:
    """n items of a step cut into slices of `size` (0: one slice), one forward and backward each:
    memory is bounded by the micro-batch (a 1B model's 16 x 4096 rows do not fit at once), and the
    step is the same, since each slice's loss is weighted by its share of the step's mean."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class EpochOrder:
    """Batches of indices over n items: a fresh seeded shuffle each epoch, a partial last batch
    dropped. Its state is two integers and the generator, saved in every checkpoint."""

    def __init__(self, n: int, batch: int, seed: int):
        if n < 1:
            raise ValueError("no training items")
        self.n, self.batch = n, min(batch, n)
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> list[int]:
        if self.pos + self.batch > self.n:  # a new epoch
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        rows = self.order[self.pos:self.pos + self.batch].tolist()
        self.pos += self.batch
        return rows

    def state_dict(self) -> dict:
        return {"order": self.order, "pos": self.pos, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.pos = state["order"], state["pos"]
        self.gen.set_state(state["gen"])


class PostTrainRun:
    """What every post-training stage does around its own step: set up one process or a torchrun
    group, load the start model, lock the run folder, then (`begin`) wrap the model for DDP/FSDP2,
    build the optimizer and resume; per step the learning rate, metrics, log lines and periodic
    checkpoints (`end_step`); at the end the final model, its report and the Hugging Face copy."""

    def __init__(self, cfg: dict, stage: str, make_start: str, log=print):
        self.cfg, self.stage = cfg, stage
        self.metrics = self.lock = None
        self.stop = StopRequest()  # armed by begin(): from the first step on, Ctrl-C stops at a step boundary
        rc: RunConfig = cfg["run"]
        try:
            self.rank, _, self.world, self.device = setup_distributed(rc.device, rc.threads, rc.parallelism)
        except ValueError as e:
            raise ConfigError(f"run.{e}") from e
        self.master = self.rank == 0
        self.log = log if self.master else (lambda *a, **k: None)
        self.run_dir = Path(rc.out_dir) / rc.name
        ckpts = checkpoint_paths(self.run_dir)
        if ckpts and not rc.resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints; continue it with --run.resume=true, or pick "
                              f"another --run.name (nothing there was touched)")
        self.lock = RunLock(self.run_dir, self.log).acquire() if self.master else None
        for partial in incomplete_checkpoints(self.run_dir):
            self.log(f"note: ignoring {partial} (a save that was interrupted; the next save removes it)")
        self.saved = load_meta(ckpts[-1]) if rc.resume and ckpts else None
        self.resume_path = ckpts[-1] if self.saved else None
        if self.saved and self.saved["stage"] == "final":
            self.close()
            raise ConfigError(f"{self.run_dir} is complete (its final checkpoint is {ckpts[-1].name}); start a new run "
                              f"with another --run.name")
        if self.saved and self.saved["config"].get(stage) != dataclasses.asdict(cfg[stage]):
            self.close()
            raise ConfigError(f"cannot resume {self.run_dir}: its [{stage}] settings differ from the checkpoint's; "
                              f"resume with the same config, or start a new run with another --run.name")
        torch.manual_seed(rc.seed)
        try:
            self.model, self.enc, self.data_cfg = load_model(rc.init, self.device)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            self.close()
            raise ConfigError(f"cannot load the start model {rc.init!r} ({e}); make it first: {make_start}") from e
        self.dtype = compute_dtype(rc.dtype, self.device)
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        self.train_model = self.model
        self.optimizer = self._sampler = None
        self.ocfg, self.steps, self.start_step = None, 0, 0

    def begin(self, ocfg: OptimConfig, steps: int) -> dict:
        """Wrap the model for training, build the optimizer (over the parameters that require
        gradients) with warmup clamped to half the run, resume if asked; the stage's saved state
        (empty on a fresh start). The lr schedule of `steps` steps follows ocfg."""
        rc = self.cfg["run"]
        self.steps = steps
        self.ocfg = dataclasses.replace(ocfg, warmup_steps=min(ocfg.warmup_steps, steps // 2))
        self.train_model, self.autocast = parallelize(self.model, rc.parallelism, self.dtype, self.device,
                                                      rc.compile and self.device.type == "cuda", self.world)
        self.optimizer = build_optimizer(self.model, self.ocfg)
        state = {}
        if self.saved:
            restore_state(self.resume_path, self.model, self.optimizer)
            self.start_step, state = self.saved["step"], self.saved["stage"]
            if len(self.saved["rng"]) == self.world:
                set_rng_state(self.saved["rng"][self.rank])
            self.log(f"resumed {self.resume_path} at step {self.start_step}")
        if self.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(config_to_toml(self.cfg))
            save_hf_tokenizer(self.enc, self.run_dir)  # the run's tokenizer travels with it (checkpoint.load_model)
            truncate_metrics(self.run_dir / "metrics.jsonl", self.start_step)
            self.metrics = open(self.run_dir / "metrics.jsonl", "a")
        self.stop.__enter__()
        return state

    def set_lr(self, step: int) -> float:
        """The schedule's learning rate for step (1-based), set on every parameter group."""
        lr = lr_at(step - 1, self.ocfg, self.steps)
        set_lr(self.optimizer, lr)
        return lr

    def micro_batches(self, n: int) -> list[slice]:
        """This process's n items of a step in run.micro_batch-sized slices (`micro_slices`)."""
        return micro_slices(n, self.cfg["run"].micro_batch)

    def grad_sync(self, last: bool):
        """The context of a micro-batch's backward: gradients are reduced across processes only after
        the step's last one (as train.forward_backward)."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)
        elif self.world > 1 and not last:
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    def clip_and_step(self) -> float:
        """Clip the gradients of the trained parameters, step, zero; the global gradient norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.ocfg.grad_clip if self.ocfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            raise Diverged(diverged(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def end_step(self, step: int, row: dict, line: str, state: dict) -> None:
        """Record the step's metrics, log its line every log_interval steps, checkpoint every
        ckpt_interval steps with the stage's state (its data order, sampling cursor...); when asked
        to stop (Ctrl-C, SIGTERM), checkpoint and raise Interrupted."""
        rc = self.cfg["run"]
        if self.metrics:
            self.metrics.write(json.dumps({"step": step, **row}) + "\n")
            self.metrics.flush()
        if step % rc.log_interval == 0 or step == self.steps:
            self.log(f"step {step:5d}/{self.steps} | {line}")
        interrupted = self.stop.agreed(self.device)
        if (rc.ckpt_interval and step % rc.ckpt_interval == 0 and step < self.steps) or interrupted:
            self.save(step, state)
        if interrupted:
            raise Interrupted(f"stopped at step {step} as asked, checkpoint written; continue with --run.resume=true")

    def save(self, step: int, state: dict | str) -> Path:
        """A checkpoint: the model's config and data config (checkpoint.load_model reads them), the
        run's config, the stage's state; the optimizer too, unless the state is "final"."""
        meta = {"step": step, "stage": state, "rng": gather_rng_states(),
                "config": {"model": dataclasses.asdict(self.model.cfg), "data": dataclasses.asdict(self.data_cfg),
                           **config_dict(self.cfg)}}
        optimizer = None if state == "final" else self.optimizer
        path = save_checkpoint(self.run_dir, step, self.model, optimizer, meta, self.cfg["run"].keep_checkpoints)
        self.log(f"saved {path}")
        return path

    def history(self) -> list[dict]:
        """Every row of metrics.jsonl (rank 0; a resumed run's rows included), for the report."""
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if self.master and path.exists() else []

    def full_model(self) -> Transformer | None:
        """The whole trained model on rank 0, for evaluation and the Hugging Face copy: the model
        itself, or under FSDP a replica gathered from the shards (a collective); None elsewhere."""
        if not is_sharded(self.model):
            return self.model if self.master else None
        state = full_state_dict(self.model)
        if not self.master:
            return None
        replica = Transformer(self.model.cfg).to(self.device)
        replica.load_state_dict(state)
        return replica

    def sampling_model(self) -> Transformer:
        """The policy to sample from, with this step's weights, on every rank: on a GPU a bf16 copy
        refreshed in place (generate.py's fast path keeps its compiled step and caches for it, as TRL
        hands the weights to vLLM), gathered from the shards under FSDP; else the model itself."""
        if self.device.type != "cuda" and not is_sharded(self.model):
            return self.model
        state = full_state_dict(self.model, all_ranks=True)
        if self._sampler is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._sampler = Transformer(self.model.cfg).to(self.device, dtype=dtype).eval()
        with torch.no_grad():
            for name, value in self._sampler.state_dict().items():
                value.copy_(state[name])
        return self._sampler

    def finish(self, report: dict, text: str) -> dict:
        """The final checkpoint (the model alone), <run>/report.json, the Hugging Face copy if
        asked; the report."""
        self.save(self.steps, "final")
        if self.cfg["run"].save_hf:
            full = self.full_model()
            if self.master:
                save_hf(full, self.run_dir / "hf", self.enc)
                self.log(f"wrote {self.run_dir / 'hf'} (Hugging Face layout)")
        if self.master:
            (self.run_dir / "report.json").write_text(json.dumps(report, indent=2))
            self.log(text)
        barrier()
        self.close()
        return report

    def close(self) -> None:
        """Close metrics.jsonl, put Ctrl-C back and release the run folder (also when the stage failed)."""
        self.stop.__exit__()
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if self.lock:
            self.lock.release()


def diverged(grad_norm: float) -> str:
    return (f"the gradient norm is {grad_norm}: the run diverged and stops before this update, so no NaN reaches a "
            f"checkpoint; resume from its last checkpoint with a lower optim.lr")


def run_stage(stage, cfg: dict) -> None:
    """A stage's command line around stage(cfg): a refusal (ConfigError, CheckpointError, DataError,
    OSError, Diverged) is one line and exit code 2; Ctrl-C or SIGTERM one line and 130."""
    try:
        stage(cfg)
    except (ValueError, OSError, Diverged) as e:  # OSError: a path that is no folder, a full disk (named)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step
        run = cfg["run"]
        print(f"interrupted: {stopped_at_once(Path(run.out_dir) / run.name, '--run.resume=true')}", file=sys.stderr)
        sys.exit(130)


def mean_of(rows: list[dict], key: str) -> float:
    """The mean of one logged figure over metric rows (the report's "last steps" figures)."""
    return sum(r[key] for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export the built-in tasks as data files of TRL's formats.")
    p.add_argument("command", choices=["export"])
    p.add_argument("--kind", choices=["sft", "preference", "rl"], required=True)
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--examples", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"wrote {export_builtin(a.kind, a.out, a.examples, a.seed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
