"""rl.py: advantages, the overlong penalty, the surrogate loss and the k3 KL equal their formulas;
rollouts keep what the loss needs; GRPO raises a verifiable reward where shuffled advantages do
not; the overlong penalty stops a reward that pays for length from lengthening completions."""

import json
import math

import pytest
import torch

import posttrain
import rl
from checkpoint import load_model
from conftest import TEST_VOCAB
from model import ModelConfig, Transformer
from test_dpo import save_start

# ---- a toy verifiable task: prompt [BOS, d]; reward pays for the digit d in the completion ------

VOCAB, END, PAD, BOS = 16, 0, 15, 14
DIGITS = range(1, 9)


def toy_model(seed: int = 0, max_seq_len: int = 16) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                                   max_seq_len=max_seq_len))


def share_of_digit(completion: list[int], digit: int, max_new_tokens: int) -> float:
    """Verifiable and dense: how many of the allowed tokens are the named digit."""
    return sum(t == digit for t in completion) / max_new_tokens


def contains_digit(completion: list[int], digit: int, max_new_tokens: int) -> float:
    """Verifiable and length-hackable: 1 if the digit appears anywhere, so writing more tokens only
    raises the chance of success, as longer no-think answers do in the playbook."""
    return float(digit in completion)


def toy_grpo(reward_fn, steps: int = 30, seed: int = 0, shuffle_advantages: bool = False, overlong_buffer: int = 0,
             max_new_tokens: int = 6, prompts: int = 8, group_size: int = 8, lr: float = 3e-2,
             device: str = "cpu") -> list[dict]:
    """GRPO on the toy task with rl.py's pieces; per step the mean reward and completion length."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices are tiny: threads cost more than they give
    try:
        model = toy_model(seed).to(device)
        cfg = rl.RLConfig(group_size=group_size, max_new_tokens=max_new_tokens, overlong_buffer=overlong_buffer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        gen = torch.Generator(device).manual_seed(seed)
        history = []
        for _ in range(steps):
            digits = torch.randint(DIGITS.start, DIGITS.stop, (prompts,), generator=gen, device=device).tolist()
            rollouts = rl.sample_groups(model, [[BOS, d] for d in digits], group_size, cfg.temperature,
                                        max_new_tokens, END, PAD, gen)
            named = [d for d in digits for _ in range(group_size)]
            reward = torch.tensor([reward_fn(c, d, max_new_tokens) for c, d in zip(rollouts.completions, named)],
                                  device=device)
            if overlong_buffer:
                reward = reward + rl.overlong_penalty(rollouts.lengths, max_new_tokens, overlong_buffer)
            advantages = rl.group_advantages(reward, group_size)
            if shuffle_advantages:  # the control: the same updates, advantages unrelated to the reward
                advantages = advantages[torch.randperm(len(advantages), generator=gen, device=device)]
            rl.policy_update(model, optimizer, rollouts, advantages, cfg)
            history.append({"reward": reward.mean().item(), "length": rollouts.lengths.float().mean().item()})
        return history
    finally:
        torch.set_num_threads(threads)


def window_mean(history: list[dict], key: str, first: bool, n: int = 5) -> float:
    rows = history[:n] if first else history[-n:]
    return sum(r[key] for r in rows) / len(rows)


# ---- 1. group-relative advantages -----------------------------------------------------------------

def test_informative_groups_are_those_whose_rewards_differ():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.25])
    assert rl.informative(rewards, 3).tolist() == [False, True, False, True]
    assert (rl.group_advantages(rewards, 3).view(4, 3).abs().sum(1) > 0).tolist() == [False, True, False, True]


def test_advantages_have_mean_0_and_std_1_per_group_and_zero_for_equal_groups():
    g = torch.Generator().manual_seed(0)
    rewards = torch.cat([torch.rand(6, generator=g), torch.full((6,), 0.7), (torch.rand(6, generator=g) > 0.5).float(),
                         torch.tensor([1.0, 0, 0, 0, 0, 0])])
    adv = rl.group_advantages(rewards, 6).view(-1, 6)
    for i in (0, 2, 3):
        assert adv[i].mean().item() == pytest.approx(0.0, abs=1e-6)
        assert adv[i].std().item() == pytest.approx(1.0, rel=1e-3)  # std / (std + 1e-4)
    assert torch.equal(adv[1], torch.zeros(6))  # all equal: no signal, exactly zero
    plain = rl.group_advantages(rewards, 6, scale_by_std=False).view(-1, 6)
    assert torch.allclose(plain, rewards.view(-1, 6) - rewards.view(-1, 6).mean(1, keepdim=True), atol=1e-7)
    assert torch.equal(plain[1], torch.zeros(6))
    # 0.3 * 3 != 0.9 in floating point; the all-equal test must not leave a tiny residue to blow up
    assert torch.equal(rl.group_advantages(torch.full((3,), 0.3), 3), torch.zeros(3))


def test_advantages_equal_a_hand_computation():
    adv = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0]), 3, eps=0.0)
    # group [1, 0, 0]: mean 1/3, sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    # group [1, 2, 0]: mean 1, sample std 1
    assert adv.tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0, 1.0, -1.0], rel=1e-6)
    dr = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0]), 3, scale_by_std=False)
    assert dr.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0, 1.0, -1.0], rel=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        rl.group_advantages(torch.zeros(6), 4)


# ---- 2. DAPO's overlong penalty -----------------------------------------------------------------------

def test_overlong_penalty_follows_the_piecewise_formula_at_its_boundaries():
    # L_max 10, L_cache 4: free up to 6, a ramp from 0 to -1 over 7..10, -1 beyond
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 40])
    got = rl.overlong_penalty(lengths, max_length=10, buffer=4)
    assert got.tolist() == pytest.approx([0, 0, 0, -0.25, -0.5, -0.75, -1, -1, -1])
    assert rl.overlong_penalty(torch.tensor([0, 1, 2]), max_length=2, buffer=2).tolist() == [0, -0.5, -1]
    for buffer in (0, 11):
        with pytest.raises(ValueError, match=r"overlong buffer .* must be in \[1, max_length=10\]"):
            rl.overlong_penalty(lengths, 10, buffer)


# ---- 3. the clipped surrogate loss, its aggregation and the KL -------------------------------------

def _batch(ratios: list[list[float]], advantages: list[float]):
    """(logps as a leaf, old_logps, advantages, mask) for the given per-token ratios; None = padding."""
    g = torch.Generator().manual_seed(3)
    width = max(map(len, ratios))
    mask = torch.tensor([[j < len(r) and r[j] is not None for j in range(width)] for r in ratios])
    ratio = torch.tensor([[(r[j] if j < len(r) and r[j] is not None else 1.0) for j in range(width)] for r in ratios],
                         dtype=torch.float64)
    old = torch.where(mask, -torch.rand(mask.shape, generator=g, dtype=torch.float64) * 3, 0.0)
    logps = (old + ratio.log()).requires_grad_(True)
    return logps, old, torch.tensor(advantages, dtype=torch.float64), mask


def test_surrogate_loss_equals_a_hand_computation_with_clipping_on_both_sides():
    logps, old, adv, mask = _batch([[1.5, 0.5, 1.0], [1.5, 0.5, None]], [1.0, -2.0])
    # row 0, A = +1: 1.5 clipped to 1.28; 0.5 kept (min picks the unclipped 0.5 < 0.8); 1.0 kept
    # row 1, A = -2: 1.5 kept (-3 < -2.56); 0.5 clipped to 0.8 (-1.6 < -1)
    per_token = [[-1.28, -0.5, -1.0], [3.0, 1.6]]
    loss, metrics = rl.clipped_surrogate_loss(logps, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token")
    assert loss.item() == pytest.approx(sum(map(sum, per_token)) / 5, rel=1e-9)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    loss.backward()
    # a clipped token sends no gradient; the others d(-ratio A)/dlogp = -ratio A, over 5 tokens
    expected = torch.tensor([[0.0, -0.5 / 5, -1.0 / 5], [3.0 / 5, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logps.grad, expected, atol=1e-12)

    logps.grad = None
    loss, _ = rl.clipped_surrogate_loss(logps, old, adv, mask, 0.2, 0.28, aggregation="sequence")
    assert loss.item() == pytest.approx((sum(per_token[0]) / 3 + sum(per_token[1]) / 2) / 2, rel=1e-9)
    # symmetric clipping (eps_high = eps_low, PPO / GRPO) clips row 0's first token at 1.2
    loss, _ = rl.clipped_surrogate_loss(logps, old, adv, mask, 0.2, 0.2, aggregation="token")
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 3.0 + 1.6) / 5, rel=1e-9)
    with pytest.raises(ValueError, match="choose from token, sequence, constant"):
        rl.clipped_surrogate_loss(logps, old, adv, mask, aggregation="batch")
    with pytest.raises(ValueError, match="give max_length >= 1"):
        rl.clipped_surrogate_loss(logps, old, adv, mask, aggregation="constant")


def test_token_and_sequence_aggregation_weigh_tokens_as_their_formulas_say():
    # ratio 1 everywhere: each token of row i loses -A_i; rows of 1 and 3 tokens
    logps, old, adv, mask = _batch([[1.0, None, None], [1.0, 1.0, 1.0]], [2.0, -1.0])
    token, _ = rl.clipped_surrogate_loss(logps, old, adv, mask, aggregation="token")
    sequence, _ = rl.clipped_surrogate_loss(logps, old, adv, mask, aggregation="sequence")
    assert token.item() == pytest.approx((-2.0 * 1 + 1.0 * 3) / 4)  # every token weighs 1/4
    assert sequence.item() == pytest.approx((-2.0 + 1.0) / 2)     # every completion weighs 1/2
    constant, _ = rl.clipped_surrogate_loss(logps, old, adv, mask, aggregation="constant", max_length=5)
    assert constant.item() == pytest.approx((-2.0 * 1 + 1.0 * 3) / (2 * 5))  # Dr. GRPO: sum / (N x L_max)
    # with equal lengths the two agree
    logps, old, adv, mask = _batch([[1.3, 0.9], [0.7, 1.1]], [2.0, -1.0])
    token, _ = rl.clipped_surrogate_loss(logps, old, adv, mask, aggregation="token")
    sequence, _ = rl.clipped_surrogate_loss(logps, old, adv, mask, aggregation="sequence")
    assert token.item() == pytest.approx(sequence.item(), rel=1e-12)


@pytest.mark.parametrize("aggregation", rl.AGGREGATIONS)
def test_at_ratio_1_the_gradient_is_the_plain_policy_gradient(aggregation):
    model = toy_model(seed=1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (4, 10), generator=g)
    targets = torch.full_like(ids, -100)
    for row, (start, length) in enumerate([(2, 7), (2, 3), (4, 1), (3, 5)]):  # completions of unequal length
        targets[row, start:start + length] = ids[row, start + 1:start + 1 + length]
    mask, adv = targets != -100, torch.tensor([1.5, -0.5, 0.25, -1.25])

    def grads(loss_fn):
        model.zero_grad()
        loss_fn(model(ids, targets, logprobs=True)).backward()
        return [p.grad.clone() for p in model.parameters()]

    surrogate = grads(lambda lp: rl.clipped_surrogate_loss(lp, lp.detach(), adv, mask, aggregation=aggregation,
                                                           max_length=8)[0])
    weight = adv[:, None] * mask  # the plain policy gradient: -A * grad log pi, aggregated the same way
    if aggregation == "token":
        plain = grads(lambda lp: -(weight * lp).sum() / mask.sum())
    elif aggregation == "constant":
        plain = grads(lambda lp: -(weight * lp).sum() / (4 * 8))
    else:
        plain = grads(lambda lp: -((weight * lp).sum(1) / mask.sum(1)).mean())
    for a, b in zip(surrogate, plain):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert any(p.abs().max() > 0 for p in plain)


def test_k3_kl_is_zero_at_the_reference_positive_elsewhere_and_estimates_kl():
    logps = torch.log_softmax(torch.randn(50, generator=torch.Generator().manual_seed(4)), -1)
    assert torch.equal(rl.k3_kl(logps, logps.clone()), torch.zeros(50))
    other = logps + torch.linspace(-1, 1, 50)
    kl = rl.k3_kl(logps, other)
    assert (kl > 0).all() and torch.allclose(kl, torch.exp(other - logps) - (other - logps) - 1)
    # its mean over samples of pi is KL(pi || ref) (ref need not be normalised for k3's zero, but
    # is here so the expectation is the true KL)
    pi, ref = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0, 0.5]), -1), torch.log_softmax(torch.zeros(4), -1)
    samples = torch.multinomial(pi.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(5))
    estimate = rl.k3_kl(pi[samples], ref[samples]).mean().item()
    exact = (pi.exp() * (pi - ref)).sum().item()
    assert estimate == pytest.approx(exact, rel=0.03)
    # in the loss: beta * mean k3 over completion tokens, added to the surrogate
    lp, old, adv, mask = _batch([[1.0, 1.0], [1.0, None]], [0.0, 0.0])
    ref_lp = old - 0.5
    loss, m = rl.clipped_surrogate_loss(lp, old, adv, mask, ref_logps=ref_lp, kl_beta=0.1)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert loss.item() == pytest.approx(0.1 * k3) and m["kl"] == pytest.approx(k3)


# ---- 4. rollouts and rewards ------------------------------------------------------------------------

def test_sample_groups_keeps_ids_mask_and_lengths_of_each_group():
    model = toy_model(seed=2)
    prompts = [[BOS, 3], [BOS, 5, 6], [BOS, 2]]  # two prompt lengths: two generate() batches
    rollouts = rl.sample_groups(model, prompts, group_size=4, temperature=1.0, max_new_tokens=6, end_id=END,
                                pad_id=PAD, generator=torch.Generator().manual_seed(0))
    assert rollouts.ids.shape[0] == len(rollouts.completions) == 12 and rollouts.group_size == 4
    for k, completion in enumerate(rollouts.completions):
        prompt = prompts[k // 4]
        n = len(completion)
        assert 1 <= n <= 6 and rollouts.lengths[k] == n
        assert rollouts.truncated[k] == (END not in completion)
        assert END not in completion[:-1]  # it stops at the first <|im_end|>, keeping it
        assert rollouts.ids[k, :len(prompt)].tolist() == prompt
        assert rollouts.ids[k, len(prompt):len(prompt) + n].tolist() == completion
        assert (rollouts.ids[k, len(prompt) + n:] == PAD).all()
        # the mask marks the positions whose target is a completion token, and only those
        assert rollouts.mask[k].sum() == n and rollouts.targets[k][rollouts.mask[k]].tolist() == completion
    assert rollouts.truncated.any() and not rollouts.truncated.all()  # this seed shows both kinds


def test_token_logps_score_the_completion_at_the_sampling_temperature():
    model = toy_model(seed=3).eval()
    rollouts = rl.sample_groups(model, [[BOS, 4]], 3, 1.5, 5, END, PAD, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logps = model(rollouts.ids, rollouts.targets, logprobs=True, temperature=1.5)
        for k, completion in enumerate(rollouts.completions):
            seq, expected = [BOS, 4], []
            for tok in completion:  # token by token from its own prefix, no batch, no padding
                expected.append(torch.log_softmax(model(torch.tensor([seq]))[0, -1].double() / 1.5, -1)[tok].item())
                seq.append(tok)
            assert logps[k][rollouts.mask[k]].tolist() == pytest.approx(expected, abs=1e-5)
            assert (logps[k][~rollouts.mask[k]] == 0).all()


def test_task_rewards_verify_answers_and_optionally_the_format():
    a, b = posttrain.make_examples(2, seed=11)
    texts = [a.answer + "<|im_end|>", "<think>\nsteps\n</think>\n" + b.answer + "<|im_end|>", "nope<|im_end|>"]
    reward, correct = rl.task_rewards([a, b, b], texts, thinking=True)
    assert correct.tolist() == reward.tolist() == [1.0, 1.0, 0.0]
    reward, _ = rl.task_rewards([a, b, b], texts, thinking=True, kind="exact", format_weight=0.5)
    assert reward.tolist() == [1.0, 1.5, 0.0]  # only the second opens with a think block
    reward, _ = rl.task_rewards([a, b, b], texts, thinking=False, kind="exact", format_weight=0.5)
    assert reward.tolist() == [1.5, 1.0, 0.5]  # no-think: no think block of its own
    with pytest.raises(ValueError, match="choose from exact, partial"):
        rl.task_rewards([a], texts[:1], thinking=False, kind="fuzzy")


def test_partial_credit_counts_answer_words_in_place_and_is_1_only_when_exact():
    ex = posttrain.Example("sort", "Sort ascending: 84 7 51 20", "", "7 20 51 84")
    cases = {"7 20 51 84<|im_end|>": 1.0, "<think>\nx\n</think>\n7  20 51 84": 1.0, "7 20 84 51<|im_end|>": 2 / 4,
             "7 20 51 84 99<|im_end|>": 4 / 5, "20 51 84<|im_end|>": 0.0, "7<|im_end|> 20 51 84": 1 / 4,
             "<|im_end|>": 0.0}
    for text, credit in cases.items():
        assert rl.partial_credit(ex, text) == pytest.approx(credit), text
        assert (rl.partial_credit(ex, text) == 1.0) == posttrain.check_answer(ex, text)
    reward, correct = rl.task_rewards([ex] * 2, ["7 20 84 51<|im_end|>", "7 20 51 84<|im_end|>"], False, "partial")
    assert reward.tolist() == [0.5, 1.0] and correct.tolist() == [0.0, 1.0]


# ---- 5. the proof: GRPO raises a verifiable reward; the overlong penalty holds length down -----------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grpo_raises_a_verifiable_reward_and_shuffled_advantages_do_not(device):
    trained = toy_grpo(share_of_digit, device=device)
    control = toy_grpo(share_of_digit, shuffle_advantages=True, device=device)
    # a random 16-token policy names the digit 1/16 of the time (reward ~0.06)
    assert window_mean(trained, "reward", first=True) < 0.2
    assert window_mean(trained, "reward", first=False) > window_mean(trained, "reward", first=True) + 0.25
    assert window_mean(control, "reward", first=False) < window_mean(control, "reward", first=True) + 0.05
    assert window_mean(trained, "reward", first=False) > window_mean(control, "reward", first=False) + 0.3


def test_overlong_penalty_stops_length_hacking():
    # "contains the digit" pays more often the longer the completion: without the penalty the
    # policy learns to use all 6 tokens; with L_max 6, L_cache 4 (free up to 2 tokens) it shortens
    free = toy_grpo(contains_digit)
    penalised = toy_grpo(contains_digit, overlong_buffer=4)
    assert window_mean(free, "length", first=False) > window_mean(free, "length", first=True)
    assert window_mean(free, "length", first=False) > 5.5
    assert window_mean(penalised, "length", first=False) < window_mean(penalised, "length", first=True) - 1.0
    assert window_mean(penalised, "length", first=False) < 3.0


def test_overlong_filtering_trains_as_if_the_truncated_completions_were_not_there():
    model = toy_model(seed=3)
    rollouts = rl.sample_groups(model, [[BOS, 1], [BOS, 2]], 4, 1.0, 12, END, PAD, torch.Generator().manual_seed(5))
    truncated = rollouts.truncated
    assert 0 < truncated.sum() < len(truncated)  # some completions hit the limit, some ended
    advantages = torch.linspace(-1.0, 1.0, 8)
    kept = ~truncated
    without = rl.Rollouts(rollouts.ids[kept], rollouts.targets[kept], [c for c, k in zip(rollouts.completions, kept) if k],
                          rollouts.lengths[kept], truncated[kept], rollouts.group_size)

    def updated(batch, adv, overlong_filter):
        m = toy_model(seed=3)
        rl.policy_update(m, torch.optim.SGD(m.parameters(), lr=0.1), batch, adv,
                         rl.RLConfig(overlong_filter=overlong_filter, updates_per_batch=1), grad_clip=0.0)
        return [p.detach() for p in m.parameters()]

    filtered, reference, unfiltered = (updated(rollouts, advantages, True), updated(without, advantages[kept], False),
                                       updated(rollouts, advantages, False))
    for a, b in zip(filtered, reference):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(filtered, unfiltered))


def test_policy_update_skips_a_batch_with_nothing_to_learn():
    model = toy_model()
    before = [p.clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    rollouts = rl.sample_groups(model, [[BOS, 1]], 4, 1.0, 3, END, PAD, torch.Generator().manual_seed(0))
    metrics = rl.policy_update(model, optimizer, rollouts, torch.zeros(4), rl.RLConfig())
    assert metrics["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- 6. the run: config checks, CLI, and a short run from an sft.py-style folder ----------------------

@pytest.mark.parametrize("override,message", [
    ("rl.tasks='add,mul'", "rl.tasks='add,mul'"), ("rl.reward='fuzzy'", "rl.reward='fuzzy'"),
    ("rl.mode='both'", "rl.mode='both'"),
    ("rl.aggregation='batch'", "rl.aggregation='batch'"), ("rl.group_size=1", "rl.group_size=1 must be >= 2"),
    ("rl.overlong_buffer=40", r"rl.overlong_buffer=40 must be in \[0, rl.max_new_tokens=32\]"),
    ("rl.eps_low=1.0", "rl.eps_low=1.0 must be in"), ("optim.lr=0.0", "lr > 0"),
    ("rl.steps=0", "rl.steps=0 must be >= 1"), ("rl.kl_beta=-1.0", "rl.kl_beta"),
    ("rl.verifier='regex'", "rl.verifier='regex': choose from string, number, choice"),
])
def test_bad_config_values_name_the_setting(override, message):
    with pytest.raises(ValueError, match=message):  # before any model is loaded
        rl.load_config(None, ["--run.init=/nonexistent", f"--{override}"])


def test_cli_parses_into_the_config():
    cfg = rl.load_config(None, ["--rl.group_size=4", "--rl.scale_by_std=false", "--rl.aggregation=sequence",
                                "--rl.kl_beta=0.04"])
    assert (cfg["rl"].group_size, cfg["rl"].scale_by_std, cfg["rl"].aggregation, cfg["rl"].kl_beta,
            cfg["run"].init) == (4, False, "sequence", 0.04, "runs/tiny-sft")


def test_missing_init_folder_says_to_run_sft_first(tmp_path):
    with pytest.raises(ValueError, match="python sft.py"):
        rl.rl_train(rl.load_config(None, [f"--run.init={tmp_path / 'no-such-run'}", f"--run.out_dir={tmp_path}"]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rl_train_runs_from_an_sft_folder_and_reports(small_data, tmp_path, device):
    data_cfg, _ = small_data
    torch.manual_seed(0)
    start = Transformer(ModelConfig(vocab_size=TEST_VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    d_ff=128, max_seq_len=256))
    save_start(start, data_cfg, tmp_path / "tiny-sft")
    cfg = rl.load_config(None, [f"--run.init={tmp_path / 'tiny-sft'}", f"--run.out_dir={tmp_path}", "--rl.prompts=4",
                                "--rl.prompts_per_step=2", "--rl.group_size=3", "--rl.steps=2", "--rl.max_new_tokens=8",
                                "--rl.overlong_buffer=4", "--rl.kl_beta=0.1", "--rl.eval_examples=1",
                                "--run.eval_max_new_tokens=4", f"--run.device={device}"])
    report = rl.rl_train(cfg, log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "tiny-rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"reward", "accuracy", "length", "overlong", "truncated", "flat_groups", "loss", "kl"} <= r.keys()
        assert 1 <= r["length"] <= 8 and 0 <= r["overlong"] <= 1
    assert report["accuracy_before"].keys() == report["accuracy_after"].keys() == {
        f"{t}/{m}" for t in posttrain.TASKS + ("format",) for m in ("think", "no_think")}
    assert "reward" in rl.format_report(report)
    trained, _, _ = load_model(str(tmp_path / "tiny-rl"))  # the checkpoint reads back
    assert trained.cfg == start.cfg


def test_dynamic_sampling_trains_only_on_informative_groups(small_data, tmp_path, monkeypatch):
    """DAPO's dynamic sampling: with a reward that pays 1 for a completion whose first token id is a
    multiple of 5 (about 1 in 5 for an untrained model), groups of 3 are often flat. Without dynamic
    sampling the updates see flat groups; with it every group in every update has differing rewards,
    each update has prompts_per_step of them, and the extra prompts come from further rounds."""
    data_cfg, _ = small_data
    torch.manual_seed(0)
    start = Transformer(ModelConfig(vocab_size=TEST_VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    d_ff=128, max_seq_len=256))
    save_start(start, data_cfg, tmp_path / "tiny-sft")

    def pays(completions: list[list[int]]) -> torch.Tensor:
        return torch.tensor([float(bool(c) and c[0] % 5 == 0) for c in completions])
    monkeypatch.setattr(rl, "score", lambda rollouts, examples, enc, cfg: (pays(rollouts.completions),) * 2)
    trained_on = []
    real_update = rl.policy_update
    monkeypatch.setattr(rl, "policy_update", lambda model, opt, rollouts, adv, cfg, *rest: (
        trained_on.append(rollouts.completions), real_update(model, opt, rollouts, adv, cfg, *rest))[1])
    flat_groups = {}
    for rounds in (0, 4):
        trained_on.clear()
        cfg = rl.load_config(None, [f"--run.init={tmp_path / 'tiny-sft'}", f"--run.out_dir={tmp_path}",
                                    f"--run.name=dyn{rounds}", "--rl.prompts=40", "--rl.prompts_per_step=4",
                                    "--rl.group_size=3", "--rl.steps=3", "--rl.max_new_tokens=4", "--rl.overlong_buffer=0",
                                    f"--rl.dynamic_sampling={rounds}", "--rl.eval_examples=1",
                                    "--run.eval_max_new_tokens=2", "--run.device=cpu"])
        rl.rl_train(cfg, log=lambda *a: None)
        rows = [json.loads(line) for line in (tmp_path / f"dyn{rounds}" / "metrics.jsonl").read_text().splitlines()]
        assert len(trained_on) == 3 and all(len(c) == 4 * 3 for c in trained_on)
        flat_groups[rounds] = sum(int((~rl.informative(pays(c), 3)).sum()) for c in trained_on)
        if rounds:
            assert [r["kept_groups"] for r in rows] == [4, 4, 4] and any(r["rounds"] > 1 for r in rows)
    assert flat_groups[0] > 0 and flat_groups[4] == 0
