"""Supervised fine-tuning: a pretrained run becomes a chat model that answers in two modes.

    python train.py                                   # the base model (runs/tiny)
    python sft.py                                     # runs/tiny -> runs/tiny-sft, then a report
    python sft.py --packing false --name tiny-sft-nopack
    python sft.py --lora-rank 8 --lr 3e-3 --name tiny-sft-lora

The story, top to bottom (the playbook's post-training chapter):
1. The chat template. SmolLM2 uses ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), rendered here in
   plain Python and checked byte for byte against the Jinja template inside SmolLM2's GGUF file.
   SmolLM3 adds a reasoning switch: `/think` or `/no_think` in the system prompt; in no-think mode
   the assistant turn starts with an empty think block, so one model serves both modes.
2. Assistant-only loss: only the tokens the assistant writes (and its `<|im_end|>`) carry loss.
3. Data: built-in verifiable tasks (addition, sorting, reversing words), each with a short
   reasoning trace for think mode. The hybrid mix is balanced by tokens, not by examples: think
   examples are longer, and counting examples gives the "split brain" the playbook warns about.
4. Packing: conversations are packed into full rows by best-fit decreasing, with document masking
   so no conversation attends to another (the playbook: 3-5x throughput), or padded one per row.
5. LoRA: low-rank adapters on every linear layer of the blocks, the base weights frozen.
6. The report: loss, answer accuracy per task and mode before and after, tokens/s, padding.

One process (CPU or one GPU); the pretraining file has the distributed machinery.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from chat import EMPTY_THINK, SMOLLM2_SYSTEM, chat_segments, render_chat  # noqa: F401 (re-exported)
from optim import OptimConfig, build_optimizer, lr_at

# --------------------------------------------------------------------------------------------
# 1. The chat template (chat.py) and assistant-only loss
# --------------------------------------------------------------------------------------------

def encode_chat(enc, messages: list[dict], thinking: bool | None = None,
                tools: list[dict] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it carries loss (it was
    written by the assistant). Each piece is encoded alone so the mask follows the text exactly;
    pieces end in a special token or a newline, where the tokenizer splits anyway."""
    ids, mask = [], []
    for text, is_output in chat_segments(messages, thinking, tools):
        piece = enc.encode(text, allowed_special="all")
        ids += piece
        mask += [is_output] * len(piece)
    return ids, mask


# --------------------------------------------------------------------------------------------
# 2-3. Built-in verifiable tasks and the hybrid reasoning mix
# --------------------------------------------------------------------------------------------

WORDS = ("apple river stone cloud tiger paper green light music ocean table winter garden silver "
         "window candle forest bridge yellow market planet sugar rabbit castle").split()


@dataclass(frozen=True)
class Example:
    """One task instance: a question, the reasoning a think-mode answer writes first, the answer."""
    task: str
    question: str
    reasoning: str
    answer: str

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question},
                {"role": "assistant", "content": self.answer, "reasoning": self.reasoning}]


def make_example(task: str, rng: random.Random) -> Example:
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        ones = a % 10 + b % 10
        steps = f"ones: {a % 10} + {b % 10} = {ones}. tens and up: {a // 10} + {b // 10} + {ones // 10} = " \
                f"{a // 10 + b // 10 + ones // 10}."
        return Example(task, f"What is {a} + {b}?", steps, str(a + b))
    if task == "sort":
        xs = rng.sample(range(1, 100), rng.randint(3, 4))
        steps = " ".join(f"smallest left: {x}." for x in sorted(xs))
        return Example(task, "Sort ascending: " + " ".join(map(str, xs)), steps, " ".join(map(str, sorted(xs))))
    if task == "reverse":
        ws = rng.sample(WORDS, rng.randint(3, 4))
        steps = " ".join(f"word {len(ws) - i}: {w}." for i, w in enumerate(reversed(ws)))
        return Example(task, "Reverse the words: " + " ".join(ws), steps, " ".join(reversed(ws)))
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


TASKS = ("add", "sort", "reverse")


