import pytest
import torch

from attention import (HAS_FLEX, CausalSelfAttention, apply_rope, document_causal_mask, kv_cache_bytes,
                       rope_frequencies)
from model import ModelConfig, Transformer


def reference_attention(x, layer: CausalSelfAttention, cos, sin, doc_ids=None):
    """Textbook multi-head attention, one head at a time, with each query head reading the KV
    head of its group; written without SDPA, enable_gqa or any mask helper."""
    B, T, _ = x.shape
    H, K, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = apply_rope(layer.q_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin)
    k = apply_rope(layer.k_proj(x).view(B, T, K, D).transpose(1, 2), cos, sin)
    v = layer.v_proj(x).view(B, T, K, D).transpose(1, 2)
    out = torch.zeros(B, H, T, D)
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            scores = q[b, h] @ k[b, kv].T / D ** 0.5
            for t in range(T):
                for s in range(T):
                    if s > t or (doc_ids is not None and doc_ids[b, s] != doc_ids[b, t]):
                        scores[t, s] = float("-inf")
            out[b, h] = scores.softmax(-1) @ v[b, kv]
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


def random_doc_ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    boundaries = torch.rand(B, T, generator=g) < 0.2
    boundaries[:, 0] = False
    return boundaries.long().cumsum(1)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("with_docs", [False, True])
def test_attention_equals_reference(n_kv_heads, with_docs):
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, n_kv_heads)
    x = torch.randn(2, 12, 32)
    cos, sin = rope_frequencies(8, 12, 10_000.0)
    doc_ids = random_doc_ids(2, 12) if with_docs else None
    mask = document_causal_mask(doc_ids) if with_docs else None
    torch.testing.assert_close(layer(x, cos, sin, mask), reference_attention(x, layer, cos, sin, doc_ids),
                               atol=1e-5, rtol=1e-5)


def test_gqa_with_one_group_per_head_is_mha():
    """n_kv_heads == n_heads is exactly MHA: copying the weights into a plain MHA layer gives the
    same output; n_kv_heads == 1 equals MHA whose K/V heads are all the same head (MQA)."""
    torch.manual_seed(0)
    cos, sin = rope_frequencies(8, 10, 10_000.0)
    x = torch.randn(2, 10, 32)
    mqa = CausalSelfAttention(32, 4, 1)
    mha = CausalSelfAttention(32, 4, 4)
    with torch.no_grad():
        mha.q_proj.weight.copy_(mqa.q_proj.weight)
        mha.o_proj.weight.copy_(mqa.o_proj.weight)
        mha.k_proj.weight.copy_(mqa.k_proj.weight.repeat(4, 1))
        mha.v_proj.weight.copy_(mqa.v_proj.weight.repeat(4, 1))
    torch.testing.assert_close(mqa(x, cos, sin), mha(x, cos, sin), atol=1e-6, rtol=1e-5)
    # GQA with 2 KV heads: query heads 0-1 read KV head 0, heads 2-3 read KV head 1 (in that order)
    gqa = CausalSelfAttention(32, 4, 2)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            heads = getattr(gqa, name).weight.view(2, 8, 32)
            getattr(mha, name).weight.copy_(heads.repeat_interleave(2, dim=0).reshape(32, 32))
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), atol=1e-6, rtol=1e-5)


