"""Preference optimisation: a model learns from pairs of answers, one better than the other.

    python sft.py                                   # runs/tiny -> runs/tiny-sft (the starting point)
    python dpo.py                                   # configs/dpo_tiny.toml: runs/tiny-sft -> runs/tiny-dpo, APO-zero
    python dpo.py --dpo.loss=dpo --dpo.beta=0.1 --run.name=tiny-dpo-sigmoid
    python dpo.py --dpo.loss=orpo --run.name=tiny-orpo       # no reference model
    python dpo.py --dpo.pairs=on_policy                      # the model's own samples, verified and paired
    python dpo.py --config configs/dpo_smollm2.toml          # SmolLM2-135M-Instruct, APO-zero as SmolLM3

The tiny model's default pairs are off-policy (the right answer against a corrupted one) because
it rarely answers right, and on-policy pairs need questions where some samples are right and some
wrong; with a model that sometimes succeeds, on-policy is the playbook's method. Pairs may also
come from a file of TRL's preference format ({"prompt", "chosen", "rejected"}).

The story, top to bottom (the playbook's preference-optimisation section):
1. Response log-probabilities: log pi(y | x) summed over the tokens the assistant writes, for the
   policy and for a frozen reference (the starting model). Every loss below is a function of these.
2. The losses, each a few lines with its formula: DPO, IPO, APO-zero, APO-down (SmolLM3 used APO),
   paired KTO and ORPO, following TRL's DPOTrainer / ORPOTrainer, which SmolLM3 was trained with.
3. Preference data, on-policy: sample k answers per prompt from the model itself, score them with
   the task's verifier, pair the best with the worst. Off-policy: built-in or from a file.
4. Training: the playbook's settings -- learning rate ~10x below SFT's, beta 0.1 (scan 0.01-0.5),
   one epoch (preference training overfits after one); the reference's log-probs once per batch.
5. The report: loss, reward accuracy and margin, answer accuracy per task and mode before and after.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F

from chat import chat_segments, render_chat
from config import ConfigError, load_config as read_config, parse_cli
from distributed import all_reduce_mean
from generate import generate
from optim import OptimConfig
from posttrain import (MODES, TASKS, EpochOrder, Example, PostTrainRun, RunConfig, accuracy, accuracy_table, check_answer,
                       global_mean_scale, held_out_examples, load_preferences, make_examples, mean_of, prompt_ids,
                       run_stage)
from sft import make_rows
from tokenizer import eot_id, special_id

# --------------------------------------------------------------------------------------------
# 1. Response log-probabilities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One preference: a prompt and two completions, the preferred (chosen) and the dispreferred
    (rejected), as text and as the ids the model reads. Completions start after the generation
    prompt and end with <|im_end|> when the model stopped. `example` is the task question the pair
    was built from (None for pairs read from a file)."""
    prompt_ids: tuple[int, ...]
    chosen: str
    rejected: str
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    thinking: bool | None = None
    example: Example | None = None


