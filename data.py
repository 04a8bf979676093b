"""Data: the embedded corpus, token shards, and a resumable, pre-shuffled, mixed loader.

The story this file tells, in the playbook's order:

1. The text: the embedded corpus (corpus.py: Python's own documentation, the standard library's
   code, generated arithmetic; no download, ever) or your own files, and a tokenizer trained on
   it (tokenizer.py) unless one is given (a Hugging Face tokenizer.json too: SmolLM3 reused
   Llama 3.2's rather than train its own).
2. Tokenizing to shards: each source becomes a flat stream of token ids with EOS after every
   document, written as a memmap-able binary with a small header (so a truncated file is caught).
   Documents stream from the files through a pool of tokenizing processes into shards written as
   they fill, so memory does not grow with the corpus (FineWeb-Edu, which the playbook's ablations
   read, is terabytes); an interrupted run resumes at its last complete shard. A document goes to
   validation by a seeded hash of its text, never by position, and the same whatever the worker
   count; exact duplicates can be dropped on the way.
3. Packing: a window of seq_len+1 tokens is cut from the stream, and `doc_ids` number the documents
   inside it (a new id after each EOS), so attention can be masked within documents.
4. Pre-shuffled order: each source's windows are visited in a seeded permutation that changes every
   epoch, because reading in corpus order gave the playbook noisy, drifting loss curves.
5. Mixture: sources are interleaved by weight (default prose/code/math 0.7/0.2/0.1, the playbook's
   ablation mix) with a deterministic deficit rule, so realised token shares match the weights.
6. Distribution and resumption: every optimizer step consumes one global batch, split by rank and
   micro-batch; the loader's state is a handful of integers saved in every checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from corpus import DEFAULT_WEIGHTS, SOURCES, corpus_documents, expand_inputs, read_records, tokenizer_training_text
from tokenizer import eot_id, load_tokenizer, save_tokenizer, train_bpe

# --------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    dir: str = "data_cache"        # tokenizer file and token shards live here, one folder per vocab
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))  # source -> share of tokens
    val_fraction: float = 0.05     # share of each source's documents held out, chosen by seed
    seed: int = 1337               # document split, window order and mixture all derive from it
    num_workers: int = 0           # tokenizing processes; 0 = one per CPU core
    # instead of training one: this project's tokenizer file or a Hugging Face tokenizer.json
    # (byte-level BPE: Llama 3.2's, which SmolLM3 reused, or SmolLM2's); model.vocab_size >= its ids
    tokenizer: str = ""            # a tokenizer file to use ("": train one on the embedded sample)
    tokenizer_train_bytes: int = 0  # 0 = tokenizer.py's default sample size
    max_docs: int = 0              # use at most this many documents per source (0: all); for smoke tests
    # Later mixture stages in one run (SmolLM3: three, the last an annealing on higher-quality data):
    # stage k + 1 draws with stage_weights[k] from stage_starts[k] (a fraction of the run) on;
    # data.weights is the first stage, and the validation mixture throughout.
    stage_starts: tuple[float, ...] = ()                 # where each later stage begins, fractions of the run
    stage_weights: tuple[dict[str, float], ...] = ()   # each later stage's mixture

    def __post_init__(self):
        for key, weights in [("data.weights", self.weights)] + [
                (f"data.stage_weights[{k}]", w) for k, w in enumerate(self.stage_weights)]:
            if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"{key} must map source names to non-negative weights with a positive "
                                 f"sum, got {weights}; e.g. {DEFAULT_WEIGHTS}")
        if len(self.stage_starts) != len(self.stage_weights):
            raise ValueError(f"data.stage_starts has {len(self.stage_starts)} entries and data.stage_weights "
                             f"{len(self.stage_weights)}: give one start (a fraction of the run) per later stage")
        points = (0.0, *self.stage_starts, 1.0)
        if any(a >= b for a, b in zip(points, points[1:])):
            raise ValueError(f"data.stage_starts={list(self.stage_starts)} must rise strictly inside (0, 1): "
                             f"fractions of the run where each later stage begins")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_docs < 0 or self.num_workers < 0 or self.tokenizer_train_bytes < 0:
            raise ValueError("data.max_docs, data.num_workers and data.tokenizer_train_bytes must be >= 0")

    def stage_at(self, progress: float) -> int:
        """0 for data.weights' stage, k for the stage stage_starts[k - 1] begins; progress is the
        fraction of the run done (0 to 1)."""
        return sum(start <= progress for start in self.stage_starts)

    def weights_at(self, progress: float) -> dict[str, float]:
        """The mixture of the stage that holds `progress`."""
        stage = self.stage_at(progress)
        return self.stage_weights[stage - 1] if stage else self.weights

    def sources(self) -> list[str]:
        """Every source some stage draws from, in first-mention order."""
        return list(dict.fromkeys(s for w in (self.weights, *self.stage_weights) for s, x in w.items() if x > 0))

    def tokenizer_path(self, vocab_size: int) -> Path:
        return Path(self.tokenizer) if self.tokenizer else Path(self.dir) / f"vocab{vocab_size}" / "tokenizer.json"

    def shard_dir(self, vocab_size: int) -> Path:
        """Shards depend on the tokenizer and on which documents went where: both are in the name
        (a given tokenizer file by its name and fingerprint, e.g. data_cache/smollm2-1a2b3c4d/...)."""
        recipe = f"seed{self.seed}-val{self.val_fraction:g}" + (f"-max{self.max_docs}" if self.max_docs else "")
        if not self.tokenizer:
            return Path(self.dir) / f"vocab{vocab_size}" / recipe
        path = Path(self.tokenizer)
        name = path.parent.name if path.name == "tokenizer.json" and path.parent.name else path.stem
        return Path(self.dir) / f"{name}-{tokenizer_fingerprint(path) & 0xFFFFFFFF:08x}" / recipe

    @classmethod
    def from_shard_dir(cls, path: str | os.PathLike) -> "DataConfig":
        """The split recipe a shard folder was made with (the inverse of shard_dir)."""
        path = Path(path)
        m = re.fullmatch(r"seed(\d+)-val([0-9.e-]+)(?:-max(\d+))?", path.name)
        if not m:
            raise ValueError(f"{path} is not a shard folder named like seed1337-val0.05 (data.py makes them)")
        return cls(dir=str(path.parent.parent), seed=int(m[1]), val_fraction=float(m[2]), max_docs=int(m[3] or 0))


# --------------------------------------------------------------------------------------------
# 2. Token shards
# --------------------------------------------------------------------------------------------

SHARD_MAGIC = 20_251_123
SHARD_VERSION = 1
HEADER_INTS = 8  # magic, version, bytes per token, n_tokens, n_docs, tokenizer fingerprint, 0, 0
HEADER_BYTES = HEADER_INTS * 8
SHARD_TOKENS = 256 * 1024 * 1024  # a shard is closed at the first chunk that takes it past this
# Documents travel to the tokenizing processes in chunks of at most this many documents or
# characters. Chunks are cut from the stream alone (never by timing), so shard boundaries and
# resume points, which fall between chunks, are the same for any worker count.
CHUNK_DOCS = 64
CHUNK_CHARS = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while ids fit in 16 bits (half the disk and page cache of uint32), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(path: str | os.PathLike) -> int:
    """63 bits of the tokenizer file's hash, stored in every shard so stale shards are caught."""
    return int.from_bytes(hashlib.sha256(Path(path).read_bytes()).digest()[:8], "little") >> 1