def test_rope_scores_depend_only_on_offset():
    torch.manual_seed(0)
    D, base = 16, 10_000.0
    cos, sin = rope_frequencies(D, 64, base)
    q, k = torch.randn(D), torch.randn(D)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, D), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, D), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()
    for m, n, shift in [(5, 2, 10), (30, 0, 7), (3, 3, 40), (10, 20, 33)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the offset
    # Position 0 is the identity; the base sets the slowest frequency.
    torch.testing.assert_close(apply_rope(q.view(1, 1, 1, D), cos[:1], sin[:1]), q.view(1, 1, 1, D))
    cos2, _ = rope_frequencies(D, 64, 500_000.0)
    assert not torch.allclose(cos[:, -1], cos2[:, -1])
    # the rotation itself: pair j of position m (dims j and j + D/2, the Llama layout) is the
    # complex number x_j + i x_{j+D/2} times e^{i m base^(-2j/D)}
    x = torch.randn(1, 1, 64, D)
    got = apply_rope(x, cos, sin)
    theta = base ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double())
    want = z * torch.polar(torch.ones(64, D // 2, dtype=torch.float64), torch.arange(64)[:, None] * theta)
    torch.testing.assert_close(got, torch.cat([want.real, want.imag], -1).float(), atol=1e-5, rtol=1e-5)


def test_document_mask_is_brute_force_reference():
    doc_ids = random_doc_ids(3, 20, seed=1)
    mask = document_causal_mask(doc_ids)[:, 0]
    for b in range(3):
        for t in range(20):
            for s in range(20):
                assert bool(mask[b, t, s]) == (s <= t and bool(doc_ids[b, s] == doc_ids[b, t]))


def test_document_masking_blocks_exactly_the_cross_document_pairs():
    """Changing the tokens of one document leaves every other document's logits untouched, while
    without doc_ids the later documents do change."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=32)).eval()
    idx = torch.randint(0, 50, (1, 24))
    doc_ids = torch.tensor([[0] * 8 + [1] * 10 + [2] * 6])
    changed = idx.clone()
    changed[0, 8:18] = torch.randint(0, 50, (10,))  # rewrite document 1
    a, b = m(idx, doc_ids=doc_ids), m(changed, doc_ids=doc_ids)
    torch.testing.assert_close(a[0, :8], b[0, :8])
    torch.testing.assert_close(a[0, 18:], b[0, 18:])
    assert not torch.allclose(a[0, 8:18], b[0, 8:18])
    assert not torch.allclose(m(idx)[0, 18:], m(changed)[0, 18:])


def _backend_results(device, n_kv_heads, with_docs, backward, T=40):
    results = []
    doc_ids = random_doc_ids(2, T, seed=3).to(device) if with_docs else None
    idx = torch.randint(0, 64, (2, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        m = Transformer(ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                                    d_ff=64, max_seq_len=128, attn_backend=backend)).to(device)
        if backward:
            loss, _ = m(idx[:, :-1], idx[:, 1:], doc_ids)
            loss.backward()
            results.append((loss.detach(), m.blocks[0].attn.q_proj.weight.grad.clone()))
        else:
            with torch.no_grad():
                results.append((m(idx[:, :-1], idx[:, 1:], doc_ids)[0], m(idx[:, :-1], doc_ids=doc_ids)))
    return results


@pytest.mark.skipif(not HAS_FLEX, reason="flex_attention needs torch >= 2.5")
@pytest.mark.parametrize("n_kv_heads", [4, 1])
@pytest.mark.parametrize("with_docs", [False, True])
def test_flex_and_sdpa_backends_agree_on_cpu(n_kv_heads, with_docs):
    """The same model with flex_attention (BlockMask) and SDPA (boolean mask) gives the same loss
    and logits. flex has no backward on CPU, so gradients are compared in the GPU test below."""
    (loss_a, logits_a), (loss_b, logits_b) = _backend_results("cpu", n_kv_heads, with_docs, backward=False)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("with_docs", [False, True])
def test_flex_and_sdpa_backends_agree_on_gpu_with_gradients(n_kv_heads, with_docs):
    (loss_a, grad_a), (loss_b, grad_b) = _backend_results("cuda", n_kv_heads, with_docs, backward=True, T=128)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-4, rtol=1e-3)


def test_kv_cache_size_formula_matches_allocated_bytes():
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=3, n_heads=8, n_kv_heads=2, d_ff=64, max_seq_len=40)
    m = Transformer(cfg).to(torch.bfloat16)
    cache = m.new_kv_cache(batch_size=2, max_len=40)
    assert cache.nbytes() == kv_cache_bytes(3, 2, 8, 40, batch_size=2, bytes_per_value=2)
    # The playbook's SmolLM3 figure: 72 KiB per token, 9 GiB at 128k tokens (bf16).
    assert kv_cache_bytes(36, 4, 128, 1) == 72 * 1024
    assert kv_cache_bytes(36, 4, 128, 128 * 1024) == 9 * 1024 ** 3
    # MQA stores 1/n_heads of MHA's cache.
    assert kv_cache_bytes(36, 1, 128, 1) * 16 == kv_cache_bytes(36, 16, 128, 1)


def test_flash_attention_4_adapters_give_torch_the_tuple_it_unpacks(monkeypatch):
    """torch's FA4 hook unpacks (out, lse) from the forward and (dq, dk, dv) from the backward;
    flash-attn-4 returns more. The adapters pass every argument through and keep what torch takes."""
    import sys
    import types

    import attention
    calls = {}

    def fwd(q, k, v, **kwargs):
        calls["fwd"] = (q, k, v, kwargs)
        return "out", "lse", None, None, None

    def bwd(*args, **kwargs):
        calls["bwd"] = (args, kwargs)
        return "dq", "dk", "dv", "dsink"

    fake = types.ModuleType("flash_attn.cute.interface")
    fake._flash_attn_fwd, fake._flash_attn_bwd = fwd, bwd
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", fake)
    assert attention._flash_attn_fwd(1, 2, 3, causal=True, return_lse=True) == ("out", "lse")
    assert calls["fwd"] == (1, 2, 3, {"causal": True, "return_lse": True})
    assert attention._flash_attn_bwd(1, 2, 3, 4, 5, 6, softmax_scale=0.5) == ("dq", "dk", "dv")
    assert calls["bwd"] == ((1, 2, 3, 4, 5, 6), {"softmax_scale": 0.5})


def test_flash_attention_4_is_refused_with_the_reason_where_it_cannot_run(tmp_path):
    from attention import use_flash_attention_4
    from train import ConfigError, load_config, train
    assert "Hopper (sm90) or Blackwell" in use_flash_attention_4(torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.attention_kernel='fast' must be auto, fa4 or pytorch"):
        load_config(None, ["--train.attention_kernel=fast"])
    with pytest.raises(ConfigError, match="train.attention_kernel=fa4: FlashAttention-4 needs a Hopper"):
        train(load_config(None, ["--train.attention_kernel=fa4", "--train.document_masking=false",
                                 "--train.device=cpu", f"--train.out_dir={tmp_path}"]))
    # flash kernels take no mask: settings whose attention would never reach them are refused up front
    for overrides, reason in ((["--model.attn_backend=flex"], "model.attn_backend='flex'"),
                              ([], "train.document_masking=true hands SDPA a mask"),
                              (["--train.document_masking=false", "--train.dtype=float32"], "train.dtype=float32"),
                              (["--train.document_masking=false", "--model.sliding_window=16"],
                               "model.layer_pattern 'SSSS': attention other than plain causal")):
        with pytest.raises(ConfigError, match=f"train.attention_kernel=fa4 would never run: {reason}"):
            load_config(None, ["--train.attention_kernel=fa4", *overrides])
    load_config(None, ["--train.attention_kernel=fa4", "--train.document_masking=false"])  # plain causal: fine
