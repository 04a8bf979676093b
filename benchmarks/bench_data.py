"""Data ingestion at scale: a multi-GB corpus in every input format, from files to shards.

Generates --gb of text into a temporary folder laid out like a downloaded web corpus (parquet
files with FineWeb's columns, .jsonl.gz, .jsonl.zst, a folder of .txt/.md files), ingests it with
`python data.py --source bench --files FOLDER` in a child process, and reports the throughput
(MB/s of text, tokens/s), the peak resident memory of the whole process tree (reader + tokenizing
workers, sampled), and, on the same documents and cores in the same run, the throughput of raw
tiktoken `encode_ordinary_batch` with one thread and with one per core (text already in memory, no
reading, hashing or writing): the better of the two is the ceiling ingestion is measured against.
The issue's bars: peak RSS under 2 GiB on >= 3 GB, and ingestion at >= 80% of raw tiktoken.

Documents are the embedded corpus's (prose, code, math), each copy made unique by a first line
naming it, with 1% exact copies for --dedup to find; the tokenizer is trained on the embedded
sample unless --tokenizer gives one. Never part of the tests. Needs pyarrow and zstandard.

    python benchmarks/bench_data.py --gb 3 --out benchmarks/results/DATE_cpu_bench_data.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from corpus import corpus_documents, math_documents, tokenizer_training_text  # noqa: E402
from data import DataConfig, ingest_state  # noqa: E402
from tokenizer import load_tokenizer, save_tokenizer, train_bpe  # noqa: E402

FILE_BYTES = 128 * 1024 * 1024  # text per parquet/jsonl file (FineWeb's files hold ~1-2 GB)
SHARES = {"parquet": 0.4, "jsonl.gz": 0.3, "jsonl.zst": 0.2, "txt": 0.1}  # of the corpus's text


def documents(total_bytes: int) -> Iterator[str]:
    """The benchmark's documents, in a fixed order, until total_bytes of UTF-8: embedded documents
    cycled, each headed by its own number (so only the planted copies are duplicates), every
    hundredth followed by an exact copy of itself."""
    pool = corpus_documents("prose") + corpus_documents("code") + math_documents(10_000, seed=7)
    made = i = 0
    while made < total_bytes:
        doc = f"Document {i}\n" + pool[(i * 7919) % len(pool)]  # a prime stride mixes the domains
        for copy in (doc, doc) if i % 100 == 99 else (doc,):
            made += len(copy.encode("utf-8"))
            yield copy
        i += 1


def write_corpus(folder: Path, total_bytes: int) -> dict[str, int]:
    """Spread the documents over the formats by SHARES; returns files written per format."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    (folder / "pages").mkdir(parents=True)
    stream = documents(total_bytes)
    files = dict.fromkeys(SHARES, 0)

    def take(n_bytes: int) -> list[str]:
        out, size = [], 0
        for doc in stream:
            out.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= n_bytes:
                break
        return out

    for fmt, share in SHARES.items():
        left = int(total_bytes * share)
        while left > 0:
            docs = take(min(FILE_BYTES, left))
            if not docs:
                break
            left -= sum(len(d.encode("utf-8")) for d in docs)
            k = files[fmt]
            if fmt == "parquet":  # FineWeb's columns, rows in groups as the datasets library writes them
                table = pa.table({"text": docs, "id": [f"<urn:uuid:{k}-{i}>" for i in range(len(docs))],
                                  "dump": ["CC-MAIN-2024-10"] * len(docs), "url": ["https://example.org"] * len(docs),
                                  "language_score": [0.95] * len(docs), "token_count": [0] * len(docs)})
                pq.write_table(table, folder / f"train-{k:05d}.parquet", row_group_size=1000)
            elif fmt == "txt":
                for i, doc in enumerate(docs):
                    (folder / "pages" / f"{k:03d}-{i:06d}.{'md' if i % 2 else 'txt'}").write_text(doc, encoding="utf-8")
            else:
                lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode("utf-8")
                if fmt == "jsonl.gz":
                    (folder / f"crawl-{k:05d}.jsonl.gz").write_bytes(gzip.compress(lines, compresslevel=6))
                else:
                    (folder / f"crawl-{k:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
            files[fmt] += 1
    return files


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # the process ended while we looked
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo += children.get(p, [])
    return total


def raw_tiktoken(tokenizer_path: Path, total_bytes: int, threads: int) -> dict:
    """encode_ordinary_batch on the same documents, timed alone, 1,024 documents a call."""
    enc = load_tokenizer(tokenizer_path)
    seconds = n_bytes = n_tokens = 0
    batch: list[str] = []
    for doc in (*documents(total_bytes), None):
        if doc is not None:
            batch.append(doc)
            if len(batch) < 1024:
                continue
        if not batch:
            break
        t0 = time.perf_counter()
        ids = enc.encode_ordinary_batch(batch, num_threads=threads)
        seconds += time.perf_counter() - t0
        n_bytes += sum(len(d.encode("utf-8")) for d in batch)
        n_tokens += sum(map(len, ids))
        batch = []
    return {"threads": threads, "seconds": seconds, "mb_per_s": n_bytes / 1e6 / seconds,
            "tokens_per_s": n_tokens / seconds, "bytes": n_bytes, "tokens": n_tokens}


def run_ingestion(work: Path, corpus: Path, tokenizer_path: Path, workers: int, dedup: bool) -> dict:
    """data.py in a child process, its tree's memory sampled every 0.2 s."""
    cmd = [sys.executable, str(ROOT / "data.py"), "--dir", str(work / "data"), "--tokenizer", str(tokenizer_path),
           "--source", "bench", "--files", str(corpus), "--workers", str(workers)] + (["--dedup"] if dedup else [])
    peak, done = 0, threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"data.py failed ({proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}")
    cfg = DataConfig(dir=str(work / "data"), tokenizer=str(tokenizer_path))
    counts = ingest_state(cfg.shard_dir(0), "bench")["counts"]
    return {"workers": workers, "dedup": dedup, "seconds": seconds, "mb_per_s": counts["bytes"] / 1e6 / seconds,
            "tokens_per_s": counts["tokens"] / seconds, "peak_rss_bytes": peak,
            "counts": counts, "summary": out.strip().splitlines()[-2] if out.strip() else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=3.0, help="text to generate, in GB (10^9 bytes of UTF-8)")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--workers", type=int, default=0, help="data.py --workers (0: one per core)")
    p.add_argument("--dedup", action="store_true", help="ingest with --dedup")
    p.add_argument("--tokenizer", help="a tokenizer file (default: 8,192 ids trained on the embedded sample)")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpus and shards are written, then removed")
    args = p.parse_args()
    total = int(args.gb * 1e9)
    need = int(total * 1.3)  # compressed corpus (~0.7x) + uint16 shards (~0.5x) + margin
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        raise SystemExit(f"error: {args.tmp} has {free / 1e9:.1f} GB free, the benchmark needs ~{need / 1e9:.1f} GB; "
                         f"pass --tmp DIR or a smaller --gb")
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.tmp))
    try:
        tok = Path(args.tokenizer) if args.tokenizer else work / "tokenizer.json"
        if not args.tokenizer:
            save_tokenizer(train_bpe(tokenizer_training_text(), 8192, progress=False), tok)
        t0 = time.perf_counter()
        files = write_corpus(work / "corpus", total)
        generated = time.perf_counter() - t0
        on_disk = sum(f.stat().st_size for f in (work / "corpus").rglob("*") if f.is_file())
        print(f"generated {args.gb:g} GB of text in {generated:.0f} s: {files}, {on_disk / 1e9:.2f} GB on disk",
              flush=True)
        ingestion = run_ingestion(work, work / "corpus", tok, args.workers or cores, args.dedup)
        print(f"ingestion: {ingestion['mb_per_s']:.2f} MB/s, {ingestion['tokens_per_s']:,.0f} tokens/s, "
              f"peak RSS {ingestion['peak_rss_bytes'] / 2 ** 30:.2f} GiB ({ingestion['summary']})", flush=True)
        raw = []  # its thread pool is not always faster than one thread: the better one is the ceiling
        for threads in sorted({1, cores}):
            raw.append(raw_tiktoken(tok, total, threads))
            print(f"raw tiktoken encode_ordinary_batch ({threads} threads): {raw[-1]['mb_per_s']:.2f} MB/s, "
                  f"{raw[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
        n_ids = load_tokenizer(tok).n_vocab
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {cores} cores",
              "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
              "text_gb": args.gb, "files": files, "corpus_bytes_on_disk": on_disk, "tokenizer_ids": n_ids,
              "ingestion": ingestion, "raw_tiktoken": raw,
              "ingestion_vs_raw": ingestion["mb_per_s"] / max(r["mb_per_s"] for r in raw),
              "load_average_at_end": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"ingestion / best raw tiktoken = {result['ingestion_vs_raw']:.3f}; peak RSS "
          f"{ingestion['peak_rss_bytes'] / 2 ** 30:.2f} GiB -> {args.out}")


if __name__ == "__main__":
    main()