def pair_batch(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets), each (2N, T): the N chosen conversations, then the N rejected ones, one per
    row and right-padded (one forward pass for both halves, as TRL's concatenated forward).
    targets are -100 everywhere but on the completion tokens (sft.make_rows' assistant-only loss)."""
    conversations = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            completion = list(getattr(p, side))
            conversations.append((list(p.prompt_ids) + completion, [False] * len(p.prompt_ids) + [True] * len(completion)))
    ids, targets, _ = make_rows(conversations, max(len(c[0]) for c in conversations), packing=False, pad_id=pad_id)
    return ids, targets


def token_logps(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """(N, T): log pi(targets[t] | ids[:t + 1]) where targets is not -100, 0 elsewhere.

    `temperature` divides the logits: rl.py scores its samples under the distribution that drew
    them (softmax(logits / T)), as TRL's GRPOTrainer does; preference losses use T = 1. The model
    computes them in float32 without ever holding the whole logits (model.token_logprobs); `model`
    may be the DDP- or FSDP-wrapped module, whose forward sees every use of the weights."""
    return model(ids, targets, logprobs=True, temperature=temperature)


def response_logps(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the SUM of log p(target token) over positions whose target is not -100 (the
    response), and the COUNT of those tokens (IPO and ORPO use the average, sum / count). Right
    padding cannot change a real token's log-prob under causal attention, so no attention mask."""
    return token_logps(model, ids, targets).sum(-1), (targets != -100).sum(-1)


# --------------------------------------------------------------------------------------------
# 2. Preference losses (per pair; preference_loss averages them)
# --------------------------------------------------------------------------------------------
# pi_c, pi_r: policy log-probs of the chosen / rejected completion; ref_c, ref_r: the reference's.
# r_c = beta * (pi_c - ref_c) and r_r = beta * (pi_r - ref_r) are the implicit rewards.

LOSSES = ("dpo", "ipo", "apo_zero", "apo_down", "kto", "orpo")


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(r_c - r_r). The Bradley-Terry likelihood of the
    preference under the reward the policy implies; log 2 when the policy equals the reference."""
    return -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))


def ipo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2. Regresses the
    log-ratio gap to a finite target instead of pushing it to infinity, so it does not overfit
    deterministic preferences. Pass length-averaged log-probs (TRL does; preference_loss divides)."""
    return ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 * beta)) ** 2


def apo_zero_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Anchored Preference Optimization):
    (1 - sigmoid(r_c)) + sigmoid(r_r). Anchored at the reference: chosen likelihood goes up and
    rejected goes down, each on its own -- for when the chosen answers beat the model's (SmolLM3)."""
    return (1 - torch.sigmoid(beta * (pi_c - ref_c))) + torch.sigmoid(beta * (pi_r - ref_r))


def apo_down_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024): sigmoid(r_c) + (1 - sigmoid(r_c - r_r)). Both
    likelihoods go down, the rejected one faster -- for when even the chosen answers are worse
    than what the model already writes."""
    r_c, r_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return torch.sigmoid(r_c) + (1 - torch.sigmoid(r_c - r_r))


def kto_pair_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """KTO on pairs (Ethayarajh et al. 2024; TRL's "kto_pair"): chosen answers are desirable,
    rejected undesirable, each valued against a reference point z instead of against each other:
    (1 - sigmoid(r_c - z_c)) / 2 + (1 - sigmoid(z_r - r_r)) / 2, where z = beta * max(0, mean
    log-ratio over the batch) estimated from the OTHER half (z_c from the rejected completions,
    z_r from the chosen ones), as TRL does, and detached (the paper does not backpropagate through z)."""
    lr_c, lr_r = pi_c - ref_c, pi_r - ref_r
    z_c = beta * lr_r.mean().clamp(min=0).detach()
    z_r = beta * lr_c.mean().clamp(min=0).detach()
    return ((1 - torch.sigmoid(beta * lr_c - z_c)) + (1 - torch.sigmoid(z_r - beta * lr_r))) / 2


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logp): avg_logp - log(1 - exp(avg_logp)).
    log(-expm1(x)) is log1p(-exp(x)) computed accurately when p is near 1."""
    return avg_logp - torch.log(-torch.expm1(avg_logp))


def orpo_loss(pi_c_avg: torch.Tensor, pi_r_avg: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024): -pi_c_avg + lam * -log sigmoid(log_odds_c - log_odds_r), on
    length-averaged log-probs. SFT and preference in one loss, no reference model; TRL's ORPO
    names lam "beta" (default 0.1), and so does this file."""
    return -pi_c_avg - lam * F.logsigmoid(log_odds(pi_c_avg) - log_odds(pi_r_avg))


def check_loss_args(kind: str, beta: float) -> None:
    """ValueError, naming the choices, for an unknown loss or a beta that is not positive."""
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; choose from {', '.join(LOSSES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the playbook: 0.1, scan 0.01-0.5), got {beta}")


def preference_loss(kind: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None, beta: float,
                    chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over the pairs and its metrics: rewards/chosen, rewards/rejected (mean implicit
    rewards), margin (their mean difference) and accuracy (share of pairs with chosen > rejected).

    Log-probs are per-sequence sums; IPO and ORPO divide them by chosen_tokens / rejected_tokens
    (None: they already are averages). ORPO ignores the reference (pass None); its rewards are
    beta * the average policy log-prob, as in TRL."""
    check_loss_args(kind, beta)
    if kind in ("ipo", "orpo") and chosen_tokens is not None:
        policy_chosen, policy_rejected = policy_chosen / chosen_tokens, policy_rejected / rejected_tokens
        if kind == "ipo":
            ref_chosen, ref_rejected = ref_chosen / chosen_tokens, ref_rejected / rejected_tokens
    metrics = {}
    if kind == "orpo":
        losses = orpo_loss(policy_chosen, policy_rejected, beta)
        reward_c, reward_r = beta * policy_chosen.detach(), beta * policy_rejected.detach()
        metrics["nll"] = -policy_chosen.detach().mean().item()
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"the {kind} loss needs the reference model's log-probs (only orpo has none)")
        fn = {"dpo": dpo_loss, "ipo": ipo_loss, "apo_zero": apo_zero_loss, "apo_down": apo_down_loss,
              "kto": kto_pair_loss}[kind]
        losses = fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
        reward_c = beta * (policy_chosen - ref_chosen).detach()
        reward_r = beta * (policy_rejected - ref_rejected).detach()
    metrics.update({"rewards/chosen": reward_c.mean().item(), "rewards/rejected": reward_r.mean().item(),
                    "margin": (reward_c - reward_r).mean().item(),
                    "accuracy": (reward_c > reward_r).float().mean().item()})
    return losses.mean(), metrics


