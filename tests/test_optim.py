import copy
import math

import pytest
import torch

from model import ModelConfig, Transformer
from optim import OptimConfig, build_optimizer, lr_at, param_groups


def test_warmup_then_cosine_hits_its_values():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)           # first step: lr / warmup
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)           # end of warmup: peak
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)          # cosine starts at the peak
    mid = 10 + (110 - 1 - 10) / 2
    assert lr_at(int(mid), cfg, 110) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))
    assert lr_at(109, cfg, 110) == pytest.approx(1e-4)         # last step: min_lr
    values = [lr_at(s, cfg, 110) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))     # monotone decay


def test_wsd_is_constant_then_decays_over_the_last_fraction():
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    steps = 100
    assert [lr_at(s, cfg, steps) for s in range(5, 80)] == [1e-3] * 75   # stable phase
    assert lr_at(80, cfg, steps) == pytest.approx(1e-3 * (1 - 1 / 20))  # decay starts at 80%
    assert lr_at(89, cfg, steps) == pytest.approx(1e-3 * 0.5)
    assert lr_at(99, cfg, steps) == pytest.approx(0.0)                   # ends at min_lr


def test_multistep_follows_deepseek_80_10_10():
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, schedule="multistep", min_lr=0.0)
    assert lr_at(799, cfg, 1000) == pytest.approx(1e-3)
    assert lr_at(800, cfg, 1000) == pytest.approx(3.16e-4)
    assert lr_at(899, cfg, 1000) == pytest.approx(3.16e-4)
    assert lr_at(900, cfg, 1000) == pytest.approx(1e-4)


def test_no_weight_decay_on_embeddings_and_norms():
    m = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                tie_embeddings=False))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed_tokens.weight" in no_decay["names"]
    assert all("norm" in n or "embed" in n for n in no_decay["names"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert "lm_head.weight" in decay["names"]  # an untied output head is a matrix like the others
    # every parameter exactly once
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters()) and len(set(ids)) == len(ids)


def test_optimizer_uses_playbook_defaults():
    m = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64))
    opt = build_optimizer(m, OptimConfig())
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [((0.9, 0.95), 1e-8, 0.1),
                                                                                     ((0.9, 0.95), 1e-8, 0.0)]
    assert OptimConfig().grad_clip == 1.0
    # what the groups do: with zero gradients, one step shrinks the block matrices by (1 - lr * wd)
    # and leaves the embedding and the norms untouched
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"] = 0.5
    opt.step()
    for n, p in m.named_parameters():
        decayed = "embed" not in n and p.ndim == 2
        torch.testing.assert_close(p.detach(), before[n] * (1 - 0.5 * 0.1 if decayed else 1.0), msg=n)


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="min_lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match=r"optim.betas must be in \[0, 1\)"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="multistep_milestones are fractions"):
        OptimConfig(schedule="multistep", multistep_milestones=(0.9, 0.8))
    with pytest.raises(ValueError, match="multistep_milestones are fractions"):
        OptimConfig(schedule="multistep", multistep_milestones=(80, 90))


# ---------------------------------------------------------------------------------------------
# Muon


@pytest.fixture
def one_thread():
    """Newton-Schulz on small matrices: one thread is ~0.3 ms a call, two on a busy 2-core machine
    can be 100x slower (threads waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _singular_values(x):
    return torch.linalg.svdvals(x.double())


def test_newton_schulz_makes_a_matrix_near_orthogonal(one_thread):
    """The quintic's known band: every singular value of the result lies in about [0.7, 1.2] (wide
    and tall, and per matrix of a stack), while the singular vectors are the input's."""
    from optim import newton_schulz
    torch.manual_seed(0)
    for shape in ((48, 96), (96, 48), (3, 40, 80)):
        g = torch.randn(shape)
        s = _singular_values(newton_schulz(g))
        assert s.min() > 0.65 and s.max() < 1.2, (shape, s.min(), s.max())
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        d = u.mT @ newton_schulz(g).double() @ vh.mT  # diagonal: NS only changes the singular values
        off = d - torch.diag_embed(torch.diagonal(d, dim1=-2, dim2=-1))
        assert off.abs().max() < 1e-4 and torch.diagonal(d, dim1=-2, dim2=-1).min() > 0.65
    # an orthogonal matrix stays itself, times one constant of the band (the quintic maps 1 to ~0.69)
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    out = newton_schulz(q)
    scale = (out * q).sum() / (q * q).sum()
    assert 0.65 < scale < 1.2
    torch.testing.assert_close(out, scale * q, atol=1e-4, rtol=0)
    assert newton_schulz(torch.zeros(8, 16)).abs().max() == 0  # no gradient, no update (no NaN)


