"""Evaluation: the playbook's rule is to trust your evaluation before you trust an ablation.

    python eval.py --model runs/tiny --task prose_cloze                  # cloze (CF), the default
    python eval.py --model runs/tiny --task code_next_line --formulation mcf
    python eval.py --model gguf:PATH --task arithmetic                   # generative, exact match
    python eval.py --model hf_folder/ --task humaneval --k 10 --temperature 0.8
    python eval.py compare runs/a runs/b                                 # loss and eval curves
    python eval.py quality runs/* --metric eval/prose_cloze/acc_norm     # is this task any good?
    python eval.py decontaminate --task prose_cloze --shards data_cache/vocab4096/seed1337-val0.05

The story, top to bottom (what is asked, the tasks, lives in eval_tasks.py; running model-written
code for HumanEval in humaneval.py; the models, any spec checkpoint.load_model reads: a run folder
or checkpoint, gguf:PATH, a Hugging Face folder):

1. Formulations. Cloze (CF): each choice is scored by the log-likelihood of its text after the
   query; `acc` takes the most likely, `acc_norm` divides by the choice's length in characters.
   Multiple-choice (MCF): choices are lettered in the prompt and only the letter is scored. The
   playbook found CF gives signal early in training while MCF only works once a model has learnt
   the format (after ~500B tokens at 7B), which is why small ablations use CF. Generative: greedy
   or sampled with the KV cache, exact match after normalisation, avg@k over k samples (steadier
   than one sample on small tasks). Scoring is batched, and padding never changes a score.
2. Task quality, FineWeb's criteria for choosing ablation tasks, from metrics.jsonl files:
   monotonicity (Spearman of score with step), noise (spread across seeds), distance above the
   random baseline, and ranking consistency between runs across steps (Kendall tau).
3. Decontamination: token n-grams (n=8 by default) shared by training shards and a task's items.
4. Comparing runs: loss and eval curves of several run folders, as a text table and a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
from checkpoint import load_model
from eval_tasks import BUILTIN_TASKS, PUBLIC_LAYOUTS, ChoiceItem, EvalError, GenItem, Task, check_task_name, load_task
from generate import generate
from humaneval import humaneval_program, pass_at_k, run_programs, truncate_at_stops
from tokenizer import load_tokenizer


# --------------------------------------------------------------------------------------------
# 1. Scoring: log-likelihoods in batches, CF, MCF, generation
# --------------------------------------------------------------------------------------------


def _max_len(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "max_seq_len", None)


def _device(model) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def encode_pair(enc, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, cut from the encoding of the whole string
    (so the continuation's tokens are the ones the model would really see after the context).
    Spaces ending the context move to the continuation, where the BPE attaches them. When a token
    still spans the boundary (a newline merged with the next line's indent), the cut moves back to
    where the two encodings part, and the continuation is scored from that token on."""
    stripped = context.rstrip(" ")
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx, whole = enc.encode_ordinary(context), enc.encode_ordinary(context + continuation)
    shared = 0
    while shared < min(len(ctx), len(whole) - 1) and ctx[shared] == whole[shared]:
        shared += 1
    return whole[:shared], whole[shared:]