def make_examples(n: int, seed: int, tasks: tuple[str, ...] = TASKS, exclude: set[str] = frozenset()) -> list[Example]:
    """n examples, tasks in turn; questions in exclude (a held-out set) are never produced."""
    rng, out, seen, misses = random.Random(seed), [], set(exclude), 0
    while len(out) < n:
        ex = make_example(tasks[len(out) % len(tasks)], rng)
        if ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
            misses = 0
        elif (misses := misses + 1) > 10_000:  # the task has run out of new questions
            raise ValueError(f"task {ex.task!r} has no more distinct questions after {len(out):,} examples; "
                             f"ask for fewer (--train-examples)")
    return out


def strip_think(completion: str) -> str:
    """The answer part of a completion: what follows </think> (all of it without a think block)."""
    return completion.split("</think>", 1)[1] if "</think>" in completion else completion


def check_answer(example: Example, completion: str) -> bool:
    """The verifier: the answer after any think block, up to <|im_end|>, equals the expected one."""
    answer = strip_think(completion).split("<|im_end|>", 1)[0]
    return " ".join(answer.split()) == example.answer


def hybrid_mix(enc, examples: list[Example], think_token_share: float,
               seed: int = 0) -> tuple[list[tuple[list[int], list[bool]]], dict]:
    """Assign each example a mode so that think-mode conversations hold think_token_share of the
    tokens (SmolLM3 balanced its mix by tokens: think answers are longer, so a 50/50 split by
    examples would be mostly think tokens). Returns the encoded conversations and a mix report."""
    if not 0.0 <= think_token_share <= 1.0:
        raise ValueError(f"think_token_share {think_token_share} must be within [0, 1]")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    encoded = [None] * len(examples)
    tokens = {"think": 0, "no_think": 0}
    count = {"think": 0, "no_think": 0}
    for i in order:  # greedy: each example goes to the mode that is furthest below its token target
        total = tokens["think"] + tokens["no_think"]
        mode = "think" if think_token_share > 0 and tokens["think"] <= think_token_share * total else "no_think"
        encoded[i] = encode_chat(enc, examples[i].messages(), thinking=(mode == "think"))
        tokens[mode] += len(encoded[i][0])
        count[mode] += 1
    total_tokens, total_examples = sum(tokens.values()), len(examples)
    report = {mode: {"examples": count[mode], "tokens": tokens[mode],
                     "example_share": count[mode] / max(total_examples, 1),
                     "token_share": tokens[mode] / max(total_tokens, 1)} for mode in tokens}
    return encoded, report


