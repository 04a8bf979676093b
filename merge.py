"""Model merging: several runs fine-tuned from one base become one model by averaging their weights.

    python sft.py --sft.epochs=1 --run.seed=0 --run.name=tiny-sft-e1-s0   # and seed 2: two fine-tunes of runs/tiny
    python merge.py --merge.runs='["runs/tiny-sft-e1-s0", "runs/tiny-sft-e1-s2"]' --merge.name=tiny-soup-e1
    python merge.py --merge.runs='["runs/tiny-soup-e1", "runs/tiny"]' --merge.weights=[0.9,0.1] --merge.name=soup-base
    python merge.py --merge.runs='["runs/a", "runs/b"]' --merge.method=slerp --merge.weights=[0.7,0.3]
    python merge.py --merge.runs='["runs/a", "runs/b"]' --merge.method=task_arithmetic --merge.base=runs/tiny

The playbook's finding: SmolLM3's last post-training step was a merge, not a training run. A soup
of its APO checkpoints (MergeKit's `linear` method) kept their gains; post-training had lost
long-context (RULER) scores, so the soup was mixed 0.9 / 0.1 with a mid-training long-context
checkpoint, which recovered them. Averaging works because models fine-tuned from one base stay in
one basin of the loss (Wortsman et al. 2022, "Model soups"): the average is often as good as the
best of them, at no training cost.

1. Merges of state dicts: linear (weights >= 0 summing to 1), SLERP of two models per tensor, task
   arithmetic (base + sum w_i (model_i - base), Ilharco et al. 2023). What cannot be merged stops
   with one line: other keys or shapes, integer tensors that differ.
2. The run: loads any model specs of one configuration (checkpoint.load_model), merges, scores each
   input and the merge (validation loss; chat models add held-out chat loss and answer accuracy),
   and writes a run folder that eval.py and the post-training stages (--run.init) read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import CheckpointError, load_model, save_checkpoint
from config import ConfigError, load_config as read_config, parse_cli
from data import MixtureLoader, tokenizer_fingerprint
from model import Transformer
from posttrain import accuracy, held_out_examples
from sft import encode_chat, make_rows
from tokenizer import eot_id, save_hf_tokenizer
from train import evaluate

StateDict = dict[str, torch.Tensor]
METHODS = ("linear", "slerp", "task_arithmetic")


class MergeError(ValueError):
    """A merge that cannot be done, said in one line."""


def check_weights(weights: list[float] | None, n: int, normalize: bool = False, sum_to_one: bool = True) -> list[float]:
    """One non-negative weight per model (equal when None). They must sum to 1 (when sum_to_one)
    unless normalize, which rescales them to."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weights for {n} models; give one per model")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise MergeError(f"weights {weights} must be finite and non-negative")
    total = sum(weights)
    if normalize:
        if total <= 0:
            raise MergeError(f"weights {weights} sum to 0; nothing to normalise")
        return [w / total for w in weights]
    if sum_to_one and abs(total - 1) > 1e-6:
        raise MergeError(f"weights {weights} sum to {total:g}, not 1; pass --normalize (normalize=True) to rescale")
    return list(weights)


def check_states(states: list[StateDict], names: list[str] | None = None) -> None:
    """Stop unless every state dict has the first's keys and shapes, and equal non-float tensors
    (counters, indices: nothing to average, so they are copied from the first)."""
    names = names or [f"model {i}" for i in range(len(states))]
    if not states:
        raise MergeError("nothing to merge: give at least one model")
    first = states[0]
    for name, state in zip(names[1:], states[1:]):
        missing, extra = sorted(first.keys() - state.keys()), sorted(state.keys() - first.keys())
        if missing or extra:
            raise MergeError(f"{name} and {names[0]} hold different tensors: {name} lacks {missing[:3]} and "
                             f"adds {extra[:3]}")
        for k, a in first.items():
            b = state[k]
            if a.shape != b.shape:
                raise MergeError(f"tensor {k} has shape {tuple(a.shape)} in {names[0]} but {tuple(b.shape)} in {name}")
            if not a.is_floating_point() and (a.dtype != b.dtype or not torch.equal(a, b.to(a.device))):
                raise MergeError(f"non-float tensor {k} ({a.dtype}) differs between {names[0]} and {name}; "
                                 f"it cannot be averaged")


