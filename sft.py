"""Supervised fine-tuning: a pretrained model becomes a chat model that answers in two modes.

    python train.py                                   # the base model (runs/tiny)
    python sft.py                                     # configs/sft_tiny.toml: runs/tiny -> runs/tiny-sft, a report
    python sft.py --sft.packing=false --run.name=tiny-sft-nopack
    python sft.py --sft.lora_rank=8 --optim.lr=3e-3 --run.name=tiny-sft-lora
    python sft.py --config configs/sft_smollm2.toml   # SmolLM2-135M-Instruct on a JSONL file
    torchrun --nproc_per_node=2 sft.py                # DDP (or --run.parallelism=fsdp)

The story, top to bottom (the playbook's post-training chapter):
1. Assistant-only loss: the conversation is rendered with the chat template (chat.py: SmolLM2's
   ChatML, SmolLM3's /think and /no_think) and only the tokens the assistant writes (and its
   <|im_end|>) carry loss.
2. The hybrid reasoning mix, balanced by tokens, not by examples: think examples are longer, and
   counting examples gives the "split brain" the playbook warns about. The data are the built-in
   verifiable tasks (posttrain.py), or your conversations in TRL's formats (sft.data).
3. Packing: conversations are packed into full rows by best-fit decreasing, with document masking
   so no conversation attends to another (the playbook: 3-5x throughput), or padded one per row.
4. LoRA: low-rank adapters on every linear layer of the blocks, the base weights frozen.
5. The run (posttrain.PostTrainRun: one process or torchrun, checkpoints, exact resume) and its
   report: loss, answer accuracy per task and mode before and after with 95% intervals, tokens/s.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn

from chat import chat_segments
from config import ConfigError, load_config as read_config, parse_cli
from distributed import all_reduce_mean
from optim import OptimConfig
from posttrain import (MODES, EpochOrder, Example, PostTrainRun, RunConfig, accuracy, accuracy_table, global_mean_scale,
                       held_out_examples, interval95, load_conversations, make_examples, mean_of, run_stage)
from tokenizer import eot_id

# --------------------------------------------------------------------------------------------
# 1. Assistant-only loss (the chat template itself is chat.py's)
# --------------------------------------------------------------------------------------------


def encode_chat(enc: tiktoken.Encoding, messages: list[dict], thinking: bool | None = None,
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
# 2. The hybrid reasoning mix
# --------------------------------------------------------------------------------------------


def hybrid_mix(enc: tiktoken.Encoding, examples: list[Example], think_token_share: float,
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
# 3. Packing
# --------------------------------------------------------------------------------------------


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity: longest item first, each into the
    fullest bin it still fits in. Every item must fit in an empty bin."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item of {max(lengths)} tokens exceeds the row length {capacity}; raise sft.seq_len "
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
        raise ValueError(f"a conversation of {max(lengths)} tokens exceeds the row length {seq_len}; raise sft.seq_len")
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
# 4. LoRA
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
        fused projections (blocks.fused_projections) add it to their slice of the fused GEMM."""
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
# 5. The fine-tuning run and its report
# --------------------------------------------------------------------------------------------


