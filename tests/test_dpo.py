"""dpo.py: each loss equals its formula, log-probs count only the response, a step widens the
margin, on-policy pairs come from the model's own samples, and a short run learns the preference."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import dpo
import model as model_module
import posttrain
import sft
from checkpoint import load_model, save_checkpoint
from conftest import TEST_VOCAB
from model import ModelConfig, Transformer

BETA = 0.3


def save_start(model: Transformer, data_cfg, run_dir: Path) -> Path:
    """A run folder holding `model` as the post-training stages save theirs (checkpoint.load_model reads it)."""
    meta = {"step": 0, "config": {"model": dataclasses.asdict(model.cfg), "data": dataclasses.asdict(data_cfg)}}
    save_checkpoint(run_dir, 0, model, None, meta)
    return run_dir


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=TEST_VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   d_ff=128, max_seq_len=256))


def pad_id(enc) -> int:
    return enc.encode("<|endoftext|>", allowed_special="all")[0]


# ---- 1. the losses against their formulas, written out with math on floats -------------------

def _sig(x):
    return 1 / (1 + math.exp(-x))


def _hand(kind, pc, pr, rc, rr, nc, nr, beta):
    """The mean loss, element by element in plain Python."""
    if kind == "ipo":  # length-averaged log-probs
        pc, pr, rc, rr = [[v / n for v, n in zip(xs, ns)] for xs, ns in ((pc, nc), (pr, nr), (rc, nc), (rr, nr))]
    out = []
    z_c = beta * max(0.0, sum(a - b for a, b in zip(pr, rr)) / len(pr))
    z_r = beta * max(0.0, sum(a - b for a, b in zip(pc, rc)) / len(pc))
    for i in range(len(pc)):
        lc, lr = pc[i] - rc[i], pr[i] - rr[i]
        if kind == "dpo":
            out.append(-math.log(_sig(beta * (lc - lr))))
        elif kind == "ipo":
            out.append((lc - lr - 1 / (2 * beta)) ** 2)
        elif kind == "apo_zero":
            out.append((1 - _sig(beta * lc)) + _sig(beta * lr))
        elif kind == "apo_down":
            out.append(_sig(beta * lc) + (1 - _sig(beta * (lc - lr))))
        elif kind == "kto":
            out.append(((1 - _sig(beta * lc - z_c)) + (1 - _sig(z_r - beta * lr))) / 2)
        elif kind == "orpo":
            ac, ar = pc[i] / nc[i], pr[i] / nr[i]
            odds_c, odds_r = ac - math.log1p(-math.exp(ac)), ar - math.log1p(-math.exp(ar))
            out.append(-ac + beta * -math.log(_sig(odds_c - odds_r)))
    return sum(out) / len(out)


@pytest.mark.parametrize("kind", dpo.LOSSES)
def test_each_loss_equals_its_formula(kind):
    g = torch.Generator().manual_seed(1)
    n = 6
    counts_c = torch.randint(3, 20, (n,), generator=g).double()
    counts_r = torch.randint(3, 20, (n,), generator=g).double()
    pc, pr = -counts_c * (0.5 + torch.rand(n, generator=g, dtype=torch.float64)), \
        -counts_r * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))
    rc, rr = pc + torch.randn(n, generator=g, dtype=torch.float64), pr + torch.randn(n, generator=g, dtype=torch.float64)
    loss, metrics = dpo.preference_loss(kind, pc, pr, None if kind == "orpo" else rc, None if kind == "orpo" else rr,
                                        BETA, counts_c, counts_r)
    expected = _hand(kind, *(t.tolist() for t in (pc, pr, rc, rr, counts_c, counts_r)), BETA)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert metrics["margin"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"], abs=1e-9)
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("kind,value", [("dpo", math.log(2)), ("ipo", (1 / (2 * BETA)) ** 2), ("apo_zero", 1.0),
                                        ("apo_down", 1.0), ("kto", 0.5)])
def test_known_values_at_equal_log_ratios(kind, value):
    """Policy equal to the reference: every log-ratio is 0, so each loss takes a known constant."""
    x = torch.tensor([-3.0, -10.0, -7.5])
    y = torch.tensor([-4.0, -2.0, -9.0])
    loss, m = dpo.preference_loss(kind, x, y, x.clone(), y.clone(), BETA)
    assert loss.item() == pytest.approx(value, rel=1e-6)
    assert m["rewards/chosen"] == m["rewards/rejected"] == m["margin"] == m["accuracy"] == 0.0


def test_orpo_is_nll_when_odds_are_equal_plus_lambda_log2():
    avg = torch.tensor([-1.3, -0.4])
    loss, _ = dpo.preference_loss("orpo", avg, avg.clone(), None, None, 0.25)
    assert loss.item() == pytest.approx(1.3 / 2 + 0.4 / 2 + 0.25 * math.log(2), rel=1e-6)


def test_bad_loss_kind_and_beta_raise_clear_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown preference loss 'sigmoid'.*dpo, ipo, apo_zero, apo_down, kto, orpo"):
        dpo.preference_loss("sigmoid", x, x, x, x, 0.1)
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta must be > 0"):
            dpo.preference_loss("dpo", x, x, x, x, beta)
    with pytest.raises(ValueError, match="reference"):
        dpo.preference_loss("dpo", x, x, None, None, 0.1)
    with pytest.raises(ValueError, match="choose from"):  # checked before any model is loaded
        dpo.load_config(None, ["--run.init=/nonexistent", "--dpo.loss=simpo"])
    with pytest.raises(ValueError, match="beta"):
        dpo.load_config(None, ["--run.init=/nonexistent", "--dpo.beta=0.0"])


def test_cli_parses_into_the_config():
    cfg = dpo.load_config(None, ["--dpo.loss=ipo", "--dpo.beta=0.2", "--dpo.pairs=on_policy"])
    assert (cfg["dpo"].loss, cfg["dpo"].beta, cfg["dpo"].pairs, cfg["optim"].lr, cfg["dpo"].epochs) == \
        ("ipo", 0.2, "on_policy", 1e-4, 1.0)  # the rest from configs/dpo_tiny.toml


# ---- 2. response log-probabilities ------------------------------------------------------------

def test_off_policy_pairs_are_verified_right_and_wrong(small_data):
    _, enc = small_data
    examples = posttrain.make_examples(12, seed=3)
    for thinking in (True, False):
        for p in dpo.off_policy_pairs(enc, examples, thinking, seed=0):
            assert posttrain.check_answer(p.example, p.chosen) and not posttrain.check_answer(p.example, p.rejected)
            assert p.chosen.endswith("<|im_end|>") and ("<think>" in p.chosen) == thinking
            # the pair is the SFT template's assistant turn: prompt + chosen = the encoded conversation
            ids, mask = sft.encode_chat(enc, p.example.messages(), thinking)
            assert list(p.prompt_ids) + list(p.chosen_ids) == ids[:-1]  # sft's template ends in "\n"


def test_response_logps_is_the_per_token_sum_over_the_response_only(small_data):
    _, enc = small_data
    model = tiny_model().eval()
    pairs = dpo.off_policy_pairs(enc, posttrain.make_examples(3, seed=5), thinking=False)
    ids, targets = dpo.pair_batch(pairs, pad_id(enc))
    with torch.no_grad():
        sums, counts = dpo.response_logps(model, ids, targets)
        completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        prompts = [p.prompt_ids for p in pairs] * 2
        for r, (prompt, completion) in enumerate(zip(prompts, completions)):
            # brute force: each completion token scored from its own prefix, no batch, no padding
            seq, total = list(prompt), 0.0
            for tok in completion:
                logits = model(torch.tensor([seq]))[0, -1]
                total += torch.log_softmax(logits.double(), -1)[tok].item()
                seq.append(tok)
            assert sums[r].item() == pytest.approx(total, abs=1e-4)
            assert counts[r].item() == len(completion)
            assert (targets[r, :len(prompt) - 1] == -100).all()  # no prompt token carries a target
        # the right padding (after every real token) cannot change the result
        noisy = ids.clone()
        for r, (prompt, completion) in enumerate(zip(prompts, completions)):
            noisy[r, len(prompt) + len(completion):] = 7
        assert torch.equal(dpo.response_logps(model, noisy, targets)[0], sums)
    # a target set on a prompt position would be counted: the mask is what excludes the prompt
    more = targets.clone()
    more[0, 0] = ids[0, 1]
    with torch.no_grad():
        assert dpo.response_logps(model, ids, more)[1][0] == counts[0] + 1


def test_chunked_logps_equal_one_log_softmax_in_values_and_gradients(small_data, monkeypatch):
    """token_logps takes the float32 log-softmax a chunk of positions at a time, recomputed in
    backward: chunks that split rows (7 positions) give the same values and gradients as one
    log-softmax over everything."""
    _, enc = small_data
    pairs = dpo.off_policy_pairs(enc, posttrain.make_examples(3, seed=5), thinking=False)
    ids, targets = dpo.pair_batch(pairs, pad_id(enc))
    results = []
    for chunk in (7, 10 ** 9):
        monkeypatch.setattr(model_module, "LOGPROB_CHUNK_TOKENS", chunk)
        model = tiny_model()
        logps = dpo.token_logps(model, ids, targets, temperature=1.3)
        (logps * torch.linspace(-1, 1, logps.shape[1])).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (chunked, chunked_grads), (whole, whole_grads) = results
    assert ids.numel() > 7 * 3
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    for a, b in zip(chunked_grads, whole_grads):  # the head's gradient sums over chunks: another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_token_logps_never_forms_the_whole_logits_and_equals_them(small_data, monkeypatch):
    """token_logps works from the hidden states, a chunk of positions at a time: the same values
    and gradients as log_softmax of the model's whole (N, T, V) logits, and the head module that
    would form those logits is never called."""
    _, enc = small_data
    pairs = dpo.off_policy_pairs(enc, posttrain.make_examples(3, seed=5), thinking=False)
    ids, targets = dpo.pair_batch(pairs, pad_id(enc))
    reference, chunked = tiny_model(), tiny_model()
    logits = reference(ids)  # the whole logits, for the reference only
    want = torch.log_softmax(logits / 1.3, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want = torch.where(targets != -100, want, 0.0)
    monkeypatch.setattr(model_module, "LOGPROB_CHUNK_TOKENS", 7)
    monkeypatch.setattr(chunked.lm_head, "forward", lambda h: pytest.fail("token_logps formed the whole logits"))
    got = dpo.token_logps(chunked, ids, targets, temperature=1.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    weights = torch.linspace(-1, 1, got.shape[1])
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    for a, b in zip(chunked.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(small_data):
    _, enc = small_data
    policy = tiny_model()
    ref = copy.deepcopy(policy)
    pairs = dpo.off_policy_pairs(enc, posttrain.make_examples(4, seed=6), thinking=True)
    ids, targets = dpo.pair_batch(pairs, pad_id(enc))
    logps, _ = dpo.response_logps(policy, ids, targets)
    with torch.no_grad():
        ref_logps, _ = dpo.response_logps(ref, ids, targets)
    loss, m = dpo.preference_loss("dpo", logps[:4], logps[4:], ref_logps[:4], ref_logps[4:], 0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["rewards/chosen"] == 0.0 and m["rewards/rejected"] == 0.0 and m["margin"] == 0.0


def test_one_dpo_step_increases_the_margin(small_data):
    _, enc = small_data
    policy = tiny_model()
    ref = copy.deepcopy(policy).requires_grad_(False)
    pairs = dpo.off_policy_pairs(enc, posttrain.make_examples(6, seed=7), thinking=False)
    ids, targets = dpo.pair_batch(pairs, pad_id(enc))
    with torch.no_grad():
        ref_logps, _ = dpo.response_logps(ref, ids, targets)

    def loss_and_margin():
        logps, _ = dpo.response_logps(policy, ids, targets)
        loss, m = dpo.preference_loss("dpo", logps[:6], logps[6:], ref_logps[:6], ref_logps[6:], 0.1)
        return loss, m["margin"]

    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
    loss, margin = loss_and_margin()
    assert margin == 0.0
    loss.backward()
    optimizer.step()
    new_loss, new_margin = loss_and_margin()
    assert new_margin > 1e-4 and new_loss.item() < loss.item()


# ---- 3. on-policy pairs -------------------------------------------------------------------------

def scripted_generate(enc, scripted, sampled):
    """A stand-in for the project's sampler: for the i-th prompt it writes scripted[i] (one text
    per sample), each ending where the real sampler would, after its stop token."""
    def generate(model, prompts, max_new_tokens, *, k=1, stop_ids=(), **kw):
        out = []
        for _ in prompts:
            texts = scripted.pop(0)
            assert len(texts) == k
            sampled.append(texts)
            out += [enc.encode(t, allowed_special="all")[:max_new_tokens] for t in texts]
        return out
    return generate


def test_build_pairs_pairs_best_with_worst_and_skips_ties(small_data, monkeypatch):
    _, enc = small_data
    a, b, c = posttrain.make_examples(3, seed=8)
    end = "<|im_end|>"
    scripted = [
        ["12 13" + end, a.answer + end, "  " + a.answer + "  " + end, "no no no no" + end],  # mixed
        ["wrong" + end, "also wrong" + end, "x" + end, "y" + end],                           # all wrong
        [c.answer + end] * 4,                                                                 # all right
    ]
    sampled = []
    monkeypatch.setattr(dpo, "generate", scripted_generate(enc, scripted, sampled))
    pairs, counts = dpo.build_pairs(tiny_model(), enc, [a, b, c], k=4, temperature=1.0, max_new_tokens=32,
                                    thinking=False)
    assert counts == {"prompts": 3, "pairs": 1, "skipped": 2, "samples": 12, "correct": 6}
    (p,) = pairs
    assert p.example == a and p.chosen in sampled[0] and p.rejected in sampled[0]
    assert posttrain.check_answer(a, p.chosen) and not posttrain.check_answer(a, p.rejected)
    assert p.chosen == a.answer + end  # ties broken by length: the shorter correct answer
    assert p.rejected == "no no no no" + end  # and the longest wrong one
    assert list(p.chosen_ids) == enc.encode(p.chosen, allowed_special="all")
    assert list(p.prompt_ids) == dpo.prompt_ids(enc, a, thinking=False)


def test_build_pairs_uses_the_models_own_samples(small_data, monkeypatch):
    """A real model sampling; the verifier replaced by one it can pass (even-length completions)."""
    _, enc = small_data
    model = tiny_model()
    outputs = []
    real = dpo.generate

    def recording_generate(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append(out)
        return out

    monkeypatch.setattr(dpo, "generate", recording_generate)
    monkeypatch.setattr(dpo, "check_answer", lambda ex, text: len(text) % 2 == 0)
    examples = posttrain.make_examples(6, seed=9)
    pairs, counts = dpo.build_pairs(model, enc, examples, k=4, temperature=1.0, max_new_tokens=6, thinking=True,
                                    seed=1)
    assert counts["pairs"] == len(pairs) > 0 and counts["pairs"] + counts["skipped"] == 6
    (samples,) = outputs  # every question's k samples in one call of the sampler
    for p in pairs:
        mine = samples[4 * examples.index(p.example):4 * examples.index(p.example) + 4]
        assert list(p.chosen_ids) in mine and list(p.rejected_ids) in mine
        assert len(p.chosen) % 2 == 0 and len(p.rejected) % 2 == 1


# ---- 4. the training run --------------------------------------------------------------------------

@pytest.fixture
def sft_run(small_data, tmp_path):
    """A run folder checkpoint.load_model reads: an untrained tiny model saved as the stages save."""
    return save_start(tiny_model(), small_data[0], tmp_path / "tiny-sft")


@pytest.mark.parametrize("loss,device", [("dpo", "cpu"), ("apo_zero", "cpu"), ("orpo", "cpu"),
                                         pytest.param("apo_zero", "cuda", marks=pytest.mark.gpu)])
def test_preference_train_learns_the_preference(sft_run, tmp_path, loss, device):
    cfg = dpo.load_config(None, [f"--run.init={sft_run}", f"--run.out_dir={tmp_path}", f"--run.name=dpo-{loss}",
                                 f"--dpo.loss={loss}", "--dpo.pairs=off_policy", "--dpo.prompts=16",
                                 "--dpo.pairs_per_step=4", "--dpo.epochs=5", "--optim.lr=3e-3", "--optim.warmup_steps=2",
                                 "--dpo.eval_examples=1", "--run.eval_max_new_tokens=4", f"--run.device={device}"])
    report = dpo.preference_train(cfg, log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / f"dpo-{loss}" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == report["steps"] == 20
    first, last = rows[:4], rows[-4:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss")
    assert mean(last, "margin") > mean(first, "margin")
    assert report["accuracy_before"].keys() == report["accuracy_after"].keys() == {
        f"{t}/{m}" for t in posttrain.TASKS + ("format",) for m in ("think", "no_think")}
    # over all training pairs (not a noisy 4-pair batch), the saved model prefers the chosen
    # answers more than the start did, and on more pairs
    trained, enc, _ = load_model(str(tmp_path / f"dpo-{loss}"))
    start, _, _ = load_model(str(sft_run))
    held_out = posttrain.held_out_examples(1)
    questions = posttrain.make_examples(16, seed=0 + 2, exclude={e.question for e in held_out})
    pairs, _ = dpo.preference_pairs(cfg["dpo"], None, enc, questions, 0, log=lambda *a: None)
    ids, targets = dpo.pair_batch(pairs, pad_id=0)
    n = len(pairs)
    with torch.no_grad():
        gap_start = (lambda lp: lp[:n] - lp[n:])(dpo.response_logps(start, ids, targets)[0])
        gap_trained = (lambda lp: lp[:n] - lp[n:])(dpo.response_logps(trained, ids, targets)[0])
    assert gap_trained.mean() > gap_start.mean()
    assert (gap_trained > gap_start).float().mean() > 0.5


def test_missing_init_folder_says_to_run_sft_first(tmp_path):
    with pytest.raises(ValueError, match="python sft.py"):
        dpo.preference_train(dpo.load_config(None, [f"--run.init={tmp_path / 'no-such-run'}",
                                                    f"--run.out_dir={tmp_path}"]))
    assert not (tmp_path / "tiny-dpo").exists()