def linear_merge(states: list[StateDict], weights: list[float] | None = None, normalize: bool = False,
                 names: list[str] | None = None) -> StateDict:
    """sum_i w_i * state_i per tensor (MergeKit's `linear`); equal weights make a model soup
    (Wortsman et al. 2022), SmolLM3's merge of its APO checkpoints. Summed in float64 and cast back
    to each tensor's dtype: a model merged with itself at any weights comes back bit for bit."""
    check_states(states, names)
    weights = check_weights(weights, len(states), normalize)
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)).to(a.dtype) if a.is_floating_point()
            else a.clone() for k, a in states[0].items()}


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1) along the arc between their directions, as
    MergeKit does per tensor: two orthogonal tensors of one norm keep it, where the linear midpoint
    shrinks it by sqrt(2). Near-parallel (|cos| > dot_threshold) or zero tensors have no stable
    arc, so they fall back to linear interpolation."""
    x, y = a.double().flatten(), b.double().flatten()
    nx, ny = x.norm().item(), y.norm().item()
    cos = (x @ y).item() / (nx * ny) if nx > 0 and ny > 0 else 1.0
    if abs(cos) > dot_threshold:
        out = (1 - t) * x + t * y
    else:
        theta = math.acos(cos)
        out = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    return out.view(a.shape).to(a.dtype)


def slerp_merge(a: StateDict, b: StateDict, t: float, names: list[str] | None = None) -> StateDict:
    """SLERP of two models, tensor by tensor (MergeKit's `slerp`); t is b's share."""
    check_states([a, b], names)
    if not 0 <= t <= 1:
        raise MergeError(f"slerp t={t} must be within [0, 1]")
    return {k: slerp(v, b[k], t) if v.is_floating_point() else v.clone() for k, v in a.items()}


def task_arithmetic(base: StateDict, states: list[StateDict], weights: list[float] | None = None,
                    normalize: bool = False, names: list[str] | None = None) -> StateDict:
    """base + sum_i w_i (state_i - base): each fine-tune's change from the base ("task vector",
    Ilharco et al. 2023), scaled and added. Weights need not sum to 1 (1, 1 adds both changes in
    full); when they do, this is the linear merge whatever the base."""
    check_states([base] + states, names)
    weights = check_weights(weights, len(states), normalize, sum_to_one=False)
    return {k: (v.double() + sum(w * (s[k].double() - v.double()) for w, s in zip(weights, states))).to(v.dtype)
            if v.is_floating_point() else v.clone() for k, v in base.items()}


# --- the run: load, check, merge, score, write ----------------------------------------------


@torch.no_grad()
def score(model: Transformer, enc, data_cfg, chat: bool, eval_examples: int, eval_batches: int,
          max_new_tokens: int) -> dict:
    """Validation loss on the pretraining data's held-out windows (train.evaluate). Chat models add
    the loss on the held-out conversations (both modes, assistant tokens) and the answer accuracy
    (posttrain.accuracy); on the tiny model the accuracy sits near 0, so the chat loss moves."""
    device, vocab = next(model.parameters()).device, model.cfg.vocab_size
    loader = MixtureLoader(data_cfg.shard_dir(vocab), data_cfg.weights, "val", model.cfg.max_seq_len, data_cfg.seed,
                           eot_id(enc), fingerprint=tokenizer_fingerprint(data_cfg.tokenizer_path(vocab)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    result = {"val_loss": evaluate(model, loader, eval_batches, 8, device, autocast)}
    if chat and eval_examples:
        examples = held_out_examples(eval_examples)  # the questions every post-training run holds out
        conversations = [encode_chat(enc, ex.messages(), thinking=t) for ex in examples for t in (True, False)]
        ids, targets, _ = make_rows(conversations, model.cfg.max_seq_len, packing=False, pad_id=eot_id(enc))
        total = count = 0
        for i in range(0, len(ids), 16):  # mean over assistant tokens, whatever the batch split
            y = targets[i:i + 16].to(device)
            n = int((y != -100).sum())
            ce = model(ids[i:i + 16].to(device), y)[1]["ce"]  # the cross-entropy alone, no z-loss
            total, count = total + ce.item() * n, count + n
        result["chat_loss"] = total / count
        result["accuracy"] = accuracy(model, enc, examples, max_new_tokens)
    return result


@dataclass
class MergeConfig:
    runs: tuple[str, ...] = ()     # the models to merge: run folders or checkpoints of one model configuration
    weights: tuple[float, ...] = ()  # one per run (default: equal, a soup)
    method: str = "linear"         # linear | slerp (two models) | task_arithmetic (needs merge.base)
    base: str = ""                 # task_arithmetic: the run the inputs were fine-tuned from
    normalize: bool = False        # rescale the weights to sum to 1
    name: str = "merged"           # the output run folder: <out_dir>/<name>
    out_dir: str = "runs"          # where run folders go
    eval_examples: int = 20        # held-out questions per task for chat models (0: skip)
    eval_batches: int = 8          # validation batches of 8 windows
    max_new_tokens: int = 64       # the held-out answers' length
    device: str = "auto"           # auto | cpu | cuda

    def __post_init__(self):
        if not self.runs:
            raise ValueError("merge.runs is empty: give the run folders to merge, e.g. --merge.runs='[\"runs/a\", "
                             "\"runs/b\"]'")
        if self.method not in METHODS:
            raise ValueError(f"merge.method={self.method!r}: choose from {', '.join(METHODS)}")
        if self.eval_examples < 0 or self.eval_batches < 1 or self.max_new_tokens < 1:
            raise ValueError("merge.eval_examples must be >= 0, merge.eval_batches and merge.max_new_tokens >= 1")


SECTIONS = {"merge": MergeConfig}


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """{"merge": MergeConfig} from a TOML file (None: the defaults) and overrides."""
    return read_config(path, overrides, sections=SECTIONS)


def merge_runs(runs: list[str], weights: list[float] | None = None, method: str = "linear", base: str | None = None,
               normalize: bool = False, name: str = "merged", out_dir: str = "runs", eval_examples: int = 20,
               eval_batches: int = 8, max_new_tokens: int = 64, device: str = "auto", log=print) -> dict:
    """Merge run folders, score the inputs and the merge, write <out_dir>/<name> (via <name>.tmp,
    renamed, so a failure leaves no folder behind). Returns the report (also <run>/report.json)."""
    out = Path(out_dir) / name
    if out.exists():
        raise MergeError(f"{out} exists already; pick another merge.name or delete it")
    if method not in METHODS:
        raise MergeError(f"merge.method {method!r}: choose from {', '.join(METHODS)}")
    if (method == "task_arithmetic") != bool(base):
        raise MergeError("merge.base (the run the inputs were fine-tuned from) goes with merge.method=task_arithmetic, "
                         "only")
    if method == "slerp" and len(runs) != 2:
        raise MergeError(f"slerp merges two models, not {len(runs)}")
    weights = check_weights(weights or None, len(runs), normalize, sum_to_one=method != "task_arithmetic")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    specs = runs + ([base] if base else [])
    loaded = []
    for spec in specs:
        try:
            loaded.append(load_model(spec, device))
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise MergeError(f"cannot load {spec!r} ({e}); make it first with sft.py, dpo.py, rl.py or train.py") from e
    models, (_, enc, data_cfg) = [m for m, *_ in loaded], loaded[0]
    ref = dataclasses.asdict(models[0].cfg)
    for spec, m in zip(specs[1:], models[1:]):
        cfg = dataclasses.asdict(m.cfg)
        # attn_backend picks a kernel, not weights; any other difference makes another model
        diff = next((k for k in ref if k != "attn_backend" and cfg[k] != ref[k]), None)
        if diff:
            raise MergeError(f"{spec} is another model than {runs[0]}: model.{diff} is {cfg[diff]!r} there, "
                             f"{ref[diff]!r} in {runs[0]}; merge runs of one configuration")
    states = [m.state_dict() for m in models[:len(runs)]]
    if method == "linear":
        merged_state = linear_merge(states, weights, names=runs)
    elif method == "slerp":
        merged_state = slerp_merge(*states, t=weights[1], names=runs)
    else:
        merged_state = task_arithmetic(models[-1].state_dict(), states, weights, names=[base] + runs)
    merged = Transformer(models[0].cfg).to(device)
    merged.load_state_dict(merged_state)

    # the post-training stages and this file write accuracy_after into report.json; with one chat
    # model among the inputs, every model gets the chat scores (a base model's are sft.py's "before")
    reports = [(Path(r) if Path(r).is_dir() else Path(r).parent) / "report.json" for r in runs]
    chat = any(p.is_file() and "accuracy_after" in json.loads(p.read_text()) for p in reports)
    label = f"merge ({method} {'/'.join(f'{w:g}' for w in weights)})"
    scores = {}
    for spec, model in list(zip(runs, models)) + [(label, merged)]:
        scores[spec] = score(model, enc, data_cfg, chat, eval_examples, eval_batches, max_new_tokens)
    report = {"method": method, "inputs": runs, "base": base, "weights": weights, "scores": scores}
    if chat:
        report["accuracy_after"] = scores[label].get("accuracy", {})
    tmp = out.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash: ours by name
    try:
        meta = {"step": 0, "config": {"model": dataclasses.asdict(merged.cfg), "data": dataclasses.asdict(data_cfg),
                                      "merge": {k: report[k] for k in ("method", "inputs", "base", "weights")}}}
        save_checkpoint(tmp, 0, merged, None, meta)
        save_hf_tokenizer(enc, tmp)  # the merged run's tokenizer travels with it (checkpoint.load_model)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(format_report(report) + f"\nwrote {out}")
    return report


def format_report(r: dict) -> str:
    """Per model: validation loss; chat loss and mean answer and format accuracy over tasks and modes."""
    width = max(map(len, r["scores"])) + 2
    lines = [f"{'model':{width}s}val_loss  chat_loss  answers  format"]
    for spec, s in r["scores"].items():
        lines.append(f"{spec:{width}s}{s['val_loss']:8.4f}")
        if "accuracy" in s:
            answers, formats = ([v for k, v in s["accuracy"].items() if k.startswith("format/") == f] for f in (0, 1))
            lines[-1] += (f"  {s['chat_loss']:9.4f}  {sum(answers) / len(answers):7.0%}  "
                          f"{sum(formats) / len(formats):6.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, doc=__doc__, sections=SECTIONS)["merge"]
    try:
        merge_runs(list(cfg.runs), list(cfg.weights), cfg.method, cfg.base or None, cfg.normalize, cfg.name,
                   cfg.out_dir, cfg.eval_examples, cfg.eval_batches, cfg.max_new_tokens, cfg.device)
    except (ConfigError, ValueError, OSError) as e:  # MergeError; missing or short validation shards; a full disk
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
