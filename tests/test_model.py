import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, RMSNorm, Transformer, count_params, cross_entropy_with_z_loss, flops_per_token


def tiny_cfg(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def numel(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # no memory: the 3B model's shapes only
        return sum(p.numel() for p in Transformer(cfg).parameters())


ABLATION_1B = dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, d_ff=8192, tie_embeddings=True)


@pytest.mark.parametrize("n_kv_heads, billions", [(1, 1.21), (4, 1.22), (8, 1.24)])
def test_param_formula_matches_playbook_1b_ablation(n_kv_heads, billions):
    cfg = ModelConfig(n_kv_heads=n_kv_heads, **ABLATION_1B)
    assert count_params(cfg) == numel(cfg)
    assert round(count_params(cfg) / 1e9, 2) == billions


def test_param_formula_smollm2_and_smollm3():
    smollm2 = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536)
    assert count_params(smollm2) == numel(smollm2)
    assert round(count_params(smollm2) / 1e6, 1) == 134.5
    smollm3 = ModelConfig(vocab_size=128256, d_model=2048, n_layers=36, n_heads=16, n_kv_heads=4, d_ff=11008)
    assert count_params(smollm3) == numel(smollm3)
    assert round(count_params(smollm3) / 1e9, 3) == 3.075


@pytest.mark.parametrize("seed", range(12))
def test_param_formula_random_configs(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    n_kv = r(1, 4)
    n_heads = n_kv * r(1, 3)
    cfg = ModelConfig(vocab_size=r(50, 3000), d_model=n_heads * 2 * r(1, 8), n_layers=r(1, 5),
                      n_heads=n_heads, n_kv_heads=n_kv, d_ff=r(8, 300), tie_embeddings=bool(seed % 2))
    assert count_params(cfg) == numel(cfg)


def test_tied_embeddings_share_one_tensor():
    tied, untied = tiny_cfg(tie_embeddings=True), tiny_cfg(tie_embeddings=False)
    m = Transformer(tied)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert count_params(untied) - count_params(tied) == tied.vocab_size * tied.d_model
    assert numel(untied) - numel(tied) == tied.vocab_size * tied.d_model


def test_init_std_matches_config():
    cfg = tiny_cfg(d_model=256, n_heads=4, d_ff=512, init_std=0.006)
    m = Transformer(cfg)
    # A normal truncated at +-3 sigma has std 0.9866 sigma.
    for w in (m.blocks[0].mlp.up_proj.weight, m.embed_tokens.weight, m.blocks[1].attn.q_proj.weight):
        assert w.std().item() == pytest.approx(0.006 * 0.9866, rel=0.03)
        assert w.abs().max().item() <= 3 * 0.006 + 1e-7
    assert torch.all(m.norm.weight == 1)


@pytest.mark.parametrize("eps, scale", [(1e-6, 1.0), (0.5, 1.0), (1e-6, 1e-3)])
def test_rmsnorm_formula(eps, scale):
    """x / sqrt(mean(x^2) + eps) * weight: eps inside the root, and the configured eps (a large eps
    and tiny activations make both visible)."""
    x = torch.randn(3, 5, 16) * scale
    norm = RMSNorm(16, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_loss_parts_equal_their_formulas():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11) * 3
    targets = torch.randint(0, 11, (2, 7))
    targets[0, :3] = -100  # ignored positions carry no loss
    loss, parts = cross_entropy_with_z_loss(logits, targets, z_loss_coef=1e-2)
    ce = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=-100)
    valid = targets.view(-1) != -100
    z = torch.logsumexp(logits.view(-1, 11)[valid], -1).pow(2).mean()
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["z_loss"], z)
    torch.testing.assert_close(loss, ce + 1e-2 * z)


def test_model_loss_includes_z_loss_only_when_enabled():
    torch.manual_seed(0)
    idx = torch.randint(0, 97, (2, 16))
    m = Transformer(tiny_cfg(z_loss_coef=1e-3))
    loss, parts = m(idx, idx)
    torch.testing.assert_close(loss.detach(), parts["ce"] + 1e-3 * parts["z_loss"])
    m.cfg.z_loss_coef = 0.0
    loss, parts = m(idx, idx)
    torch.testing.assert_close(loss.detach(), parts["ce"])


