"""scaling.py: compute formulas, the Chinchilla and DeepSeek laws, the fits, the memory estimate, the CLI."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import scaling
from model import ModelConfig, Transformer, count_params, flops_per_token
from scaling import (CHINCHILLA, GIB, block_activation_bytes, chinchilla_loss, chinchilla_optimal, deepseek_lr,
                     fit_chinchilla, fit_power_law, matmul_params, memory_estimate, training_flops,
                     twenty_tokens_per_param)
from train import load_config

ROOT = Path(__file__).resolve().parent.parent
ABLATION = load_config(ROOT / "configs" / "ablation_1b.toml")["model"]


def test_power_law_fit_recovers_deepseek_lr_law():
    C = np.logspace(17, 21, 12)
    a, b = fit_power_law(C, deepseek_lr(C))
    assert (a, b) == (pytest.approx(0.3118, rel=1e-9), pytest.approx(-0.125, rel=1e-9))
    noisy = deepseek_lr(C) * np.exp(np.random.default_rng(0).normal(0, 0.05, C.size))  # 5% scatter per budget
    assert fit_power_law(C, noisy)[1] == pytest.approx(-0.125, abs=0.02)
    with pytest.raises(ValueError):
        fit_power_law([1.0, 2.0], [1.0, -1.0])


def test_chinchilla_fit_recovers_planted_law_despite_an_outlier():
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6)))
    loss = chinchilla_loss(N, D, **CHINCHILLA) * np.exp(np.random.default_rng(0).normal(0, 0.002, N.size))
    loss[5] *= 1.2  # one diverged run
    fit = fit_chinchilla(N, D, loss)
    assert fit["alpha"] == pytest.approx(0.34, abs=0.02) and fit["beta"] == pytest.approx(0.28, abs=0.02)
    assert fit["E"] == pytest.approx(1.69, abs=0.05)
    # the Huber loss is what holds: least squares (a delta far above every residual) is pulled off
    squares = fit_chinchilla(N, D, loss, delta=10.0)
    assert abs(squares["beta"] - 0.28) > 2 * abs(fit["beta"] - 0.28)


@pytest.mark.parametrize("compute", [1e18, 2.3e20, 2e23])
def test_chinchilla_optimum_is_on_the_budget_and_lowest_there(compute):
    n, d = chinchilla_optimal(compute, **CHINCHILLA)
    assert 6 * n * d == pytest.approx(compute, rel=1e-12)
    # the closed form equals a brute-force search along the budget curve
    grid = n * np.logspace(-1, 1, 40001)
    searched = grid[np.argmin(chinchilla_loss(grid, compute / (6 * grid)))]
    assert searched == pytest.approx(n, rel=2e-4)
    best = chinchilla_loss(n, d)
    for factor in (0.8, 0.95, 1.05, 1.25):  # neighbours on the same C = 6ND curve
        assert chinchilla_loss(n * factor, d / factor) > best
    # N_opt grows as C^(beta / (alpha + beta))
    assert chinchilla_optimal(10 * compute)[0] / n == pytest.approx(10 ** (0.28 / 0.62), rel=1e-9)
    n20, d20 = twenty_tokens_per_param(compute)
    assert d20 == pytest.approx(20 * n20) and 6 * n20 * d20 == pytest.approx(compute)


@pytest.mark.parametrize("cfg", [ModelConfig(), ABLATION, dataclasses.replace(ABLATION, tie_embeddings=False),
                                 dataclasses.replace(ABLATION, n_kv_heads=1)])
def test_6nd_equals_flops_per_token_without_attention(cfg):
    T, tokens = cfg.max_seq_len, 1e9
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    untied_embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model  # a lookup, not a matmul
    assert matmul_params(cfg) == count_params(cfg) - norms - untied_embedding
    assert training_flops(cfg, tokens, T, attention=False) == 6 * matmul_params(cfg) * tokens
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    assert training_flops(cfg, tokens, T) == pytest.approx(6 * matmul_params(cfg) * tokens + attention * tokens)
    assert training_flops(cfg, tokens, T) == flops_per_token(cfg, T) * tokens


def test_smollm3_is_about_2e23_flops():
    assert 6 * count_params(scaling.SMOLLM3) * 11.2e12 == pytest.approx(2.07e23, rel=0.01)


def test_memory_static_parts_are_16_bytes_per_param_and_fsdp_shards_them():
    n = count_params(ABLATION)
    one = memory_estimate(ABLATION, 4, 4096)
    static = ("weights (fp32)", "gradients (fp32)", "optimizer states (fp32)")
    assert sum(one[k] for k in static) == 16 * n
    fsdp = memory_estimate(ABLATION, 4, 4096, world=8, parallelism="fsdp")
    for k in static:
        assert fsdp[k] == one[k] / 8
    assert memory_estimate(ABLATION, 4, 4096, world=8) == one  # DDP: a full replica, gradients in its buckets
    # accumulating without a reduce-scatter, FSDP2 holds unsharded fp32 gradients
    assert memory_estimate(ABLATION, 4, 4096, world=8, parallelism="fsdp", grad_accum=12)["gradients (fp32)"] == 4 * n
    assert memory_estimate(ABLATION, 4, 4096, world=8, parallelism="fsdp", grad_accum=12,
                           reduce_every_micro_batch=True)["gradients (fp32)"] == 4 * n / 8
    assert memory_estimate(ABLATION, 4, 4096, optimizer_states=1)["optimizer states (fp32)"] == 4 * n  # Muon


def test_activations_scale_with_micro_batch_and_drop_with_checkpointing():
    act = "activations (all blocks)"
    for compiled in (True, False):
        b1, b2 = (memory_estimate(ABLATION, b, 4096, compiled=compiled) for b in (1, 2))
        assert b2[act] == pytest.approx(2 * b1[act])
        ckpt = memory_estimate(ABLATION, 2, 4096, compiled=compiled, checkpointing=True)
        assert ckpt[act] == ABLATION.n_layers * 2 * ABLATION.d_model * 2 * 4096  # one bf16 input per block
        assert ckpt[act] < b2[act] / 10 and ckpt["peak"] < b2["peak"]
    assert block_activation_bytes(ABLATION, compiled=True) < block_activation_bytes(ABLATION, compiled=False)


def test_eager_block_count_equals_what_autograd_saves():
    """block_activation_bytes(compiled=False) + the bf16 weight copies == the bytes of every tensor
    one Block saves for backward under bf16 autocast (parameters and RoPE tables excluded)."""
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=64)
    model = Transformer(cfg)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    B, T = 2, 64
    x = torch.randn(B, T, cfg.d_model, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.blocks[0](x, model.rope_cos[:T], model.rope_sin[:T], None)
    weight_copies = 2 * (matmul_params(cfg) - cfg.vocab_size * cfg.d_model) / cfg.n_layers
    assert sum(saved.values()) == pytest.approx(block_activation_bytes(cfg, compiled=False) * B * T + weight_copies,
                                                rel=0.01)


def test_estimate_within_5_percent_of_measured_h100_peak():
    """README, Benchmarks: the 1B shape, micro-batch 4 x 4096, bf16 autocast, fp32 AdamW, whole forward
    compiled, one H100: 43.9 GiB peak. The estimate gives 44.4 GiB (+1.1%)."""
    peak = memory_estimate(ABLATION, 4, 4096, compiled=True)["peak"] / GIB
    assert peak == pytest.approx(43.9, rel=0.05)


def test_cli_reports_and_fails_in_one_line(capsys):
    scaling.main(["--config", str(ROOT / "configs" / "ablation_1b.toml"), "--gpus", "8"])
    out = capsys.readouterr().out
    assert "DeepSeek" in out and "Chinchilla" in out and "peak" in out
    for argv in (["--config", "configs/no_such.toml"], ["--config", str(ROOT / "configs" / "tiny.toml"), "--gpus", "0"],
                 ["--config", str(ROOT / "configs" / "ablation_1b.toml"), "--gpus", "7"]):
        with pytest.raises(SystemExit) as e:
            scaling.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    scaling.main([])  # the playbook table
    assert "SmolLM3" in capsys.readouterr().out
