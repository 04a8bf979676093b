"""GPU-only checks (marked gpu, skipped without CUDA): the compiled bf16 path computes what the
float32 CPU path computes, and trains."""

import json

import pytest
import torch

from conftest import tiny_overrides
from model import ModelConfig, Transformer, cross_entropy_with_z_loss, linear_cross_entropy
from train import load_config, train

pytestmark = pytest.mark.gpu


def test_fused_loss_under_bf16_autocast_matches_float32_reference():
    torch.manual_seed(0)
    h = torch.randn(5000, 256, device="cuda", requires_grad=True)
    w = (0.02 * torch.randn(32000, 256, device="cuda")).requires_grad_()
    t = torch.randint(0, 32000, (5000,), device="cuda")
    ref, _ = cross_entropy_with_z_loss(h @ w.t(), t, 1e-4)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, t, 1e-4)
    loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    for got, want in ((h.grad, gh), (w.grad, gw)):
        assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_compiled_bf16_training_on_gpu_lowers_the_loss(small_data, tmp_path, backend):
    args = tiny_overrides(small_data[0], tmp_path, f"gpu-{backend}", **{
        "train.device": "cuda", "train.compile": "true", "model.attn_backend": backend, "train.max_steps": 30,
        "train.eval_interval": 30, "train.ckpt_interval": 30, "train.micro_batch_size": 8})
    train(load_config(None, args))
    rows = [json.loads(line) for line in (tmp_path / f"gpu-{backend}" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.5
    assert all("mfu" in r for r in rows if "loss" in r)  # peak FLOP rate known for this GPU


def test_gpu_generation_cached_equals_uncached():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                                max_seq_len=128)).cuda().eval()
    prompt = torch.randint(0, 300, (2, 7), device="cuda")
    a = m.generate(prompt, 30, temperature=0)
    b = m.generate(prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_muon_with_a_batch_ramp_and_spike_skipping_trains_compiled_on_gpu(small_data, tmp_path):
    """The CPU-tested optimisation pieces on the GPU path (bf16 autocast, compiled forward): Muon's
    Newton-Schulz on CUDA lowers the loss, the batch grows as batch_size_at says, and a clean run
    with spike skipping on skips nothing."""
    from optim import batch_size_at
    args = tiny_overrides(small_data[0], tmp_path, "gpu-muon", **{
        "train.device": "cuda", "train.compile": "true", "optim.name": "muon", "train.max_steps": 30,
        "train.eval_interval": 30, "train.ckpt_interval": 30, "train.global_batch_size": 16,
        "train.batch_ramp_start": 4, "train.batch_ramp_tokens": 8192, "train.spike_sigma": 6.0,
        "train.spike_window": 8})
    train(load_config(None, args))
    rows = [json.loads(line) for line in (tmp_path / "gpu-muon" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.5
    steps, tokens = [r for r in rows if "loss" in r], 0
    for r in steps:
        assert r["batch_size"] == batch_size_at(tokens, 16, 4, 8192, 4)
        tokens += r["batch_size"] * 64
    assert steps[0]["batch_size"] == 4 and steps[-1]["batch_size"] == 16
    assert steps[-1]["skipped_steps"] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("parallelism,optimizer,compiled", [("fsdp", "muon", "false"), ("ddp", "adamw", "true")])
def test_two_gpus_match_one_gpu(small_data, tmp_path, parallelism, optimizer, compiled):
    """On NCCL, 2 GPUs with one micro-batch each follow the loss curve of 1 GPU with two (bf16
    autocast, so within bf16 noise rather than CPU's 1e-5): Muon's gather-orthogonalise-reshard
    under FSDP2, and the compiled DDP forward with gradients as views into DDP's buckets."""
    from conftest import torchrun
    common = {"train.device": "cuda", "train.compile": compiled, "optim.name": optimizer, "train.max_steps": 20,
              "train.eval_interval": 20, "train.ckpt_interval": 20, "train.parallelism": parallelism}
    train(load_config(None, tiny_overrides(small_data[0], tmp_path, "one", **common, **{"train.grad_accum_steps": 2})))
    torchrun(2, tiny_overrides(small_data[0], tmp_path, "two", **common), tmp_path)
    curves = [{r["step"]: r["loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for name in ("one", "two")]
    assert sorted(curves[0]) == sorted(curves[1]) == list(range(1, 21))
    assert curves[0][20] < curves[0][1] - 0.5
    for step in curves[0]:
        assert curves[1][step] == pytest.approx(curves[0][step], abs=2e-2), step