# --------------------------------------------------------------------------------------------
# 3. Preference data: on-policy (the model's own samples, scored), off-policy (built-in, a file)
# --------------------------------------------------------------------------------------------


def build_pairs(model: torch.nn.Module, enc: tiktoken.Encoding, examples: list[Example], k: int = 4,
                temperature: float = 1.0, max_new_tokens: int = 64, thinking: bool | None = False, seed: int = 0,
                top_k: int | None = None) -> tuple[list[Pair], dict[str, int]]:
    """On-policy pairs: k sampled completions per question (all questions in one call of the
    project's sampler), scored by the question's verifier, ranked by (score, then shorter first);
    the best is chosen, the worst rejected. A question whose samples all score the same teaches no
    preference and is skipped.

    Returns the pairs and counts: prompts, pairs, skipped (all equal), samples, correct samples."""
    if k < 2:
        raise ValueError(f"need at least 2 samples per prompt to make a pair, got k={k}")
    end = special_id(enc, "<|im_end|>")
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompts = [prompt_ids(enc, ex, thinking) for ex in examples]
    samples = generate(model, prompts, max_new_tokens, k=k, temperature=temperature, top_k=top_k, stop_ids=[end],
                       generator=gen) if examples else []
    pairs, counts = [], {"prompts": len(examples), "pairs": 0, "skipped": 0, "samples": 0, "correct": 0}
    for i, (ex, prompt) in enumerate(zip(examples, prompts)):
        mine = samples[i * k:(i + 1) * k]  # the k samples keep the <|im_end|> the model wrote
        texts = [enc.decode(s) for s in mine]
        scores = [float(check_answer(ex, t)) for t in texts]
        counts["samples"] += k
        counts["correct"] += int(sum(scores))
        if len(set(scores)) == 1:
            counts["skipped"] += 1
            continue
        ranked = sorted(range(k), key=lambda j: (-scores[j], len(mine[j])))
        best, worst = ranked[0], ranked[-1]
        pairs.append(Pair(tuple(prompt), texts[best], texts[worst], tuple(mine[best]), tuple(mine[worst]),
                          thinking, ex))
    counts["pairs"] = len(pairs)
    return pairs, counts


