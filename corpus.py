"""The corpus: where text comes from, before any tokenizer sees it.

The default corpus exists wherever Python is installed, with the three domains of the playbook's
ablation mix (prose/code/math 0.7/0.2/0.1): prose is Python's reference documentation (the
`pydoc_data` topics, cut at section headings), code the standard library's `.py` files (tests
excluded), math seeded arithmetic word problems with worked answers. No download, ever. Your own
documents stream from files, folders and globs of text, JSON lines (plain, gzip, zstd) and parquet
(`read_records`), the formats web corpora such as FineWeb-Edu ship in, one record at a time so that
a corpus far larger than memory can be read. tokenizer.py trains on a weighted sample of these texts
(`tokenizer_training_text`); data.py turns them into token shards.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import random
import re
import sysconfig
import zlib
from collections.abc import Iterator
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


INPUT_SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def input_format(path: Path) -> str | None:
    """The reader a file's name asks for (one of INPUT_SUFFIXES), or None."""
    return next((s for s in INPUT_SUFFIXES if path.name.endswith(s)), None)


def expand_inputs(specs: list[str | os.PathLike]) -> list[Path]:
    """Files, folders (every file of a known format under it, hidden ones excluded, sorted) and
    glob patterns (the files of a known format they match, sorted), in the order given, each file
    once. A spec that names nothing readable stops here, as does a named file of unknown format."""
    files: dict[Path, None] = {}
    for spec in map(str, specs):
        if any(c in spec for c in "*?["):
            found = sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if p.is_file() and input_format(p))
            if not found:
                raise FileNotFoundError(f"{spec}: no {', '.join(INPUT_SUFFIXES)} file matches this pattern; check it "
                                        f"(and quote it, so that the shell does not expand it first)")
        elif Path(spec).is_dir():
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and input_format(p)
                           and not any(part.startswith(".") for part in p.relative_to(spec).parts))
            if not found:
                raise FileNotFoundError(f"{spec}: folder holds no {', '.join(INPUT_SUFFIXES)} files; point "
                                        f"--files at the folder that has them")
        elif Path(spec).is_file():
            found = [Path(spec)]
        else:
            raise FileNotFoundError(f"{spec}: no such file or folder; check the path")
        for path in found:
            if not input_format(path):
                raise ValueError(f"{path}: unknown format; --files reads {', '.join(INPUT_SUFFIXES)} "
                                 f"(rename a plain text file to .txt)")
            files[path] = None
    return list(files)


def _missing_package(path: Path, package: str) -> ImportError:
    return ImportError(f"{path}: reading {input_format(path)} files needs the {package} package: "
                       f"pip install {package}")


def _jsonl_lines(path: Path) -> tuple[io.BufferedIOBase, tuple[type[Exception], ...]]:
    """The raw lines of a .jsonl, .jsonl.gz or .jsonl.zst file as a decompressing stream, and the
    errors a truncated or corrupt stream raises."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb"), (OSError, EOFError, zlib.error)
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise _missing_package(path, "zstandard") from None
        stream = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(stream), (OSError, zstandard.ZstdError)
    return open(path, "rb"), (OSError,)


def _jsonl_records(path: Path, text_field: str, skip_bad: bool, skip: int) -> Iterator[str | None]:
    """One record per non-blank line: its text field, or None for a bad line under skip_bad."""
    seen = 0
    lines, broken = _jsonl_lines(path)
    with lines:
        try:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                seen += 1
                if seen <= skip:
                    continue
                try:
                    text = json.loads(line.decode("utf-8"))[text_field]
                    if not isinstance(text, str):
                        raise TypeError(f"field {text_field!r} is {type(text).__name__}, not a string")
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
                    if not skip_bad:
                        why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else f"{type(e).__name__}: {e}"
                        raise ValueError(f"{path}:{n}: expected a JSON object with a string field {text_field!r} "
                                         f"({why}); fix the line, choose the field with --text-field, or pass "
                                         f"--skip-bad to count and skip such lines") from None
                    text = None
                yield text
        except broken as e:
            if not skip_bad:
                raise ValueError(f"{path}: cannot be read past record {seen} ({type(e).__name__}: {e}); "
                                 f"download it again, or pass --skip-bad to keep what was read") from None
            if seen + 1 > skip:  # the rest of the file counts as one bad record
                yield None


def _parquet_records(path: Path, text_field: str, skip_bad: bool, skip: int) -> Iterator[str | None]:
    """One record per row of the text column, read a row group at a time (FineWeb's row groups are
    tens of MB; whole files are GBs). Row groups before `skip` are passed over unread."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing_package(path, "pyarrow") from None
    row = 0
    try:
        file = pq.ParquetFile(path)
        if text_field not in file.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(file.schema_arrow.names)}); "
                             f"choose one with --text-field")
        groups = []
        for g in range(file.num_row_groups):
            rows = file.metadata.row_group(g).num_rows
            if row + rows > skip:
                groups.append(g)
            else:
                row += rows
        for batch in file.iter_batches(batch_size=1024, row_groups=groups, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if row <= skip:
                    continue
                if isinstance(text, bytes):  # a binary column holds text only if it is UTF-8
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError:
                        text = None
                if text is None and not skip_bad:
                    raise ValueError(f"{path}: row {row} of column {text_field!r} is null or not UTF-8 text; "
                                     f"pass --skip-bad to count and skip such rows")
                yield text
    except (OSError, pyarrow.ArrowException) as e:
        if not skip_bad:
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); download it "
                             f"again or remove it, or pass --skip-bad to skip it") from None
        if row + 1 > skip:  # the rest of the file counts as one bad record
            yield None


def _text_file_record(path: Path, skip_bad: bool) -> str | None:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if skip_bad:
            return None
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it, "
                         f"e.g. `iconv -f latin1 -t utf-8`, or pass --skip-bad to skip it") from None


def read_records(files: list[Path], text_field: str = "text", skip_bad: bool = False,
                 start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, str | None]]:
    """(file index, text) for every record of the files, in order: a .txt/.md file is one record,
    a .jsonl(.gz/.zst) line one, a parquet row one. A bad record stops with one line naming file
    and line or row; with skip_bad it comes out as (file index, None), so the caller counts it.

    Streams: at most one parquet row group is held at a time. `start` = (file, record) resumes
    inside the stream: earlier files are not opened, earlier records of that file are skipped
    (parquet row groups unread)."""
    first_file, skip = start
    for i in range(first_file, len(files)):
        path, kind = files[i], input_format(files[i])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (it was there when the run began); restore it")
        skip_here = skip if i == first_file else 0
        if kind in (".txt", ".md"):
            if skip_here == 0:
                yield i, _text_file_record(path, skip_bad)
            continue
        records = _parquet_records if kind == ".parquet" else _jsonl_records
        for text in records(path, text_field, skip_bad, skip_here):
            yield i, text


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


def file_sample(files: list[Path], max_bytes: int, text_field: str = "text", seed: int = 0) -> list[str]:
    """About max_bytes of UTF-8 from your files for tokenizer training, read as a stream: the files
    in a seeded random order (a folder of topical files still gives a mixed sample), documents in
    file order, the last one cut to fit. Only what is kept is ever held in memory. Web corpora
    such as FineWeb ship pre-shuffled files, so their first documents are a fair sample."""
    order = list(files)
    random.Random(seed).shuffle(order)
    sample, budget = [], max_bytes
    for _, text in read_records(order, text_field):
        if budget <= 0:
            break
        raw = text.encode("utf-8")
        if len(raw) > budget:
            text = raw[:budget].decode("utf-8", errors="ignore")
        sample.append(text)
        budget -= len(raw)
    return sample
