"""Preference optimisation: an SFT model learns from pairs of its own answers, one better than the other.

    python sft.py                                   # runs/tiny -> runs/tiny-sft (the starting point)
    python dpo.py                                   # runs/tiny-sft -> runs/tiny-dpo: APO-zero, built-in pairs
    python dpo.py --loss dpo --beta 0.1 --name tiny-dpo-sigmoid
    python dpo.py --loss orpo --name tiny-orpo      # no reference model
    python dpo.py --data on_policy                  # the model's own samples, verified and paired

The default pairs are off-policy (the right answer against a corrupted one) because the tiny CPU
model rarely answers right, and on-policy pairs need questions where some samples are right and
some wrong; with a model that sometimes succeeds, on-policy is the playbook's method.

The story, top to bottom (the playbook's preference-optimisation section):
1. Response log-probabilities: log pi(y | x) summed over the tokens the assistant writes, for the
   policy and for a frozen reference (the SFT model). Every loss below is a function of these.
2. The losses, each a few lines with its formula: DPO, IPO, APO-zero, APO-down (SmolLM3 used APO),
   paired KTO and ORPO, following TRL's DPOTrainer / ORPOTrainer, which SmolLM3 was trained with.
3. Preference data, on-policy: sample k answers per prompt from the model itself, score them with
   the verifier of the built-in tasks, pair the best with the worst. Off-policy pairs (the correct
   answer against a corrupted one) let a workshop skip the sampling.
4. Training: the playbook's settings -- learning rate ~10x below SFT's, beta 0.1 (scan 0.01-0.5),
   one epoch (preference training overfits after one).
5. The report: loss, reward accuracy and margin, answer accuracy per task and mode before and after.

One process (CPU or one GPU), like sft.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from optim import OptimConfig, build_optimizer, lr_at
from sft import (TASKS, Example, accuracy, accuracy_table, chat_segments, check_answer, make_examples, make_rows,
                 generate_completions, held_out_examples, load_start, parse_args, render_chat, save_model)

# --------------------------------------------------------------------------------------------
# 1. Response log-probabilities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One preference: a prompt (an Example's question in one reasoning mode) and two completions,
    the preferred (chosen) and the dispreferred (rejected), as text and as the ids the model reads.
    Completions start after the generation prompt and end with <|im_end|> when the model stopped."""
    example: Example
    thinking: bool
    prompt_ids: tuple[int, ...]
    chosen: str
    rejected: str
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


def prompt_ids(enc, example: Example, thinking: bool) -> list[int]:
    """The question as sft.py's chat template renders it, up to and including the assistant header
    (in no-think mode that header holds the empty think block, as at generation time)."""
    return enc.encode(render_chat(example.messages()[:1], thinking=thinking, add_generation_prompt=True),
                      allowed_special="all")


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


LOGPS_CHUNK_TOKENS = 4096  # positions whose logits and float32 log-softmax exist at once (~7 GiB at a 128k vocab)


def _picked_logps(h: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    logits = F.linear(h, head_weight)  # the model's output head, under the caller's autocast
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def token_logps(model, ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, T): log pi(targets[t] | ids[:t + 1]) where targets is not -100, 0 elsewhere.

    `temperature` divides the logits: rl.py scores its samples under the distribution that drew
    them (softmax(logits / T)), as TRL's GRPOTrainer does; preference losses use T = 1.
    Log-softmax in float32 (the losses take differences of sums of hundreds of log-probs, where
    bf16's 3 significant digits would drown the signal); bf16 forward on GPU, as sft.py trains.
    The output head, the float32 log-softmax and the pick run LOGPS_CHUNK_TOKENS positions at a
    time from the model's hidden states and are recomputed in backward (activation
    checkpointing): at a 128k vocabulary no (N, T, V) tensor exists, neither the logits nor a
    float32 copy nor their log-softmax, only one chunk's (bf16 logits and three float32 tensors of
    4096 x 128k: ~7 GiB). `model` is a plain Transformer (LoRA-wrapped layers are fine; a compiled
    or DDP-wrapped one would need its inner module)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
        h = model.hidden_states(ids)
        flat, flat_targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        picked = torch.cat([
            torch.utils.checkpoint.checkpoint(_picked_logps, flat[start:start + LOGPS_CHUNK_TOKENS],
                                              model.lm_head.weight, flat_targets[start:start + LOGPS_CHUNK_TOKENS],
                                              temperature, use_reentrant=False)
            for start in range(0, flat.shape[0], LOGPS_CHUNK_TOKENS)]).view_as(targets)
    return torch.where(targets != -100, picked, 0.0)