def completion_text(example: Example, answer: str, thinking: bool) -> str:
    """What the assistant writes for this answer in the given mode, <|im_end|> included: exactly the
    loss-carrying piece of the chat template (think mode: the reasoning block, then the answer)."""
    messages = [{"role": "user", "content": example.question},
                {"role": "assistant", "content": answer, "reasoning": example.reasoning}]
    return next(text for text, is_output in chat_segments(messages, thinking) if is_output)


def corrupt_answer(example: Example, rng: random.Random) -> str:
    """A plausible wrong answer: a sum off by one or ten, two neighbours of a sorted list swapped,
    or the words left in their original order."""
    if example.task == "add":
        return str(int(example.answer) + rng.choice((-10, -1, 1, 10)))
    words = example.answer.split()
    if example.task == "sort":
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    if example.task == "reverse":
        return " ".join(reversed(words))
    raise ValueError(f"no corruption for task {example.task!r}; choose from {TASKS}")


def off_policy_pairs(enc: tiktoken.Encoding, examples: list[Example], thinking: bool | None,
                     seed: int = 0) -> list[Pair]:
    """Pairs without sampling: the correct answer (chosen) against a corrupted one (rejected), both
    written in the template's words. Off-policy: neither completion came from the model."""
    rng = random.Random(seed)
    pairs = []
    for ex in examples:
        chosen = completion_text(ex, ex.answer, thinking)
        rejected = completion_text(ex, corrupt_answer(ex, rng), thinking)
        pairs.append(Pair(tuple(prompt_ids(enc, ex, thinking)), chosen, rejected,
                          tuple(enc.encode(chosen, allowed_special="all")),
                          tuple(enc.encode(rejected, allowed_special="all")), thinking, ex))
    return pairs


def file_pairs(enc: tiktoken.Encoding, path: str) -> list[Pair]:
    """Pairs of a preference file (posttrain.load_preferences): the prompt rendered with the chat
    template up to the assistant header, each answer as the assistant writes it (+ <|im_end|>)."""
    pairs = []
    for n, (prompt, chosen, rejected) in enumerate(load_preferences(path), 1):
        texts = []
        for answer in (chosen, rejected):
            if [m["role"] for m in answer] != ["assistant"]:
                raise ValueError(f"{path}: row {n}: 'chosen' and 'rejected' must each be one assistant answer")
            texts.append(next(t for t, out in chat_segments(prompt + answer)[::-1] if out))
        ids = enc.encode(render_chat(prompt, add_generation_prompt=True), allowed_special="all")
        pairs.append(Pair(tuple(ids), texts[0], texts[1], *(tuple(enc.encode(t, allowed_special="all"))
                                                            for t in texts)))
    return pairs


# --------------------------------------------------------------------------------------------
# 4-5. Preference training run and report
# --------------------------------------------------------------------------------------------


@dataclass
class DPOConfig:
    loss: str = "apo_zero"         # one of LOSSES; SmolLM3 used APO
    beta: float = 0.1              # the playbook: 0.1, scan 0.01-0.5 (ORPO: its lambda)
    pairs: str = "off_policy"      # on_policy (sample, verify, pair) | off_policy (built-in answers) | a .jsonl/.parquet
                                   # file of {"prompt", "chosen", "rejected"} rows
    prompts: int = 400             # built-in questions to build pairs from, shared out over dpo.modes
    modes: tuple[str, ...] = ("think", "no_think")  # the modes questions are asked in (and accuracy measured in):
                                                   # think | no_think | plain (ChatML without a reasoning flag)
    samples: int = 4               # on-policy completions per question
    temperature: float = 1.0       # sampling temperature of the candidates
    max_new_tokens: int = 64       # on-policy: the candidates' length limit
    eval_examples: int = 30        # per task, held out (posttrain.held_out_examples: the same questions as sft.py)
    pairs_per_step: int = 8        # over all processes
    epochs: float = 1.0            # the playbook: preference training overfits after one epoch

    def __post_init__(self):
        check_loss_args(self.loss, self.beta)
        if self.pairs == "on_policy" and self.samples < 2:
            raise ValueError(f"dpo.samples={self.samples}: on-policy pairs need at least 2 samples per question")
        if self.pairs not in ("on_policy", "off_policy") and not Path(self.pairs).is_file():
            raise ValueError(f"dpo.pairs={self.pairs!r}: on_policy, off_policy, or an existing preference file")
        if not self.modes or not set(self.modes) <= set(MODES):
            raise ValueError(f"dpo.modes={list(self.modes)}: a non-empty list of {list(MODES)}")
        if self.prompts < 1 or self.pairs_per_step < 1 or self.epochs <= 0 or self.max_new_tokens < 1:
            raise ValueError("dpo.prompts, dpo.pairs_per_step and dpo.max_new_tokens must be >= 1, dpo.epochs > 0")


