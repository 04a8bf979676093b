"""FP8 training (fp8.py): the quantisation's error bounds, the emulated FP8 linear against a hand
computation, the layer swap (same parameters, same state dict), and training runs on CPU (one
process and FSDP2 with activation checkpointing); on a GPU (marked gpu) the real _scaled_mm
kernels against the emulation, and a compiled FP8 run whose loss falls."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blocks import SwiGLU
from conftest import tiny_overrides, torchrun
from fp8 import E4M3, E5M2, FP8Linear, convert_to_fp8, dequantize, emulated_scaled_mm, fp8_linear, quantize, scaled_mm
from model import ModelConfig, Transformer
from train import ConfigError, load_config, train

# mantissa bits and the exponent of the smallest normal number of each format
FORMATS = {E4M3: (3, -6), E5M2: (2, -14)}


def spread_tensor(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Values over many orders of magnitude (log-uniform from 1e-6 to 1e3, random signs), rows
    scaled differently, as activations and gradients are."""
    g = torch.Generator().manual_seed(seed)
    mag = 10 ** (torch.rand(rows, cols, generator=g) * 9 - 6)
    sign = torch.randint(0, 2, (rows, cols), generator=g) * 2 - 1
    return mag * sign * 10 ** torch.linspace(-2, 2, rows)[:, None]


def hand_quantize(t: torch.Tensor, dtype: torch.dtype, dim: int | None) -> torch.Tensor:
    """t rounded to FP8 the textbook way, slice by slice with Python floats: the scale is 2^e for
    the smallest e with amax / 2^e <= max of the format; dequantised back to float32."""
    fmax = torch.finfo(dtype).max
    slices = [t] if dim is None else t.unbind(dim)
    out = []
    for s in slices:
        amax = s.abs().max().item()
        scale = 2.0 ** math.ceil(math.log2(amax / fmax))
        assert amax / scale <= fmax
        out.append((s / scale).to(dtype).float() * scale)
    return out[0] if dim is None else torch.stack(out, dim)


# ---------------------------------------------------------------------------------------------
# quantisation


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("reduce_dim", [None, 0, 1])
def test_quantize_round_trip_is_within_the_formats_error_bound(dtype, reduce_dim):
    """Each value comes back within half a unit in the last place: 2^-(m+1) of itself for normal
    numbers, half the subnormal spacing (times the scale) below that; the scale is a power of two
    that puts each slice's amax in the format's top octave, and nothing saturates."""
    t = spread_tensor(64, 48)
    q, s = quantize(t, dtype, reduce_dim)
    assert q.dtype == dtype and s.dtype == torch.float32
    assert s.shape == (() if reduce_dim is None else (1, 48) if reduce_dim == 0 else (64, 1))
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    fmax = torch.finfo(dtype).max
    amax = t.abs().amax() if reduce_dim is None else t.abs().amax(reduce_dim, keepdim=True)
    assert ((amax / s <= fmax) & (amax / s > fmax / 2)).all()
    mantissa, emin = FORMATS[dtype]
    err = (dequantize(q, s) - t).abs()
    bound = torch.maximum(t.abs() * 2.0 ** -(mantissa + 1), s * 2.0 ** (emin - mantissa - 1))
    assert (err <= bound).all()
    assert (err > 0.5 * bound).any()  # the bound is the format's, not a loose one
    # hand_quantize takes the dim it slices along; quantize the one it reduces over
    assert torch.equal(dequantize(q, s), hand_quantize(t, dtype, None if reduce_dim is None else 1 - reduce_dim))


def test_e5m2_trades_precision_for_range_and_rowwise_scales_keep_small_rows():
    """Why gradients use e5m2 under one scale per tensor, and why rowwise scales exist."""
    t = spread_tensor(64, 48)
    amax = t.abs().max()
    e4, e5 = (dequantize(*quantize(t, d, None)) for d in (E4M3, E5M2))
    small = (t.abs() < amax * 2.0 ** -20) & (t.abs() > amax * 2.0 ** -28)
    assert small.sum() > 100 and (e4[small] == 0).all() and (e5[small] != 0).all()  # e5m2's range keeps them
    big = t.abs() > amax * 2.0 ** -5
    rel = lambda d: ((d - t).abs() / t.abs())[big].mean()
    assert rel(e4) < 0.6 * rel(e5)  # where both represent a value, e4m3 is the more precise

    torch.manual_seed(0)
    x = torch.randn(32, 64) * 10 ** torch.linspace(-3, 3, 32)[:, None]  # tokens of very different sizes
    rel_err = {dim: ((dequantize(*quantize(x, E4M3, dim)) - x).norm(dim=1) / x.norm(dim=1))[:8].mean()
               for dim in (None, 1)}
    assert rel_err[None] > 0.5 and rel_err[1] < 0.1  # one scale flushes the 8 smallest tokens; per-row keeps them