@torch.no_grad()
def continuation_logprobs(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                          bos: int = 0) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids).

    Sequences are sorted by length and right-padded: with causal attention a padding token comes
    after every real one and so cannot change any score. A context too long for the model keeps
    its last tokens; an empty one starts from `bos` (the end-of-document token, as in training)."""
    max_len = _max_len(model)
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    rows = []
    for ctx, cont in requests:
        if not cont:
            raise EvalError("a continuation encodes to no tokens; every choice needs text")
        if vocab is not None and max(max(ctx, default=0), max(cont)) >= vocab:
            raise EvalError(f"the tokenizer gave an id past the model's vocabulary ({vocab}): they do not match")
        tokens = (list(ctx) or [bos]) + list(cont)
        if max_len is not None:
            if len(cont) > max_len:
                raise EvalError(f"a continuation of {len(cont)} tokens is longer than the model's {max_len}")
            tokens = tokens[-(max_len + 1):]
        rows.append((tokens[:-1], tokens[-len(cont):]))
    device = _device(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        width = len(rows[batch[0]][0])
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for j, i in enumerate(batch):
            x[j, :len(rows[i][0])] = torch.tensor(rows[i][0])
        logits = model(x.to(device))
        for j, i in enumerate(batch):
            inputs, cont = rows[i]
            n, end = len(cont), len(inputs)
            logp = F.log_softmax(logits[j, end - n:end].float(), dim=-1)
            out[i] = logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum().item()
    return out


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mcf_prompt(item: ChoiceItem) -> str:
    """The query, the choices lettered A, B, C..., then 'Answer:'; the model should say a letter."""
    if len(item.choices) > len(LETTERS):
        raise EvalError(f"the multiple-choice formulation letters at most {len(LETTERS)} choices")
    lines = [item.query.rstrip()] + [f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def score_choices(model, enc, items: list[ChoiceItem], formulation: str = "cf", batch_size: int = 16,
                  bos: int = 0) -> dict:
    """acc and acc_norm (fractions) of multiple-choice items under CF or MCF, with per-item scores.

    CF scores each choice's text after the query; acc_norm divides its log-likelihood by the
    choice's length in characters, so long choices are not penalised for having more tokens.
    MCF scores ' A', ' B', ... after the lettered prompt (acc_norm is then acc: all one letter)."""
    if formulation not in ("cf", "mcf"):
        raise EvalError(f"multiple-choice tasks take --formulation cf or mcf, not {formulation!r}")
    requests, spans, lengths = [], [], []
    for item in items:
        if formulation == "cf":
            pairs = [(item.query, c) for c in item.choices]
            lengths.append([len(c) for c in item.choices])
        else:
            prompt = mcf_prompt(item)
            pairs = [(prompt, " " + LETTERS[i]) for i in range(len(item.choices))]
            lengths.append([1] * len(item.choices))
        spans.append((len(requests), len(requests) + len(pairs)))
        requests += [encode_pair(enc, q, c) for q, c in pairs]
    scores = continuation_logprobs(model, requests, batch_size, bos)
    per_item = []
    for item, (a, b), lens in zip(items, spans, lengths):
        ll = scores[a:b]
        pred = int(np.argmax(ll))
        pred_norm = int(np.argmax([s / n for s, n in zip(ll, lens)]))
        per_item.append({"loglik": ll, "pred": pred, "pred_norm": pred_norm, "gold": item.gold})
    n = len(items)
    return {"acc": sum(r["pred"] == r["gold"] for r in per_item) / n,
            "acc_norm": sum(r["pred_norm"] == r["gold"] for r in per_item) / n,
            "random": float(np.mean([1 / len(it.choices) for it in items])), "n": n, "items": per_item}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """Lowercase, no surrounding space or final period, single spaces, no thousands commas or $."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text.strip().lower()).replace("$", "")
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip()


def answer_matches(generated: str, answer: str) -> bool:
    """Exact match after normalisation. A numeric answer is compared with the number after 'the
    answer is' when the generation says so, else with the last number it wrote (GSM8K's rule)."""
    gold = normalize_answer(answer)
    if _NUMBER.fullmatch(gold):
        text = normalize_answer(generated)
        said = re.findall(r"answer is:?\s*(-?[\d,]*\.?\d+)", text)
        numbers = said or _NUMBER.findall(text)
        if not numbers:
            return False
        try:
            return float(numbers[-1].replace(",", "")) == float(gold)
        except ValueError:
            return False
    return normalize_answer(generated.strip().split("\n")[0]) == gold