SECTIONS = {"run": RunConfig, "optim": OptimConfig, "dpo": DPOConfig}
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "dpo_tiny.toml"


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """{"run", "optim", "dpo"} from a TOML file (default configs/dpo_tiny.toml) and overrides."""
    return read_config(path or DEFAULT_CONFIG, overrides, sections=SECTIONS)


def preference_pairs(cfg: DPOConfig, model: torch.nn.Module | None, enc: tiktoken.Encoding, examples: list[Example],
                     seed: int, log=print) -> tuple[list[Pair], dict]:
    """The training pairs of the configured kind: from a file, or the questions shared out over the
    reasoning modes. On-policy under torchrun, each process samples its share of the questions and
    every process gets all pairs, in one order."""
    if cfg.pairs not in ("on_policy", "off_policy"):
        pairs = file_pairs(enc, cfg.pairs)
        log(f"  {len(pairs):,} pairs from {cfg.pairs}")
        return pairs, {"file": {"pairs": len(pairs)}}
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    pairs, counts = [], {}
    for i, mode in enumerate(cfg.modes):
        thinking, exs = MODES[mode], examples[i::len(cfg.modes)]
        if cfg.pairs == "off_policy":
            found = off_policy_pairs(enc, exs, thinking, seed)
            counts[mode] = {"prompts": len(exs), "pairs": len(found)}
        else:
            found, counts[mode] = build_pairs(model, enc, exs[rank::world], cfg.samples, cfg.temperature,
                                              cfg.max_new_tokens, thinking, seed + rank)
            if world > 1:
                shares, tallies = [None] * world, [None] * world
                dist.all_gather_object(shares, found)
                dist.all_gather_object(tallies, counts[mode])
                found = [p for share in shares for p in share]
                counts[mode] = {k: sum(t[k] for t in tallies) for k in tallies[0]}
        pairs += found
        log(f"  {mode:8s} " + ", ".join(f"{k} {v:,}" for k, v in counts[mode].items()))
    return pairs, counts


