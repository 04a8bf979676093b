"""Every attention and position variant of attention.py, each against an independent reference.

References here are written without the code under test: explicit per-head score matrices with
masks from Python loops, and the recurrences of the papers, one step at a time."""

import math

import pytest
import torch

from attention import (HAS_FLEX, CausalSelfAttention, GatedLinearAttention, KVCache, MultiHeadLatentAttention,
                       apply_rope, attention_mask, build_attention_mask, dca_query_positions, gla_chunked,
                       gla_recurrent, kv_values_per_token, rope_frequencies, rope_layers, rotary_dim,
                       yarn_frequencies)
from checkpoint import checkpoint_paths, load_meta
from model import ModelConfig, Transformer, count_params, describe_layers

needs_flex = pytest.mark.skipif(not HAS_FLEX, reason="flex_attention needs torch >= 2.5")


def random_doc_ids(B, T, seed=0, p=0.15):
    g = torch.Generator().manual_seed(seed)
    boundaries = torch.rand(B, T, generator=g) < p
    boundaries[:, 0] = False
    return boundaries.long().cumsum(1)


def brute_force_allowed(T, window=0, chunk=0, doc_ids=None, b=0):
    """The masks' definitions, one (t, s) pair at a time."""
    out = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        for s in range(T):
            ok = s <= t
            ok = ok and (not window or t - s < window)
            ok = ok and (not chunk or t // chunk == s // chunk)
            ok = ok and (doc_ids is None or bool(doc_ids[b, t] == doc_ids[b, s]))
            out[t, s] = ok
    return out


def reference_layer(layer: CausalSelfAttention, x, cos, sin, doc_ids=None, sinks=None):
    """Per-head attention with explicit scores; optional per-head sink logits in the denominator."""
    B, T, _ = x.shape
    H, K, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = layer.k_proj(x).view(B, T, K, D).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, K, D).transpose(1, 2)
    if layer.q_norm is not None:  # RMSNorm of each head vector, written out
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + layer.q_norm.eps) * layer.q_norm.weight
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + layer.k_norm.eps) * layer.k_norm.weight
    if layer.use_rope:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = torch.zeros(B, H, T, D)
    for b in range(B):
        allowed = brute_force_allowed(T, layer.window, layer.chunk, doc_ids, b)
        for h in range(H):
            kv = h // (H // K)
            scores = (q[b, h] @ k[b, kv].T / D ** 0.5).masked_fill(~allowed, float("-inf"))
            if sinks is not None:
                scores = torch.cat([scores, sinks[h].expand(T, 1)], dim=1)
            probs = scores.softmax(-1)[:, :T]
            out[b, h] = probs @ v[b, kv]
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


def tiny(**kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def numel(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


# ---------------------------------------------------------------- RoPE and its variants


def test_partial_rope_with_fraction_one_is_plain_rope_and_leaves_the_rest_unrotated():
    c1, s1 = rope_frequencies(16, 32, 10_000.0)
    c2, s2 = rope_frequencies(16, 32, 10_000.0, fraction=1.0)
    assert torch.equal(c1, c2) and torch.equal(s1, s2)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 32, 16)
    cos, sin = rope_frequencies(16, 32, 10_000.0, fraction=0.5)
    assert cos.shape == (32, 4) and rotary_dim(16, 0.5) == 8
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])  # the un-rotated half carries no position
    assert not torch.allclose(y[..., :8], x[..., :8])
    # Rotated dims keep the relative-position property: shifting both positions keeps scores.
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        return (apply_rope(q.view(1, 1, 1, 16), cos[m:m + 1], sin[m:m + 1])
                * apply_rope(k.view(1, 1, 1, 16), cos[n:n + 1], sin[n:n + 1])).sum().item()
    assert score(9, 4) == pytest.approx(score(20, 15), abs=1e-4)
    # A model with rope_fraction 1 is the default model, weight for weight.
    torch.manual_seed(0)
    a = Transformer(tiny())
    torch.manual_seed(0)
    b = Transformer(tiny(rope_fraction=1.0))
    idx = torch.randint(0, 64, (2, 20))
    assert torch.equal(a(idx), b(idx))