def _moe_model():
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                   tie_embeddings=False, moe=True, moe_experts=4, moe_top_k=2, moe_shared_experts=1,
                                   moe_dense_layers=1))


def test_muon_takes_exactly_the_block_matrices(one_thread):
    from optim import describe_groups, muon_param_groups
    for m in (Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                      tie_embeddings=False, qk_norm=True, attn_sinks=True)), _moe_model()):
        groups = muon_param_groups(m, 0.1)
        muon = [g for g in groups if g.get("muon")]
        assert len(muon) == 1
        want = [n for n, p in m.named_parameters() if n.startswith("blocks.") and p.ndim >= 2 and "router" not in n]
        assert muon[0]["names"] == want and muon[0]["weight_decay"] == 0.1
        adamw = {n: g["weight_decay"] for g in groups if not g.get("muon") for n in g["names"]}
        assert adamw["lm_head.weight"] == 0.1 and adamw["embed_tokens.weight"] == 0.0
        assert all(wd == 0.0 for n, wd in adamw.items() if "norm" in n or "sinks" in n)
        ids = [id(p) for g in groups for p in g["params"]]  # every parameter exactly once
        assert sorted(ids) == sorted(id(p) for p in m.parameters()) and len(set(ids)) == len(ids)
        shapes = dict(zip(muon[0]["names"], muon[0]["matrix_shapes"]))
        # q, k and v are three matrices (the model keeps them apart: no fused QKV to orthogonalise)
        assert shapes["blocks.0.attn.q_proj.weight"] == (32, 32) and shapes["blocks.0.attn.k_proj.weight"] == (16, 32)
        assert "muon " in describe_groups(build_optimizer(m, OptimConfig(name="muon")))
    assert adamw["blocks.1.mlp.router.gate.weight"] == 0.1  # the router: AdamW, with decay
    # stacked experts: one matrix per expert, gate and up apart
    assert shapes["blocks.1.mlp.experts.w_gate_up"] == (64, 32) and shapes["blocks.1.mlp.experts.w_down"] == (32, 64)