def _split_key(seed: int, source: str) -> bytes:
    return hashlib.sha256(f"{seed}:{source}".encode()).digest()


def is_validation(text: str, val_fraction: float, seed: int, source: str) -> bool:
    """Whether a document is held out: a keyed hash of its text, read as a number in [0, 1), falls
    below val_fraction. It depends on nothing but the text, so the split is the same whatever the
    worker count, file order or resume point, no global permutation of a corpus is needed, and
    exact copies of a document always fall on the same side (no train/validation leak)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=_split_key(seed, source)).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2 ** 64


def split_documents(docs: list[str], val_fraction: float, seed: int, source: str) -> dict[str, list[str]]:
    """A list of documents split as the shards split them (is_validation), in their order; the
    built-in evaluation tasks take their items from the "val" side."""
    if len(docs) < 2:
        raise ValueError(f"data source {source!r} has {len(docs)} document(s); it needs at least 2 (whole documents "
                         f"are held out for validation): give it more files, or split a long text into several")
    val = [is_validation(d, val_fraction, seed, source) for d in docs]
    split = {"train": [d for d, v in zip(docs, val) if not v], "val": [d for d, v in zip(docs, val) if v]}
    _check_both_sides(source, len(split["train"]), len(split["val"]), val_fraction)
    return split


def _check_both_sides(source: str, n_train: int, n_val: int, val_fraction: float) -> None:
    if n_train and n_val:
        return
    if not n_train + n_val:
        raise ValueError(f"data source {source!r} has no documents: its inputs are empty (or hold no --text-field "
                         f"field); check the files")
    side, fix = ("validation", "raise --val-fraction or add documents") if not n_val else \
                ("training", "lower --val-fraction or add documents")
    raise ValueError(f"data source {source!r}: none of its {n_train + n_val} documents fell on the {side} side "
                     f"(each is held out with probability val_fraction={val_fraction:g}, by a seeded hash of its "
                     f"text); {fix}")


def limit_documents(docs: list[str], cfg: DataConfig, source: str) -> list[str]:
    """At most cfg.max_docs documents of an embedded source (a seeded choice, kept in corpus order).
    Your own files are streamed, so for them max_docs keeps the first documents."""
    if not cfg.max_docs:
        return docs
    keep = np.random.default_rng([cfg.seed, _stable_hash(source)]).permutation(len(docs))[:cfg.max_docs]
    return [docs[i] for i in sorted(keep)]


def _stable_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


class ChunkTokenizer:
    """What a tokenizing process does to a chunk of documents: for each, its tokens + EOS (all of
    them in one array), its side of the split, and for deduplication a 64-bit hash of its
    normalised text (lower case, runs of whitespace as one space). Hashing here rather than in the
    reading process keeps that process free to read."""

    def __init__(self, tokenizer_path: str, val_fraction: float, seed: int, source: str, dedup: bool):
        self.enc = load_tokenizer(tokenizer_path)
        self.eot, self.dtype = eot_id(self.enc), token_dtype(self.enc.n_vocab)
        self.key, self.threshold = _split_key(seed, source), val_fraction * 2 ** 64
        self.dedup = dedup

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int]:
        """(tokens with an EOS after each document, tokens per document including its EOS, is
        validation, dedup hashes or None, UTF-8 bytes read)."""
        # encode_to_numpy with no special token allowed is encode_ordinary without a Python list
        ids = [self.enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
        lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        ends = np.cumsum(lengths)
        for x, end in zip(ids, ends):
            tokens[end - len(x) - 1:end - 1] = x
        tokens[ends - 1] = self.eot
        raw = [t.encode("utf-8") for t in texts]
        is_val = np.array([int.from_bytes(hashlib.blake2b(r, digest_size=8, key=self.key).digest(), "little")
                           < self.threshold for r in raw], dtype=bool)
        keys = None
        if self.dedup:
            keys = np.array([int.from_bytes(hashlib.blake2b(" ".join(t.split()).lower().encode("utf-8"),
                                                            digest_size=8).digest(), "little") for t in texts],
                            dtype=np.uint64)
        return tokens, lengths, is_val, keys, sum(map(len, raw))


_worker: ChunkTokenizer | None = None


def _init_worker(*args) -> None:
    global _worker
    _worker = ChunkTokenizer(*args)


def _run_worker(texts: list[str]):
    return _worker(texts)


class SeenHashes:
    """Exact deduplication's memory: the hashes of every document kept so far, 8 bytes each in a
    sorted array, plus a set of the newest that is folded in every million. This is the one thing
    that grows with the corpus (8 bytes per unique document: 360 MB for FineWeb-Edu's ~45M
    documents per 45B tokens); collisions of 64-bit hashes are negligible at that size."""

    def __init__(self, saved: np.ndarray | None = None):
        self.sorted = np.sort(saved) if saved is not None else np.zeros(0, dtype=np.uint64)
        self.recent: set[int] = set()

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """For each hash, in order, whether it is new; new ones are remembered."""
        pos = np.searchsorted(self.sorted, keys)
        old = (pos < len(self.sorted)) & (self.sorted[np.minimum(pos, len(self.sorted) - 1)] == keys) \
            if len(self.sorted) else np.zeros(len(keys), dtype=bool)
        new = np.zeros(len(keys), dtype=bool)
        for i, k in enumerate(keys.tolist()):
            if not old[i] and k not in self.recent:
                self.recent.add(k)
                new[i] = True
        if len(self.recent) >= 1 << 20:
            self.array()
        return new

    def array(self) -> np.ndarray:
        if self.recent:
            self.sorted = np.union1d(self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.recent = set()
        return self.sorted


class ShardWriter:
    """One split's shards, `<source>_<split>_<k>.bin`: tokens are appended to a temporary file as
    they come (nothing is held back in memory), and close() writes the header and renames it."""

    def __init__(self, out_dir: Path, source: str, split: str, index: int, dtype: np.dtype, fingerprint: int):
        self.prefix, self.index, self.dtype, self.fingerprint = out_dir / f"{source}_{split}", index, dtype, fingerprint
        self.file, self.n_tokens, self.n_docs = None, 0, 0

    def path(self, index: int) -> Path:
        return self.prefix.parent / f"{self.prefix.name}_{index:03d}.bin"

    def write(self, tokens: np.ndarray, n_docs: int) -> None:
        if not len(tokens):
            return
        if self.file is None:
            self.file = open(self.path(self.index).with_suffix(".bin.tmp"), "wb")
            self.file.write(bytes(HEADER_BYTES))
        self.file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += len(tokens)
        self.n_docs += n_docs

    def close(self) -> None:
        """Finish the current shard (if it holds anything) and start counting the next."""
        if self.file is None:
            return
        header = [SHARD_MAGIC, SHARD_VERSION, self.dtype.itemsize, self.n_tokens, self.n_docs, self.fingerprint, 0, 0]
        self.file.seek(0)
        self.file.write(np.array(header, dtype=np.int64).tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())  # the shard is on disk before the progress file says so
        self.file.close()
        os.replace(self.path(self.index).with_suffix(".bin.tmp"), self.path(self.index))
        self.file, self.n_tokens, self.n_docs, self.index = None, 0, 0, self.index + 1


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ingest_state(out_dir: str | os.PathLike, source: str) -> dict | None:
    """The progress file of a source's shards (`<source>.ingest.json`): settings, the stream
    position and counts at the last complete shard, and whether the source is finished."""
    path = Path(out_dir) / f"{source}.ingest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:  # half-written by another tool, or edited: start over
        return None


def ingest(source: str, records: Callable[[tuple[int, int]], Iterator[tuple[int, str | None]]],
           inputs: list, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, cfg: DataConfig,
           dedup: bool = False, shard_tokens: int = SHARD_TOKENS, log=print) -> dict:
    """Tokenize one source's document stream into train and validation shards in out_dir.

    records(start) yields (file index, text or None for a skipped bad record) from position start
    = (file index, record index); `inputs` identifies what it reads (files with sizes and times).
    The reading process cuts the stream into chunks (CHUNK_DOCS), a pool of cfg.num_workers
    processes tokenizes them (ChunkTokenizer), and results are written in stream order as they
    come back, with at most two chunks per worker in flight: memory stays flat however large the
    corpus. When either split's shard passes shard_tokens, both are closed and the position,
    counts and dedup hashes saved; a rerun after Ctrl-C or SIGKILL continues from there and ends
    with the same bytes as a run never interrupted, as does any worker count. Returns the counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    enc = load_tokenizer(tokenizer_path)
    fingerprint = tokenizer_fingerprint(tokenizer_path)
    settings = {"inputs": inputs, "tokenizer": fingerprint, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                "max_docs": cfg.max_docs, "dedup": dedup, "shard_tokens": shard_tokens,
                "chunk": [CHUNK_DOCS, CHUNK_CHARS], "version": SHARD_VERSION}
    state = ingest_state(out_dir, source)
    if state and not shards_present(out_dir, source, state):  # deleted as a read error advised: rebuild
        log(f"{source}: shards that {source}.ingest.json lists are missing from {out_dir}: starting over")
        state = None
    if state and state["settings"] == settings and state["complete"]:
        log(f"{source}: already complete in {out_dir} ({_summary(state['counts'])})")
        return state["counts"]
    dedup_path = out_dir / f"{source}.dedup.npy"
    if state and state["settings"] == settings:
        log(f"{source}: resuming after {sum(state['shards'].values())} complete shards "
            f"({state['counts']['documents']:,} documents read)")
    else:
        if state:
            log(f"{source}: inputs or settings differ from those of the shards in {out_dir}: starting over")
        state = {"settings": settings, "position": [0, 0], "shards": {"train": 0, "val": 0}, "complete": False,
                 "counts": dict.fromkeys(["documents", "train", "val", "bytes", "tokens", "skipped", "duplicates"], 0)}
        dedup_path.unlink(missing_ok=True)
    for stale in out_dir.iterdir():  # past the last complete shard, or temporary
        m = re.fullmatch(rf"{re.escape(source)}_(train|val)_(\d+)\.bin(\.tmp)?", stale.name)
        if m and (m[3] or int(m[2]) >= state["shards"][m[1]]):
            stale.unlink()
    seen = None if not dedup else SeenHashes(np.load(dedup_path) if dedup_path.exists() else None)
    dtype = token_dtype(enc.n_vocab)
    writers = {split: ShardWriter(out_dir, source, split, state["shards"][split], dtype, fingerprint)
               for split in ("train", "val")}
    counts, position = state["counts"], tuple(state["position"])
    read_now, t0 = 0, time.perf_counter()

    def chunks():
        """(texts, position after the chunk, bad records skipped in it), cut from the stream alone."""
        texts, chars, skipped, (file, record) = [], 0, 0, position
        n_docs = counts["documents"]
        for f, text in records(position):
            file, record = (f, record + 1) if f == file else (f, 1)
            if text is None:
                skipped += 1
                continue
            texts.append(text)
            chars += len(text)
            n_docs += 1
            if len(texts) == CHUNK_DOCS or chars >= CHUNK_CHARS or n_docs == cfg.max_docs:
                yield texts, (file, record), skipped
                texts, chars, skipped = [], 0, 0
            if n_docs == cfg.max_docs:
                return
        if texts or skipped:
            yield texts, (file, record), skipped

    def checkpoint(complete: bool) -> None:
        for w in writers.values():
            w.close()
        if seen is not None:
            buf = io.BytesIO()
            np.save(buf, seen.array())
            _write_atomic(dedup_path, buf.getvalue())
        state.update(position=list(position), shards={s: w.index for s, w in writers.items()}, complete=complete)
        _write_atomic(out_dir / f"{source}.ingest.json", json.dumps(state, indent=1).encode())

    def consume(result, end, skipped) -> None:
        nonlocal position, read_now
        tokens, lengths, is_val, keys, n_bytes = result
        keep = seen.first_seen(keys) if seen is not None else np.ones(len(lengths), dtype=bool)
        for split, mask in (("train", keep & ~is_val), ("val", keep & is_val)):
            writers[split].write(tokens[np.repeat(mask, lengths)], int(mask.sum()))
            counts[split] += int(mask.sum())
        counts["documents"] += len(lengths)
        counts["bytes"] += n_bytes
        counts["tokens"] += int(lengths[keep].sum())
        counts["skipped"] += skipped
        counts["duplicates"] += int((~keep).sum())
        position, read_now = end, read_now + n_bytes
        bar.update(n_bytes)
        if max(w.n_tokens for w in writers.values()) >= shard_tokens:
            checkpoint(complete=False)

    workers = cfg.num_workers or os.cpu_count() or 1
    args = (str(tokenizer_path), cfg.val_fraction, cfg.seed, source, dedup)
    bar = tqdm(desc=f"tokenizing {source}", unit="B", unit_scale=True, leave=False)
    try:
        if workers == 1:
            tokenize = ChunkTokenizer(*args)
            for texts, end, skipped in chunks():
                consume(tokenize(texts), end, skipped)
        else:
            with mp.get_context("spawn").Pool(workers, _init_worker, args) as pool:
                pending = deque()
                for texts, end, skipped in chunks():
                    pending.append((pool.apply_async(_run_worker, (texts,)), end, skipped))
                    if len(pending) >= 2 * workers:
                        job, end, skipped = pending.popleft()
                        consume(job.get(), end, skipped)
                while pending:
                    job, end, skipped = pending.popleft()
                    consume(job.get(), end, skipped)
    except KeyboardInterrupt:
        bar.close()
        log(f"{source}: interrupted; the same command continues after shard {sum(state['shards'].values())}")
        raise
    bar.close()
    _check_both_sides(source, counts["train"], counts["val"], cfg.val_fraction)
    checkpoint(complete=True)
    seconds = time.perf_counter() - t0
    log(f"{source}: {_summary(counts)}, {read_now / 1e6 / max(seconds, 1e-9):.1f} MB/s")
    return counts