@pytest.mark.parametrize("tie", [True, False])
def test_flops_formula_counts_every_matmul_weight(tie):
    """6 x (every matmul weight, the output head once whether tied or not) + attention's 12 L h T."""
    cfg = tiny_cfg(tie_embeddings=tie)
    m = Transformer(cfg)
    linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 50
    assert flops_per_token(cfg, 50) == 6 * linear + attention


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    m = Transformer(tiny_cfg())
    idx = torch.randint(0, 97, (4, 32))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss, _ = m(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(97), rel=0.05)  # uniform prediction at init
    assert loss.item() < 0.3 * first


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, 10)])
def test_cached_and_uncached_generation_agree(n_kv_heads, temperature, top_k):
    torch.manual_seed(0)
    m = Transformer(tiny_cfg(n_kv_heads=n_kv_heads)).eval()
    with torch.no_grad():  # sharp attention: at init it is near uniform and hides position errors
        for block in m.blocks:
            block.attn.q_proj.weight.mul_(20)
            block.attn.k_proj.weight.mul_(20)
    prompt = torch.randint(0, 97, (3, 5))
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        outs.append(m.generate(prompt, 20, temperature=temperature, top_k=top_k, use_cache=use_cache, generator=g))
    assert outs[0].shape == (3, 25)
    assert torch.equal(outs[0], outs[1])


def test_generate_stops_at_eos_and_pads_finished_rows():
    torch.manual_seed(0)
    m = Transformer(tiny_cfg()).eval()
    prompt = torch.randint(0, 97, (2, 4))
    greedy = m.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 5])  # the second greedy token of row 0: row 0 stops there
    out = m.generate(prompt, 10, temperature=0, eos_id=eos)
    assert torch.all(out[0, 5:] == eos)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="n_heads=8 is not divisible by model.n_kv_heads=3"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="d_model=100 is not divisible"):
        ModelConfig(d_model=100, n_heads=8)
    with pytest.raises(ValueError, match="attn_backend"):
        ModelConfig(attn_backend="flash")
    m = Transformer(tiny_cfg(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-2])
def test_chunked_linear_cross_entropy_equals_full_logits(monkeypatch, z_loss_coef):
    """The fused loss never holds all logits, yet gives the same loss and gradients as
    materialising them (chunks of 5 rows here, so several chunks and a ragged last one)."""
    import model as model_module
    monkeypatch.setattr(model_module, "LOSS_CHUNK_TOKENS", 5)
    torch.manual_seed(0)
    h = torch.randn(23, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (23,))
    targets[[0, 7, 22]] = -100
    ref_loss, ref_parts = cross_entropy_with_z_loss(h @ w.t(), targets, z_loss_coef)
    ref_loss.backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, parts = model_module.linear_cross_entropy(h, w, targets, z_loss_coef)
    (2.0 * loss).backward()  # the upstream gradient is applied, not assumed to be 1
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(parts["z_loss"], ref_parts["z_loss"])
    torch.testing.assert_close(h.grad, 2 * ref_gh)
    torch.testing.assert_close(w.grad, 2 * ref_gw)
    with torch.no_grad():  # the evaluation path
        torch.testing.assert_close(model_module.linear_cross_entropy(h, w, targets, z_loss_coef)[0], ref_loss)


def test_swiglu_one_matmul_equals_the_textbook_gated_mlp():
    """down(silu(x Wg^T) * x Wu^T), values and gradients, whatever the fused layout of gate and up."""
    from model import SwiGLU
    torch.manual_seed(0)
    mlp = SwiGLU(16, 24)
    x = torch.randn(3, 5, 16, requires_grad=True)
    got = mlp(x)
    want = mlp.down_proj(torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T))
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, mlp.gate_proj.weight, mlp.up_proj.weight], g)
    grads_want = torch.autograd.grad(want, [x, mlp.gate_proj.weight, mlp.up_proj.weight], g)
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a, b)