@torch.no_grad()
def sample_completions(model, enc, prompts: list[str], k: int = 1, temperature: float = 0.0, max_new_tokens: int = 64,
                       stops: list[str] = (), eos: int | None = None, seed: int = 0) -> list[list[str]]:
    """k continuations of each prompt, cut at the stops: every prompt of a task in one call of the
    project's sampler (ragged prompts batch together)."""
    max_len = _max_len(model)
    if max_len is not None and max_new_tokens > max_len // 2:
        warnings.warn(f"generating {max_len // 2} tokens, not {max_new_tokens}: half of the model's "
                      f"max_seq_len={max_len} is kept for the prompt", stacklevel=2)
        max_new_tokens = max_len // 2
    ids = [enc.encode_ordinary(p) for p in prompts]
    if max_len is not None:
        ids = [i[-(max_len - max_new_tokens):] for i in ids]  # a long prompt keeps its end, next to the answer
    gen = torch.Generator(device=_device(model)).manual_seed(seed)
    completions = generate(model, ids, max_new_tokens, k=k, temperature=temperature,
                           stop_ids=() if eos is None else (eos,), generator=gen)
    texts = [truncate_at_stops(enc.decode(row[:-1] if row[-1:] == [eos] else row), list(stops)) for row in completions]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def score_generative(model, enc, task: Task, k: int = 1, temperature: float = 0.0, max_new_tokens: int = 64,
                     eos: int | None = None, seed: int = 0, timeout: float = 10.0, workers: int = 2) -> dict:
    """Exact match and avg@k for generative items; pass@k (unbiased) for HumanEval's unit tests."""
    if k > 1 and temperature == 0:
        raise EvalError(f"--k {k} samples at temperature 0 would all be the same; set --temperature (e.g. 0.8)")
    prompts = [item["prompt"] if task.kind == "code" else item.prompt for item in task.items]
    samples = sample_completions(model, enc, prompts, k, temperature, max_new_tokens, task.stops, eos, seed)
    if task.kind == "code":
        programs = [humaneval_program(p, c) for p, cs in zip(task.items, samples) for c in cs]
        results = run_programs(programs, timeout=timeout, workers=workers)
        correct = [[r.passed for r in results[i * k:(i + 1) * k]] for i in range(len(task.items))]
        metrics = {f"pass@{j}": float(np.mean([pass_at_k(k, sum(c), j) for c in correct]))
                   for j in sorted({1, 10, 100, k}) if j <= k}
    else:
        correct = [[answer_matches(s, item.answer) for s in ss] for item, ss in zip(task.items, samples)]
        metrics = {"exact_match": float(np.mean([c[0] for c in correct])),
                   f"avg@{k}": float(np.mean([np.mean(c) for c in correct]))}
    metrics["n"] = len(task.items)
    metrics["items"] = [{"samples": s, "correct": c} for s, c in zip(samples, correct)]
    return metrics


def evaluate_task(model, enc, task: Task, formulation: str | None = None, batch_size: int = 16, k: int = 1,
                  temperature: float = 0.0, max_new_tokens: int | None = None, seed: int = 0) -> dict:
    """Score one task with its formulation (default: cf for choices, gen otherwise)."""
    formulation = formulation or ("cf" if task.kind == "choice" else "gen")
    eos = getattr(enc, "eot_token", None)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        if task.kind == "choice":
            return score_choices(model, enc, task.items, formulation, batch_size, bos=eos or 0)
        if formulation != "gen":
            raise EvalError(f"task {task.name} is generative: use --formulation gen")
        if max_new_tokens is None:
            max_new_tokens = 256 if task.kind == "code" else 64
        return score_generative(model, enc, task, k, temperature, max_new_tokens, eos, seed)
    finally:
        if was_training:
            model.train()


NO_CODE_TASKS_IN_TRAINING = ("train.eval_tasks cannot run humaneval (it executes code); evaluate checkpoints "
                             "with eval.py instead")