def preference_train(cfg: dict, log=print) -> dict:
    """Run preference optimisation as configured and return the report (also <run>/report.json)."""
    dcfg = cfg["dpo"]
    run = PostTrainRun(cfg, "dpo", "python sft.py", log)
    try:
        model, enc, device, seed = run.model, run.enc, run.device, cfg["run"].seed
        if dcfg.pairs_per_step % run.world:
            raise ConfigError(f"dpo.pairs_per_step={dcfg.pairs_per_step} must divide among {run.world} processes")
        eval_set = held_out_examples(dcfg.eval_examples) if dcfg.eval_examples else []
        # fresh questions (seed + 2: not sft.py's training stream), none of the held-out ones
        questions = make_examples(dcfg.prompts, seed=seed + 2, exclude={e.question for e in eval_set})
        run.log(f"{dcfg.pairs.replace('_', '-')} preference pairs:")
        t0 = time.time()
        pairs, pair_counts = preference_pairs(dcfg, model, enc, questions, seed, run.log)
        if not pairs:
            raise ConfigError("no preference pairs: every question's samples scored the same; raise dpo.samples or "
                              "dpo.temperature, or use dpo.pairs=off_policy")
        run.log(f"{len(pairs):,} pairs in {time.time() - t0:.0f}s")
        max_new = cfg["run"].eval_max_new_tokens
        before = accuracy(model, enc, eval_set, max_new, dcfg.modes) if eval_set and run.master else {}
        # the reference is the starting policy, frozen, its log-probs computed once per batch (ORPO has none)
        ref = None if dcfg.loss == "orpo" else copy.deepcopy(model).eval().requires_grad_(False)
        pad_id = eot_id(enc)
        steps = max(1, math.ceil(dcfg.epochs * len(pairs) / dcfg.pairs_per_step))
        order = EpochOrder(len(pairs), dcfg.pairs_per_step, seed)
        saved = run.begin(cfg["optim"], steps)
        if saved:
            order.load_state_dict(saved["order"])
        trained_tokens = 0  # prompts and both completions, padding excluded (of this run, not before a resume)
        for step in range(run.start_step + 1, steps + 1):
            lr = run.set_lr(step)
            chunk = [pairs[i] for i in order.next()[run.rank::run.world]]
            trained_tokens += sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in chunk)
            scale = global_mean_scale(len(chunk), device)  # the mean over every process's pairs
            parts, sums = run.micro_batches(len(chunk)), {}
            for i, part in enumerate(parts):
                sub = chunk[part]
                ids, targets = (t.to(device) for t in pair_batch(sub, pad_id))
                n, share = len(sub), len(sub) / len(chunk)  # this micro-batch's part of the mean
                with run.grad_sync(i == len(parts) - 1):
                    with run.autocast:
                        logps, n_tokens = response_logps(run.train_model, ids, targets)
                        with torch.no_grad():
                            ref_logps = response_logps(ref, ids, targets)[0] if ref is not None else None
                    loss, m = preference_loss(dcfg.loss, logps[:n], logps[n:], None if ref is None else ref_logps[:n],
                                              None if ref is None else ref_logps[n:], dcfg.beta,
                                              n_tokens[:n].float(), n_tokens[n:].float())
                    (loss * share * scale).backward()
                for key, value in {"loss": loss.item(), **m}.items():
                    sums[key] = sums.get(key, 0.0) + value * share
            grad_norm = run.clip_and_step()
            row = {"loss": all_reduce_mean(sums.pop("loss") * scale, device), "lr": lr, "grad_norm": grad_norm,
                   **{k: all_reduce_mean(v, device) for k, v in sums.items()}}
            run.end_step(step, row, f"loss {row['loss']:.4f} | reward acc {row['accuracy']:.0%} | margin "
                                    f"{row['margin']:+.4f} | lr {lr:.2e}", {"order": order.state_dict()})
        trained_tokens = round(all_reduce_mean(trained_tokens, device) * run.world)
        full = run.full_model()
        if not run.master:
            return run.finish({}, "")
        history = run.history()
        window = history[-max(1, min(10, steps // 4)):]
        report = {"loss_type": dcfg.loss, "beta": dcfg.beta, "pairs_kind": dcfg.pairs, "pairs": len(pairs),
                  "pair_counts": pair_counts, "steps": steps, "tokens": trained_tokens, "first_loss": history[0]["loss"],
                  "final_loss": mean_of(window, "loss"), "final_reward_accuracy": mean_of(window, "accuracy"),
                  "final_margin": mean_of(window, "margin"), "accuracy_before": before,
                  "accuracy_after": accuracy(full, enc, eval_set, max_new, dcfg.modes) if eval_set else {}}
        return run.finish(report, format_report(report))
    finally:
        run.close()


def format_report(r: dict) -> str:
    lines = accuracy_table(r["accuracy_before"], r["accuracy_after"]) if r["accuracy_after"] else []
    lines.append(f"{r['loss_type']} (beta {r['beta']}) on {r['pairs']} {r['pairs_kind'].replace('_', '-')} pairs: "
                 f"loss {r['first_loss']:.4f} -> {r['final_loss']:.4f} in {r['steps']} steps; reward accuracy "
                 f"{r['final_reward_accuracy']:.0%}, margin {r['final_margin']:+.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, doc=__doc__, sections=SECTIONS,
                    default_config=DEFAULT_CONFIG)
    run_stage(preference_train, cfg)


if __name__ == "__main__":
    main()
