"""Data: the embedded corpus, token shards, and a resumable, pre-shuffled, mixed loader.

The story this file tells, in the playbook's order:

1. The text: the embedded corpus (corpus.py: Python's own documentation, the standard library's
   code, generated arithmetic; no download, ever) or your own files, and a tokenizer trained on
   it (tokenizer.py) unless one is given.
2. Tokenizing to shards: each source becomes a flat stream of token ids with EOS after every
   document, written as a memmap-able binary with a small header (so a truncated file is caught).
   Documents are split into train and validation by a seeded permutation, never by position.
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

import hashlib
import multiprocessing as mp
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from corpus import DEFAULT_WEIGHTS, SOURCES, corpus_documents, read_documents, tokenizer_training_text
from tokenizer import eot_id, load_tokenizer, save_tokenizer, train_bpe

# --------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    dir: str = "data_cache"        # tokenizer file and token shards live here, one folder per vocab
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    val_fraction: float = 0.05     # share of each source's documents held out, chosen by seed
    seed: int = 1337               # document split, window order and mixture all derive from it
    num_workers: int = 0           # tokenizing processes; 0 = one per CPU core (at most 8)
    tokenizer_train_bytes: int = 0  # 0 = tokenizer.py's default sample size
    max_docs: int = 0              # use at most this many documents per source (0: all); for smoke tests
    # Later mixture stages in one run (SmolLM3: three, the last an annealing on higher-quality data):
    # stage k + 1 draws with stage_weights[k] from stage_starts[k] (a fraction of the run) on;
    # data.weights is the first stage, and the validation mixture throughout.
    stage_starts: tuple[float, ...] = ()
    stage_weights: tuple[dict[str, float], ...] = ()

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
        return Path(self.dir) / f"vocab{vocab_size}" / "tokenizer.json"

    def shard_dir(self, vocab_size: int) -> Path:
        """Shards depend on the tokenizer and on which documents went where: both are in the name."""
        recipe = f"seed{self.seed}-val{self.val_fraction:g}" + (f"-max{self.max_docs}" if self.max_docs else "")
        return Path(self.dir) / f"vocab{vocab_size}" / recipe

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
SHARD_TOKENS = 256 * 1024 * 1024  # tokens per shard file before a new one is started


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while ids fit in 16 bits (half the disk and page cache of uint32), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(path: str | os.PathLike) -> int:
    """63 bits of the tokenizer file's hash, stored in every shard so stale shards are caught."""
    return int.from_bytes(hashlib.sha256(Path(path).read_bytes()).digest()[:8], "little") >> 1


def split_documents(docs: list[str], val_fraction: float, seed: int, source: str) -> dict[str, list[str]]:
    """Hold out whole documents (never a prefix of the corpus) as validation, chosen by seed."""
    if len(docs) < 2:
        raise ValueError(f"data source {source!r} has {len(docs)} document(s); it needs at least 2 (whole documents "
                         f"are held out for validation): give it more files, or split a long text into several")
    order = np.random.default_rng([seed, _stable_hash(source)]).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val = set(order[:n_val].tolist())
    return {"train": [d for i, d in enumerate(docs) if i not in val],
            "val": [d for i, d in enumerate(docs) if i in val]}


def limit_documents(docs: list[str], cfg: DataConfig, source: str) -> list[str]:
    """At most cfg.max_docs documents of a source (a seeded choice, kept in corpus order)."""
    if not cfg.max_docs:
        return docs
    keep = np.random.default_rng([cfg.seed, _stable_hash(source)]).permutation(len(docs))[:cfg.max_docs]
    return [docs[i] for i in sorted(keep)]


def _stable_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


_worker_enc = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_enc
    _worker_enc = load_tokenizer(tokenizer_path)


def _encode_chunk(docs: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.uint32) for ids in _worker_enc.encode_ordinary_batch(docs, num_threads=1)]