def shards_present(out_dir: str | os.PathLike, source: str, state: dict) -> bool:
    """Whether every shard a progress file counts as written is there."""
    return all((Path(out_dir) / f"{source}_{split}_{k:03d}.bin").is_file()
               for split, n in state["shards"].items() for k in range(n))


def _summary(counts: dict) -> str:
    return (f"{counts['train'] + counts['val']:,} documents ({counts['train']:,} train / {counts['val']:,} val), "
            f"{counts['bytes'] / 1e6:,.1f} MB, {counts['tokens']:,} tokens, {counts['skipped']:,} skipped, "
            f"{counts['duplicates']:,} duplicates")


def file_inputs(files: list[Path]) -> list:
    """What identifies a list of input files for resuming: path, size and modification time."""
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def read_shard(path: str | os.PathLike, fingerprint: int | None = None) -> np.ndarray:
    """Memory-map a shard's tokens, checking its header, its size, and (optionally) its tokenizer."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"shard {path} is truncated ({size} bytes, shorter than its header); delete it and rerun to rebuild")
    header = np.fromfile(path, dtype=np.int64, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION or header[2] not in (2, 4):
        raise ValueError(f"{path} is not a nanoplaybook token shard (bad header); delete it and rerun to rebuild")
    itemsize, n_tokens = int(header[2]), int(header[3])
    expected = HEADER_BYTES + n_tokens * itemsize
    if size != expected:
        raise ValueError(f"shard {path} is truncated or corrupt: header promises {n_tokens} tokens "
                         f"({expected} bytes) but the file has {size} bytes; delete it and rerun to rebuild")
    if fingerprint is not None and int(header[5]) != fingerprint:
        raise ValueError(f"shard {path} was tokenized with a different tokenizer than the one in use; "
                         f"delete {path.parent} to rebuild its shards")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def shard_paths(shard_dir: str | os.PathLike, source: str, split: str) -> list[Path]:
    return sorted(Path(shard_dir).glob(f"{source}_{split}_*.bin"))


def prepare_data(cfg: DataConfig, vocab_size: int, log=print):
    """The run's tokenizer (cfg.tokenizer, else trained on the embedded corpus if missing), and
    every embedded source's shards, built or finished if missing.

    Returns the tokenizer. Sources that are not embedded must already have complete shards in
    cfg.shard_dir(vocab_size) (see `python data.py --help` to make them from your own files)."""
    tok_path = cfg.tokenizer_path(vocab_size)
    if cfg.tokenizer:
        if not tok_path.is_file():
            raise FileNotFoundError(f"data.tokenizer={cfg.tokenizer}: no such file; give a tokenizer.json (e.g. "
                                    f"tokenizer.save_hf_tokenizer's, or a Hugging Face model's) or this project's file")
    elif not tok_path.exists():
        make_it = (f"`python tokenizer.py --vocab-size {vocab_size} --files ... --max-bytes 200000000 "
                   f"--out {tok_path}`")
        own = [s for s in cfg.sources() if s not in SOURCES]
        if own:  # a tokenizer for your data is trained on your data, not on the embedded sample
            raise FileNotFoundError(f"no tokenizer at {tok_path} for data source(s) {own}: make it from your files "
                                    f"first with {make_it}, then their shards with `python data.py --source ...`")
        t0 = time.time()
        kwargs = {"max_bytes": cfg.tokenizer_train_bytes} if cfg.tokenizer_train_bytes else {}
        texts = tokenizer_training_text(weights={k: v for k, v in cfg.weights.items() if k in SOURCES} or None,
                                        seed=cfg.seed, **kwargs)
        try:
            enc = train_bpe(texts, vocab_size)
        except ValueError as e:  # the embedded sample holds ~17k merges at 2 MB, ~44k at 20 MB
            raise ValueError(f"{e}; or make the tokenizer from your own text: {make_it}") from e
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        save_tokenizer(enc, tok_path)
        log(f"trained a {vocab_size}-token BPE tokenizer in {time.time() - t0:.1f}s -> {tok_path}")
    enc = load_tokenizer(tok_path)
    fingerprint = tokenizer_fingerprint(tok_path)
    if cfg.tokenizer:
        if enc.n_vocab > vocab_size:
            raise ValueError(f"data.tokenizer {tok_path} has {enc.n_vocab:,} ids but model.vocab_size={vocab_size}; "
                             f"set --model.vocab_size={-(-enc.n_vocab // 128) * 128} (a multiple of 128 at least "
                             f"as large)")
        log(f"tokenizer {tok_path}: {enc.n_vocab:,} ids, fingerprint {fingerprint:016x}")
    elif enc.n_vocab != vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {enc.n_vocab} tokens but model.vocab_size={vocab_size}")
    out = cfg.shard_dir(vocab_size)
    for source in cfg.sources():
        state = ingest_state(out, source)
        if source in SOURCES:  # built, finished, or (other tokenizer, older split) rebuilt here
            # read only if the shards need writing: reading the stdlib's code takes a second on every start
            def documents(start, source=source):
                return ((0, d) for d in limit_documents(corpus_documents(source), cfg, source)[start[1]:])
            ingest(source, documents, [f"embedded:{source}"], out, tok_path, cfg, log=log)
        elif not (state and state["complete"] and state["settings"]["tokenizer"] == fingerprint
                  and shards_present(out, source, state)):
            why = ("is unfinished" if state and not state["complete"] else
                   "was made with another tokenizer" if state and state["settings"]["tokenizer"] != fingerprint else
                   "is missing shards" if state else "is missing")
            raise FileNotFoundError(
                f"data source {source!r} {why} in {out}; make it with `python data.py --source {source} --files ... "
                f"{f'--tokenizer {tok_path}' if cfg.tokenizer else f'--vocab-size {vocab_size}'} --seed {cfg.seed} "
                f"--val-fraction {cfg.val_fraction:g}{f' --max-docs {cfg.max_docs}' if cfg.max_docs else ''}` "
                f"(an unfinished one continues where it stopped) or use only the embedded sources {sorted(SOURCES)}")
    return enc


# --------------------------------------------------------------------------------------------
# 3-6. Packing, pre-shuffled order, mixture, ranks, resumption
# --------------------------------------------------------------------------------------------


def window_doc_ids(window: np.ndarray, eot: int) -> np.ndarray:
    """Document number of each input position: it increases right after every EOS token.

    The EOS closes its own document (the token before it predicts it), so it keeps its document's
    id; the token after it starts the next document."""
    is_eot = window[:-1] == eot
    return np.concatenate([[0], np.cumsum(is_eot[:-1])]).astype(np.int64)


class SourceWindows:
    """The seq_len+1-token windows of one source's shards, consecutive windows sharing one token
    (the last target of one is the first input of the next) so every token is predicted once."""

    def __init__(self, paths: list[Path], seq_len: int, fingerprint: int | None = None):
        if not paths:
            raise FileNotFoundError("no shard files given")
        self.shards = [read_shard(p, fingerprint) for p in paths]
        self.seq_len = seq_len
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.offsets = np.cumsum([0] + counts)
        self.n_tokens = sum(len(s) for s in self.shards)
        if self.offsets[-1] == 0:
            raise ValueError(f"{paths[0].parent}: {paths[0].name.rsplit('_', 1)[0]} has {self.n_tokens} tokens, "
                             f"fewer than one window of seq_len+1={seq_len + 1}; lower train.seq_len or add data")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        start = (i - self.offsets[shard]) * self.seq_len
        return np.asarray(self.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)


class MixtureLoader:
    """Serves (inputs, targets, doc_ids) micro-batches from several sources mixed by weight.

    Order: each source's windows are read in a permutation seeded by (seed, source, epoch), fresh
    every epoch. Mixture: sample n goes to the source with the largest deficit w_s * (n + 1) - c_s,
    so after n samples every source has within one sample of its share. Distribution: a step's
    global batch is one run of samples; rank r's micro-batch m is its slice
    [(m * world + r) * B, ... + B), so any (world, grad_accum) split of the same global batch sees
    the same samples. State: the sample counter and the per-source counts, plus where the current
    mixture stage began: resuming with other weights starts a new stage, whose deficits count from
    there (each source still continues its own permutation, so nothing is repeated early)."""

    def __init__(self, shard_dir: str | os.PathLike, weights: dict[str, float], split: str, seq_len: int,
                 seed: int, eot: int, rank: int = 0, world_size: int = 1, fingerprint: int | None = None,
                 sources: list[str] | None = None):
        # `sources`: every source a later stage may draw from (DataConfig.sources), opened now
        self.names = list(sources) if sources else [s for s, w in weights.items() if w > 0]
        self.weights = self._normalized(weights)
        self.sources = []
        for s in self.names:
            paths = shard_paths(shard_dir, s, split)
            if not paths:
                raise FileNotFoundError(f"no {split} shards for source {s!r} in {shard_dir}; run training once "
                                        f"(it builds them) or `python data.py`")
            self.sources.append(SourceWindows(paths, seq_len, fingerprint))
        self.seed, self.eot, self.rank, self.world_size = seed, eot, rank, world_size
        self.samples = 0
        self.counts = np.zeros(len(self.names), dtype=np.int64)
        self.stage_samples, self.stage_counts = 0, np.zeros(len(self.names), dtype=np.int64)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    def _normalized(self, weights: dict[str, float]) -> np.ndarray:
        unknown = [s for s, w in weights.items() if w > 0 and s not in self.names]
        if unknown:
            raise ValueError(f"sources {unknown} were not opened by this loader (it has {self.names})")
        w = np.array([float(weights.get(s, 0.0)) for s in self.names])
        return w / w.sum()

    def set_weights(self, weights: dict[str, float]) -> bool:
        """Switch to another mixture (a new stage of the run); returns True when it differs. Deficits
        then count from here, as on a resume with new weights."""
        new = self._normalized(weights)
        if np.allclose(new, self.weights, rtol=0, atol=1e-9):
            return False
        self.weights = new
        self.stage_samples, self.stage_counts = self.samples, self.counts.copy()
        return True

    def _window_index(self, s: int, count: int) -> int:
        n = len(self.sources[s])
        epoch, pos = divmod(count, n)
        cached = self._perm_cache.get(s)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _stable_hash(self.names[s]), epoch])
            cached = (epoch, rng.permutation(n))
            self._perm_cache[s] = cached
        return int(cached[1][pos])

    def _draw(self, n: int) -> list[tuple[int, int]]:
        """The next n (source, window) pairs of the global sequence, advancing the state."""
        out = []
        for _ in range(n):
            deficit = self.weights * (self.samples - self.stage_samples + 1) - (self.counts - self.stage_counts)
            s = int(np.argmax(deficit))
            out.append((s, self._window_index(s, int(self.counts[s]))))
            self.counts[s] += 1
            self.samples += 1
        return out

    def next_step(self, micro_batch_size: int, grad_accum_steps: int) -> list[tuple[torch.Tensor, ...]]:
        """This rank's micro-batches for one optimizer step: a list of (x, y, doc_ids), each (B, T)."""
        draws = self._draw(micro_batch_size * grad_accum_steps * self.world_size)
        batches = []
        for m in range(grad_accum_steps):
            start = (m * self.world_size + self.rank) * micro_batch_size
            windows = [self.sources[s][i] for s, i in draws[start:start + micro_batch_size]]
            w = np.stack(windows)
            doc = np.stack([window_doc_ids(x, self.eot) for x in windows])
            batches.append((torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:]), torch.from_numpy(doc)))
        return batches

    def state_dict(self) -> dict:
        return {"samples": self.samples, "counts": dict(zip(self.names, self.counts.tolist())),
                "weights": dict(zip(self.names, self.weights.tolist())), "stage_samples": self.stage_samples,
                "stage_counts": dict(zip(self.names, self.stage_counts.tolist()))}

    def load_state_dict(self, state: dict) -> bool:
        """Restore the position; returns True when the weights differ from the saved ones, which
        starts a new mixture stage here (without it, a source whose weight rose would be owed
        every sample since step 0 and fill the next batches alone)."""
        def per_source(counts: dict) -> np.ndarray:
            return np.array([int(counts.get(s, 0)) for s in self.names], dtype=np.int64)
        self.samples = int(state["samples"])
        self.counts = per_source(state["counts"])
        saved = state.get("weights", dict(zip(self.names, self.weights.tolist())))
        new_stage = set(saved) != set(self.names) or any(abs(saved[s] - w) > 1e-9 for s, w in
                                                          zip(self.names, self.weights))
        if new_stage:
            self.stage_samples, self.stage_counts = self.samples, self.counts.copy()
        else:
            self.stage_samples = int(state.get("stage_samples", 0))
            self.stage_counts = per_source(state.get("stage_counts", {}))
        return new_stage


