"""FP8 training: the blocks' linear layers multiply in 8-bit floats, in plain PyTorch.

The playbook's infrastructure chapter: an H100's tensor cores run FP8 (e4m3) matmuls at about
twice their bf16 rate (`torch._scaled_mm`: 1,210-1,457 TFLOP/s against 714-758 on Llama-70B
shapes), and DeepSeek-V3 trained in FP8. An FP8 number has 8 bits: e4m3 (4 exponent, 3 mantissa
bits, up to 448) or e5m2 (5 and 2, up to 57,344), so a tensor is divided by a scale before the
cast to fit the format's range, and the matmul multiplies the scales back in:

    x @ w.T  ~  (s_x * q_x) @ (s_w * q_w).T      q = fp8(t / s),  s = amax(|t|) / max of the format

Two recipes choose where a scale applies (`model.fp8`):

- tensorwise: one scale per tensor. Cheapest; a few large values (activation outliers) squeeze
  every other value towards e4m3's bottom, where it has few or no mantissa bits left.
- rowwise: one scale per row of the input (per token) and per column of the weight (per output
  feature); the matmul multiplies the (M, 1) and (1, N) scales into its output. An outlier costs
  only its own row.

What runs where, in `_FP8Matmul` (y = x w^T, x (M, K), w (N, K), upstream gradient g (M, N)):

- forward: x and w in e4m3 (precision matters more than range for values and weights).
- backward: grad_x = g w and grad_w = g^T x, each an FP8 GEMM with its operands quantised along
  the dimension it contracts. Gradients are e5m2 under tensorwise scaling: one scale cannot
  follow their spread (the largest entries of a gradient are orders of magnitude above the
  typical ones), so range wins over precision, the classic recipe (NVIDIA's Transformer Engine,
  torchao's tensorwise). Under rowwise scaling each row has its own scale, which covers that
  spread, so gradients keep e4m3's extra mantissa bit, as in torchao's rowwise recipe and
  DeepSeek-V3 (e4m3 everywhere, with fine-grained scales).
- every scale is a power of two (the smallest one that keeps amax in range), so dividing by it
  is exact and the only error is the FP8 rounding; the forward accumulates with cuBLAS's fast
  FP8 accumulation, the two backward GEMMs, whose sums run over up to K = 16k tokens, with its
  precise one (DeepSeek-V3 measured up to 2% error for long fast sums; torchao's default).

The master weights stay float32 and the optimizer never sees FP8: the layer quantises the weight
it is given on every call (the float32 parameter under autocast, FSDP2's all-gathered bf16 copy
under fully_shard), so gradient accumulation, DDP and FSDP2 need nothing special, and no cached
FP8 copy can go stale after an optimizer step. Only FP8 operands are saved for backward (x^T and
w^T, already in the layout and scaling their backward GEMMs take), 1 byte per element against
bf16's 2. Under torch.compile, Inductor fuses each amax and cast into neighbouring kernels;
activation checkpointing recomputes the forward, scales included, bit for bit.

Without gradients (validation, generation, evaluation) an FP8 layer is an ordinary linear layer:
FP8 is how the weights are trained, not a different model. On CPU, which has no FP8 tensor cores,
the same Function runs an emulation (quantise, dequantise, matmul in float32) with the same
numbers, which is what the CPU tests check; a GPU test checks the real kernel against it.

Which layers (`convert_to_fp8`): every linear layer of the blocks (Q/K/V, O, gate/up, down),
except in the first and last blocks by default (`model.fp8_skip_first_last`); the output head is
never FP8. Those ends are where low precision hurts first: the first block reads raw embeddings
and the last feeds the logits, whose small differences the softmax turns into probabilities.
Megatron-Core has the same switch (first_last_layers_bf16, one block at each end), torchtitan's
FP8 recipes leave the output layer in bf16, modded-nanogpt's speedrun gave its FP8 head hand-set
scales, and the DeepSeek-V3 report keeps the embedding, the output head and other
precision-sensitive parts in higher precision. Measurements are in benchmarks/README.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_RECIPES = ("off", "tensorwise", "rowwise")
FP8_ALIGNMENT = 16  # _scaled_mm needs every matrix dimension it contracts or outputs to be a multiple of 16


def quantize(t: torch.Tensor, dtype: torch.dtype, reduce_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): t in FP8 `dtype` and its float32 dequantisation scale, so that t ~ s * q.

    reduce_dim None: one scale for the tensor (0-dim); else one scale per slice, the amax taken
    over reduce_dim (kept as a size-1 dim, so s broadcasts against q). s is the smallest power of
    two with amax / s <= the format's largest value: the amax lands in the format's top octave
    and dividing by s is exact."""
    fmax = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(t, float("inf"), dim=reduce_dim, keepdim=reduce_dim is not None).float()
    scale = torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / fmax)))
    # in t's own dtype: a power of two divides a bf16 exactly too, with no float32 copy of t
    q = (t / scale.to(t.dtype)).clamp(-fmax, fmax).to(dtype)  # the clamp guards log2's last-bit rounding
    return q.contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


@functools.lru_cache(maxsize=None)
def fp8_kernel_blocker(device: torch.device) -> str | None:
    """Why this device cannot run torch._scaled_mm's FP8 kernels, or None (CUDA, compute
    capability 8.9+: Ada, Hopper, Blackwell). CPUs take the emulation instead."""
    if device.type != "cuda":
        return f"{device.type} has no FP8 tensor cores"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no FP8 tensor cores (compute "
                f"capability 8.9+ needed: Ada, Hopper, Blackwell); set model.fp8=off")
    return None