def test_yarn_factor_one_is_plain_rope_and_factor_two_interpolates_only_slow_pairs():
    c1, s1 = rope_frequencies(64, 128, 10_000.0)
    c2, s2 = rope_frequencies(64, 128, 10_000.0, yarn_factor=1.0, yarn_original_len=128)
    torch.testing.assert_close(c1, c2, atol=0, rtol=1e-6)
    torch.testing.assert_close(s1, s2, atol=0, rtol=1e-6)
    inv_freq = 1.0 / (10_000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    new, mscale = yarn_frequencies(inv_freq, 2.0, original_len=4096, base=10_000.0)
    assert mscale == pytest.approx(0.1 * math.log(2) + 1)
    turns = 4096 * inv_freq / (2 * math.pi)
    fast, slow = turns > 32, turns < 1  # many turns within the trained context: keep; under one: stretch
    assert fast.any() and slow.any()
    torch.testing.assert_close(new[fast], inv_freq[fast])
    torch.testing.assert_close(new[slow], inv_freq[slow] / 2)
    mid = ~fast & ~slow
    assert ((new[mid] < inv_freq[mid]) & (new[mid] > inv_freq[mid] / 2)).all()
    # Scores still depend only on the offset, times mscale^2.
    cos, sin = rope_frequencies(64, 256, 10_000.0, yarn_factor=2.0, yarn_original_len=128)
    q, k = torch.randn(64), torch.randn(64)

    def score(m, n, c, s):
        return (apply_rope(q.view(1, 1, 1, 64), c[m:m + 1], s[m:m + 1])
                * apply_rope(k.view(1, 1, 1, 64), c[n:n + 1], s[n:n + 1])).sum().item()
    assert score(200, 150, cos, sin) == pytest.approx(score(60, 10, cos, sin), abs=1e-3)
    assert score(0, 0, cos, sin) == pytest.approx(mscale ** 2 * (q @ k).item(), rel=1e-4)


@pytest.mark.parametrize("head_dim,base,original,factor", [(128, 5e6, 65536, 2.0), (64, 10_000.0, 4096, 4.0),
                                                           (64, 50_000.0, 4096, 2.0)])
def test_yarn_matches_hugging_faces_reference(head_dim, base, original, factor):
    """SmolLM3's setting first (d_h 128, base 5M, 64k trained, x2): a checkpoint extended with YaRN
    must get the frequencies and scale that Hugging Face (and the YaRN authors' code) give it."""
    hf = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_yarn_parameters
    cfg = hf.LlamaConfig(head_dim=head_dim, hidden_size=head_dim * 4, num_attention_heads=4,
                         max_position_embeddings=int(original * factor),
                         rope_scaling={"rope_type": "yarn", "factor": factor,
                                       "original_max_position_embeddings": original, "rope_theta": base})
    cfg.rope_theta = base
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters["rope_theta"] = base
    hf_inv_freq, hf_scale = _compute_yarn_parameters(cfg, "cpu")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ours, mscale = yarn_frequencies(inv_freq, factor, original, base)
    torch.testing.assert_close(ours.float(), hf_inv_freq.float(), rtol=1e-5, atol=0)
    assert mscale == pytest.approx(hf_scale, rel=1e-6)


def test_rnope_pattern_is_smollm3s_and_nope_layers_use_no_rotation():
    smollm3 = rope_layers(36, 4)
    assert [i for i, r in enumerate(smollm3) if not r] == list(range(3, 36, 4))
    assert not any(rope_layers(5, 1)) and all(rope_layers(5, 0))
    cfg = tiny(n_layers=8, nope_every=4)
    m = Transformer(cfg)
    assert [b.attn.use_rope for b in m.blocks] == [True, True, True, False] * 2
    assert describe_layers(cfg) == "G G G G/nope G G G G/nope"
    # A NoPE layer equals attention with the identity rotation, and differs from the RoPE layer.
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, 2, use_rope=False)
    x = torch.randn(2, 12, 32)
    cos, sin = rope_frequencies(8, 12, 10_000.0)
    identity = torch.ones_like(cos), torch.zeros_like(sin)
    layer.use_rope = True
    with_identity = reference_layer(layer, x, *identity)
    with_rope = reference_layer(layer, x, cos, sin)
    layer.use_rope = False
    torch.testing.assert_close(layer(x, cos, sin), with_identity, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_identity, with_rope, atol=1e-3)


def test_abf_changing_rope_base_between_stages_keeps_the_weights_and_only_moves_the_tables():
    torch.manual_seed(0)
    stage1 = Transformer(tiny(rope_base=10_000.0))
    stage2 = Transformer(tiny(rope_base=1_000_000.0))
    stage2.load_state_dict(stage1.state_dict())  # RoPE tables are not weights: nothing to convert
    assert "rope_cos" not in stage1.state_dict()
    cos2, _ = rope_frequencies(8, 64, 1_000_000.0)
    assert torch.equal(stage2.rope_cos, cos2)
    # The fastest pair is the same for every base, the slowest turns slower with a larger base.
    assert torch.equal(stage1.rope_cos[:, 0], stage2.rope_cos[:, 0])
    assert (stage2.rope_cos[1:, -1] > stage1.rope_cos[1:, -1]).all()


