"""Generation for the whole project: one sampler that evaluation, post-training and the chat call.

Every stage past SFT lives on sampling: on-policy preference pairs, GRPO rollouts, generative
evaluations, HumanEval, the text samples at the end of pretraining, the chat. They all call
`generate`: k completions of each of a list of token-id prompts, each ending at its first stop
token (kept) or after max_new_tokens, whichever comes first; greedy at temperature 0. The chat
calls `stream`, the same decoding one token at a time.

It is fast the way gpt-fast is (and vLLM, which TRL uses for GRPO rollouts, for the same reasons):
- every prompt in one batch: prompts of different lengths are right-padded and each row keeps its
  own position (attention.StaticKVCache), so nothing is grouped by length;
- a static cache: allocated once per batch shape (shapes are bucketed, caches kept between calls),
  positions are tensors;
- the prompts go through one prefill forward with the training attention kernels;
- each later token is one decode step of fixed shapes, on GPU compiled once with
  mode="reduce-overhead": a CUDA graph replay, no Python per layer or per kernel;
- sampling on the device (temperature, top-k, top-p, by the Gumbel-max trick on noise from a seeded
  generator), and stops recorded on the device: the host looks every SYNC_EVERY tokens whether all
  rows are done, never once per token.
`model.Transformer.generate` stays the small eager reference the tests compare this with.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterator

import torch

from attention import StaticKVCache
from model import Transformer

SYNC_EVERY = 16    # decode steps between the host's looks at whether every row is done
STOP_SLOTS = 8     # most stop ids at once (a fixed-size tensor: the compiled step keeps its shapes)
MAX_WORKSPACES = 4  # static caches kept per model, one per batch shape, the least recently used dropped


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, k: int = 1,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids: Collection[int] = (), generator: torch.Generator | None = None, max_rows: int = 256,
             compiled: bool | None = None) -> list[list[int]]:
    """k completions of every prompt (row p * k + j is prompt p's j-th), each cut after its first
    stop id or after max_new_tokens, capped by the room max_seq_len leaves after its prompt.

    All rows are decoded together, up to max_rows at a time (longest prompts first, so a batch
    pads little). compiled: compile the decode step (None: on CUDA)."""
    rows = [p for p in prompts for _ in range(k)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[list[int]] = [[] for _ in rows]
    for start in range(0, len(order), max_rows):
        batch = order[start:start + max_rows]
        for i, tokens in zip(batch, _complete(model, [rows[i] for i in batch], max_new_tokens, temperature, top_k,
                                              top_p, stop_ids, generator, compiled, max_rows)):
            out[i] = tokens
    return out


@torch.no_grad()
def stream(model: Transformer, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, stop_ids: Collection[int] = (),
           generator: torch.Generator | None = None, compiled: bool | None = None) -> Iterator[int]:
    """One prompt's completion, token by token as it is sampled (the chat prints them as they
    come): the decoding of `generate`, with one host sync per token; it ends after a stop id."""
    stops = set(stop_ids)
    for tokens, n in _decode(model, [prompt], max_new_tokens, temperature, top_k, top_p, stops, generator,
                             compiled, max_rows=1, sync_every=1):
        token = int(tokens[0, n - 1])
        yield token
        if token in stops:
            return


def _complete(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, generator, compiled,
              max_rows) -> list[list[int]]:
    """One batch of prompts decoded to the end: each row's tokens up to its first stop or its room."""
    for tokens, n in _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, generator,
                             compiled, max_rows, SYNC_EVERY):
        pass
    stops = set(stop_ids)
    out = []
    for p, row in zip(prompts, tokens[:len(prompts), :n].tolist()):
        row = row[:min(max_new_tokens, model.cfg.max_seq_len - len(p))]
        end = next((t for t, token in enumerate(row) if token in stops), None)
        out.append(row if end is None else row[:end + 1])
    return out