def emulated_scaled_mm(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """What torch._scaled_mm computes, in float32: (scale_a * a) @ (scale_b * b)."""
    with torch.autocast(a.device.type, enabled=False):
        return (dequantize(a, scale_a) @ dequantize(b, scale_b)).to(out_dtype)


def scaled_mm(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """(scale_a * a) @ (scale_b * b) for FP8 a (M, K) row-major and b (K, N) column-major, with
    scales that are scalars (tensorwise) or (M, 1) and (1, N) (rowwise): the FP8 kernel on a GPU
    that has one, the float32 emulation on CPU.

    torch._scaled_mm's keyword signature is the same from torch 2.5 on (this project needs 2.6+,
    the GPU machine has 2.11, this one 2.13); rowwise scales want a bf16 output on the kernels
    that implement them (CUTLASS, and cuBLAS from 12.9 on Hopper), so the kernel writes bf16 and
    a float32 output, if asked for, is cast from it."""
    if a.device.type != "cuda":
        return emulated_scaled_mm(a, scale_a, b, scale_b, out_dtype)
    # checked in eager code only (a compiled graph meets _scaled_mm's own error on such a GPU)
    if not torch.compiler.is_compiling() and (blocker := fp8_kernel_blocker(a.device)):
        raise RuntimeError(f"model.fp8: {blocker}")
    out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                           use_fast_accum=fast_accum)
    return out.to(out_dtype)


class _FP8Matmul(torch.autograd.Function):
    """x (M, K) @ weight (N, K)^T with all three GEMMs (output, grad_x, grad_w) in FP8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rowwise: bool, out_dtype: torch.dtype) -> torch.Tensor:
        along_k, along_rows = (1, 0) if rowwise else (None, None)
        x_q, x_s = quantize(x, E4M3, along_k)        # per row of x: (M, 1)
        w_q, w_s = quantize(weight, E4M3, along_k)   # per output feature: (N, 1)
        out = scaled_mm(x_q, x_s, w_q.t(), w_s.t(), out_dtype, fast_accum=True)
        # the backward GEMMs contract over M (grad_w) and N (grad_x): x and w quantised along
        # those, and kept transposed, which is the layout their kernels read
        if rowwise:
            x_q, x_s = quantize(x, E4M3, along_rows)       # per column of x: (1, K)
            w_q, w_s = quantize(weight, E4M3, along_rows)  # per column of w: (1, K)
        ctx.save_for_backward(x_q.t().contiguous(), x_s, w_q.t().contiguous(), w_s)
        ctx.rowwise, ctx.x_dtype, ctx.w_dtype = rowwise, x.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_t, x_s, w_t, w_s = ctx.saved_tensors
        grad_dtype = E4M3 if ctx.rowwise else E5M2
        grad_x = grad_w = None
        g_q, g_s = quantize(grad_out, grad_dtype, 1 if ctx.rowwise else None)  # per row of g: (M, 1)
        if ctx.needs_input_grad[0]:  # grad_x (M, K) = g (M, N) @ w (N, K)
            grad_x = scaled_mm(g_q, g_s, w_t.t(), w_s, ctx.x_dtype, fast_accum=False)
        if ctx.needs_input_grad[1]:  # grad_w (N, K) = g^T (N, M) @ x (M, K)
            if ctx.rowwise:
                g_q, g_s = quantize(grad_out, grad_dtype, 0)  # per column of g: (1, N)
            grad_w = scaled_mm(g_q.t().contiguous(), g_s.t(), x_t.t(), x_s, ctx.w_dtype, fast_accum=False)
        return grad_x, grad_w, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: str) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with FP8 GEMMs while gradients are being computed.

    The output is in autocast's dtype when autocast is on, else in x's. Without gradients, and
    for shapes the FP8 kernels do not take (any of tokens, in or out features not a multiple of
    16), it is F.linear itself."""
    tokens = x.numel() // x.shape[-1]
    if not torch.is_grad_enabled() or any(n % FP8_ALIGNMENT for n in (tokens, *weight.shape)):
        return F.linear(x, weight)
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    out = _FP8Matmul.apply(x.reshape(tokens, x.shape[-1]), weight, recipe == "rowwise", out_dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """A bias-free nn.Linear whose training matmuls run in FP8 (`fp8_linear`). Its parameter is
    the same `weight`, so state dicts, checkpoints and optimizers cannot tell it from nn.Linear.
    `matmul` is what blocks.fused_projections calls on the concatenated Q/K/V or gate/up weights,
    so that one wide GEMM runs in FP8 too."""

    recipe: str = "tensorwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, weight, self.recipe)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.recipe}"


def convert_to_fp8(blocks: Sequence[nn.Module], recipe: str, skip_first_last: bool = True) -> int:
    """Swap every bias-free nn.Linear inside `blocks` (except the first and last when
    skip_first_last) for an FP8Linear holding the same Parameter; the number swapped. Layers whose
    sizes are not multiples of 16 (the FP8 kernels' alignment) stay as they are."""
    if recipe not in FP8_RECIPES[1:]:
        raise ValueError(f"FP8 recipe {recipe!r} is not one of {FP8_RECIPES[1:]}")
    chosen = list(blocks)[1:-1] if skip_first_last else list(blocks)
    swapped = 0
    for block in chosen:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if (type(child) is not nn.Linear or child.bias is not None
                        or child.in_features % FP8_ALIGNMENT or child.out_features % FP8_ALIGNMENT):
                    continue
                layer = FP8Linear(child.in_features, child.out_features, bias=False, device="meta")
                layer.weight = child.weight  # the same Parameter: same key, same optimizer state
                layer.recipe = recipe
                setattr(parent, name, layer)
                swapped += 1
    return swapped