# --------------------------------------------------------------------------------------------
# 4. Packing
# --------------------------------------------------------------------------------------------


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity: longest item first, each into the
    fullest bin it still fits in. Every item must fit in an empty bin."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item of {max(lengths)} tokens exceeds the row length {capacity}; raise --seq-len "
                         f"or drop long conversations")
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: free[b])
            bins[b].append(i)
            free[b] -= lengths[i]
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def make_rows(conversations: list[tuple[list[int], list[bool]]], seq_len: int, packing: bool,
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, targets, doc_ids), each (rows, seq_len). targets[t] is ids[t + 1] where that token is
    assistant output of the same conversation, else -100 (no loss). Packed rows hold several
    conversations (doc_ids keep their attention apart); unpacked rows hold one, then padding."""
    lengths = [len(ids) for ids, _ in conversations]
    groups = best_fit_decreasing(lengths, seq_len) if packing else [[i] for i in range(len(conversations))]
    if not packing and max(lengths, default=0) > seq_len:
        raise ValueError(f"a conversation of {max(lengths)} tokens exceeds the row length {seq_len}; raise --seq-len")
    ids = torch.full((len(groups), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(groups), seq_len), -100, dtype=torch.long)
    doc_ids = torch.full((len(groups), seq_len), -1, dtype=torch.long)  # padding: a document of its own
    for r, group in enumerate(groups):
        t = 0
        for doc, i in enumerate(group):
            tok, mask = conversations[i]
            n = len(tok)
            ids[r, t:t + n] = torch.tensor(tok)
            doc_ids[r, t:t + n] = doc
            labels = torch.tensor(tok[1:] + [-100])
            keep = torch.tensor(mask[1:] + [False])
            targets[r, t:t + n] = torch.where(keep, labels, -100)
            t += n
    return ids, targets, doc_ids


# --------------------------------------------------------------------------------------------
# 5. LoRA
# --------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x with W frozen, A (r x in) random, B (out x r) zero: at the start
    the model is exactly the base model, and only r * (in + out) numbers per layer train."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank {rank} must be at least 1")
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    @property
    def weight(self) -> torch.Tensor:
        """The adapted weight W + s B A, for whoever reads weights rather than calling the layer
        (merging; MLA's absorbed generation path). Training never forms it."""
        return self.base.weight + self.scale * self.lora_b @ self.lora_a

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s (x A^T) B^T: the adapter's share of the output, through the rank-r bottleneck (as PEFT
        computes it): no (out x in) matrix, and the frozen W gets no weight gradient. The model's
        fused projections (attention.fused_projections) add it to their slice of the fused GEMM."""
        return self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.base.weight, self.base.bias) + self.low_rank(x)

    def merged(self) -> nn.Linear:
        """A plain linear layer with the adapter folded into its weight (same outputs)."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.weight)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def add_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """Freeze the model and wrap every nn.Linear inside its blocks in a LoRALinear; returns the
    number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, LoRALinear(child, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> None:
    """Replace every LoRALinear by its merged nn.Linear, leaving a plain model to save or serve."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# 6. Fine-tuning run and report
# --------------------------------------------------------------------------------------------


@dataclass
class SFTConfig:
    init: str = "runs/tiny"        # the base: a run folder or checkpoint of train.py (eval.load_model)
    name: str = "tiny-sft"         # output: <out_dir>/<name>
    out_dir: str = "runs"
    train_examples: int = 3000
    eval_examples: int = 20        # per task, held out (no question of training appears)
    think_token_share: float = 0.5
    packing: bool = True
    seq_len: int = 256
    rows_per_step: int = 8
    epochs: float = 3.0
    lr: float = 1e-3
    warmup_steps: int = 20
    lora_rank: int = 0             # 0: full fine-tuning
    lora_alpha: float = 16.0
    seed: int = 0
    device: str = "auto"
    max_new_tokens: int = 64


def generate_completions(model, prompts: list[list[int]], k: int, temperature: float, max_new_tokens: int,
                         end_id: int, generator: torch.Generator | None = None, top_k: int | None = None,
                         max_rows: int = 256) -> list[list[int]]:
    """k completions of every prompt (row p * k + j is prompt p's j-th), each ending at its first
    end_id (<|im_end|>, kept) or after max_new_tokens (capped by the room max_seq_len leaves).
    temperature 0 is greedy. generate() takes one prompt length per batch, so prompts of equal
    token length are generated together, k copies of each, up to max_rows rows at a time. Used by
    the evaluation here, dpo.py's on-policy pairs and rl.py's rollouts."""
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in range(len(prompts) * k)]
    per_batch = max(1, max_rows // k)
    model.eval()
    with torch.no_grad():
        for n, members in by_length.items():
            for b in range(0, len(members), per_batch):
                chunk = members[b:b + per_batch]
                x = torch.tensor([prompts[i] for i in chunk for _ in range(k)], device=device)
                new = model.generate(x, min(max_new_tokens, model.cfg.max_seq_len - n), temperature=temperature,
                                     top_k=top_k, eos_id=end_id, generator=generator)[:, n:].tolist()
                for j, row in enumerate(new):
                    out[chunk[j // k] * k + j % k] = row[:row.index(end_id) + 1] if end_id in row else row
    return out


def generate_answers(model, enc, examples: list[Example], thinking: bool, max_new_tokens: int,
                     batch_size: int = 32) -> list[str]:
    """Greedy completions of each question in the given mode, up to <|im_end|> (not included)."""
    end = enc.encode("<|im_end|>", allowed_special="all")[0]
    prompts = [enc.encode(render_chat(ex.messages()[:1], thinking=thinking, add_generation_prompt=True),
                          allowed_special="all") for ex in examples]
    completions = generate_completions(model, prompts, 1, 0.0, max_new_tokens, end, max_rows=batch_size)
    return [enc.decode(c[:-1] if c[-1:] == [end] else c) for c in completions]


def follows_mode(completion: str, thinking: bool) -> bool:
    """Think mode: the completion opens with a non-empty think block. No-think mode (whose prompt
    already holds the empty block): it writes no think block of its own."""
    if not thinking:
        return "<think>" not in completion
    return completion.startswith("<think>\n") and "</think>" in completion and \
        completion.split("</think>", 1)[0].strip() != "<think>"


def accuracy(model, enc, examples: list[Example], max_new_tokens: int) -> dict[str, float]:
    """Share of correct answers per task and mode (think / no_think), and per mode the share of
    completions that follow it (format/think, format/no_think: the /think switch works)."""
    result = {}
    for thinking in (True, False):
        mode = "think" if thinking else "no_think"
        completions = generate_answers(model, enc, examples, thinking, max_new_tokens)
        for task in sorted({ex.task for ex in examples}):
            pairs = [(ex, c) for ex, c in zip(examples, completions) if ex.task == task]
            result[f"{task}/{mode}"] = sum(check_answer(e, c) for e, c in pairs) / len(pairs)
        result[f"format/{mode}"] = sum(follows_mode(c, thinking) for c in completions) / len(completions)
    return result


def save_model(model, data_cfg, path: Path, extra: dict) -> None:
    """A checkpoint eval.load_model reads (the model and data configs + weights), written to .tmp
    and renamed."""
    config = {"model": dataclasses.asdict(model.cfg), "data": dataclasses.asdict(data_cfg)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": config, "model": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def load_start(spec: str, device: str, seed: int, how_to_make_it: str):
    """(model, tokenizer, DataConfig, device) of the run a post-training stage starts from; a
    missing or unreadable run stops with one line saying how to make it. Seeds torch."""
    from eval import EvalError, load_model
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch.manual_seed(seed)
    try:
        model, enc, data_cfg = load_model(spec, device)
    except EvalError as e:
        raise SystemExit(f"error: cannot load {spec!r} ({e}); make it first: {how_to_make_it}")
    return model, enc, data_cfg, device


HELD_OUT_SEED = 1  # one evaluation set for every run, whatever its --seed: runs of different seeds compare


def held_out_examples(per_task: int) -> list[Example]:
    """The evaluation questions, the same for sft.py, dpo.py, rl.py and merge.py and for every
    --seed; training excludes them."""
    return make_examples(per_task * len(TASKS), seed=HELD_OUT_SEED)


def finetune(cfg: SFTConfig, log=functools.partial(print, flush=True)) -> dict:
    """Run SFT as configured and return the report (also written to <run>/report.json)."""
    model, enc, data_cfg, device = load_start(cfg.init, cfg.device, cfg.seed, "python train.py")
    if cfg.seq_len > model.cfg.max_seq_len:
        raise SystemExit(f"error: --seq-len {cfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    eval_set = held_out_examples(cfg.eval_examples)
    train_set = make_examples(cfg.train_examples, seed=cfg.seed, exclude={e.question for e in eval_set})
    conversations, mix = hybrid_mix(enc, train_set, cfg.think_token_share, cfg.seed)
    pad_id = enc.encode("<|endoftext|>", allowed_special="all")[0]
    ids, targets, doc_ids = make_rows(conversations, cfg.seq_len, cfg.packing, pad_id)
    real_tokens = sum(len(c[0]) for c in conversations)
    log(f"data: {len(train_set):,} conversations, {real_tokens:,} tokens -> {ids.shape[0]:,} rows of {cfg.seq_len} "
        f"({'packed, best-fit decreasing' if cfg.packing else 'one per row'}; "
        f"{real_tokens / ids.numel():.0%} of positions are real tokens)")
    for mode, r in mix.items():
        log(f"  {mode:8s} {r['examples']:5,} examples ({r['example_share']:.0%})  {r['tokens']:7,} tokens "
            f"({r['token_share']:.0%})")
    before = accuracy(model, enc, eval_set, cfg.max_new_tokens)
    trainable = add_lora(model, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else sum(
        p.numel() for p in model.parameters())
    log(f"training {trainable:,} parameters ({'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full'})")
    steps = max(1, math.ceil(cfg.epochs * ids.shape[0] / cfg.rows_per_step))
    ocfg = OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=min(cfg.warmup_steps, steps // 2),
                       weight_decay=0.0 if cfg.lora_rank else 0.1)
    optimizer = build_optimizer(model, ocfg)
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(run_dir / "metrics.jsonl", "w")
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos = torch.randperm(ids.shape[0], generator=gen), 0
    batch = min(cfg.rows_per_step, ids.shape[0])
    model.train()
    t0, losses, trained_tokens = time.time(), [], 0
    from tqdm import tqdm
    for step in tqdm(range(1, steps + 1), desc="sft", disable=not sys.stderr.isatty()):
        if pos + batch > ids.shape[0]:  # a new epoch: reshuffle (a partial last batch is dropped)
            order, pos = torch.randperm(ids.shape[0], generator=gen), 0
        rows = order[pos:pos + batch]
        pos += batch
        lr = lr_at(step - 1, ocfg, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = ids[rows].to(device), targets[rows].to(device)
        docs = doc_ids[rows].to(device) if cfg.packing else None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):  # bf16 on GPU, as train.py
            loss, _ = model(x, y, docs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trained_tokens += int((x != pad_id).sum())
        losses.append(loss.item())
        metrics.write(json.dumps({"step": step, "loss": losses[-1], "lr": lr}) + "\n")
        if step % 25 == 0 or step == steps:
            log(f"step {step:5d}/{steps} | loss {sum(losses[-25:]) / len(losses[-25:]):.4f} | lr {lr:.2e}")
    seconds = time.time() - t0
    metrics.close()
    if cfg.lora_rank:
        merge_lora(model)
    after = accuracy(model, enc, eval_set, cfg.max_new_tokens)
    report = {"steps": steps, "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
              "tokens_per_s": trained_tokens / seconds, "fill": real_tokens / ids.numel(), "rows": ids.shape[0],
              "trainable_params": trainable, "mix": mix, "accuracy_before": before, "accuracy_after": after}
    save_model(model, data_cfg, run_dir / f"ckpt_{steps:07d}.pt",
               {"step": steps, "sft": dataclasses.asdict(cfg)})
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    log(format_report(report))
    return report


def accuracy_table(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Lines of 'task/mode  before -> after' for a report."""
    return ["", "task/mode           accuracy before -> after"] + [
        f"{key:20s} {before[key]:6.0%} -> {after[key]:6.0%}" for key in after]


def format_report(r: dict) -> str:
    lines = accuracy_table(r["accuracy_before"], r["accuracy_after"])
    lines.append(f"loss {r['first_loss']:.3f} -> {r['final_loss']:.3f} in {r['steps']} steps; "
                 f"{r['tokens_per_s']:,.0f} tokens/s; rows {r['fill']:.0%} full")
    return "\n".join(lines)


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def parse_args(argv: list[str], config_class=None, check=None) -> object:
    """--some-field VALUE for every field of the config dataclass (SFTConfig by default); fields
    are int, float, str or bool. `check(config)` may raise ValueError: the run then stops with that
    one line before any loading."""
    config_class = config_class or SFTConfig
    parser = argparse.ArgumentParser(description=sys.modules[config_class.__module__].__doc__.split("\n")[0])
    types = {"int": int, "float": float, "str": str, "bool": _bool}
    for f in dataclasses.fields(config_class):
        parser.add_argument("--" + f.name.replace("_", "-"), type=types[f.type], default=f.default)
    config = config_class(**vars(parser.parse_args(argv)))
    try:
        if check:
            check(config)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return config


if __name__ == "__main__":
    finetune(parse_args(sys.argv[1:]))