def test_muon_update_is_orthogonalised_momentum_scaled_like_adamw(one_thread):
    """One step from zero momentum moves each block matrix by lr x 0.2 sqrt(max(m, n)) x NS(grad)
    (Moonshot's scale: RMS ~0.2 per unit lr, AdamW's range), per expert and per gate/up half; the
    AdamW part equals torch.optim.AdamW step for step."""
    from optim import Muon, muon_param_groups, newton_schulz
    torch.manual_seed(0)
    m = _moe_model()
    ref = copy.deepcopy(m)
    opt = build_optimizer(m, OptimConfig(name="muon", weight_decay=0.0))
    assert isinstance(opt, Muon)
    ref_opt = torch.optim.AdamW([g for g in muon_param_groups(ref, 0.0) if not g.get("muon")], betas=(0.9, 0.95),
                                eps=1e-8, foreach=False)
    lr = 0.01
    for g in opt.param_groups + ref_opt.param_groups:
        g["lr"] = lr
    muon = next(g for g in opt.param_groups if g["muon"])
    for step in range(3):
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        for p, q in zip(m.parameters(), ref.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        if step == 0:
            for name, p, (rows, cols) in zip(muon["names"], muon["params"], muon["matrix_shapes"]):
                delta = (before[name] - p.detach()) / (lr * 0.2 * max(rows, cols) ** 0.5)
                want = newton_schulz(p.grad.reshape(-1, rows, cols)).reshape(p.shape)
                torch.testing.assert_close(delta, want, atol=2e-5, rtol=1e-4)
                rms = (before[name] - p.detach()).pow(2).mean().sqrt() / lr
                assert 0.1 < rms < 0.25, (name, rms)
    adamw_names = [n for g in opt.param_groups if not g["muon"] for n in g["names"]]
    ref_params = dict(ref.named_parameters())
    for n in adamw_names:
        torch.testing.assert_close(dict(m.named_parameters())[n], ref_params[n], atol=1e-6, rtol=1e-5)


def test_muon_lowers_the_loss_of_a_tiny_model(one_thread):
    """A direct loop on a fixed batch of a tiny model: Muon at AdamW's lr trains."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=32))
    opt = build_optimizer(m, OptimConfig(name="muon", lr=1e-2))
    x = torch.randint(0, 64, (8, 33))
    losses = []
    for _ in range(20):
        loss, _ = m(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_bad_optimizer_name_is_refused():
    with pytest.raises(ValueError, match=r"optim.name='sgd' is not one of \('adamw', 'muon'\)"):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError, match="optim.muon_momentum in"):
        OptimConfig(name="muon", muon_momentum=1.0)


# ---------------------------------------------------------------------------------------------
# batch-size warmup and the square-root LR rule


def test_batch_ramp_values_and_rounding():
    from optim import batch_size_at
    # DeepSeek-V3: 3072 -> 15360 sequences over the first 469B tokens
    full, start, ramp = 15360, 3072, 469_000_000_000
    assert batch_size_at(0, full, start, ramp) == 3072
    assert batch_size_at(ramp // 2, full, start, ramp) == 9216                       # halfway: the mean
    assert batch_size_at(ramp - 1, full, start, ramp) == 15359
    assert batch_size_at(ramp, full, start, ramp) == batch_size_at(10 * ramp, full, start, ramp) == 15360
    # 8 GPUs x micro-batch 12 = 96: every value is a whole number of micro-batches on every rank
    values = [batch_size_at(t, full, start, ramp, 96) for t in range(0, ramp + ramp // 50, ramp // 100)]
    assert values[0] == 3072 and values[-1] == 15360 and all(v % 96 == 0 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))                          # monotone
    assert batch_size_at(ramp // 2, full, start, ramp, 96) == 9216
    assert batch_size_at(ramp // 2 - 1, full, start, ramp, 96) == 9216 - 96          # rounded down
    assert batch_size_at(0, 64, 1, 1000, 16) == 16                                   # never below one micro-batch
    assert batch_size_at(123, 64, 16, 0, 16) == 64                                   # no ramp


def test_ramp_steps_reach_the_token_budget_and_stop():
    from optim import batch_size_at, ramp_steps
    for budget, full, start, ramp, multiple in ((8 * 16 * 64, 16, 4, 2048, 4), (10**9, 384, 96, 10**8, 96),
                                               (5000, 16, 4, 0, 4)):
        steps = ramp_steps(budget, 64, full, start, ramp, multiple)
        seen = [0]
        for _ in range(steps):
            seen.append(seen[-1] + batch_size_at(seen[-1], full, start, ramp, multiple) * 64)
        assert seen[-2] < budget <= seen[-1] < budget + full * 64  # one step more would be past it
    assert ramp_steps(5000, 64, 16, 4, 0, 4) == -(-5000 // (16 * 64))  # no ramp: whole full batches
    assert ramp_steps(8 * 16 * 64, 64, 16, 4, 2048, 4) == 12  # 4,4,4,8,8,12,16 then five more of 16


def test_lr_schedule_on_tokens_takes_fractional_steps():
    from optim import OptimConfig, lr_at
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=4, schedule="cosine")
    assert lr_at(1.5, cfg, 10) == pytest.approx(2.5 / 4)  # in warmup, between steps 1 and 2
    assert lr_at(3, cfg, 10) == lr_at(3.5, cfg, 10) == 1.0 > lr_at(4.5, cfg, 10)  # the peak, never above it
    assert lr_at(9, cfg, 10) == pytest.approx(0.0) and lr_at(9.7, cfg, 10) == pytest.approx(0.0)
    for schedule in ("cosine", "wsd", "constant"):
        cfg.schedule = schedule
        values = [lr_at(t / 10, cfg, 10) for t in range(100)]
        assert max(values) == 1.0 and all(a >= b for a, b in zip(values[40:], values[41:]))  # decays after warmup


def test_sqrt_lr_scaling():
    from optim import sqrt_lr_scale
    assert sqrt_lr_scale(1024, 256) == pytest.approx(2.0)       # 4x the batch: 2x the learning rate
    assert sqrt_lr_scale(3072, 15360) == pytest.approx(0.2 ** 0.5)
    assert sqrt_lr_scale(256, 256) == 1.0
    with pytest.raises(ValueError, match="optim.lr_base_batch >= 0"):
        OptimConfig(lr_base_batch=-1)