def write_shards(docs: list[str], tokenizer_path: str | os.PathLike, out_prefix: str | os.PathLike,
                 num_workers: int = 0, desc: str = "tokenizing") -> list[Path]:
    """Tokenize docs with several processes and write `<out_prefix>_000.bin`, ... with EOS after
    every document. Each file is written under a temporary name and renamed when complete."""
    enc = load_tokenizer(tokenizer_path)
    eot, dtype, fingerprint = eot_id(enc), token_dtype(enc.n_vocab), tokenizer_fingerprint(tokenizer_path)
    workers = num_workers or min(8, os.cpu_count() or 1)
    chunks = [docs[i:i + 64] for i in range(0, len(docs), 64)]
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_prefix.parent.glob(out_prefix.name + "_*.bin"):
        stale.unlink()
    paths: list[Path] = []
    buffer: list[np.ndarray] = []
    buffered = n_docs = 0

    def flush():
        nonlocal buffer, buffered, n_docs
        path = out_prefix.parent / f"{out_prefix.name}_{len(paths):03d}.bin"
        tokens = np.concatenate(buffer).astype(dtype)
        header = np.array([SHARD_MAGIC, SHARD_VERSION, dtype.itemsize, len(tokens), n_docs, fingerprint, 0, 0],
                          dtype=np.int64)
        tmp = path.with_suffix(".bin.tmp")
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.tobytes())
        os.replace(tmp, path)
        paths.append(path)
        buffer, buffered, n_docs = [], 0, 0

    def consume(results):
        nonlocal buffered, n_docs
        for ids in results:
            buffer.append(np.append(ids, eot))
            buffered += len(ids) + 1
            n_docs += 1
            if buffered >= SHARD_TOKENS:
                flush()

    bar = tqdm(total=len(docs), desc=desc, unit="doc", leave=False)
    if workers > 1 and len(chunks) > 1:
        with mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_path),)) as pool:
            for results in pool.imap(_encode_chunk, chunks):  # imap keeps document order
                consume(results)
                bar.update(len(results))
    else:
        for chunk in chunks:
            consume([np.asarray(enc.encode_ordinary(d), dtype=np.uint32) for d in chunk])
            bar.update(len(chunk))
    bar.close()
    if buffer:
        flush()
    return paths


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
    """Train the tokenizer and tokenize every embedded source whose shards are missing.

    Returns the tokenizer. Sources that are not embedded must already have shards in
    cfg.shard_dir(vocab_size) (see `python data.py --help` to make them from your own files)."""
    tok_path = cfg.tokenizer_path(vocab_size)
    if not tok_path.exists():
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
    if enc.n_vocab != vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {enc.n_vocab} tokens but model.vocab_size={vocab_size}")
    out = cfg.shard_dir(vocab_size)
    for source in cfg.sources():
        if shard_paths(out, source, "train") and shard_paths(out, source, "val"):
            continue
        if source not in SOURCES:
            raise FileNotFoundError(
                f"no shards for data source {source!r} in {out} (expected {source}_train_000.bin and "
                f"{source}_val_000.bin); make them with `python data.py --source {source} --files ... "
                f"--vocab-size {vocab_size} --seed {cfg.seed} --val-fraction {cfg.val_fraction:g}"
                f"{f' --max-docs {cfg.max_docs}' if cfg.max_docs else ''}` (shards are kept per split recipe) "
                f"or use only the embedded sources {sorted(SOURCES)}")
        splits = split_documents(limit_documents(corpus_documents(source), cfg, source), cfg.val_fraction,
                                 cfg.seed, source)
        for split, docs in splits.items():
            write_shards(docs, tok_path, out / f"{source}_{split}", cfg.num_workers, f"{source}/{split}")
        log(f"tokenized {source}: {len(splits['train'])} train / {len(splits['val'])} val documents")
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
    import argparse
    p = argparse.ArgumentParser(description="Prepare the default corpus, or tokenize your own files into a source.")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--dir", default=DataConfig.dir)
    p.add_argument("--source", help="name of a new source to make from --files (e.g. 'web')")
    p.add_argument("--files", nargs="*", default=[],
                   help="text files (one document each) or .jsonl files (one document per line, field 'text')")
    # the split recipe names the shard folder: it must match the training config's data.* values
    p.add_argument("--seed", type=int, default=DataConfig.seed, help="data.seed of the runs that will read it")
    p.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction, help="data.val_fraction")
    p.add_argument("--max-docs", type=int, default=DataConfig.max_docs, help="data.max_docs (0: all)")
    args = p.parse_args()
    try:
        cfg = DataConfig(dir=args.dir, seed=args.seed, val_fraction=args.val_fraction, max_docs=args.max_docs)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        enc = prepare_data(cfg, args.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if args.source:
        if not args.files:
            raise SystemExit("--source needs --files: the text or .jsonl files to tokenize")
        try:
            docs = read_documents(args.files)
            splits = split_documents(limit_documents(docs, cfg, args.source), cfg.val_fraction, cfg.seed,
                                     args.source)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        for split, part in splits.items():
            write_shards(part, cfg.tokenizer_path(args.vocab_size), cfg.shard_dir(args.vocab_size) / f"{args.source}_{split}")
    for path in sorted(cfg.shard_dir(args.vocab_size).glob("*.bin")):
        print(f"{path}: {len(read_shard(path)):,} tokens")
    del enc


if __name__ == "__main__":
    main()
