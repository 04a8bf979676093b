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