def test_abf_stage_resumes_in_train_with_a_new_rope_base(small_data, tmp_path, monkeypatch):
    from conftest import tiny_overrides
    from train import load_config, train
    data_cfg, _ = small_data
    train(load_config(None, tiny_overrides(data_cfg, tmp_path, "abf", **{"train.max_steps": 3})))
    stage2 = tiny_overrides(data_cfg, tmp_path, "abf", **{"train.max_steps": 5, "model.rope_base": 500_000.0,
                                                          "train.resume": True})
    tables = []
    real_forward = Transformer.forward

    def spy(self, *args, **kwargs):
        tables.append(self.rope_cos)
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(Transformer, "forward", spy)
    summary = train(load_config(None, stage2))
    assert summary["steps"] == 5 and math.isfinite(summary["val_loss"])
    cos_500k, _ = rope_frequencies(16, 64, 500_000.0)  # the tiny model: head_dim 16, max_seq_len 64
    assert tables and all(torch.equal(t, cos_500k) for t in tables)  # the trained weights meet the new base
    saved = load_meta(checkpoint_paths(tmp_path / "abf")[-1])
    assert saved["config"]["model"]["rope_base"] == 500_000.0


# ---------------------------------------------------------------- masks, sinks, QK-norm


MASK_CASES = [dict(window=5), dict(chunk=8), dict(window=3, docs=True), dict(chunk=6, docs=True), dict(docs=True)]


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
def test_masks_equal_brute_force(case):
    doc_ids = random_doc_ids(2, 30, seed=4) if case.get("docs") else None
    w, c = case.get("window", 0), case.get("chunk", 0)
    mask = attention_mask(doc_ids, 30, 30, w, c)
    for b in range(mask.shape[0]):
        assert torch.equal(mask[b, 0], brute_force_allowed(30, w, c, doc_ids, b))
    # Generation builds the same rows from a query offset.
    rows = attention_mask(None, 4, 30, w, c, q_offset=26)[0, 0]
    assert torch.equal(rows, brute_force_allowed(30, w, c)[26:])


