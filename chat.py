"""The chat format: SmolLM2's ChatML and SmolLM3's reasoning switch, rendered in plain Python.

SmolLM2 uses ChatML (`<|im_start|>role\n...<|im_end|>\n`), rendered here and checked byte for
byte against the Jinja template inside SmolLM2's GGUF file. SmolLM3 adds a reasoning switch:
`/think` or `/no_think` in the system prompt; in no-think mode the assistant turn starts with an
empty think block, so one model serves both modes. Tools are listed as JSON schemas in the system
prompt. Every post-training stage (sft.py, dpo.py, rl.py) and the chat command read and write
conversations through `chat_segments`.
"""

from __future__ import annotations

import json

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
