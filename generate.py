"""Generation for the whole project: one sampler that evaluation, post-training and the chat call.

Every stage past SFT lives on sampling: on-policy preference pairs, GRPO rollouts, generative
evaluations, HumanEval, the text samples at the end of pretraining, the chat. They all call
`generate`: k completions of each of a list of token-id prompts, each ending at its first stop
token (kept) or after max_new_tokens, whichever comes first; greedy at temperature 0.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, k: int = 1,
             temperature: float = 0.0, top_k: int | None = None, stop_ids: Collection[int] = (),
             generator: torch.Generator | None = None, max_rows: int = 256) -> list[list[int]]:
    """k completions of every prompt (row p * k + j is prompt p's j-th), each cut after its first
    stop id or after max_new_tokens, capped by the room max_seq_len leaves after the prompt.

    Prompts of equal token length are generated together, k copies of each, up to max_rows rows
    at a time, with Transformer.generate's KV cache."""
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    stop = sorted(set(stop_ids))
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in range(len(prompts) * k)]
    per_batch = max(1, max_rows // k)
    was_training = model.training
    model.eval()
    for n, members in by_length.items():
        room = min(max_new_tokens, model.cfg.max_seq_len - n)
        if room < 1:
            raise ValueError(f"a prompt of {n} tokens leaves no room to generate in model.max_seq_len="
                             f"{model.cfg.max_seq_len}; shorten it")
        for b in range(0, len(members), per_batch):
            chunk = members[b:b + per_batch]
            x = torch.tensor([prompts[i] for i in chunk for _ in range(k)], device=device)
            new = model.generate(x, room, temperature=temperature, top_k=top_k,
                                 eos_id=stop[0] if len(stop) == 1 else None, generator=generator)[:, n:].tolist()
            for j, row in enumerate(new):
                end = next((t for t, token in enumerate(row) if token in stop), None)
                out[chunk[j // k] * k + j % k] = row if end is None else row[:end + 1]
    model.train(was_training)
    return out