@dataclass
class SFTConfig:
    data: str = ""                 # conversations to train on: a .jsonl/.parquet file of TRL's formats ("messages",
                                   # or "prompt" + "completion"); "" = the built-in tasks in both reasoning modes
    train_examples: int = 3000     # built-in tasks: conversations to generate
    eval_examples: int = 20        # per built-in task: held-out questions scored before and after (0: none)
    eval_modes: tuple[str, ...] = ("think", "no_think")  # the modes they are asked in: think | no_think | plain
    think_token_share: float = 0.5  # built-in tasks: the share of tokens in think mode (SmolLM3: balanced by tokens)
    packing: bool = True           # best-fit-decreasing packing with document masking; false: one conversation per row
    seq_len: int = 256             # tokens per row
    rows_per_step: int = 8         # rows per optimizer step, over all processes
    epochs: float = 3.0            # passes over the rows (a new shuffle each)
    lora_rank: int = 0             # 0: full fine-tuning; r > 0: LoRA adapters of rank r, base frozen
    lora_alpha: float = 16.0       # LoRA's scale is alpha / rank

    def __post_init__(self):
        if self.train_examples < 1 or self.eval_examples < 0 or self.seq_len < 2 or self.rows_per_step < 1:
            raise ValueError("sft.train_examples, sft.rows_per_step must be >= 1, sft.seq_len >= 2, "
                             "sft.eval_examples >= 0")
        if self.epochs <= 0 or self.lora_rank < 0 or not 0 <= self.think_token_share <= 1:
            raise ValueError("sft.epochs must be > 0, sft.lora_rank >= 0, sft.think_token_share in [0, 1]")
        if not self.eval_modes or not set(self.eval_modes) <= set(MODES):
            raise ValueError(f"sft.eval_modes={list(self.eval_modes)}: a non-empty list of {list(MODES)}")


SECTIONS = {"run": RunConfig, "optim": OptimConfig, "sft": SFTConfig}
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sft_tiny.toml"


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """{"run", "optim", "sft"} from a TOML file (default configs/sft_tiny.toml) and overrides."""
    return read_config(path or DEFAULT_CONFIG, overrides, sections=SECTIONS)


def training_conversations(cfg: SFTConfig, enc: tiktoken.Encoding, eval_set: list[Example],
                           seed: int) -> tuple[list[tuple[list[int], list[bool]]], dict]:
    """Encoded (ids, loss mask) conversations and the mix report: from sft.data, or the built-in
    tasks (none of the held-out questions) balanced by tokens between the two reasoning modes."""
    if cfg.data:
        rows = load_conversations(cfg.data)
        conversations = [encode_chat(enc, messages, tools=tools) for messages, tools in rows]
        n = sum(len(c[0]) for c in conversations)
        return conversations, {"file": {"examples": len(rows), "tokens": n, "example_share": 1.0, "token_share": 1.0}}
    examples = make_examples(cfg.train_examples, seed=seed, exclude={e.question for e in eval_set})
    return hybrid_mix(enc, examples, cfg.think_token_share, seed)