class TrainingEvals:
    """The tasks train.py scores every eval_interval steps, built once (a sample of each)."""

    def __init__(self, specs: tuple[str, ...], cfg: data.DataConfig, enc, items: int):
        self.enc = enc
        self.tasks = [load_task(s, cfg, limit=items) for s in specs]
        for t in self.tasks:
            if t.kind == "code":
                raise EvalError(NO_CODE_TASKS_IN_TRAINING)

    def run(self, model) -> dict[str, float]:
        row = {}
        for task in self.tasks:
            result = evaluate_task(model, self.enc, task)
            for key, value in result.items():
                if key not in ("n", "items", "random"):
                    row[f"eval/{task.name}/{key}"] = value
        return row


# --------------------------------------------------------------------------------------------
# 2. Task-quality statistics (FineWeb's criteria) from metrics.jsonl
# --------------------------------------------------------------------------------------------


def _ranks(x) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of the ranks (nan when either side is constant)."""
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def kendall_tau(x, y) -> float:
    """Kendall's tau-b: (concordant - discordant) pairs over the pairs not tied on each side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    i, j = np.triu_indices(len(x), 1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denom = math.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy))
    return float((sx * sy).sum() / denom) if denom else float("nan")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise EvalError(f"{path} not found; give run folders written by train.py")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: malformed JSON line ({e.msg})") from e
    return rows


def curve(rows: list[dict], metric: str) -> dict[int, float]:
    """{step: value} of one metric (the last value logged at a step wins)."""
    return {int(r["step"]): float(r[metric]) for r in rows if metric in r and r[metric] is not None}


def task_quality(groups: dict[str, list[dict[int, float]]], baseline: float) -> dict:
    """FineWeb's four criteria for one metric. groups: setup name -> one curve per seed.

    monotonicity: mean over runs of Spearman(step, score). noise: std across seeds (ddof=1) at
    each shared step, averaged over steps (setups with 2+ seeds). above_random: final score
    (mean over seeds) minus the random baseline, and in units of the noise. ranking: mean
    Kendall tau between the setups' rankings at consecutive shared steps (2+ setups)."""
    curves = [c for cs in groups.values() for c in cs if len(c) >= 2]
    if not curves:
        raise EvalError("no run has this metric at two or more steps")
    out = {"runs": sum(len(cs) for cs in groups.values()), "setups": len(groups),
           "monotonicity": float(np.nanmean([spearman(list(c), list(c.values())) for c in curves]))}
    noises = []
    for cs in groups.values():
        if len(cs) >= 2:
            shared = sorted(set.intersection(*(set(c) for c in cs)))
            noises += [float(np.std([c[s] for c in cs], ddof=1)) for s in shared]
    out["noise"] = float(np.mean(noises)) if noises else None
    finals = [float(np.mean([c[max(c)] for c in cs])) for cs in groups.values() if cs and all(cs)]
    out["final"] = float(np.mean(finals))
    out["above_random"] = out["final"] - baseline
    out["above_random_in_noise"] = out["above_random"] / out["noise"] if out["noise"] else None
    if len(groups) >= 2:
        means = {g: {s: float(np.mean([c[s] for c in cs])) for s in set.intersection(*(set(c) for c in cs))}
                 for g, cs in groups.items()}
        shared = sorted(set.intersection(*(set(m) for m in means.values())))
        taus = [kendall_tau([m[a] for m in means.values()], [m[b] for m in means.values()])
                for a, b in zip(shared, shared[1:])]
        out["ranking_kendall_tau"] = float(np.nanmean(taus)) if taus else None
    return out


def group_runs(run_dirs: list[str]) -> dict[str, list[str]]:
    """Runs whose config.toml agree apart from train.name/seed/out_dir are seeds of one setup."""
    groups: dict[str, list[str]] = {}
    for run in run_dirs:
        cfg_path = Path(run) / "config.toml"
        key = str(run)
        if cfg_path.is_file():
            cfg = tomllib.loads(cfg_path.read_text())
            for k in ("name", "seed", "out_dir"):
                cfg.get("train", {}).pop(k, None)
            key = json.dumps(cfg, sort_keys=True)
        groups.setdefault(key, []).append(run)
    return {", ".join(Path(r).name for r in runs): runs for runs in groups.values()}