# ---------------------------------------------------------------------------------------------
# the FP8 linear


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_fp8_linear_and_its_gradients_equal_a_hand_computation(recipe):
    """Forward: e4m3 x and w, scaled per row of x and per output feature (rowwise) or per tensor.
    Backward: grad_x = g w and grad_w = g^T x, each operand quantised along the dimension its GEMM
    contracts; g in e4m3 (rowwise) or e5m2 (tensorwise)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 48, requires_grad=True)
    w = (0.1 * torch.randn(64, 48)).requires_grad_()
    g = torch.randn(2, 16, 64) * torch.logspace(-3, 1, 64)
    y = fp8_linear(x, w, recipe)
    y.backward(g)

    rowwise = recipe == "rowwise"
    x2, g2 = x.detach().reshape(32, 48), g.reshape(32, 64)
    gdt = E4M3 if rowwise else E5M2
    along = (lambda dim: dim) if rowwise else (lambda dim: None)
    want_y = hand_quantize(x2, E4M3, along(0)) @ hand_quantize(w.detach(), E4M3, along(0)).t()
    want_gx = hand_quantize(g2, gdt, along(0)) @ hand_quantize(w.detach(), E4M3, along(1))
    want_gw = hand_quantize(g2, gdt, along(1)).t() @ hand_quantize(x2, E4M3, along(1))
    # hand_quantize's dim is the one unbound (a slice per row: 0); quantize's the one reduced (1)
    torch.testing.assert_close(y.reshape(32, 64), want_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.reshape(32, 48), want_gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, want_gw, rtol=1e-6, atol=1e-6)
    # FP8 really rounded, and stays close to the float32 layer
    exact = F.linear(x.detach(), w.detach())
    rel = ((y - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.1


def test_fp8_linear_is_plain_without_gradients_or_for_unaligned_shapes_and_spares_frozen_weights():
    torch.manual_seed(0)
    layer = FP8Linear(32, 48, bias=False)
    layer.recipe = "rowwise"
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight))  # validation, generation, evaluation
    odd = torch.randn(5, 32)  # 5 tokens: not a multiple of 16, which _scaled_mm needs
    assert torch.equal(layer(odd), F.linear(odd, layer.weight))
    layer.weight.requires_grad_(False)  # a frozen base weight (LoRA): no weight gradient is computed
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert layer.weight.grad is None and xg.grad is not None
    assert not torch.equal(layer(xg), F.linear(xg, layer.weight))  # with gradients: FP8


def test_fused_projections_run_their_one_gemm_in_fp8():
    torch.manual_seed(0)
    mlp = SwiGLU(32, 64)
    assert convert_to_fp8([mlp], "tensorwise", skip_first_last=False) == 3
    x = torch.randn(2, 16, 32, requires_grad=True)
    out = mlp(x)
    gate, up = fp8_linear(x, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), "tensorwise").split(64, -1)
    want = fp8_linear(F.silu(gate) * up, mlp.down_proj.weight, "tensorwise")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    plain = F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)
    assert not torch.allclose(out, plain, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())


def small_config(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64, **kw)


def test_conversion_keeps_parameters_init_and_state_dict_keys():
    """Blocks 1 and 2 of 4 are FP8 by default (the first and last, and the head, stay as they
    are); a state dict written with FP8 on loads with it off and back, and without gradients
    both models give the same logits."""
    torch.manual_seed(0)
    plain = Transformer(small_config())
    torch.manual_seed(0)
    fp8 = Transformer(small_config(fp8="rowwise"))
    kinds = [sorted({type(m).__name__ for m in b.modules() if isinstance(m, torch.nn.Linear)}) for b in fp8.blocks]
    assert kinds == [["Linear"], ["FP8Linear"], ["FP8Linear"], ["Linear"]]
    assert sum(isinstance(m, FP8Linear) for m in fp8.modules()) == 14  # q, k, v, o, gate, up, down in 2 blocks
    assert type(fp8.lm_head) is torch.nn.Linear
    a, b = plain.state_dict(), fp8.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    fp8.load_state_dict(a)
    plain.load_state_dict(b)
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(plain(idx), fp8(idx))
    every = Transformer(small_config(fp8="tensorwise", fp8_skip_first_last=False))
    assert sum(isinstance(m, FP8Linear) for m in every.modules()) == 28


def test_activation_checkpointing_recomputes_the_same_fp8_gradients():
    torch.manual_seed(0)
    model = Transformer(small_config(fp8="rowwise", fp8_skip_first_last=False))
    idx = torch.randint(0, 256, (4, 33))
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        model(idx[:, :-1], idx[:, 1:])[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)


def test_bad_fp8_settings_stop_with_one_line():
    with pytest.raises(ConfigError, match=r"model.fp8='fp4' is not one of \('off', 'tensorwise', 'rowwise'\)"):
        load_config(None, ["--model.fp8=fp4"])
    with pytest.raises(ConfigError, match="leaves none of the 2 blocks in FP8; set model.fp8_skip_first_last=false"):
        load_config(None, ["--model.fp8=rowwise", "--model.n_layers=2"])


# ---------------------------------------------------------------------------------------------
# training


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_model_trains_with_fp8_and_a_run_switches_it_off_at_a_resume(small_data, tmp_path):
    """Each recipe's loss falls and stays near the float32 run's (same data, same init); a
    checkpoint written with FP8 on resumes with it off (and the run finishes)."""
    fp8 = {"model.fp8_skip_first_last": False, "train.max_steps": 8, "train.eval_interval": 8,
           "train.ckpt_interval": 4, "optim.lr": 3e-3}
    final = {}
    for recipe in ("off", "tensorwise", "rowwise"):
        train(load_config(None, tiny_overrides(small_data[0], tmp_path, recipe, **fp8, **{"model.fp8": recipe})))
        rows = metrics(tmp_path / recipe)
        val = [r["val_loss"] for r in rows if "val_loss" in r]
        assert val[-1] < val[0] - 0.3, recipe
        final[recipe] = [r["loss"] for r in rows if "loss" in r]
    for recipe in ("tensorwise", "rowwise"):
        assert final[recipe] != final["off"]  # FP8 rounded the matmuls...
        assert final[recipe][-1] == pytest.approx(final["off"][-1], rel=0.03)  # ...and trained as well
    train(load_config(None, tiny_overrides(small_data[0], tmp_path, "rowwise", **{
        **fp8, "model.fp8": "off", "train.resume": True, "train.max_steps": 10})))
    assert [r["step"] for r in metrics(tmp_path / "rowwise") if "loss" in r][-1] == 10


@pytest.mark.slow
def test_fsdp_and_ddp_on_two_ranks_with_fp8_match_one_process(small_data, tmp_path):
    """Under FSDP2 each FP8 layer quantises the all-gathered weight (here with activation
    checkpointing recomputing its scales), under DDP the replica's: 2 gloo ranks follow the
    one-process curve (same micro-batches, so the same per-token scales) to 1e-5."""
    common = {"model.fp8": "rowwise", "model.fp8_skip_first_last": False, "train.max_steps": 3,
              "train.ckpt_interval": 3, "train.eval_interval": 3}
    train(load_config(None, tiny_overrides(small_data[0], tmp_path, "one", **common, **{"train.grad_accum_steps": 2})))
    torchrun(2, tiny_overrides(small_data[0], tmp_path, "fsdp", **common, **{
        "train.parallelism": "fsdp", "train.activation_checkpointing": True}), tmp_path)
    torchrun(2, tiny_overrides(small_data[0], tmp_path, "ddp", **common), tmp_path)
    one = {r["step"]: r["loss"] for r in metrics(tmp_path / "one") if "loss" in r}
    assert sorted(one) == [1, 2, 3]
    for name in ("fsdp", "ddp"):
        two = {r["step"]: r["loss"] for r in metrics(tmp_path / name) if "loss" in r}
        assert sorted(two) == sorted(one)
        for step in one:
            assert two[step] == pytest.approx(one[step], abs=1e-5), (name, step)


# ---------------------------------------------------------------------------------------------
# GPU: the real kernels


def gemm_tolerance(a, sa, b, sb, fast_accum: bool) -> torch.Tensor:
    """Per output element: bf16 rounding of the result, plus the accumulation's error, which
    grows with sum |a_k b_k| (larger for cuBLAS's fast FP8 accumulation)."""
    magnitude = dequantize(a, sa).abs() @ dequantize(b, sb).abs()
    exact = emulated_scaled_mm(a, sa, b, sb, torch.float32)
    return 2.0 ** -8 * exact.abs() + (1e-2 if fast_accum else 1e-3) * magnitude


@pytest.mark.gpu
@pytest.mark.parametrize("rowwise, a_dtype", [(False, E4M3), (False, E5M2), (True, E4M3)])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_scaled_mm_kernel_equals_the_emulation(rowwise, a_dtype, fast_accum):
    """torch._scaled_mm with the operands, scales and layouts fp8.py hands it (e4m3 x e4m3, and
    under tensorwise scaling an e5m2 gradient times e4m3) computes what the float32 emulation
    computes."""
    torch.manual_seed(0)
    m, k, n = 512, 1024, 768
    a_hp = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * torch.logspace(-2, 2, m, device="cuda")[:, None]
    b_hp = torch.randn(n, k, device="cuda")  # a weight, (out, in)
    a, sa = quantize(a_hp, a_dtype, 1 if rowwise else None)
    b, sb = quantize(b_hp, E4M3, 1 if rowwise else None)
    b, sb = b.t(), sb.t()  # (k, n) column-major, scales (1, n)
    got = scaled_mm(a, sa, b, sb, torch.bfloat16, fast_accum)
    want = emulated_scaled_mm(a, sa, b, sb, torch.float32)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert ((got.float() - want).abs() <= gemm_tolerance(a, sa, b, sb, fast_accum)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_linear_on_gpu_equals_the_cpu_emulation(recipe):
    """The whole autograd Function, output and both gradients, under bf16 autocast on the GPU
    against the same inputs on CPU (emulated): the same quantisation, and GEMMs that agree to
    bf16 rounding and accumulation order."""
    torch.manual_seed(0)
    x = torch.randn(4, 256, 512, dtype=torch.bfloat16)
    w = 0.02 * torch.randn(1024, 512)
    g = torch.randn(4, 256, 1024, dtype=torch.bfloat16)
    results = []
    for device in ("cuda", "cpu"):
        xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            y = fp8_linear(xd, wd, recipe)
        y.backward(g.to(device))
        results.append([t.float().cpu() for t in (y, xd.grad, wd.grad)])
        assert y.dtype == torch.bfloat16 and xd.grad.dtype == torch.bfloat16 and wd.grad.dtype == torch.float32
    for got, want in zip(*results):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
        assert ((got - want).abs() <= 2.0 ** -6 * want.abs() + 1e-2 * want.abs().max()).all()


@pytest.mark.gpu
def test_compiled_fp8_graph_calls_scaled_mm():
    """Inductor keeps the FP8 GEMMs: one forward and backward of a compiled FP8 layer runs
    _scaled_mm three times (output, grad_x, grad_w)."""
    layer = FP8Linear(512, 1024, bias=False).cuda()
    layer.recipe = "rowwise"
    compiled = torch.compile(layer)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled(x).sum().backward()  # compile outside the profile
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        compiled(x).sum().backward()
        torch.cuda.synchronize()
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_mm")
    assert calls == 3, [e.key for e in prof.key_averages()]


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_fp8_training_on_gpu_lowers_the_loss(small_data, tmp_path, recipe):
    args = tiny_overrides(small_data[0], tmp_path, f"gpu-fp8-{recipe}", **{
        "train.device": "cuda", "train.compile": "true", "model.fp8": recipe, "model.fp8_skip_first_last": False,
        "model.d_model": 256, "model.d_ff": 512, "train.max_steps": 30, "train.eval_interval": 30,
        "train.ckpt_interval": 30, "train.micro_batch_size": 8})
    train(load_config(None, args))
    val = [r["val_loss"] for r in metrics(tmp_path / f"gpu-fp8-{recipe}") if "val_loss" in r]
    assert val[-1] < val[0] - 0.5
