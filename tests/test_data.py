import re
from pathlib import Path

import numpy as np
import pytest

import data
from data import (DataConfig, MixtureLoader, SourceWindows, math_documents, prepare_data, read_shard, shard_paths,
                  split_documents, tokenizer_fingerprint, window_doc_ids, write_shards)
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
    prose, code = data.corpus_documents("prose"), data.corpus_documents("code")
    assert len(prose) > 100 and sum(map(len, prose)) > 300_000
    assert len(code) > 300 and any("def " in d for d in code)
    # the standard library's tests (and installed packages) stay out of the code source
    for rel, excluded in (("test/test_json.py", True), ("idlelib/idle_test/x.py", True), ("unittest/test/a.py", True),
                          ("lib2to3/tests/t.py", True), ("site-packages/numpy/x.py", True), ("test_grammar.py", True),
                          ("json/decoder.py", False), ("unittest/case.py", False), ("contest.py", False)):
        assert data._is_test_path(rel) is excluded, rel
    import sysconfig
    import unittest.case
    texts = set(code)
    assert Path(unittest.case.__file__).read_text(encoding="utf-8") in texts
    stdlib_tests = sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").glob("test_*.py"))[:20]
    assert not any(p.read_text(encoding="utf-8", errors="replace") in texts for p in stdlib_tests)
    with pytest.raises(ValueError, match="unknown corpus source 'web'"):
        data.corpus_documents("web")


def test_empty_corpus_stops_with_a_clear_error(monkeypatch, tmp_path, small_data):
    monkeypatch.setitem(data.SOURCES, "math", lambda: [])
    cfg = DataConfig(dir=str(tmp_path), max_docs=5, weights={"math": 1.0})
    # reuse the session's tokenizer so that only the empty source is at stake
    (tmp_path / "vocab512").mkdir()
    (tmp_path / "vocab512" / "tokenizer.json").write_bytes(small_data[0].tokenizer_path(512).read_bytes())
    with pytest.raises(RuntimeError, match="corpus source 'math' is empty"):
        prepare_data(cfg, 512, log=lambda *a: None)


def test_split_holds_out_whole_documents():
    docs = [f"document number {i}" for i in range(200)]
    s = split_documents(docs, 0.1, seed=0, source="x")
    assert len(s["val"]) == 20 and len(s["train"]) == 180
    assert set(s["val"]).isdisjoint(s["train"]) and set(s["val"]) | set(s["train"]) == set(docs)
    assert s["val"] != docs[-20:]  # not a positional split
    assert split_documents(docs, 0.1, seed=0, source="x") == s


def test_shards_are_documents_joined_by_eos(small_data, tmp_path):
    cfg, enc = small_data
    docs = ["first document", "second one, with 123 digits", "third\n\nand last"]
    paths = write_shards(docs, cfg.tokenizer_path(enc.n_vocab), tmp_path / "mine_train", num_workers=1)
    tokens = read_shard(paths[0]).tolist()
    expected = []
    for d in docs:
        expected += enc.encode_ordinary(d) + [eot_id(enc)]
    assert tokens == expected
    assert read_shard(paths[0]).dtype == np.uint16  # 512-token vocabulary fits 16 bits
    assert not list(tmp_path.glob("*.tmp"))


def test_multiprocess_tokenizing_matches_single_process(small_data, tmp_path):
    cfg, enc = small_data
    docs = data.math_documents(300, seed=5)
    one = write_shards(docs, cfg.tokenizer_path(512), tmp_path / "a_train", num_workers=1)
    two = write_shards(docs, cfg.tokenizer_path(512), tmp_path / "b_train", num_workers=2)
    assert np.array_equal(read_shard(one[0]), read_shard(two[0]))


def test_truncated_and_stale_shards_are_refused(small_data, tmp_path):
    cfg, enc = small_data
    path = write_shards(["some text"] * 20, cfg.tokenizer_path(512), tmp_path / "t_train", num_workers=1)[0]
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


def test_a_source_needs_two_documents():
    with pytest.raises(ValueError, match="data source 'web' has 1 document"):
        split_documents(["only one"], 0.05, 0, "web")
    assert split_documents(["a", "b"], 0.9, 0, "web")["train"]  # validation never takes every document


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
    with pytest.raises(FileNotFoundError, match="python data.py --source web"):
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