# --------------------------------------------------------------------------------------------
# 3. Decontamination: shared token n-grams between training shards and a task
# --------------------------------------------------------------------------------------------

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every n-gram (wrapping uint64 arithmetic), one per start."""
    t = np.asarray(tokens, dtype=np.uint64)
    if len(t) < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _HASH_MULT + t[j:len(t) - n + 1 + j] + np.uint64(1)
    return h


def item_text(item) -> str:
    """What a contaminated training set would contain: the question with its right answer."""
    if isinstance(item, ChoiceItem):
        return item.query + item.choices[item.gold]
    if isinstance(item, GenItem):
        return item.prompt + " " + item.answer
    return item["prompt"] + item["canonical_solution"]


def find_contamination(item_tokens: list[list[int]], shards, n: int = 8, chunk: int = 1 << 24) -> list[int]:
    """For each item, how many of its distinct n-grams occur in the shards (token arrays).

    Hash matches are confirmed token by token, so a hash collision never counts."""
    by_hash: dict[int, set[tuple[int, ...]]] = {}
    owners: dict[tuple[int, ...], list[int]] = {}
    for i, toks in enumerate(item_tokens):
        hashes = ngram_hashes(np.asarray(toks), n)
        for s, h in enumerate(hashes.tolist()):
            gram = tuple(toks[s:s + n])
            by_hash.setdefault(h, set()).add(gram)
            owners.setdefault(gram, [])
            if i not in owners[gram]:
                owners[gram].append(i)
    wanted = np.fromiter(by_hash, dtype=np.uint64, count=len(by_hash))
    found: set[tuple[int, ...]] = set()
    for shard in shards:
        for start in range(0, max(1, len(shard) - n + 1), chunk):
            part = np.asarray(shard[start:start + chunk + n - 1])
            hashes = ngram_hashes(part, n)
            for pos in np.nonzero(np.isin(hashes, wanted))[0].tolist():
                gram = tuple(part[pos:pos + n].tolist())
                if gram in by_hash.get(int(hashes[pos]), ()):
                    found.add(gram)
    counts = [0] * len(item_tokens)
    for gram in found:
        for i in owners[gram]:
            counts[i] += 1
    return counts


def decontaminate(task: Task, enc, shards, n: int = 8, threshold: float = 0.0) -> dict:
    """Items whose share of n-grams found in the shards exceeds threshold (0: any shared n-gram,
    GPT-3's rule; Llama 2 counted an item dirty above ~80%, since common phrases and templates
    are shared by clean items too). 'clean' is the task without them."""
    toks = [enc.encode_ordinary(item_text(it)) for it in task.items]
    counts = find_contamination(toks, shards, n)  # distinct n-grams found, so divide by distinct ones
    distinct = [len({tuple(t[s:s + n]) for s in range(len(t) - n + 1)}) for t in toks]
    overlap = [c / max(1, d) for c, d in zip(counts, distinct)]
    dirty = [i for i, (c, o) in enumerate(zip(counts, overlap)) if c > 0 and o > threshold]
    clean = dataclasses.replace(task, items=[it for i, it in enumerate(task.items) if i not in set(dirty)])
    return {"n": n, "threshold": threshold, "items": len(task.items), "contaminated": dirty,
            "too_short": [i for i, t in enumerate(toks) if len(t) < n], "overlap": overlap, "clean": clean}


# --------------------------------------------------------------------------------------------
# 4. Comparing runs
# --------------------------------------------------------------------------------------------


def compare_runs(run_dirs: list[str], out_png: str | None = "compare.png", max_rows: int = 12) -> str:
    """A text table per metric (loss, val_loss, eval/...) at up to max_rows steps; a PNG as well
    when matplotlib is installed. Returns the text."""
    runs = {str(r): read_metrics(r) for r in run_dirs}
    keys = ["loss", "val_loss"] + sorted({k for rows in runs.values() for r in rows for k in r if k.startswith("eval/")})
    curves = {k: {r: curve(rows, k) for r, rows in runs.items()} for k in keys}
    curves = {k: c for k, c in curves.items() if any(c.values())}
    lines = []
    for key, per_run in curves.items():
        steps = sorted(set().union(*per_run.values()))
        if len(steps) > max_rows:
            steps = sorted({steps[round(i * (len(steps) - 1) / (max_rows - 1))] for i in range(max_rows)})
        names = [Path(r).name for r in per_run]
        width = max(10, *map(len, names))
        lines.append(f"\n{key}\n{'step':>8} " + " ".join(f"{n:>{width}}" for n in names))
        for s in steps:
            cells = [f"{c[s]:>{width}.4f}" if s in c else f"{'':>{width}}" for c in per_run.values()]
            lines.append(f"{s:>8} " + " ".join(cells))
    text = "\n".join(lines)
    if out_png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            text += "\n\n(no PNG: matplotlib is not installed; pip install matplotlib)"
            return text
        fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), squeeze=False)
        for ax, (key, per_run) in zip(axes[0], curves.items()):
            for run, c in per_run.items():
                if c:
                    ax.plot(list(c), list(c.values()), label=Path(run).name, marker="." if len(c) < 30 else None)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_png, dpi=100)
        plt.close(fig)
        text += f"\n\nwrote {out_png}"
    return text


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _print_result(model: str, task: Task, formulation: str, result: dict, seconds: float) -> None:
    metrics = {k: v for k, v in result.items() if k != "items"}
    print(f"model {model} | task {task.name} ({task.kind}, {result['n']} items) | formulation {formulation} | "
          f"{seconds:.1f} s")
    print(f"{'metric':<14}{'value':>10}")
    for k, v in metrics.items():
        print(f"{k:<14}{v:>10.4f}" if isinstance(v, float) else f"{k:<14}{v:>10}")
    print(json.dumps({"task": task.name, "formulation": formulation, **metrics}))


def main_eval(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0] + " Score a model on a task.",
                                epilog="also: eval.py compare RUNS..., eval.py quality RUNS..., eval.py decontaminate")
    p.add_argument("--model", required=True, help="run folder, ckpt_* checkpoint, gguf:PATH, or Hugging Face folder")
    p.add_argument("--task", required=True, help=f"built-in ({', '.join(BUILTIN_TASKS)}), a JSONL path, or "
                                                 f"LAYOUT:PATH ({', '.join(PUBLIC_LAYOUTS)})")
    p.add_argument("--formulation", choices=["cf", "mcf", "gen"], help="default: cf for choices, gen otherwise")
    p.add_argument("--limit", type=int, help="score a seeded sample of this many items")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=1, help="samples per generative item (avg@k, pass@k)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if (args.k < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1) or args.temperature < 0
            or (args.max_new_tokens is not None and args.max_new_tokens < 1)):
        raise EvalError("--k, --batch-size, --limit and --max-new-tokens must be >= 1 and --temperature >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    # a task file is read before the model, so a bad line stops the run before any loading
    task = None if args.task in BUILTIN_TASKS else load_task(args.task, None, args.limit, args.seed)
    check_task_name(args.task)
    model, enc, dcfg = load_model(args.model, args.device)
    task = task or load_task(args.task, dcfg, args.limit, args.seed)
    formulation = args.formulation or ("cf" if task.kind == "choice" else "gen")
    t0 = time.time()
    result = evaluate_task(model, enc, task, formulation, args.batch_size, args.k, args.temperature,
                           args.max_new_tokens, args.seed)
    _print_result(args.model, task, formulation, result, time.time() - t0)


def main_quality(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="eval.py quality", description="FineWeb's task-quality criteria for one "
                                "metric over run folders (runs differing only in train.seed are seeds of a setup)")
    p.add_argument("runs", nargs="+")
    p.add_argument("--metric", required=True, help="e.g. eval/prose_cloze/acc_norm")
    p.add_argument("--baseline", type=float, help="random baseline (default: from the built-in task, else 0)")
    args = p.parse_args(argv)
    baseline = args.baseline
    if baseline is None:
        name = args.metric.split("/")[1] if args.metric.startswith("eval/") else ""
        baseline = load_task(name).random_baseline if name in BUILTIN_TASKS and name != "humaneval" else 0.0
    groups = {g: [curve(read_metrics(r), args.metric) for r in runs] for g, runs in group_runs(args.runs).items()}
    result = task_quality(groups, baseline)
    for k, v in result.items():
        print(f"{k:<24}{v:>10.4f}" if isinstance(v, float) else f"{k:<24}{v!s:>10}")
    print(json.dumps({"metric": args.metric, "baseline": baseline, **result}))


def main_decontaminate(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="eval.py decontaminate",
                                description="n-gram overlap between training shards and a task")
    p.add_argument("--task", required=True)
    p.add_argument("--shards", nargs="+", required=True, help="shard files or folders (their *_train_*.bin)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: next to the shard folder)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.0, help="contaminated above this share of n-grams found")
    p.add_argument("--out", help="write the task without contaminated items to this JSONL file")
    args = p.parse_args(argv)
    paths = []
    for s in map(Path, args.shards):
        paths += sorted(s.glob("*_train_*.bin")) if s.is_dir() else [s]
    if not paths or not all(p.is_file() for p in paths):
        raise EvalError(f"no training shards found in {args.shards}")
    tok_path = Path(args.tokenizer) if args.tokenizer else paths[0].parent.parent / "tokenizer.json"
    enc = load_tokenizer(tok_path)
    # built-in tasks are cut from the validation documents of the shards' own split
    task = load_task(args.task, data.DataConfig.from_shard_dir(paths[0].parent) if args.task in BUILTIN_TASKS else None)
    fingerprint = data.tokenizer_fingerprint(tok_path)  # n-grams of ids mean nothing under another tokenizer
    report = decontaminate(task, enc, [data.read_shard(p, fingerprint) for p in paths], args.n, args.threshold)
    overlap = np.array(report["overlap"])
    print(f"task {task.name}, {report['items']} items against {len(paths)} shard(s), {args.n}-grams: "
          + ", ".join(f"{int((overlap > t).sum())} above {t:.0%}" for t in (0, 0.5, 0.8))
          + f"; {len(report['too_short'])} too short to check")
    print(f"{len(report['contaminated'])} contaminated (above {args.threshold:.0%}); the most overlapping:")
    for i in sorted(report["contaminated"], key=lambda i: -overlap[i])[:5]:
        print(f"  item {i} ({100 * report['overlap'][i]:.0f}% of its {args.n}-grams): {item_text(task.items[i])[:100]!r}")
    if args.out:
        with open(args.out, "w") as f:
            for it in report["clean"].items:
                f.write(json.dumps(dataclasses.asdict(it) if dataclasses.is_dataclass(it) else it) + "\n")
        print(f"wrote {len(report['clean'].items)} clean items to {args.out}")
    print(json.dumps({k: v for k, v in report.items() if k not in ("clean", "overlap")}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"compare": None, "quality": main_quality, "decontaminate": main_decontaminate}
    try:
        if argv and argv[0] == "compare":
            p = argparse.ArgumentParser(prog="eval.py compare", description="loss and eval curves of run folders")
            p.add_argument("runs", nargs="+")
            p.add_argument("--out", default="compare.png", help="PNG path (written when matplotlib is installed)")
            args = p.parse_args(argv[1:])
            print(compare_runs(args.runs, args.out))
        elif argv and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            main_eval(argv)
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # ValueError: EvalError, unreadable files
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