def _decode(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, stop_ids: Collection[int], generator: torch.Generator | None,
            compiled: bool | None, max_rows: int, sync_every: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Prefill the prompts, then decode step by step; yields (tokens (rows, slots) on the device, how
    many columns are filled) every sync_every tokens and at the end, and stops early once every row
    is done. Rows beyond len(prompts) pad the batch to its bucket."""
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids)
    device = next(model.parameters()).device
    compiled = device.type == "cuda" if compiled is None else compiled
    lengths = [len(p) for p in prompts]
    rooms = [min(max_new_tokens, model.cfg.max_seq_len - n) for n in lengths]
    steps = max(rooms)
    n_rows = bucket(len(prompts), max(max_rows, len(prompts)))
    n_pad = n_rows - len(prompts)
    cache, rows = _workspace(model, n_rows, bucket(max(lengths) + steps, model.cfg.max_seq_len), compiled)
    padded = torch.zeros(n_rows, max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts + [prompts[0]] * n_pad):
        padded[i, :len(p)] = torch.tensor(p)
    cache.reset(torch.tensor(lengths + [lengths[0]] * n_pad, device=device))
    rows.start(rooms + [0] * n_pad, stop_ids)  # padding rows are done from the start
    sampled = temperature > 0
    if sampled and rows.noise is None:
        rows.noise = _static(torch.empty(n_rows, model.cfg.vocab_size, device=device), compiled)
    generator = _device_generator(generator, device) if sampled else None
    step = _compiled_step() if compiled else decode_step
    was_training = model.training
    model.eval()
    try:
        h = model.hidden_states(padded.to(device), kv_cache=cache)  # the prefill, with the training kernels
        if sampled:
            rows.noise.uniform_(generator=generator)
        rows.record(pick(model.lm_head(h[cache.rows, cache.lengths - 1]).float(), rows.noise, temperature, top_k,
                         top_p))
        n = 1
        while n < steps:
            if n % sync_every == 0:
                yield rows.tokens, n
                if bool(rows.done.all()):
                    return
            if sampled:
                rows.noise.uniform_(generator=generator)
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            step(model, cache, rows, temperature, top_k, top_p)
            n += 1
        yield rows.tokens, n
    finally:
        model.train(was_training)


def decode_step(model: Transformer, cache: StaticKVCache, rows: _Rows, temperature: float, top_k: int | None,
                top_p: float | None) -> None:
    """One token for every row: each row's last token through the model at its own position, then
    picked and recorded, all on the device. Fixed shapes: compiled, it is one CUDA graph."""
    logits = model(rows.last, kv_cache=cache)[:, -1].float()
    rows.record(pick(logits, rows.noise, temperature, top_k, top_p))


def pick(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float, top_k: int | None,
         top_p: float | None) -> torch.Tensor:
    """(B,) token ids from (B, V) float32 logits: the argmax at temperature 0; else a sample of
    softmax(logits / temperature) over the top_k best tokens and the smallest set of them whose
    probability reaches top_p (nucleus sampling). Sampled by the Gumbel-max trick: with noise
    u ~ U(0, 1), argmax(logits - log(-log u)) is distributed as the softmax, and needs no
    host-side draw as torch.multinomial does."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the tokens before it already reach top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), -math.inf)
    return (logits - torch.log(-torch.log(noise))).argmax(dim=-1)


class _Rows:
    """A batch's state on the device, allocated once per shape: the tokens generated so far (a
    column per step), each row's last token (the next step's input), its budget of new tokens, the
    stop ids, which rows are done, the step count, and the sampling noise."""

    def __init__(self, n_rows: int, max_len: int, device: torch.device):
        self.tokens = torch.zeros(n_rows, max_len, dtype=torch.long, device=device)
        self.last = torch.zeros(n_rows, 1, dtype=torch.long, device=device)
        self.room = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.stop = torch.full((STOP_SLOTS,), -1, dtype=torch.long, device=device)
        self.done = torch.zeros(n_rows, dtype=torch.bool, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.noise: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens, self.last, self.room, self.stop, self.done, self.step]

    def start(self, rooms: list[int], stop_ids: Collection[int]) -> None:
        self.room.copy_(torch.tensor(rooms))
        self.stop.fill_(-1)  # -1 is no token: unused slots never match
        stops = sorted(set(stop_ids))
        self.stop[:len(stops)] = torch.tensor(stops, dtype=torch.long)
        self.done.zero_()
        self.step.zero_()

    def record(self, token: torch.Tensor) -> None:
        """Store each row's new token in the step's column; a row is done at a stop id or once its
        budget is spent (it keeps decoding, and the host cuts its tokens there)."""
        self.tokens.index_copy_(1, self.step.view(1), token[:, None])
        self.done.copy_(self.done | (token[:, None] == self.stop).any(dim=-1) | (self.step + 1 >= self.room))
        self.last.copy_(token[:, None])
        self.step.add_(1)


def bucket(n: int, limit: int) -> int:
    """n rounded up to the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (two sizes per octave, so at
    most 1.5x), capped at limit: batches of nearby shapes share one static cache and one compiled
    decode step."""
    power = 1 << (n - 1).bit_length()  # the next power of two
    return min(power * 3 // 4 if power >= 4 and power * 3 // 4 >= n else power, limit)


_workspaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {shape: (cache, rows)}


def _workspace(model: Transformer, n_rows: int, max_len: int, compiled: bool) -> tuple[StaticKVCache, _Rows]:
    """The static cache and row state of this batch shape, made once and kept: a compiled decode
    step's CUDA graph reads and writes these very buffers at every replay."""
    kept = _workspaces.setdefault(model, OrderedDict())
    p = model.lm_head.weight
    key = (n_rows, max_len, p.dtype, p.device, compiled)
    if key not in kept:
        cache, rows = model.new_static_cache(n_rows, max_len), _Rows(n_rows, max_len, p.device)
        for t in cache.tensors() + rows.tensors():
            _static(t, compiled)
        kept[key] = (cache, rows)
        while len(kept) > MAX_WORKSPACES:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return kept[key]


def _static(t: torch.Tensor, compiled: bool) -> torch.Tensor:
    """Mark a buffer the compiled step mutates as living at a fixed address, so that CUDA graphs
    write it in place instead of skipping the graph (Hugging Face's static cache does the same)."""
    if compiled:
        torch._dynamo.mark_static_address(t, guard=False)
    return t


_compiled = None


def _compiled_step():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(decode_step, mode="reduce-overhead")
    return _compiled


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The caller's generator where it lives on the model's device; else one on that device, seeded
    from it (the noise is drawn on the device, and the same seed still gives the same tokens)."""
    if generator is None or generator.device == device:
        return generator
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _check(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids) -> None:
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: generate at least one token")
    longest = max(len(p) for p in prompts)
    if longest >= model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens leaves no room to generate in model.max_seq_len="
                         f"{model.cfg.max_seq_len}; shorten it")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: need temperature >= 0 "
                         f"(0: greedy), top_k >= 1 and 0 < top_p <= 1")
    if len(set(stop_ids)) > STOP_SLOTS:
        raise ValueError(f"{len(set(stop_ids))} stop ids; at most {STOP_SLOTS} (stop strings are cut by the caller)")