def main() -> None:
    p = argparse.ArgumentParser(description="Prepare the default corpus, or tokenize your own files into a source "
                                            "(resumable: rerun the same command after an interruption).")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="use the tokenizer in data_cache/vocab<V>/ (the run's model.vocab_size)")
    p.add_argument("--tokenizer", default="", help="a tokenizer file to use instead (data.tokenizer): this project's, "
                                                   "or a Hugging Face byte-level BPE tokenizer.json")
    p.add_argument("--dir", default=DataConfig.dir)
    p.add_argument("--source", help="name of a new source to make from --files (e.g. 'web')")
    p.add_argument("--files", nargs="*", default=[],
                   help="files, folders or globs of .txt/.md (one document each), .jsonl, .jsonl.gz, .jsonl.zst "
                        "(one per line) and .parquet (one per row, e.g. a FineWeb-Edu folder)")
    p.add_argument("--text-field", default="text", help="the JSON field or parquet column that holds the text")
    p.add_argument("--skip-bad", action="store_true",
                   help="count and skip bad lines, rows and files instead of stopping")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicates (same text up to case and whitespace)")
    p.add_argument("--workers", type=int, default=DataConfig.num_workers, help="tokenizing processes (0: one per core)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file (and resume point)")
    # the split recipe names the shard folder: it must match the training config's data.* values
    p.add_argument("--seed", type=int, default=DataConfig.seed, help="data.seed of the runs that will read it")
    p.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction, help="data.val_fraction")
    p.add_argument("--max-docs", type=int, default=DataConfig.max_docs, help="data.max_docs (0: all)")
    args = p.parse_args()
    try:
        cfg = DataConfig(dir=args.dir, seed=args.seed, val_fraction=args.val_fraction, max_docs=args.max_docs,
                         num_workers=args.workers, tokenizer=args.tokenizer)
        if args.shard_tokens < 1:
            raise ValueError(f"--shard-tokens must be positive, got {args.shard_tokens}")
        if not args.source:
            prepare_data(cfg, args.vocab_size)
            print(f"shards in {cfg.shard_dir(args.vocab_size)}")
            return
        if not args.files:
            raise ValueError("--source needs --files: the files, folders or globs to tokenize")
        tok_path = cfg.tokenizer_path(args.vocab_size)
        if not tok_path.is_file():
            raise FileNotFoundError(f"no tokenizer at {tok_path}: make one from your files first with `python "
                                    f"tokenizer.py --vocab-size {args.vocab_size} --files ... --out {tok_path}`, or "
                                    f"give a tokenizer.json with --tokenizer")
        files = expand_inputs(args.files)
        inputs = {"files": file_inputs(files), "text_field": args.text_field, "skip_bad": args.skip_bad}
        out = cfg.shard_dir(args.vocab_size)
        ingest(args.source, lambda start: read_records(files, args.text_field, args.skip_bad, start), inputs, out,
               tok_path, cfg, dedup=args.dedup, shard_tokens=args.shard_tokens)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit(130)
    vocab = (f"--data.tokenizer={tok_path} --model.vocab_size=..." if args.tokenizer
             else f"--model.vocab_size={args.vocab_size}")
    print(f"shards in {out}; train on them with --data.weights='{{ {args.source} = 1.0 }}' {vocab}"
          f"{f' --data.seed={args.seed}' if args.seed != DataConfig.seed else ''}"
          f"{f' --data.val_fraction={args.val_fraction:g}' if args.val_fraction != DataConfig.val_fraction else ''}")


if __name__ == "__main__":
    main()
