"""Reinforcement learning with verifiable rewards: GRPO on the model's own samples, with DAPO's fixes.

    python sft.py                                   # runs/tiny -> runs/tiny-sft (the starting point)
    python rl.py                                    # configs/grpo_tiny.toml: runs/tiny-sft -> runs/tiny-rl
    python rl.py --rl.tasks=add,sort,reverse --rl.reward=exact --run.name=tiny-rl-exact   # the strict verifier
    python rl.py --rl.overlong_buffer=0 --run.name=tiny-rl-no-penalty    # without DAPO's length penalty
    python rl.py --rl.dynamic_sampling=2 --run.name=tiny-rl-dyn          # DAPO: resample groups with no signal
    python rl.py --rl.scale_by_std=false --rl.aggregation=constant       # Dr. GRPO: unscaled advantages
    python rl.py --rl.kl_beta=0.04 --run.name=tiny-rl-kl                 # with a KL penalty to the start model
    python rl.py --config configs/grpo_smollm2.toml                      # SmolLM2-135M-Instruct, arithmetic

The story, top to bottom (the playbook's RL section; SmolLM3 ran GRPO with verifiable rewards):
1. Rollouts: G completions per prompt, sampled from the policy itself (generate.py), kept as token
   ids with the mask of completion tokens and their lengths.
2. Verifiable rewards: no reward model, a program checks the answer (posttrain's verifiers):
   exactly, or with partial credit for answer words in place, optionally plus the format.
3. Group-relative advantages (GRPO, Shao et al. 2024, arXiv 2402.03300): each completion is
   scored against the other completions of its own prompt, so no value network is needed.
4. DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476): a reward that falls
   linearly over the last L_cache tokens before the length limit. The playbook's reason: in
   no-think mode RL lengthens answers (length hacking) unless length is penalised.
5. The loss: PPO's clipped surrogate against the log-probs of the policy that sampled, DAPO's
   clip-higher (eps_high > eps_low) and token-level averaging (or Dr. GRPO's fixed normaliser),
   optional k3 KL to the start model; DAPO's dynamic sampling (train only on groups whose rewards
   differ, drawing more prompts to fill the batch) and overlong filtering, both optional.
6. The run and its report: reward, accuracy, completion length and overlong share per step;
   before and after, the same numbers on held-out questions (greedy, with 95% intervals), and
   accuracy per task and mode (RL in one mode can cost the other: the playbook's "split brain").
   Under torchrun each process samples its share of the prompts (a group stays on one process),
   and the loss is normalised over every process's tokens.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch

from checkpoint import Diverged
from config import ConfigError, load_config as read_config, parse_cli
from distributed import all_reduce_mean
from generate import generate
from optim import OptimConfig
from posttrain import (MODES, TASKS, VERIFIERS, Example, PostTrainRun, RunConfig, accuracy, accuracy_table, check_answer,
                       diverged, follows_mode, global_mean_scale, held_out_examples, interval95, load_prompts,
                       make_examples, mean_of, micro_slices, prompt_ids, run_stage, strip_think)
from sft import make_rows
from tokenizer import eot_id, special_id

# --------------------------------------------------------------------------------------------
# 1. Rollouts: a group of sampled completions per prompt
# --------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """G sampled completions for each of P prompts; rows p*G .. p*G + G - 1 belong to prompt p.

    ids (N, T): prompt + completion, right-padded. targets (N, T): the next token where that token
    is a completion token, else -100 (sft.make_rows' layout, so mask = targets != -100 marks the
    positions whose prediction is a completion token). completions: the sampled ids, <|im_end|>
    included where the model wrote it; lengths (N,) their token counts; truncated (N,) True where
    the model never wrote <|im_end|> within the limit."""
    ids: torch.Tensor
    targets: torch.Tensor
    completions: list[list[int]]
    lengths: torch.Tensor
    truncated: torch.Tensor
    group_size: int

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != -100


def sample_groups(model: torch.nn.Module, prompts: list[list[int]], group_size: int, temperature: float,
                  max_new_tokens: int, end_id: int, pad_id: int, generator: torch.Generator | None = None,
                  max_rows: int = 256) -> Rollouts:
    """group_size completions of every prompt (generate.generate), each stopping at end_id
    (<|im_end|>) or after max_new_tokens, laid out as Rollouts."""
    completions = generate(model, prompts, max_new_tokens, k=group_size, temperature=temperature, stop_ids=[end_id],
                           generator=generator, max_rows=max_rows)
    return rollouts_from(prompts, completions, group_size, end_id, pad_id, next(model.parameters()).device)


def rollouts_from(prompts: list[list[int]], completions: list[list[int]], group_size: int, end_id: int,
                  pad_id: int, device: torch.device) -> Rollouts:
    """Rollouts of given completions (row p * group_size + j: prompt p's j-th)."""
    conversations = [(prompts[k // group_size] + c, [False] * len(prompts[k // group_size]) + [True] * len(c))
                     for k, c in enumerate(completions)]
    ids, targets, _ = make_rows(conversations, max(len(c) for c, _ in conversations), packing=False, pad_id=pad_id)
    return Rollouts(ids=ids.to(device), targets=targets.to(device), completions=completions,
                    lengths=torch.tensor([len(c) for c in completions], device=device),
                    truncated=torch.tensor([end_id not in c for c in completions], device=device),
                    group_size=group_size)


# --------------------------------------------------------------------------------------------
# 2. Verifiable rewards
# --------------------------------------------------------------------------------------------


REWARDS = ("exact", "partial")


def partial_credit(example: Example, completion: str) -> float:
    """A denser verifiable reward: the share of the expected answer's words (numbers) that the
    answer part of the completion has in the right position, over the longer of the two. 1 exactly
    when posttrain.check_answer accepts it (string answers); a one-word answer (a sum) scores 0 or 1. For a model that is
    rarely right, exact match gives almost every group the same reward and so no advantage."""
    got = strip_think(completion).split()
    want = example.answer.split()
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def task_rewards(examples: list[Example], texts: list[str], thinking: bool | None, kind: str = "exact",
                 format_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward, correct) per completion: 1 when the verifier accepts the answer (posttrain.check_answer),
    or with kind "partial" the share of answer words in place (partial_credit); plus format_weight
    when the completion follows the reasoning mode (posttrain.follows_mode). The playbook's RLVR: a
    program, not a learned reward model, scores the answers, so there is no reward model to fool."""
    if kind not in REWARDS:
        raise ValueError(f"unknown reward {kind!r}; choose from {', '.join(REWARDS)}")
    correct = torch.tensor([float(check_answer(ex, t)) for ex, t in zip(examples, texts)])
    reward = correct.clone() if kind == "exact" else \
        torch.tensor([partial_credit(ex, t) for ex, t in zip(examples, texts)])
    if format_weight:
        reward += format_weight * torch.tensor([float(follows_mode(t, thinking)) for t in texts])
    return reward, correct


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, section 3.4), with
    L_max = max_length and L_cache = buffer:
        0                                    if len <= L_max - L_cache
        (L_max - L_cache - len) / L_cache    if L_max - L_cache < len <= L_max
        -1                                   if len > L_max
    Added to the task reward. Instead of a cliff (a truncated answer just scores as wrong, which
    punishes sound but long reasoning: reward noise, says DAPO), the ramp tells the policy that
    length itself costs, before the hard limit (the playbook: no-think answers grow under RL
    unless length is penalised)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer {buffer} must be in [1, max_length={max_length}]")
    lengths = lengths.float()
    expected = max_length - buffer
    ramp = (expected - lengths) / buffer
    return torch.where(lengths <= expected, 0.0, torch.where(lengths <= max_length, ramp, -1.0))


# --------------------------------------------------------------------------------------------
# 3. Group-relative advantages
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each completion: (r - mean of its group) / (std of its group + eps), the
    sample std (Bessel-corrected, as TRL's torch.std). scale_by_std=False keeps r - mean only, as
    Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) argues: dividing by the std up-weights the groups
    that are almost all right or all wrong. A group whose rewards are all equal gets exactly 0: it
    says nothing about which completion is better (DAPO's dynamic sampling drops such groups)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return torch.where(informative(rewards, group_size)[:, None], advantages, 0.0).view(-1)


def informative(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group: True where its rewards are not all equal. A flat group (all right or all wrong)
    has advantages 0 and teaches nothing; DAPO's dynamic sampling trains on the others only."""
    groups = rewards.view(-1, group_size)
    return ~(groups == groups[:, :1]).all(dim=1)


# --------------------------------------------------------------------------------------------
# 4. The clipped surrogate loss, its aggregation, and the KL penalty
# --------------------------------------------------------------------------------------------

AGGREGATIONS = ("token", "sequence", "constant")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - pi) - (ref - pi) - 1 (Schulman's "Approximating
    KL divergence", as GRPO uses it): unbiased over samples of pi, never negative, 0 when the
    policy assigns the reference's probability."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def clipped_surrogate_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.28,
                           aggregation: str = "token", ref_logps: torch.Tensor | None = None,
                           kl_beta: float = 0.0, max_length: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of a batch of completions (N rows of T positions, mask = completion tokens):
    per token -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), ratio = pi / pi_old
    against the log-probs at sampling time (PPO, Schulman et al. 2017), + kl_beta * k3 KL.

    eps_high > eps_low is DAPO's clip-higher: a rare token with A > 0 may grow further before the
    clip stops it, which keeps entropy from collapsing. aggregation "token" averages over all
    completion tokens of the batch (DAPO: every token weighs the same, so a long wrong answer is
    not diluted); "sequence" averages within each completion, then over completions (GRPO: a token
    of a short completion weighs more); "constant" sums over tokens and divides by N x max_length,
    the same for every batch (Dr. GRPO, Liu et al. 2025: neither a completion's length nor the
    batch's token count rescales a token's gradient). Metrics: clip_fraction (tokens whose clip is
    active), kl."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose from {', '.join(AGGREGATIONS)}")
    if aggregation == "constant" and max_length < 1:
        raise ValueError("aggregation 'constant' divides by N x max_length: give max_length >= 1 (the generation limit)")
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    kl = k3_kl(logps, ref_logps) if kl_beta else torch.zeros_like(logps)
    per_token = per_token + kl_beta * kl
    weight = mask.float()
    if aggregation == "token":
        loss = (per_token * weight).sum() / weight.sum().clamp(min=1)
    elif aggregation == "constant":
        loss = (per_token * weight).sum() / (weight.shape[0] * max_length)
    else:
        loss = ((per_token * weight).sum(-1) / weight.sum(-1).clamp(min=1)).mean()
    clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    n = weight.sum().clamp(min=1)
    return loss, {"clip_fraction": ((clipped.float() * weight).sum() / n).item(),
                  "kl": ((kl.detach() * weight).sum() / n).item()}


# --------------------------------------------------------------------------------------------
# 5. One GRPO step: sample, score, update
# --------------------------------------------------------------------------------------------


@dataclass
class RLConfig:
    # The defaults are what the tiny SFT model can learn from in minutes: it answers ~1% of
    # questions exactly, so exact-match groups are nearly all flat (no advantage), while reversing
    # words earns partial credit often enough to give most groups a signal.
    tasks: str = "reverse"         # comma-separated built-in tasks (add, sort, reverse), unless rl.data is set
    data: str = ""                 # prompts to train on: a .jsonl/.parquet of {"prompt", "answer"} rows ("" = built-in)
    verifier: str = "number"       # how rl.data's answers are checked: number | string | choice
    mode: str = "no_think"         # reasoning mode of the prompts: no_think | think | plain (ChatML, no flag)
    reward: str = "partial"        # exact (the verifier) | partial (share of answer words in place)
    prompts: int = 800             # training questions, cycled through (800 = one pass at the defaults)
    prompts_per_step: int = 16     # over all processes
    group_size: int = 8            # G completions per prompt
    steps: int = 50                # sample-and-update steps
    temperature: float = 1.0       # sampling temperature of the rollouts (their log-probs use it too)
    max_new_tokens: int = 32       # also DAPO's L_max
    overlong_buffer: int = 16      # DAPO's L_cache; 0 turns the overlong penalty off
    overlong_filter: bool = False  # DAPO's overlong filtering: truncated completions carry no loss
    format_weight: float = 0.0     # reward for following the reasoning mode (posttrain.follows_mode)
    scale_by_std: bool = True      # false: Dr. GRPO advantages (r - mean)
    aggregation: str = "token"     # token (DAPO) | sequence (GRPO) | constant (Dr. GRPO: / (N x max_new_tokens))
    eps_low: float = 0.2           # PPO clip below: ratio >= 1 - eps_low
    eps_high: float = 0.28         # DAPO's clip-higher
    kl_beta: float = 0.0           # k3 KL to the start model; DAPO and Dr. GRPO drop it
    dynamic_sampling: int = 0      # DAPO's dynamic sampling: up to this many extra rounds of prompts per step
                                   # to replace flat groups (0: off, train on every group sampled)
    updates_per_batch: int = 2     # gradient steps per sampled batch; from the 2nd on, the clip acts
    eval_examples: int = 30        # per task, held out (posttrain.held_out_examples: every run holds them out)

    def __post_init__(self):
        unknown = [t for t in self.tasks.split(",") if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"rl.tasks={self.tasks!r}: a comma-separated subset of {','.join(TASKS)}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"rl.verifier={self.verifier!r}: choose from {', '.join(VERIFIERS)}")
        if self.data and not Path(self.data).is_file():
            raise ValueError(f"rl.data={self.data!r} is not a file; give a .jsonl/.parquet of prompt/answer rows")
        if self.reward not in REWARDS:
            raise ValueError(f"rl.reward={self.reward!r}: choose from {', '.join(REWARDS)}")
        if self.mode not in MODES:
            raise ValueError(f"rl.mode={self.mode!r}: choose from {', '.join(MODES)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"rl.aggregation={self.aggregation!r}: choose from {', '.join(AGGREGATIONS)}")
        for key in ("prompts", "prompts_per_step", "steps", "max_new_tokens", "updates_per_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"rl.{key}={getattr(self, key)} must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"rl.group_size={self.group_size} must be >= 2: advantages compare completions of one "
                             f"prompt")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"rl.overlong_buffer={self.overlong_buffer} must be in [0, rl.max_new_tokens="
                             f"{self.max_new_tokens}] (0: no overlong penalty)")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"rl.eps_low={self.eps_low} must be in [0, 1) and rl.eps_high={self.eps_high} >= 0 "
                             f"(DAPO: 0.2 and 0.28)")
        if self.temperature <= 0:
            raise ValueError(f"rl.temperature={self.temperature} must be > 0")
        if self.kl_beta < 0 or self.dynamic_sampling < 0 or self.eval_examples < 0:
            raise ValueError("rl.kl_beta, rl.dynamic_sampling and rl.eval_examples must be >= 0")


def policy_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rollouts: Rollouts,
                  advantages: torch.Tensor, cfg: RLConfig, grad_clip: float = 1.0, ref: torch.nn.Module | None = None,
                  autocast=None, micro_batch: int = 0, grad_sync=None) -> dict[str, float]:
    """Train on one sampled batch: log-probs of the policy as it sampled (pi_old), then
    cfg.updates_per_batch gradient steps on the clipped surrogate. The first step is exactly on
    policy (ratio 1, the plain policy gradient); later ones see a ratio that moved, and the clip
    bounds how far one batch may push. Returns the last step's loss, gradient norm and metrics.
    `model` may be the DDP/FSDP-wrapped module; the loss is normalised over every process's
    completions. A gradient step runs over micro_batch completions at a time (0: all at once),
    accumulating gradients that are reduced across processes inside grad_sync(last)
    (PostTrainRun.grad_sync).

    A batch whose advantages are all 0 (every group all right or all wrong) and no KL term has
    nothing to learn; it is skipped rather than letting Adam's momentum move the weights. With
    cfg.overlong_filter (DAPO), completions cut at the length limit are left out of the loss: a
    truncated answer was never finished, so its reward says little about its tokens."""
    device = rollouts.ids.device
    if all_reduce_mean(float(advantages.any() or cfg.kl_beta > 0), device) == 0:
        return {"loss": 0.0, "grad_norm": 0.0, "clip_fraction": 0.0, "kl": 0.0, "skipped": 1.0}
    autocast = autocast or torch.autocast(device.type, enabled=False)
    grad_sync = grad_sync or (lambda last: contextlib.nullcontext())
    parts = micro_slices(rollouts.ids.shape[0], micro_batch)
    # log-probs at the sampling temperature, the distribution that drew the completions (as TRL's GRPOTrainer)
    with torch.no_grad(), autocast:
        old = torch.cat([model(rollouts.ids[p], rollouts.targets[p], logprobs=True, temperature=cfg.temperature)
                         for p in parts])
        ref_logps = torch.cat([ref(rollouts.ids[p], rollouts.targets[p], logprobs=True, temperature=cfg.temperature)
                               for p in parts]) if cfg.kl_beta else None
    mask = rollouts.mask & ~rollouts.truncated[:, None] if cfg.overlong_filter else rollouts.mask
    # what the aggregation averages over, on this process: tokens, or completions
    counted = (lambda p: float(mask[p].sum())) if cfg.aggregation == "token" else (lambda p: float(mask[p].shape[0]))
    count, tokens = counted(slice(None)), max(float(mask.sum()), 1.0)
    scale = global_mean_scale(count, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(cfg.updates_per_batch):
        sums = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0}
        for i, p in enumerate(parts):
            share = counted(p) / max(count, 1e-12)  # this micro-batch's part of the loss's mean
            with grad_sync(i == len(parts) - 1):
                with autocast:
                    logps = model(rollouts.ids[p], rollouts.targets[p], logprobs=True, temperature=cfg.temperature)
                loss, metrics = clipped_surrogate_loss(logps, old[p], advantages[p].to(logps.device), mask[p],
                                                       cfg.eps_low, cfg.eps_high, cfg.aggregation,
                                                       None if ref_logps is None else ref_logps[p], cfg.kl_beta,
                                                       cfg.max_new_tokens)
                (loss * share * scale).backward()
            sums["loss"] += loss.item() * share
            for key, value in metrics.items():  # means over completion tokens
                sums[key] += value * float(mask[p].sum()) / tokens
        # grad_clip 0: no clipping, the norm still measured
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            raise Diverged(diverged(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loss": all_reduce_mean(sums.pop("loss") * scale, device), "grad_norm": norm, **sums, "skipped": 0.0}


def sample_step(model: torch.nn.Module, enc: tiktoken.Encoding, cfg: RLConfig, prompts: list[list[int]],
                questions: list[Example], cursor: int, end_id: int, pad_id: int, want: int,
                generator: torch.Generator | None = None) -> dict:
    """One step's batch on this process: `want` prompts from `cursor` on (cycling), group_size
    samples each, scored. With cfg.dynamic_sampling = R (DAPO, Yu et al. 2025), flat groups are
    dropped and up to R more rounds of fresh prompts are drawn until `want` informative groups
    are found (fewer if the rounds run out); every group DAPO trains on then has a learning signal.

    Returns rollouts, reward and correct of the batch to train on, `first` (rollouts, reward,
    correct of the first round: what the policy does on fresh prompts, comparable across runs),
    the new cursor and the number of rounds drawn."""
    g = cfg.group_size
    kept_prompts, kept_completions, kept_reward, kept_correct = [], [], [], []
    first, rounds = None, 0
    while rounds <= cfg.dynamic_sampling and len(kept_prompts) < want:
        picked = [(cursor + i) % len(questions) for i in range(want)]
        cursor, rounds = cursor + want, rounds + 1
        rollouts = sample_groups(model, [prompts[i] for i in picked], g, cfg.temperature, cfg.max_new_tokens,
                                 end_id, pad_id, generator)
        reward, correct = score(rollouts, [questions[i] for i in picked for _ in range(g)], enc, cfg)
        first = first or (rollouts, reward, correct)
        keep = informative(reward, g) if cfg.dynamic_sampling else torch.ones(want, dtype=torch.bool)
        for p in keep.nonzero().flatten().tolist()[:want - len(kept_prompts)]:
            kept_prompts.append(prompts[picked[p]])
            kept_completions += rollouts.completions[p * g:(p + 1) * g]
            kept_reward.append(reward[p * g:(p + 1) * g])
            kept_correct.append(correct[p * g:(p + 1) * g])
    if not kept_prompts:  # every group of every round flat: train on the first (policy_update skips it)
        rollouts, reward, correct = first
    else:
        rollouts = rollouts_from(kept_prompts, kept_completions, g, end_id, pad_id, first[0].ids.device)
        reward, correct = torch.cat(kept_reward), torch.cat(kept_correct)
    return {"rollouts": rollouts, "reward": reward, "correct": correct, "first": first, "cursor": cursor,
            "rounds": rounds}


def score(rollouts: Rollouts, examples: list[Example], enc: tiktoken.Encoding,
          cfg: RLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward, correct) per completion (examples: one per row): the task reward (task_rewards),
    plus DAPO's overlong penalty with L_max = cfg.max_new_tokens when cfg.overlong_buffer > 0."""
    texts = [enc.decode(c) for c in rollouts.completions]
    reward, correct = task_rewards(examples, texts, MODES[cfg.mode], cfg.reward, cfg.format_weight)
    if cfg.overlong_buffer:
        reward = reward + overlong_penalty(rollouts.lengths.cpu(), cfg.max_new_tokens, cfg.overlong_buffer)
    return reward, correct


def rollout_stats(rollouts: Rollouts, reward: torch.Tensor, correct: torch.Tensor,
                  cfg: RLConfig) -> dict[str, float]:
    """The per-step numbers the playbook watches: mean reward, accuracy, completion length, the share
    of completions in the overlong zone (longer than L_max - L_cache; with no buffer, those cut at
    L_max), and the share of groups whose rewards were all equal (no learning signal)."""
    lengths = rollouts.lengths.float()
    overlong = lengths > cfg.max_new_tokens - cfg.overlong_buffer if cfg.overlong_buffer else rollouts.truncated
    return {"reward": reward.mean().item(), "accuracy": correct.mean().item(), "length": lengths.mean().item(),
            "overlong": overlong.float().mean().item(), "truncated": rollouts.truncated.float().mean().item(),
            "flat_groups": 1 - informative(reward, rollouts.group_size).float().mean().item()}


SUMMARY = ("reward", "accuracy", "length", "overlong")  # the numbers a report compares


def held_out_eval(model: torch.nn.Module, enc: tiktoken.Encoding, examples: list[Example], cfg: RLConfig,
                  end_id: int, pad_id: int) -> dict[str, float]:
    """Greedy answers to held-out questions, in the trained mode, scored as in training: reward,
    accuracy, length, overlong share. Deterministic, unlike the sampled numbers of each step."""
    prompts = [prompt_ids(enc, ex, MODES[cfg.mode]) for ex in examples]
    rollouts = sample_groups(model, prompts, 1, 0.0, cfg.max_new_tokens, end_id, pad_id)
    stats = rollout_stats(rollouts, *score(rollouts, examples, enc, cfg), cfg)
    return {key: stats[key] for key in SUMMARY}


# --------------------------------------------------------------------------------------------
# 6. The run and its report
# --------------------------------------------------------------------------------------------

SECTIONS = {"run": RunConfig, "optim": OptimConfig, "rl": RLConfig}
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "grpo_tiny.toml"


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """{"run", "optim", "rl"} from a TOML file (default configs/grpo_tiny.toml) and overrides."""
    return read_config(path or DEFAULT_CONFIG, overrides, sections=SECTIONS)


def rl_questions(cfg: RLConfig, seed: int) -> tuple[list[Example], list[Example]]:
    """(training questions, held-out questions of the trained tasks): from rl.data (its last tenth,
    at most 200, held out) or the built-in tasks (posttrain.held_out_examples held out)."""
    if cfg.data:
        examples = load_prompts(cfg.data, cfg.verifier)
        n_held = min(200, len(examples) // 10) if cfg.eval_examples else 0
        if len(examples) - n_held < 1:
            raise ValueError(f"{cfg.data} has too few rows to train on")
        return examples[:len(examples) - n_held], examples[len(examples) - n_held:]
    tasks = tuple(cfg.tasks.split(","))
    held_out = [ex for ex in held_out_examples(cfg.eval_examples) if ex.task in tasks] if cfg.eval_examples else []
    # fresh questions (seed + 3: neither sft.py's nor dpo.py's stream), none of the held-out ones
    questions = make_examples(cfg.prompts, seed=seed + 3, tasks=tasks,
                              exclude={e.question for e in held_out_examples(max(cfg.eval_examples, 1))})
    return questions, held_out


def rl_train(cfg: dict, log=print) -> dict:
    """Run GRPO as configured and return the report (also written to <run>/report.json)."""
    rcfg = cfg["rl"]
    run = PostTrainRun(cfg, "rl", "python sft.py", log)
    try:
        model, enc, device = run.model, run.enc, run.device
        if rcfg.prompts_per_step % run.world:
            raise ConfigError(f"rl.prompts_per_step={rcfg.prompts_per_step} must divide among {run.world} processes")
        questions, eval_trained = rl_questions(rcfg, cfg["run"].seed)
        thinking = MODES[rcfg.mode]
        prompts = [prompt_ids(enc, ex, thinking) for ex in questions]
        end_id, pad_id = special_id(enc, "<|im_end|>"), eot_id(enc)
        longest = max(len(p) for p in prompts + [prompt_ids(enc, ex, thinking) for ex in eval_trained])
        if longest + rcfg.max_new_tokens > model.cfg.max_seq_len:
            raise ConfigError(f"prompts of up to {longest} tokens + rl.max_new_tokens={rcfg.max_new_tokens} exceed "
                              f"the model's max_seq_len {model.cfg.max_seq_len}")
        run.log(f"GRPO on {len(questions):,} {rcfg.data or rcfg.tasks} questions ({rcfg.mode}, {rcfg.reward} reward): "
                f"{rcfg.prompts_per_step} prompts x {rcfg.group_size} samples per step, {rcfg.steps} steps; overlong "
                "penalty " + (f"from {rcfg.max_new_tokens - rcfg.overlong_buffer} to {rcfg.max_new_tokens} tokens"
                              if rcfg.overlong_buffer else "off"))
        max_new = cfg["run"].eval_max_new_tokens
        builtin_eval = held_out_examples(rcfg.eval_examples) if rcfg.eval_examples and not rcfg.data else []
        modes = ("plain",) if rcfg.mode == "plain" else ("think", "no_think")
        before, held_out_before = {}, {}
        if run.master:
            before = accuracy(model, enc, builtin_eval, max_new, modes) if builtin_eval else {}
            held_out_before = held_out_eval(model, enc, eval_trained, rcfg, end_id, pad_id) if eval_trained else {}
        ref = copy.deepcopy(model).eval().requires_grad_(False) if rcfg.kl_beta else None
        saved = run.begin(cfg["optim"], rcfg.steps)
        gen = torch.Generator(device=device).manual_seed(cfg["run"].seed + run.rank)
        cursor = run.rank * (rcfg.prompts_per_step // run.world)  # each process its own slice of the prompts
        if saved:
            cursor = saved["cursor"]
            gen.set_state(saved["generator"].to(gen.get_state().device))
        t0, sampled_tokens = time.time(), 0
        for step in range(run.start_step + 1, rcfg.steps + 1):
            lr = run.set_lr(step)
            # sample with the current policy (a bf16 copy on GPU, whole under FSDP), score, advantages
            policy = run.sampling_model()
            batch = sample_step(policy, enc, rcfg, prompts, questions, cursor, end_id, pad_id,
                                rcfg.prompts_per_step // run.world, gen)
            cursor = batch["cursor"] + (run.world - 1) * (rcfg.prompts_per_step // run.world) * batch["rounds"]
            sampled_tokens += int(batch["first"][0].lengths.sum())
            advantages = group_advantages(batch["reward"], rcfg.group_size, rcfg.scale_by_std)
            update = policy_update(run.train_model, run.optimizer, batch["rollouts"], advantages, rcfg,
                                   cfg["optim"].grad_clip, ref, run.autocast, cfg["run"].micro_batch, run.grad_sync)
            stats = {k: all_reduce_mean(v, device) for k, v in rollout_stats(*batch["first"], rcfg).items()}
            dynamic = {"rounds": batch["rounds"], "kept_groups": int(informative(batch["reward"], rcfg.group_size).sum())} \
                if rcfg.dynamic_sampling else {}
            row = {**stats, **dynamic, **update, "lr": lr, "seconds": time.time() - t0}
            run.end_step(step, row, f"reward {row['reward']:+.3f} | acc {row['accuracy']:6.1%} | length "
                                    f"{row['length']:5.1f} | overlong {row['overlong']:5.1%} | flat groups "
                                    f"{row['flat_groups']:4.0%} | clip {row['clip_fraction']:.3f} | {row['seconds']:.0f}s",
                         {"cursor": cursor, "generator": gen.get_state()})
        sampled_tokens = round(all_reduce_mean(sampled_tokens, device) * run.world)
        rollout_tok_s = sampled_tokens / max(time.time() - t0, 1e-9)
        full = run.full_model()
        if not run.master:
            return run.finish({}, "")
        history = run.history()
        window = max(1, min(10, rcfg.steps // 4))
        report = {"mode": rcfg.mode, "tasks": rcfg.data or rcfg.tasks, "reward_kind": rcfg.reward,
                  "steps": rcfg.steps, "window": window, "sampled_tokens": sampled_tokens,
                  "sampled_tokens_per_s": rollout_tok_s,
                  "sampled_first": {key: mean_of(history[:window], key) for key in SUMMARY},
                  "sampled_last": {key: mean_of(history[-window:], key) for key in SUMMARY},
                  "held_out": len(eval_trained), "held_out_before": held_out_before,
                  "held_out_after": held_out_eval(full, enc, eval_trained, rcfg, end_id, pad_id) if eval_trained else {},
                  "accuracy_before": before,
                  "accuracy_after": accuracy(full, enc, builtin_eval, max_new, modes) if builtin_eval else {}}
        return run.finish(report, format_report(report))
    finally:
        run.close()


def format_report(r: dict) -> str:
    def line(label: str, a: dict, b: dict) -> str:
        return (f"{label:34s} reward {a['reward']:+.3f} -> {b['reward']:+.3f} | accuracy {a['accuracy']:5.1%} -> "
                f"{b['accuracy']:5.1%} | length {a['length']:4.1f} -> {b['length']:4.1f} | overlong "
                f"{a['overlong']:4.1%} -> {b['overlong']:4.1%}")

    lines = accuracy_table(r["accuracy_before"], r["accuracy_after"]) if r["accuracy_after"] else []
    lines.append(f"GRPO on {r['tasks']} ({r['mode']}, {r['reward_kind']} reward), {r['steps']} steps; "
                 f"{r['sampled_tokens_per_s']:,.0f} sampled tokens/s:")
    if r["held_out_after"]:
        lines.append(line("  held-out, greedy, before -> after", r["held_out_before"], r["held_out_after"]))
        n = r["held_out"]
        lo, hi = (interval95(r["held_out_after"]["accuracy"] * n, n))
        lines.append(f"  (held-out accuracy after: 95% interval {lo:.1%} - {hi:.1%} over {n} questions)")
    lines.append(line(f"  sampled, first {r['window']} -> last {r['window']} steps", r["sampled_first"],
                      r["sampled_last"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, doc=__doc__, sections=SECTIONS,
                    default_config=DEFAULT_CONFIG)
    run_stage(rl_train, cfg)


if __name__ == "__main__":
    main()
