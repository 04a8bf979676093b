"""The corpus: where text comes from, before any tokenizer sees it.

The default corpus exists wherever Python is installed, with the three domains of the playbook's
ablation mix (prose/code/math 0.7/0.2/0.1): prose is Python's reference documentation (the
`pydoc_data` topics, cut at section headings), code the standard library's `.py` files (tests
excluded), math seeded arithmetic word problems with worked answers. No download, ever. Your own
documents come from files (`read_documents`). tokenizer.py trains on a weighted sample of these
texts (`tokenizer_training_text`); data.py turns them into token shards.
"""

from __future__ import annotations

import json
import os
import random
import re
import sysconfig
from pathlib import Path

import numpy as np

DEFAULT_WEIGHTS = {"prose": 0.7, "code": 0.2, "math": 0.1}  # the playbook's ablation mix
# 2 MB of budget: all the prose (464 kB, less than its 1.4 MB share) + 400 kB code + 200 kB math.
# 4096 tokens train in about a second. More budget only adds code and math, which lowers prose
# compression at small vocabularies; but this sample supports at most ~17k ids, so larger
# vocabularies need a larger max_bytes (20 MB allows ~44k and still trains in seconds).
DEFAULT_MAX_BYTES = 2_000_000

# --------------------------------------------------------------------------------------------
# The embedded corpus
# --------------------------------------------------------------------------------------------

_HEADING_UNDERLINE = re.compile(r"^([*=\-~^])\1{3,}\s*$")


def prose_documents() -> list[str]:
    """Python's reference documentation topics (`pydoc_data.topics`), cut into sections.

    Each topic is split at its reStructuredText-style headings so that documents have the sizes of
    real web pages (a few hundred to a few thousand tokens) rather than one 60 kB blob."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some minimal Python builds strip pydoc_data
        raise RuntimeError(
            "the prose source needs the standard library's pydoc_data module, which this Python "
            "lacks; install a full Python build or set data.weights to exclude 'prose'"
        ) from e
    docs = []
    for name in sorted(topics):
        lines = topics[name].splitlines()
        starts = [0] + [i - 1 for i in range(2, len(lines)) if _HEADING_UNDERLINE.match(lines[i])
                        and lines[i - 1].strip()]
        starts = sorted(set(starts))
        for a, b in zip(starts, starts[1:] + [len(lines)]):
            section = "\n".join(lines[a:b]).strip()
            if len(section) >= 200:
                docs.append(section)
    return docs


def _is_test_path(rel: str) -> bool:
    parts = rel.replace(os.sep, "/").split("/")
    return any(p in ("test", "tests", "idle_test", "site-packages", "__pycache__") or
               p.startswith("test_") for p in parts)


def code_documents() -> list[str]:
    """The standard library's own `.py` files (tests and site-packages excluded), one per document."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        if _is_test_path(rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of files are deliberately in other encodings
        if len(text) >= 200:
            docs.append(text)
    return docs


_ITEMS = ["apples", "books", "marbles", "coins", "pencils", "stickers", "cookies", "cards", "shells",
          "stamps", "bottles", "tickets"]
_NAMES = ["Ada", "Alan", "Grace", "Linus", "Guido", "Barbara", "Ken", "Margaret", "Donald", "Frances",
          "Edsger", "Radia", "John", "Lynn", "Tim", "Anita"]


def _math_problem(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        q = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?"
        w = f"{a} + {b} = {a + b}. The answer is {a + b}."
    elif kind == 1:
        a = rng.randint(20, 999)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} are left?"
        w = f"{a} - {b} = {a - b}. The answer is {a - b}."
    elif kind == 2:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        w = f"{a} * {b} = {a * b}. The answer is {a * b}."
    elif kind == 3:
        b, c = rng.randint(2, 12), rng.randint(2, 50)
        r = rng.randint(0, b - 1)
        a = b * c + r
        q = f"{name} shares {a} {item} equally among {b} friends. How many does each friend get, and how many are left over?"
        w = f"{a} / {b} = {c} remainder {r}. Each friend gets {c} and {r} are left over. The answer is {c}."
    elif kind == 4:
        a, b, c = rng.randint(2, 200), rng.randint(2, 20), rng.randint(1, 99)
        q = (f"{name} buys {b} packs of {item} with {a} in each pack, then loses {c} of them. "
             f"How many {item} does {name} have?")
        t = a * b
        w = f"{b} * {a} = {t}. {t} - {c} = {t - c}. The answer is {t - c}."
    else:
        p = rng.choice([10, 20, 25, 50, 75])
        a = rng.randint(1, 40) * 4 * (100 // np.gcd(p, 100))
        q = f"{name} has {a} {item} and gives {p}% of them to {other}. How many {item} does {other} get?"
        w = f"{p}% of {a} is {a} * {p} / 100 = {a * p // 100}. The answer is {a * p // 100}."
    return f"Question: {q}\nAnswer: {w}"


def math_documents(n_docs: int = 10_000, seed: int = 1234) -> list[str]:
    """Generated arithmetic word problems with worked answers (seeded, so every machine agrees).

    A document is a short worksheet of 1-4 problems, like the math pages of a web crawl."""
    rng = random.Random(seed)
    return ["\n\n".join(_math_problem(rng) for _ in range(rng.randint(1, 4))) for _ in range(n_docs)]


SOURCES = {"prose": prose_documents, "code": code_documents, "math": math_documents}


def corpus_documents(source: str) -> list[str]:
    """All documents of one named source of the default corpus."""
    if source not in SOURCES:
        raise ValueError(f"unknown corpus source {source!r}; the embedded sources are {sorted(SOURCES)}")
    docs = SOURCES[source]()
    if not docs:
        raise RuntimeError(f"corpus source {source!r} is empty on this machine; check the Python install")
    return docs


# --------------------------------------------------------------------------------------------
# Your own documents, and samples for tokenizer training
# --------------------------------------------------------------------------------------------


def read_documents(files: list[str | os.PathLike]) -> list[str]:
    """Your own documents: a text file is one document, a .jsonl file one per line (field 'text')."""
    docs = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")
        if path.suffix != ".jsonl":
            docs.append(path.read_text(encoding="utf-8"))
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from e
    return docs


def tokenizer_training_text(max_bytes: int = DEFAULT_MAX_BYTES, weights: dict[str, float] | None = None,
                            seed: int = 0) -> list[str]:
    """Documents of the default corpus, about max_bytes of UTF-8 in all, shared out by weight.

    Each source gets weight/sum(weights) of the budget, filled with its documents in a seeded
    random order (the last one cut to fit). A source smaller than its share is taken whole and
    the shortfall is not handed to the others, which would tilt the mix towards code."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    total = sum(weights.values())
    sample = []
    for source, weight in sorted(weights.items()):
        sample += sample_documents(corpus_documents(source), int(max_bytes * weight / total), f"{seed}:{source}")
    return sample


def sample_documents(docs: list[str], max_bytes: int, seed: str | int) -> list[str]:
    """About max_bytes of UTF-8 from docs, taken in a seeded random order, the last one cut to fit
    (str seeds are stable across runs)."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    sample, budget = [], max_bytes
    for doc in docs:
        if budget <= 0:
            break
        raw = doc.encode("utf-8")
        if len(raw) > budget:
            doc = raw[:budget].decode("utf-8", errors="ignore")
        sample.append(doc)
        budget -= len(raw)
    return sample