@pytest.mark.parametrize("case", MASK_CASES + [dict(docs=True, sinks=True), dict(window=4, sinks=True),
                                               dict(chunk=5, docs=True, sinks=True), dict(qk_norm=True, docs=True)],
                         ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_limited_attention_layers_equal_reference_on_both_backends(case, backend):
    if backend == "flex" and not HAS_FLEX:
        pytest.skip("flex_attention needs torch >= 2.5")
    torch.manual_seed(0)
    w, c = case.get("window", 0), case.get("chunk", 0)
    layer = CausalSelfAttention(32, 4, 2, backend, window=w, chunk=c, sinks=case.get("sinks", False),
                                qk_norm=case.get("qk_norm", False))
    with torch.no_grad():
        if layer.sinks is not None:
            layer.sinks.copy_(torch.tensor([-1.0, 0.5, 2.0, 4.0]))
        if layer.q_norm is not None:
            layer.q_norm.weight.uniform_(0.5, 1.5)
            layer.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 40, 32)
    cos, sin = rope_frequencies(8, 40, 10_000.0)
    doc_ids = random_doc_ids(2, 40, seed=2) if case.get("docs") else None
    mask = build_attention_mask(backend, doc_ids, 2, 40, torch.device("cpu"), window=w, chunk=c)
    with torch.no_grad():
        got = layer(x, cos, sin, mask)
        want = reference_layer(layer, x, cos, sin, doc_ids, layer.sinks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_sinks_absorb_probability_and_learn():
    """A large sink logit drains the attention (output -> 0); the sink receives a gradient."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, 4, sinks=True)
    x = torch.randn(1, 10, 32)
    cos, sin = rope_frequencies(8, 10, 10_000.0)
    layer(x, cos, sin).square().sum().backward()
    assert layer.sinks.grad is not None and layer.sinks.grad.abs().min() > 0
    with torch.no_grad():
        layer.sinks.fill_(30.0)
        assert layer(x, cos, sin).abs().max() < 1e-6


def test_qk_norm_changes_only_the_q_k_norms():
    """QK-norm adds two d_h weight vectors per layer and nothing else; with the norms' weights at
    1, every q and k head has RMS 1 before RoPE (so logits are bounded by sqrt(d_h))."""
    cfg = tiny(qk_norm=True)
    plain = {n: p.shape for n, p in Transformer(tiny()).named_parameters()}
    extra = {n: p.shape for n, p in Transformer(cfg).named_parameters() if n not in plain}
    assert extra == {f"blocks.{i}.attn.{w}_norm.weight": torch.Size([8]) for i in range(2) for w in "qk"}
    assert count_params(cfg) == numel(cfg) == count_params(tiny()) + 2 * 2 * 8
    layer = CausalSelfAttention(32, 4, 2, qk_norm=True)
    q = layer.q_norm(layer.q_proj(torch.randn(3, 7, 32) * 5).view(3, 7, 4, 8))
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(3, 7, 4), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- whole models: back ends and generation

VARIANTS = {
    "rnope": dict(nope_every=2),
    "partial": dict(rope_fraction=0.5),
    "yarn": dict(yarn_factor=2.0),
    "swa": dict(sliding_window=6),
    "chunked": dict(attn_chunk_size=8),
    "gemma3_like": dict(layer_pattern="SG", sliding_window=5),
    "llama4_like": dict(layer_pattern="CG", attn_chunk_size=8, nope_every=2),
    "sinks": dict(attn_sinks=True),
    "qk_norm": dict(qk_norm=True),
    "mla": dict(attn_type="mla"),
    "mla_swa": dict(attn_type="mla", sliding_window=7, kv_lora_rank=12, mla_rope_dim=4),
    "hybrid": dict(layer_pattern="LG", gla_chunk_size=4),
    "dca": dict(dca_chunk_size=8, dca_local_window=3),
}


def _randomise_variant_params(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("sinks"):
                p.uniform_(-1, 2)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_parameter_count_matches_formula(name):
    cfg = tiny(**VARIANTS[name])
    assert count_params(cfg) == numel(cfg)


@needs_flex
@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "dca"])
def test_flex_and_sdpa_agree_for_every_variant_with_documents(name):
    idx = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
    doc_ids = random_doc_ids(2, 32, seed=5)
    out = []
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        m = Transformer(tiny(attn_backend=backend, d_model=64, **VARIANTS[name])).eval()  # flex: head_dim >= 16
        _randomise_variant_params(m)
        with torch.no_grad():
            out.append(m(idx[:, :-1], doc_ids=doc_ids))
    torch.testing.assert_close(out[0], out[1], atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "dca"])
def test_flex_and_sdpa_gradients_agree_on_gpu_for_every_variant(name):
    idx = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(0)).cuda()
    doc_ids = random_doc_ids(2, 40, seed=5).cuda()
    results = []
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        m = Transformer(tiny(attn_backend=backend, d_model=64, **VARIANTS[name])).cuda()
        _randomise_variant_params(m)
        loss, _ = m(idx[:, :-1], idx[:, 1:], doc_ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_keeps_documents_apart(name):
    """Rewriting one packed document leaves the other documents' logits unchanged."""
    torch.manual_seed(0)
    m = Transformer(tiny(**VARIANTS[name])).eval()
    _randomise_variant_params(m)
    idx = torch.randint(0, 64, (1, 30))
    doc_ids = torch.tensor([[0] * 9 + [1] * 12 + [2] * 9])
    changed = idx.clone()
    changed[0, 9:21] = torch.randint(0, 64, (12,))
    with torch.no_grad():
        a, b = m(idx, doc_ids=doc_ids), m(changed, doc_ids=doc_ids)
    torch.testing.assert_close(a[0, :9], b[0, :9])
    torch.testing.assert_close(a[0, 21:], b[0, 21:])
    assert not torch.allclose(a[0, 9:21], b[0, 9:21])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_generates_the_same_with_and_without_cache(name):
    torch.manual_seed(0)
    m = Transformer(tiny(**VARIANTS[name])).eval()
    _randomise_variant_params(m)
    prompt = torch.randint(0, 64, (2, 9))
    cached = m.generate(prompt, 20, temperature=0.0)
    uncached = m.generate(prompt, 20, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)
    # and the cached logits equal the full forward pass, token by token
    cache = m.new_kv_cache(2, 29)
    with torch.no_grad():
        step_logits = [m(cached[:, :9], kv_cache=cache)]
        step_logits += [m(cached[:, t:t + 1], kv_cache=cache) for t in range(9, 29)]
        torch.testing.assert_close(torch.cat(step_logits, 1), m(cached), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- StreamingLLM generation


def test_streaming_cache_equals_running_the_model_on_the_kept_tokens():
    """Each streaming step computes exactly what the model computes on the kept tokens (the first
    n_sink plus the last window) renumbered from 0: StreamingLLM's positions-within-cache rule.
    Exact for one layer: in deeper layers a cached key keeps the context its token saw when it was
    computed (StreamingLLM never recomputes the cache), which the reference cannot reproduce."""
    torch.manual_seed(0)
    m = Transformer(tiny(max_seq_len=16, n_layers=1)).eval()
    seq = torch.randint(0, 64, (1, 40))  # longer than max_seq_len: only streaming can go there
    n_sink, window = 2, 6
    cache = m.new_streaming_cache(1, n_sink, window)
    with torch.no_grad():
        for t in range(40):
            got = m(seq[:, t:t + 1], kv_cache=cache)[0, -1]
            kept = list(range(min(n_sink, t + 1))) + list(range(max(n_sink, t + 1 - window), t + 1))
            want = m(seq[:, kept])[0, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert cache.pos == len(kept) <= n_sink + window
    bounded = cache.nbytes()
    assert bounded == m.new_kv_cache(1, n_sink + window).nbytes()  # memory stays that of 8 tokens
    out = m.generate(seq[:, :10], 50, temperature=0.0, stream_window=window, stream_sinks=n_sink)
    assert out.shape == (1, 60)  # past max_seq_len=16
    deep = Transformer(tiny(max_seq_len=16, n_layers=3)).eval()
    assert deep.generate(seq[:, :10], 50, temperature=0.0, stream_window=window, stream_sinks=n_sink).shape == (1, 60)
    # Within the budget, streaming is ordinary generation.
    assert torch.equal(m.generate(seq[:, :4], 4, temperature=0.0, stream_window=window, stream_sinks=n_sink),
                       m.generate(seq[:, :4], 4, temperature=0.0))


# ---------------------------------------------------------------- MLA and cache sizes


def test_mla_absorbed_path_equals_naive_path():
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(32, 4, kv_lora_rank=12, rope_dim=4)
    x = torch.randn(2, 15, 32)
    cos, sin = rope_frequencies(4, 15, 10_000.0)
    doc_ids = random_doc_ids(2, 15, seed=1)
    for mask in (None, build_attention_mask("sdpa", doc_ids, 2, 15, torch.device("cpu"))):
        naive = layer(x, cos, sin, mask, absorbed=False)
        absorbed = layer(x, cos, sin, mask, absorbed=True)
        torch.testing.assert_close(naive, absorbed, atol=1e-5, rtol=1e-4)
    # and both equal MLA written out head by head from its definition (causal, no documents):
    # key_h = [W_uk_h c, RoPE(W_kr x)], value_h = W_uv_h c, scores / sqrt(d_h + d_rope)
    with torch.no_grad():
        H, dn, dr, r, T = 4, 8, 4, 12, 15
        c_and_kr = layer.kv_down(x)
        c = layer.kv_norm(c_and_kr[..., :r])
        k_rope = apply_rope(c_and_kr[..., r:][:, None], cos, sin)[:, 0]
        q = layer.q_proj(x).view(2, T, H, dn + dr)
        heads = []
        for h in range(H):
            q_h = torch.cat([q[:, :, h, :dn], apply_rope(q[:, None, :, h, dn:], cos, sin)[:, 0]], -1)
            k_h = torch.cat([c @ layer.k_up.weight[h * dn:(h + 1) * dn].T, k_rope], -1)
            v_h = c @ layer.v_up.weight[h * dn:(h + 1) * dn].T
            scores = q_h @ k_h.transpose(1, 2) / math.sqrt(dn + dr)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(scores.softmax(-1) @ v_h)
        want = layer.o_proj(torch.cat(heads, -1))
        torch.testing.assert_close(layer(x, cos, sin, None, absorbed=False), want, atol=1e-5, rtol=1e-4)


def test_mla_cache_holds_only_the_latent_and_the_rope_key():
    cfg = tiny(n_layers=3, d_model=64, n_heads=4, attn_type="mla")  # d_h 16: latent 64, RoPE key 8
    m = Transformer(cfg).to(torch.bfloat16)
    cache = m.new_kv_cache(batch_size=2, max_len=10)
    assert cache.k.shape == (3, 2, 1, 10, 64) and cache.v.shape == (3, 2, 1, 10, 8)
    per_token = kv_values_per_token(3, 16, kv_lora_rank=64, rope_dim=8)
    assert per_token == 4.5 * 3 * 16  # the playbook's 4.5 * L * d_h
    assert cache.nbytes() == per_token * 2 * 10 * 2
    with torch.no_grad():  # generation fills exactly these slots
        m(torch.randint(0, 64, (2, 6)), kv_cache=cache)
    assert cache.pos == 6 and cache.k[:, :, :, 6:].abs().sum() == 0 and cache.k[:, :, :, :6].abs().sum() > 0


@pytest.mark.parametrize("n_kv_heads, label", [(8, "MHA"), (2, "GQA"), (1, "MQA")])
def test_cache_bytes_generate_allocates_equal_the_formulas(n_kv_heads, label, monkeypatch):
    cfg = tiny(n_layers=3, d_model=64, n_heads=8, n_kv_heads=n_kv_heads, max_seq_len=40)
    m = Transformer(cfg).to(torch.bfloat16)
    allocated = []
    real = m.new_kv_cache

    def spy(*a, **k):
        allocated.append(real(*a, **k))
        return allocated[-1]
    monkeypatch.setattr(m, "new_kv_cache", spy)
    m.generate(torch.randint(0, 64, (2, 5)), 7, temperature=0.0)
    formula = {"MHA": 2 * 8 * 3 * 8, "GQA": 2 * 2 * 3 * 8, "MQA": 2 * 3 * 8}[label]  # 2*n_h*L*d_h, 2*g*L*d_h, 2*L*d_h
    assert kv_values_per_token(3, 8, n_kv_heads) == formula
    assert allocated[0].nbytes() == formula * 2 * 12 * 2  # bf16, 12 positions, batch 2


def test_local_layers_cache_only_their_span_whatever_the_length():
    """Sliding-window (S) and chunked (C) layers keep their last span - 1 keys, global ones every
    position: Gemma 3's 5:1 local:global pattern shrinks the cache almost 6x at long context.
    (Generation with these buffers == the full forward: test_every_variant_generates_...)."""
    per_layer_token = kv_values_per_token(1, 8, 2) * 2  # bf16 bytes of one layer's K and V for one token
    for pattern, spans in (("SSSG", dict(sliding_window=5)), ("CCG", dict(attn_chunk_size=8))):
        m = Transformer(tiny(n_layers=len(pattern), layer_pattern=pattern, d_model=32, n_heads=4, n_kv_heads=2,
                             max_seq_len=400, **spans)).to(torch.bfloat16)
        span = spans.get("sliding_window") or spans["attn_chunk_size"]
        local = pattern.count("S") + pattern.count("C")
        for length in (40, 400):
            cache = m.new_kv_cache(batch_size=1, max_len=length)
            assert cache.nbytes() == per_layer_token * (length + local * (span - 1)), (pattern, length)
    mla = Transformer(tiny(n_layers=2, layer_pattern="SG", attn_type="mla", sliding_window=7, kv_lora_rank=12,
                           mla_rope_dim=4, max_seq_len=400))
    per_mla_token = kv_values_per_token(1, 0, kv_lora_rank=12, rope_dim=4) * 4  # float32 latent + RoPE key
    assert mla.new_kv_cache(1, 400).nbytes() == per_mla_token * (400 + 6)
    gemma3 = tiny(n_layers=6, layer_pattern="SSSSSG", sliding_window=1024, d_model=32, n_heads=4, n_kv_heads=2,
                  max_seq_len=32768)
    full = tiny(n_layers=6, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32768)
    ratio = Transformer(full).new_kv_cache(1).nbytes() / Transformer(gemma3).new_kv_cache(1).nbytes()
    assert 5 < ratio < 6


def test_hybrid_cache_has_kv_only_for_attention_layers_and_a_fixed_state_for_linear_ones():
    cfg = tiny(n_layers=4, layer_pattern="LLLG", d_model=32, n_heads=4, n_kv_heads=2)
    cache = Transformer(cfg).new_kv_cache(1, 100)
    assert cache.k.shape[0] == 1 and sorted(cache.states) == [0, 1, 2]
    kv = kv_values_per_token(1, 8, 2) * 100 * 4
    state = 3 * 4 * 8 * 8 * 4  # 3 layers x heads x d_h x d_h, float32
    assert cache.nbytes() == kv + state


# ---------------------------------------------------------------- Dual Chunk Attention


def test_dca_equals_full_attention_when_the_sequence_fits_in_one_chunk():
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    doc_ids = random_doc_ids(2, 16, seed=3)
    torch.manual_seed(0)
    full = Transformer(tiny()).eval()
    torch.manual_seed(0)
    dca = Transformer(tiny(dca_chunk_size=16, dca_local_window=4)).eval()
    with torch.no_grad():
        torch.testing.assert_close(dca(idx), full(idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dca(idx, doc_ids=doc_ids), full(idx, doc_ids=doc_ids), atol=1e-5, rtol=1e-5)
        for m in (full, dca):  # sharper queries and keys, so that positions visibly matter
            for block in m.blocks:
                block.attn.q_proj.weight.mul_(20)
                block.attn.k_proj.weight.mul_(20)
        long = torch.cat([idx, idx], 1)
        a, b = dca(long), full(long)
        torch.testing.assert_close(a[:, :16], b[:, :16], atol=1e-4, rtol=1e-4)  # the first chunk is exact
        assert (a[:, 16:] - b[:, 16:]).abs().max() > 1e-2  # later ones use DCA's capped positions


def test_dca_scores_use_the_papers_relative_positions_and_never_exceed_the_trained_range():
    s, w, T, D = 6, 2, 20, 8
    cos, sin = rope_frequencies(D, s + w, 10_000.0)
    torch.manual_seed(0)
    layer = CausalSelfAttention(D * 2, 2, 1, dca_chunk=s, dca_local_window=w, dca_rope=(cos, sin))
    x = torch.randn(1, T, D * 2)
    got = layer(x, None, None)
    # Reference: q_i . R(d_ij) k_j with d_ij from the rule, pair by pair.
    q = layer.q_proj(x).view(1, T, 2, D).transpose(1, 2)[0]
    k = layer.k_proj(x).view(1, T, 1, D).transpose(1, 2)[0, 0]
    v = layer.v_proj(x).view(1, T, 1, D).transpose(1, 2)[0, 0]
    big_cos, big_sin = rope_frequencies(D, 64, 10_000.0)
    out = torch.zeros(2, T, D)
    for h in range(2):
        scores = torch.full((T, T), float("-inf"))
        for i in range(T):
            for j in range(i + 1):
                a, b = i % s, j % s
                if i // s == j // s:
                    d = i - j
                elif i // s == j // s + 1:
                    d = i - j if a < w else s + w - 1 - b
                else:
                    d = s + w - 1 - b
                assert 0 <= d <= s + w - 1
                qi = apply_rope(q[h, i].view(1, 1, 1, D), big_cos[d:d + 1], big_sin[d:d + 1])
                scores[i, j] = (qi.flatten() @ k[j]) / D ** 0.5
        out[h] = scores.softmax(-1) @ v
    want = layer.o_proj(out.transpose(0, 1).reshape(1, T, 2 * D))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    intra, succ, inter = dca_query_positions(torch.arange(T), s, w)
    assert int(torch.stack([intra, succ, inter]).max()) == s + w - 1


# ---------------------------------------------------------------- gated linear attention


@pytest.mark.parametrize("T, chunk, with_docs, with_state", [(23, 4, False, False), (32, 8, True, False),
                                                               (17, 16, True, False), (9, 4, False, True)])
def test_gla_recurrent_equals_chunked(T, chunk, with_docs, with_state):
    g = torch.Generator().manual_seed(T)
    B, H, dk, dv = 2, 3, 5, 4
    q, k = torch.randn(B, H, T, dk, generator=g), torch.randn(B, H, T, dk, generator=g)
    v = torch.randn(B, H, T, dv, generator=g)
    log_decay = torch.nn.functional.logsigmoid(torch.randn(B, H, T, dk, generator=g) * 3)
    state = torch.randn(B, H, dk, dv, generator=g) if with_state else None
    doc_ids = random_doc_ids(B, T, seed=T, p=0.2) if with_docs else None
    o_rec, s_rec = gla_recurrent(q, k, v, log_decay, state, doc_ids)
    o_chk, s_chk = gla_chunked(q, k, v, log_decay, chunk, state, doc_ids)
    torch.testing.assert_close(o_chk, o_rec, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_chk, s_rec, atol=1e-4, rtol=1e-4)
    # The recurrence itself, for one head and no documents: o_t = S_t^T q_t with S_t = a_t*S + k v^T.
    if not with_docs:
        S = state[0, 0].clone() if with_state else torch.zeros(dk, dv)
        for t in range(T):
            S = log_decay[0, 0, t].exp()[:, None] * S + torch.outer(k[0, 0, t], v[0, 0, t])
            torch.testing.assert_close(o_rec[0, 0, t], q[0, 0, t] @ S, atol=1e-5, rtol=1e-5)


def test_gla_chunked_stays_finite_at_the_strongest_decay_and_longest_chunk():
    """The layer clamps log-decays at GLA_MIN_LOG_DECAY; the config allows chunks up to 16: at
    both limits the chunked form must still equal the recurrence (exp(+-80) fits float32)."""
    from attention import GLA_MIN_LOG_DECAY
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 4, generator=g) for _ in range(3))
    log_decay = torch.full((1, 2, 48, 4), GLA_MIN_LOG_DECAY)
    o_rec, _ = gla_recurrent(q, k, v, log_decay)
    o_chk, _ = gla_chunked(q, k, v, log_decay, 16)
    assert torch.isfinite(o_chk).all()
    torch.testing.assert_close(o_chk, o_rec, atol=1e-4, rtol=1e-4)


def test_gla_layer_trains_and_generates_in_constant_memory():
    torch.manual_seed(0)
    layer = GatedLinearAttention(32, 4, chunk_size=4)
    x = torch.randn(1, 11, 32)
    cache = KVCache(0, 1, 1, 1, 1, torch.float32, "cpu", layers=[])
    cache.states[0] = torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        full = layer(x)
        steps = [layer(x[:, :5], kv_cache=cache)] + [layer(x[:, t:t + 1], kv_cache=cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.nbytes() == 4 * 8 * 8 * 4 + 0  # the state, whatever the length


def test_gla_layer_clamps_its_decay_so_any_gate_stays_finite():
    """A gate driven far negative (log-decay -100/16 per step, below GLA_MIN_LOG_DECAY) over a
    16-token chunk would overflow the chunked form; the layer's clamp keeps it finite and equal to
    stepping the recurrence one token at a time."""
    torch.manual_seed(0)
    layer = GatedLinearAttention(32, 4, chunk_size=16)
    x = torch.randn(1, 32, 32).abs() + 0.5
    with torch.no_grad():
        layer.gate_proj.weight.fill_(-10.0)  # every gate pre-activation about -200
        full = layer(x)
        cache = KVCache(0, 1, 1, 1, 1, torch.float32, "cpu", layers=[])
        cache.states[0] = torch.zeros(1, 4, 8, 8)
        steps = torch.cat([layer(x[:, t:t + 1], kv_cache=cache) for t in range(32)], 1)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full, steps, atol=1e-4, rtol=1e-4)


def test_hybrid_model_loss_falls():
    torch.manual_seed(0)
    m = Transformer(tiny(n_layers=4, layer_pattern="LGLG", gla_chunk_size=8))
    assert describe_layers(m.cfg) == "L G L G"
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    first = None
    for _ in range(30):
        loss, _ = m(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.6 * first


# ---------------------------------------------------------------- invalid combinations


@pytest.mark.parametrize("kw, words", [
    (dict(yarn_factor=0.5), "yarn_factor"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(layer_pattern="SG"), "sliding_window is below 1"),
    (dict(rope_fraction=0.0), "rope_fraction"),
    (dict(rope_fraction=1.5), "rope_fraction"),
    (dict(attn_type="mla", mla_rope_dim=3), "mla_rope_dim"),
    (dict(attn_type="mla", mla_rope_dim=16), "mla_rope_dim"),
    (dict(attn_type="mla", kv_lora_rank=100), "kv_lora_rank"),
    (dict(attn_type="mla", qk_norm=True), "attn_type='mla'"),
    (dict(layer_pattern="GGG"), "n_layers=2"),
    (dict(layer_pattern="GX"), "letters"),
    (dict(sliding_window=4, attn_chunk_size=8), "layer_pattern"),
    (dict(sliding_window=4, layer_pattern="GG"), "no S layer"),
    (dict(dca_chunk_size=8, attn_backend="flex"), "attn_backend='sdpa'"),
    (dict(dca_chunk_size=60, dca_local_window=10), "max_seq_len"),
    (dict(attn_type="gqa2"), "attn_type"),
    (dict(dca_chunk_size=8, yarn_factor=2.0), "two ways to extend"),
    (dict(gla_chunk_size=17), "gla_chunk_size=17 must be in [1, 16]"),
    (dict(dca_local_window=4), "dca_chunk_size is 0"),
    (dict(yarn_original_seq_len=32), "yarn_factor is 1"),
    (dict(nope_every=3), "nope_every=3 is above model.n_layers=2"),
    (dict(attn_type="mla", yarn_factor=2.0), "attn_type='mla' is not supported"),
])
def test_invalid_combinations_stop_with_one_line(kw, words):
    with pytest.raises(ValueError) as e:
        tiny(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_invalid_variant_is_one_error_line_in_train(tmp_path, capsys):
    import train
    with pytest.raises(SystemExit):
        train.main(["--model.yarn_factor=0.5", f"--train.out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.yarn_factor=0.5")


@pytest.mark.parametrize("scope", ["model", "blocks"])
@pytest.mark.parametrize("name", ["hybrid", "mla", "sinks", "swa"])
def test_compiled_model_gives_the_same_loss_and_gradients(name, scope):
    """train.py compiles the whole training forward on GPU (block by block under FSDP); the variants
    must trace (graph breaks allowed) and compute the same thing. aot_eager runs dynamo and autograd
    tracing without a C compiler."""
    torch._dynamo.reset()  # a fresh compile cache: never fall back to eager after the recompile limit
    idx = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
    doc_ids = random_doc_ids(2, 32, seed=7)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = fwd = Transformer(tiny(**VARIANTS[name]))
        if compiled and scope == "blocks":
            for block in m.blocks:
                block.compile(backend="aot_eager")
        elif compiled:
            fwd = torch.compile(m, backend="aot_eager")
        loss, _ = fwd(idx[:, :-1], idx[:, 1:], doc_ids)
        loss.backward()
        results.append((loss.detach(), m.blocks[0].attn.o_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
