"""GPU-only checks (marked gpu, skipped without CUDA): the compiled bf16 path computes what the
float32 CPU path computes, and trains."""

import json

import pytest
import torch

from conftest import tiny_overrides
from model import ModelConfig, Transformer, cross_entropy_with_z_loss, linear_cross_entropy
from train import load_config, train

pytestmark = pytest.mark.gpu


def _has_flash_attention_4() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("flash_attn.cute.interface") is not None
    except ModuleNotFoundError:
        return False


needs_fa4 = pytest.mark.skipif(not _has_flash_attention_4(), reason="flash-attn-4 is not installed "
                               "(requirements-gpu.txt)")


@pytest.fixture(autouse=True)
def pytorch_attention_kernels_after_each_test():
    """train.py switches SDPA to FlashAttention-4 for the whole process when it can; each test
    starts from PyTorch's own kernels again."""
    yield
    if _has_flash_attention_4():  # only then can a test have switched it on
        from torch.nn.attention import restore_flash_attention_impl
        restore_flash_attention_impl()
    torch.backends.cuda.enable_cudnn_sdp(True)


@needs_fa4
def test_flash_attention_4_computes_what_pytorch_attention_computes(monkeypatch):
    """GQA causal attention and its gradients through SDPA: FlashAttention-4's error against a
    float32 reference is within twice that of PyTorch's own bf16 kernel, and the flash slot really
    ran FlashAttention-4 (through the adapter torch calls), not PyTorch's own flash kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attention
    from attention import use_flash_attention_4
    calls = []
    real_forward = attention._flash_attn_fwd
    monkeypatch.setattr(attention, "_flash_attn_fwd", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("FlashAttention-4 runs on Hopper and Blackwell GPUs")
    torch.manual_seed(0)
    q = torch.randn(2, 8, 1024, 64, device="cuda")
    k, v = torch.randn(2, 2, 1024, 64, device="cuda"), torch.randn(2, 2, 1024, 64, device="cuda")
    grad_out = torch.randn(2, 8, 1024, 64, device="cuda")

    def outputs(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
        return [out.float()] + [g.float() for g in torch.autograd.grad(out, leaves, grad_out.to(dtype))]

    with sdpa_kernel(SDPBackend.MATH):
        want = outputs(torch.float32)
    pytorch_bf16 = outputs(torch.bfloat16)
    assert use_flash_attention_4(torch.device("cuda")) is None
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # FlashAttention-4 now sits behind this one
        fa4_bf16 = outputs(torch.bfloat16)
    assert calls, "SDPA's flash slot did not reach FlashAttention-4"
    for name, w, ours, theirs in zip(("out", "dq", "dk", "dv"), want, fa4_bf16, pytorch_bf16):
        assert (ours - w).abs().max() <= 2 * (theirs - w).abs().max() + 1e-3, name


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


@pytest.mark.parametrize("backend, kernel", [("sdpa", "pytorch"), ("flex", "auto"),
                                             pytest.param("sdpa", "fa4", marks=needs_fa4)])
def test_compiled_bf16_training_on_gpu_lowers_the_loss(small_data, tmp_path, backend, kernel, capsys, monkeypatch):
    """fa4: plain causal attention (no document mask) at head_dim 64, FlashAttention-4's home
    ground, and every attention call of the compiled graph goes through its adapter."""
    import attention
    calls = []
    real_forward = attention._flash_attn_fwd
    monkeypatch.setattr(attention, "_flash_attn_fwd", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    fa4 = {"train.document_masking": False, "model.d_model": 256, "model.d_ff": 512} if kernel == "fa4" else {}
    args = tiny_overrides(small_data[0], tmp_path, f"gpu-{backend}", **{
        "train.device": "cuda", "train.compile": "true", "model.attn_backend": backend, "train.max_steps": 30,
        "train.eval_interval": 30, "train.ckpt_interval": 30, "train.micro_batch_size": 8,
        "train.attention_kernel": kernel, **fa4})
    train(load_config(None, args))
    rows = [json.loads(line) for line in (tmp_path / f"gpu-{backend}" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.5
    assert all("mfu" in r for r in rows if "loss" in r)  # peak FLOP rate known for this GPU
    if kernel == "fa4":
        assert "attention kernel: FlashAttention-4" in capsys.readouterr().out and calls
    else:
        assert not calls


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