def response_logps(model, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
# 3. Preference data: on-policy (the model's own samples, scored) and off-policy (built-in)
# --------------------------------------------------------------------------------------------


def build_pairs(model, enc, examples: list[Example], k: int = 4, temperature: float = 1.0,
                max_new_tokens: int = 64, thinking: bool = False, seed: int = 0,
                top_k: int | None = None) -> tuple[list[Pair], dict[str, int]]:
    """On-policy pairs: k sampled completions per question, scored by the verifier (sft.check_answer),
    ranked by (score, then shorter first); the best is chosen, the worst rejected. A question whose
    samples all score the same teaches no preference and is skipped.

    Returns the pairs and counts: prompts, pairs, skipped (all equal), samples, correct samples."""
    if k < 2:
        raise ValueError(f"need at least 2 samples per prompt to make a pair, got k={k}")
    end = enc.encode("<|im_end|>", allowed_special="all")[0]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    pairs, counts = [], {"prompts": len(examples), "pairs": 0, "skipped": 0, "samples": 0, "correct": 0}
    for ex in examples:
        prompt = prompt_ids(enc, ex, thinking)
        if len(prompt) >= model.cfg.max_seq_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in max_seq_len={model.cfg.max_seq_len}")
        # the k samples keep the <|im_end|> the model wrote
        samples = generate_completions(model, [prompt], k, temperature, max_new_tokens, end, gen, top_k)
        texts = [enc.decode(s) for s in samples]
        scores = [float(check_answer(ex, t)) for t in texts]
        counts["samples"] += k
        counts["correct"] += int(sum(scores))
        if len(set(scores)) == 1:
            counts["skipped"] += 1
            continue
        ranked = sorted(range(k), key=lambda i: (-scores[i], len(samples[i])))
        best, worst = ranked[0], ranked[-1]
        pairs.append(Pair(ex, thinking, tuple(prompt), texts[best], texts[worst], tuple(samples[best]),
                          tuple(samples[worst])))
    counts["pairs"] = len(pairs)
    return pairs, counts


def completion_text(example: Example, answer: str, thinking: bool) -> str:
    """What the assistant writes for this answer in the given mode, <|im_end|> included: exactly the
    loss-carrying piece of sft.py's chat template (think mode: the reasoning block, then the answer)."""
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


def off_policy_pairs(enc, examples: list[Example], thinking: bool, seed: int = 0) -> list[Pair]:
    """Pairs without sampling: the correct answer (chosen) against a corrupted one (rejected), both
    written in the template's words. Off-policy: neither completion came from the model."""
    rng = random.Random(seed)
    pairs = []
    for ex in examples:
        chosen = completion_text(ex, ex.answer, thinking)
        rejected = completion_text(ex, corrupt_answer(ex, rng), thinking)
        pairs.append(Pair(ex, thinking, tuple(prompt_ids(enc, ex, thinking)), chosen, rejected,
                          tuple(enc.encode(chosen, allowed_special="all")),
                          tuple(enc.encode(rejected, allowed_special="all"))))
    return pairs


# --------------------------------------------------------------------------------------------
# 4-5. Preference training run and report
# --------------------------------------------------------------------------------------------


@dataclass
class DPOConfig:
    init: str = "runs/tiny-sft"    # the SFT model (a run folder of sft.py); also the frozen reference
    name: str = "tiny-dpo"         # output: <out_dir>/<name>
    out_dir: str = "runs"
    loss: str = "apo_zero"         # one of LOSSES; SmolLM3 used APO
    beta: float = 0.1              # the playbook: 0.1, scan 0.01-0.5 (ORPO: its lambda)
    data: str = "off_policy"       # "on_policy" (sample, verify, pair) or "off_policy" (built-in answers)
    prompts: int = 400             # questions to build pairs from, half in each reasoning mode
    samples: int = 4               # on-policy completions per question
    temperature: float = 1.0       # sampling temperature of the candidates
    eval_examples: int = 30        # per task, held out (sft.py's seed + 1 set: the same questions)
    pairs_per_step: int = 8
    epochs: float = 1.0            # the playbook: preference training overfits after one epoch
    lr: float = 1e-4               # ~10x below sft.py's 1e-3 (the playbook)
    warmup_steps: int = 5
    seed: int = 0
    device: str = "auto"
    max_new_tokens: int = 64


def check_config(cfg: DPOConfig) -> None:
    """ValueError, one line, for a setting that cannot work (before anything is loaded)."""
    check_loss_args(cfg.loss, cfg.beta)
    if cfg.data not in ("on_policy", "off_policy"):
        raise ValueError(f"--data {cfg.data!r}: choose from on_policy, off_policy")
    if cfg.data == "on_policy" and cfg.samples < 2:
        raise ValueError(f"--samples {cfg.samples}: on-policy pairs need at least 2 samples per question")
    if cfg.prompts < 1 or cfg.pairs_per_step < 1 or cfg.epochs <= 0 or cfg.lr <= 0:
        raise ValueError("--prompts and --pairs-per-step must be >= 1, --epochs and --lr > 0")


def preference_pairs(cfg: DPOConfig, model, enc, examples: list[Example], log=print) -> tuple[list[Pair], dict]:
    """The training pairs of the configured kind, half of the questions in each reasoning mode."""
    halves = ((True, examples[0::2]), (False, examples[1::2]))
    pairs, counts = [], {}
    for thinking, exs in halves:
        mode = "think" if thinking else "no_think"
        if cfg.data == "off_policy":
            found = off_policy_pairs(enc, exs, thinking, cfg.seed)
            counts[mode] = {"prompts": len(exs), "pairs": len(found)}
        else:
            found, counts[mode] = build_pairs(model, enc, exs, cfg.samples, cfg.temperature, cfg.max_new_tokens,
                                              thinking, cfg.seed)
        pairs += found
        log(f"  {mode:8s} " + ", ".join(f"{k} {v:,}" for k, v in counts[mode].items()))
    return pairs, counts


def preference_train(cfg: DPOConfig, log=functools.partial(print, flush=True)) -> dict:
    """Run preference optimisation as configured and return the report (also <run>/report.json)."""
    check_config(cfg)
    model, enc, data_cfg, device = load_start(cfg.init, cfg.device, cfg.seed, "python sft.py")
    eval_set = held_out_examples(cfg.eval_examples)
    # fresh questions (seed + 2: not sft.py's training stream), none of the held-out ones
    questions = make_examples(cfg.prompts, seed=cfg.seed + 2, exclude={e.question for e in eval_set})
    log(f"{cfg.data.replace('_', '-')} preference pairs from {len(questions):,} questions:")
    t0 = time.time()
    pairs, data_counts = preference_pairs(cfg, model, enc, questions, log)
    if not pairs:
        raise SystemExit("error: no preference pairs: every question's samples scored the same; raise --samples "
                         "or --temperature, or use --data off_policy")
    log(f"{len(pairs):,} pairs in {time.time() - t0:.0f}s")
    before = accuracy(model, enc, eval_set, cfg.max_new_tokens)

    # the reference is the starting policy, frozen (ORPO has none)
    ref = None if cfg.loss == "orpo" else copy.deepcopy(model).eval().requires_grad_(False)
    pad_id = enc.encode("<|endoftext|>", allowed_special="all")[0]
    steps = max(1, math.ceil(cfg.epochs * len(pairs) / cfg.pairs_per_step))
    batch = min(cfg.pairs_per_step, len(pairs))
    # no weight decay: it would pull the weights toward zero, while the loss already holds them
    # near the reference
    ocfg = OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=min(cfg.warmup_steps, steps // 2),
                       weight_decay=0.0)
    optimizer = build_optimizer(model, ocfg)
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = open(run_dir / "metrics.jsonl", "w")
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(pairs), generator=gen)
    history, pos = [], 0
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        if pos + batch > len(pairs):  # a new epoch: reshuffle (a partial last batch is dropped)
            order, pos = torch.randperm(len(pairs), generator=gen), 0
        chunk = [pairs[i] for i in order[pos:pos + batch].tolist()]
        pos += batch
        lr = lr_at(step - 1, ocfg, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, targets = pair_batch(chunk, pad_id)
        ids, targets = ids.to(device), targets.to(device)
        logps, n_tokens = response_logps(model, ids, targets)
        ref_logps = None
        if ref is not None:
            with torch.no_grad():
                ref_logps, _ = response_logps(ref, ids, targets)
        n = len(chunk)
        loss, m = preference_loss(cfg.loss, logps[:n], logps[n:], ref_logps[:n] if ref is not None else None,
                                  ref_logps[n:] if ref is not None else None, cfg.beta,
                                  n_tokens[:n].float(), n_tokens[n:].float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": loss.item(), "lr": lr, **m})
        metrics_file.write(json.dumps(history[-1]) + "\n")
        if step % 10 == 0 or step == steps:
            recent = history[-10:]
            log(f"step {step:4d}/{steps} | loss {mean_of(recent, 'loss'):.4f} | reward acc "
                f"{mean_of(recent, 'accuracy'):.0%} | margin {mean_of(recent, 'margin'):+.4f} | lr {lr:.2e}")
    seconds = time.time() - t0
    metrics_file.close()
    after = accuracy(model, enc, eval_set, cfg.max_new_tokens)
    window = history[-max(1, min(10, steps // 4)):]
    report = {"loss_type": cfg.loss, "beta": cfg.beta, "data": cfg.data, "pairs": len(pairs),
              "pair_counts": data_counts, "steps": steps, "seconds": seconds, "first_loss": history[0]["loss"],
              "final_loss": mean_of(window, "loss"), "final_reward_accuracy": mean_of(window, "accuracy"),
              "final_margin": mean_of(window, "margin"), "accuracy_before": before, "accuracy_after": after}
    save_model(model, data_cfg, run_dir / f"ckpt_{steps:07d}.pt", {"step": steps, "dpo": dataclasses.asdict(cfg)})
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    log(format_report(report))
    return report


def mean_of(rows: list[dict], key: str) -> float:
    """The mean of one logged figure over metric rows (the report's "last steps" figures)."""
    return sum(r[key] for r in rows) / len(rows)


def format_report(r: dict) -> str:
    lines = accuracy_table(r["accuracy_before"], r["accuracy_after"])
    lines.append(f"{r['loss_type']} (beta {r['beta']}) on {r['pairs']} {r['data'].replace('_', '-')} pairs: loss "
                 f"{r['first_loss']:.4f} -> {r['final_loss']:.4f} in {r['steps']} steps; reward accuracy "
                 f"{r['final_reward_accuracy']:.0%}, margin {r['final_margin']:+.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    preference_train(parse_args(sys.argv[1:], DPOConfig, check_config))