def finetune(cfg: dict, log=print) -> dict:
    """Run SFT as configured and return the report (also written to <run>/report.json)."""
    scfg = cfg["sft"]
    run = PostTrainRun(cfg, "sft", "python train.py", log)
    try:
        model, enc, device = run.model, run.enc, run.device
        if scfg.seq_len > model.cfg.max_seq_len:
            raise ConfigError(f"sft.seq_len={scfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
        if scfg.rows_per_step % run.world:
            raise ConfigError(f"sft.rows_per_step={scfg.rows_per_step} must divide among {run.world} processes")
        if scfg.lora_rank and cfg["run"].parallelism == "fsdp":
            raise ConfigError("LoRA trains a few numbers per layer: use run.parallelism=ddp (FSDP shards whole weights)")
        eval_set = held_out_examples(scfg.eval_examples) if scfg.eval_examples else []
        conversations, mix = training_conversations(scfg, enc, eval_set, cfg["run"].seed)
        pad_id = eot_id(enc)
        ids, targets, doc_ids = make_rows(conversations, scfg.seq_len, scfg.packing, pad_id)
        real_tokens = sum(len(c[0]) for c in conversations)
        run.log(f"data: {len(conversations):,} conversations, {real_tokens:,} tokens -> {ids.shape[0]:,} rows of "
                f"{scfg.seq_len} ({'packed, best-fit decreasing' if scfg.packing else 'one per row'}; "
                f"{real_tokens / ids.numel():.0%} of positions are real tokens)")
        for mode, r in mix.items():
            run.log(f"  {mode:8s} {r['examples']:5,} examples ({r['example_share']:.0%})  {r['tokens']:7,} tokens "
                    f"({r['token_share']:.0%})")
        max_new = cfg["run"].eval_max_new_tokens
        before = accuracy(model, enc, eval_set, max_new, scfg.eval_modes) if eval_set and run.master else {}
        trainable = add_lora(model, scfg.lora_rank, scfg.lora_alpha) if scfg.lora_rank else \
            sum(p.numel() for p in model.parameters())
        run.log(f"training {trainable:,} parameters ({'LoRA rank ' + str(scfg.lora_rank) if scfg.lora_rank else 'full'})")
        steps = max(1, math.ceil(scfg.epochs * ids.shape[0] / scfg.rows_per_step))
        order = EpochOrder(ids.shape[0], scfg.rows_per_step, cfg["run"].seed)
        saved = run.begin(cfg["optim"], steps)
        if saved:
            order.load_state_dict(saved["order"])
        t0, trained_tokens = time.time(), 0
        for step in range(run.start_step + 1, steps + 1):
            lr = run.set_lr(step)
            rows = order.next()[run.rank::run.world]  # this process's share of the step's rows
            local_tokens = float((targets[rows] != -100).sum())
            scale = global_mean_scale(local_tokens, device)  # the mean over every process's tokens
            parts, step_loss = run.micro_batches(len(rows)), 0.0
            for i, part in enumerate(parts):
                x, y = ids[rows[part]].to(device), targets[rows[part]].to(device)
                docs = doc_ids[rows[part]].to(device) if scfg.packing else None
                share = float((y != -100).sum()) / local_tokens  # this micro-batch's part of the mean
                with run.grad_sync(i == len(parts) - 1):
                    with run.autocast:
                        loss, _ = run.train_model(x, y, docs)
                    (loss * share * scale).backward()
                step_loss += loss.item() * share
                trained_tokens += int((x != pad_id).sum())
            grad_norm = run.clip_and_step()
            step_loss = all_reduce_mean(step_loss * scale, device)
            run.end_step(step, {"loss": step_loss, "lr": lr, "grad_norm": grad_norm},
                         f"loss {step_loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f}", {"order": order.state_dict()})
        seconds = time.time() - t0
        if scfg.lora_rank:
            merge_lora(model)
        tokens_per_s = all_reduce_mean(trained_tokens, device) * run.world / max(seconds, 1e-9)
        full = run.full_model()
        if not run.master:
            return run.finish({}, "")
        history = run.history()
        report = {"steps": steps, "first_loss": history[0]["loss"], "final_loss": mean_of(history[-10:], "loss"),
                  "tokens_per_s": tokens_per_s, "fill": real_tokens / ids.numel(), "rows": ids.shape[0],
                  "trainable_params": trainable, "mix": mix, "held_out_per_task": scfg.eval_examples if eval_set else 0,
                  "accuracy_before": before, "accuracy_after": accuracy(full, enc, eval_set, max_new, scfg.eval_modes) if eval_set else {}}
        return run.finish(report, format_report(report))
    finally:
        run.close()


def format_report(r: dict) -> str:
    lines = accuracy_table(r["accuracy_before"], r["accuracy_after"]) if r["accuracy_after"] else []
    n = r["held_out_per_task"]
    if n:
        lines.append(f"(per task and mode, {n} held-out questions: a share's 95% interval is about "
                     f"+-{(interval95(n / 2, n)[1] - 0.5):.0%} at 50%)")
    lines.append(f"loss {r['first_loss']:.3f} -> {r['final_loss']:.3f} in {r['steps']} steps; "
                 f"{r['tokens_per_s']:,.0f} tokens/s; rows {r['fill']:.0%} full")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, doc=__doc__, sections=SECTIONS,
                    default_config=DEFAULT_CONFIG)
    run_stage(finetune, cfg)


if __name__ == "__main__":
    main()
