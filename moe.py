"""Mixture of experts: a router sends each token to k of E small SwiGLU experts.

The playbook's MoE chapter, as a drop-in replacement for the dense MLP of chosen layers
(`--model.moe=true`; the first `moe_dense_layers` layers stay dense, as in DeepSeek-V3):

- Router: scores = softmax (Mixtral, Qwen3, OLMoE) or sigmoid (DeepSeek-V3) of a linear map, the
  top-k experts per token, their weights optionally renormalised to sum to 1. Computed in float32.
- Routed experts: E SwiGLU MLPs of width d_expert, stored stacked as (E, out, in) tensors.
  Granularity G = 2 * d_model / d_expert (Mixtral 0.57, Qwen3-30B-A3B 5.3, DeepSeek-V3 7);
  sparsity = experts / active experts, shared ones included in both (Mixtral 4 ... Kimi K2 42.8).
- Shared experts: always active. n shared experts of width d_expert equal one SwiGLU of width
  n * d_expert (their hidden units concatenate, their outputs add), so that is how they are stored.
- Load balancing, three tools. (1) The auxiliary loss alpha * sum_i f_i * P_i, with f_i the share
  of routed slots that went to expert i, scaled by E so that a perfectly balanced router gives
  sum_i f_i P_i = 1 (and a collapsed top-1 router E), and P_i the mean routing probability of expert
  i. f is a count (no gradient), P carries the gradient. (2) The router z-loss mean(logsumexp^2) of
  ST-MoE, which keeps router logits small. (3) DeepSeek-V3's auxiliary-loss-free balancing: a
  per-expert bias added to the scores for the top-k choice only (never to the weights), moved by
  gamma toward balance after every optimizer step (`end_moe_step`).
- Two expert paths that agree in values and gradients: `reference` loops over experts;
  `grouped` sorts the (token, expert) pairs by expert and runs each weight matrix as one grouped
  GEMM (`torch._grouped_mm` where this torch and device have it, else a padded batched matmul).

Global batch statistics (the playbook: compute f and P over the global batch, not the micro-batch).
A micro-batch of one domain (code, say) routed mostly to a few experts is fine if the global batch
is balanced: that is how experts specialise. Statistics over each micro-batch penalise exactly that.
The global loss is L = alpha * sum_i f_i^G * P_i^G, with f^G and P^G over every token of a step:
all micro-batches of gradient accumulation, all data-parallel ranks. Its gradient is
alpha * sum_i f_i^G * dP_i^G, and P^G is the mean of the micro-batches' P (equal token counts), so
micro-batch m on rank r may backpropagate alpha * sum_i f_i^G * P_i^(m,r): train.py divides each
micro-batch loss by the number of micro-batches and DDP averages over ranks, which makes the sum of
their gradients exactly the global one, provided every micro-batch uses f^G. How f^G is obtained:
- Across ranks it is exact: each MoE layer all-reduces its (E + 1) token counts in the forward pass
  (a few hundred bytes; P needs no all-reduce, the gradient average does that job).
- Across micro-batches it cannot be exact: micro-batch m is backpropagated (and its graph freed)
  before micro-batches m+1..M have been routed. Micro-batch m therefore uses the exact counts of
  micro-batches 1..m plus, for the M - m not yet seen, the prediction "they will route like the
  whole previous step did" (on the very first step: like the micro-batches seen so far). The last
  micro-batch uses the exact f^G; with no accumulation (M = 1) every rank uses the exact f^G.
  Each micro-batch's own counts enter f with their true weight 1/M. The simpler running mean
  (Megatron's global_aux_loss) gives micro-batch m weight 1/m, so early micro-batches are still
  pushed toward local balance, which is the bias global statistics exist to remove.
- `moe_balance_stats="local"` uses each micro-batch's own f and P (the classic Switch loss) so the
  two can be compared; whichever is trained, end_moe_step logs both values over the whole step.
The counts are taken in training forward passes with gradients enabled only (not in evaluation,
not in generation), so every rank runs the same collectives. Activation checkpointing that
re-runs forward passes would count micro-batches twice, so train.py refuses it for MoE models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from attention import attention_params
from blocks import SwiGLU


# --------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------


class Router(nn.Module):
    """scores = softmax or sigmoid(x W^T); experts = top-k of scores + bias; weights = their scores."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, score: str, renormalize: bool):
        super().__init__()
        self.top_k, self.score, self.renormalize = top_k, score, renormalize
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        # DeepSeek-V3's balancing bias: changes which experts are chosen, never how much they weigh.
        self.register_buffer("expert_bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> logits (N, E), scores (N, E), weights (N, k), experts (N, k)."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in float32
            logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        experts = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if self.renormalize and self.top_k > 1:
            # with one expert the renormalised weight is always 1, which would cut the router off
            # from the task loss; top-1 keeps the raw probability, as the Switch Transformer does
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, weights, experts


# --------------------------------------------------------------------------------------------
# Routed experts: the reference loop and the grouped GEMM
# --------------------------------------------------------------------------------------------


def _torch_version() -> tuple[int, int]:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@torch.compiler.assume_constant_result
def _cuda_has_grouped_mm(device_index: int) -> bool:
    """Hopper and newer always; Ampere with torch versions that publish F.grouped_mm."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return major >= 9 or (major == 8 and hasattr(F, "grouped_mm"))


def grouped_kernel(x: torch.Tensor, d_in: int, d_out: int, dtype: torch.dtype) -> str:
    """"grouped_mm" where torch._grouped_mm can run these shapes on this device, else "bmm".

    Its kernels want rows of 16-byte multiples; on CUDA they take bf16 (the training dtype), on CPU
    (torch >= 2.9) any float type, but torch.compile's shape function accepts bf16 only."""
    if not hasattr(torch, "_grouped_mm") or (d_in * dtype.itemsize) % 16 or (d_out * dtype.itemsize) % 16:
        return "bmm"
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return "bmm"
    if x.device.type == "cuda":
        return "grouped_mm" if dtype == torch.bfloat16 and _cuda_has_grouped_mm(x.device.index or 0) else "bmm"
    return "grouped_mm" if x.device.type == "cpu" and _torch_version() >= (2, 9) else "bmm"


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, group_of_row: torch.Tensor,
                   kernel: str) -> torch.Tensor:
    """Rows of x sorted by group, group e multiplied by weight[e]^T: (M, in) x (E, out, in) -> (M, out).

    counts (E,) rows per group; group_of_row (M,) the group of each row (non-decreasing)."""
    if kernel == "grouped_mm":
        offsets = counts.cumsum(0).to(torch.int32)  # where each group's rows end
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    # Padded batched matmul: scatter the rows into an (E, capacity, in) block, one bmm, gather back.
    # The capacity (the busiest expert's row count) is read on the host: a sync the grouped GEMM avoids.
    starts = counts.cumsum(0) - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[group_of_row]
    capacity = max(int(counts.max()), 1)
    padded = x.new_zeros(weight.shape[0], capacity, x.shape[1]).index_put((group_of_row, slot), x)
    return torch.bmm(padded, weight.transpose(1, 2))[group_of_row, slot]


class RoutedExperts(nn.Module):
    """E SwiGLU experts: w_gate_up (E, 2*d_expert, d_model) holds gate and up, w_down (E, d_model, d_expert).

    Gate and up of an expert are one matrix so that one GEMM computes both."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, impl: str = "grouped"):
        super().__init__()
        self.impl = impl
        self.kernel = "auto"  # grouped path: "auto", or force "grouped_mm" / "bmm" (tests, benchmarks)
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * d_expert, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.reset_expert_parameters(0.02)

    def reset_expert_parameters(self, std: float) -> None:
        for w in (self.w_gate_up, self.w_down):
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (N, d), weights and experts (N, k) -> sum_j weights[:, j] * expert_{experts[:, j]}(x)."""
        if self.impl == "reference":
            return self.forward_reference(x, weights, experts)
        return self.forward_grouped(x, weights, experts)

    def forward_reference(self, x, weights, experts):
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device)
        for e in range(self.w_gate_up.shape[0]):
            # An expert with no tokens still runs (on zero rows): its weights get a zero gradient,
            # which DDP needs to see from every parameter.
            token, slot = torch.where(experts == e)
            gate, up = (x[token] @ self.w_gate_up[e].t()).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.w_down[e].t()
            out = out.index_add(0, token, y * weights[token, slot, None])
        return out

    def forward_grouped(self, x, weights, experts):
        n_experts, k = self.w_gate_up.shape[0], experts.shape[1]
        flat = experts.reshape(-1)                      # (N*k,) expert of each (token, slot) pair
        order = flat.argsort(stable=True)               # pairs sorted by expert
        token = order // k
        sorted_expert = flat[order]
        counts = torch.zeros(n_experts, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w_gate_up, w_down = self.w_gate_up.to(dtype), self.w_down.to(dtype)
        kernel = self.kernel
        if kernel == "auto":
            kernel = grouped_kernel(x, w_gate_up.shape[2], w_gate_up.shape[1], dtype)
            if kernel == "grouped_mm" and grouped_kernel(x, w_down.shape[2], w_down.shape[1], dtype) != kernel:
                kernel = "bmm"
        h = grouped_linear(x.to(dtype)[token], w_gate_up, counts, sorted_expert, kernel)
        gate, up = h.chunk(2, dim=-1)
        y = grouped_linear(F.silu(gate) * up, w_down, counts, sorted_expert, kernel)
        y = y * weights.reshape(-1)[order, None]
        out = torch.zeros(x.shape, dtype=y.dtype, device=x.device)
        return out.index_add(0, token, y)


# --------------------------------------------------------------------------------------------
# The MoE layer and its balance statistics
# --------------------------------------------------------------------------------------------


@dataclass
class StepLoad:
    """One MoE layer's routing statistics over the micro-batches of the current optimizer step."""
    counts: torch.Tensor          # (E,) routed (token, slot) pairs per expert, all ranks
    tokens: torch.Tensor          # () tokens, all ranks
    prob_sum: torch.Tensor        # (E,) sum of routing probabilities, this rank
    local_balance: torch.Tensor   # () sum over micro-batches of the micro-batch's own sum_i f_i P_i
    micro_batches: int = 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MoE(nn.Module):
    """Router + routed experts (+ shared experts): the MLP of a MoE layer.

    forward returns the output and leaves `balance_loss` (sum_i f_i P_i) and `router_z_loss`
    (mean logsumexp^2) on the module; Transformer.forward adds them to the loss (see add_router_losses)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, d_expert: int, n_shared: int = 0,
                 score: str = "softmax", renormalize: bool = True, balance_stats: str = "global",
                 bias_rate: float = 0.0, impl: str = "grouped", layer: int = 0):
        super().__init__()
        self.layer = layer
        self.n_experts, self.top_k = n_experts, top_k
        self.balance_stats = balance_stats
        self.bias_rate = bias_rate
        self.router = Router(d_model, n_experts, top_k, score, renormalize)
        self.experts = RoutedExperts(n_experts, d_model, d_expert, impl)
        self.shared = SwiGLU(d_model, n_shared * d_expert) if n_shared else None
        # Share of routed slots per expert over the last optimizer step (sums to 1; all zero before
        # the first): predicts the micro-batches of a step not yet seen. Saved with checkpoints so a
        # resumed run continues exactly.
        self.register_buffer("last_step_load", torch.zeros(n_experts))
        self.micro_batches_per_step = 1  # set by begin_moe_step; 1 = every forward is a whole step
        self.step_load: StepLoad | None = None
        self.balance_loss = self.router_z_loss = self.balance_f = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, scores, weights, experts = self.router(x)
        out = self.experts(x, weights, experts)
        if self.shared is not None:
            out = out + self.shared(x)
        self._router_losses(logits, scores, experts)
        # routing runs in float32; the layer's output keeps the residual stream's dtype (bf16 on GPU)
        return out.view(shape).to(x.dtype)

    def _router_losses(self, logits, scores, experts) -> None:
        n_tokens = logits.shape[0]
        # P_i uses probabilities that sum to 1 per token: sigmoid scores are normalised (DeepSeek-V3).
        probs = scores if self.router.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        counts = torch.zeros(self.n_experts, device=logits.device).scatter_add_(
            0, experts.reshape(-1), torch.ones(experts.numel(), device=logits.device))
        f_local = counts * self.n_experts / (self.top_k * n_tokens)
        P = probs.mean(0)
        f = f_local
        if self.training and torch.is_grad_enabled():
            f_global = self._track(counts, n_tokens, probs.detach().sum(0), (f_local * P).detach().sum())
            if self.balance_stats == "global":
                f = f_global
        self.balance_f = f.detach()  # the f this forward's balance loss used (global, estimated, or local)
        self.balance_loss = (f * P).sum()
        self.router_z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()

    @torch.compiler.disable
    def _track(self, counts, n_tokens: int, prob_sum, local_balance) -> torch.Tensor:
        """Add one micro-batch to the step's statistics; return f over the global batch (module doc)."""
        stats = torch.cat([counts, counts.new_tensor([n_tokens])])
        if _world() > 1:
            dist.all_reduce(stats)
        counts_all, tokens_all = stats[:-1], stats[-1]
        if self.step_load is not None and self.step_load.micro_batches >= self.micro_batches_per_step:
            self._close_step()  # nobody called end_moe_step: the finished step becomes the prediction
        if self.step_load is None:
            zero = torch.zeros((), device=counts.device)
            self.step_load = StepLoad(torch.zeros_like(counts), zero, torch.zeros_like(prob_sum), zero.clone())
        s = self.step_load
        s.counts, s.tokens = s.counts + counts_all, s.tokens + tokens_all
        s.prob_sum, s.local_balance = s.prob_sum + prob_sum, s.local_balance + local_balance
        s.micro_batches += 1
        unseen = max(self.micro_batches_per_step - s.micro_batches, 0)
        # Unseen micro-batches are predicted to route like the last step (like this step so far on
        # the first step); no host sync, so the GPU never waits on this.
        share = torch.where(self.last_step_load.sum() > 0, self.last_step_load, s.counts / s.counts.sum())
        expected_counts = s.counts + share * (self.top_k * tokens_all * unseen)
        expected_tokens = s.tokens + tokens_all * unseen
        f = expected_counts * self.n_experts / (self.top_k * expected_tokens)
        return f

    def _close_step(self) -> None:
        s = self.step_load
        self.last_step_load.copy_(s.counts / s.counts.sum())
        self.step_load = None


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def add_router_losses(model: nn.Module, loss: torch.Tensor, parts: dict, balance_coef: float,
                      router_z_coef: float) -> tuple[torch.Tensor, dict]:
    """loss + alpha * mean over MoE layers of sum_i f_i P_i + beta * mean router z-loss (in training).

    The mean over layers keeps alpha's meaning independent of depth. In evaluation the loss stays
    cross-entropy (+ z-loss), so validation losses of MoE and dense models compare directly."""
    layers = moe_layers(model)
    balance = torch.stack([m.balance_loss for m in layers]).mean()
    router_z = torch.stack([m.router_z_loss for m in layers]).mean()
    if model.training and balance_coef > 0:
        loss = loss + balance_coef * balance
    if model.training and router_z_coef > 0:
        loss = loss + router_z_coef * router_z
    return loss, {**parts, "balance_loss": balance.detach(), "router_z_loss": router_z.detach()}


def begin_moe_step(model: nn.Module, micro_batches: int) -> None:
    """Tell every MoE layer how many micro-batches (per rank) the coming optimizer step has."""
    for m in moe_layers(model):
        if m.step_load is not None:  # a step that end_moe_step did not close still predicts this one
            m._close_step()
        m.micro_batches_per_step = micro_batches


@torch.no_grad()
def end_moe_step(model: nn.Module) -> dict[str, float]:
    """After optimizer.step(): the step's balance metrics, and DeepSeek-V3's bias update.

    Per MoE layer i: imbalance = max/mean tokens per expert (1 = perfect), dead = experts that got
    no token in the whole step; then balance_loss = sum_j f_j P_j over the global batch and
    balance_loss_local = the same over each micro-batch, averaged (both before alpha). The bias
    update: expert_bias += gamma * sign(mean load - load), so overloaded experts are chosen less."""
    layers = [m for m in moe_layers(model) if m.step_load is not None]
    if not layers:
        return {}
    rank_sums = torch.stack([torch.cat([m.step_load.prob_sum, m.step_load.local_balance[None]]) for m in layers])
    if _world() > 1:
        dist.all_reduce(rank_sums)
    row, imbalance, dead, balance, balance_local = {}, [], [], [], []
    for m, sums in zip(layers, rank_sums):
        s = m.step_load
        f = s.counts * m.n_experts / (m.top_k * s.tokens)
        imbalance.append(s.counts.max() / s.counts.mean())
        dead.append((s.counts == 0).sum())
        balance.append((f * sums[:-1] / s.tokens).sum())
        balance_local.append(sums[-1] / (s.micro_batches * _world()))
        if m.bias_rate > 0:
            m.router.expert_bias += m.bias_rate * torch.sign(s.counts.mean() - s.counts)
        m._close_step()
    values = torch.stack([torch.stack(v).float() for v in (imbalance, dead, balance, balance_local)]).tolist()
    for name, per_layer in zip(("imbalance", "dead"), values[:2]):
        for m, v in zip(layers, per_layer):
            row[f"moe/{name}/L{m.layer}"] = int(v) if name == "dead" else v
    row["moe/imbalance"] = max(values[0])
    row["moe/dead_experts"] = int(sum(values[1]))
    row["moe/balance_loss"] = sum(values[2]) / len(layers)
    row["moe/balance_loss_local"] = sum(values[3]) / len(layers)
    return row


# --------------------------------------------------------------------------------------------
# Calculators: total vs active parameters, sparsity, granularity; the playbook's MoE shapes
# --------------------------------------------------------------------------------------------


def sparsity(routed: int, shared: int, active_routed: int) -> float:
    """Experts / experts a token uses, shared experts counted in both (the playbook's table)."""
    return (routed + shared) / (active_routed + shared)


def granularity(d_model: int, d_expert: int) -> float:
    """G = 2 * d_model / d_expert: a dense SwiGLU of width ~2.7 d_model has G ~ 0.75; fine experts G >= 4."""
    return 2 * d_model / d_expert


@dataclass
class MoEShape:
    """The shapes that fix a MoE transformer's parameter count. head_dim is free (Qwen3 uses
    n_heads * head_dim != d_model) and qk_norm_params counts QK-norm weights per layer."""
    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    d_expert: int
    n_shared: int = 0
    dense_layers: int = 0
    d_ff: int = 0                 # width of the dense layers' MLP
    tie_embeddings: bool = False
    qk_norm_params: int = 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.dense_layers

    def moe_mlp_params(self, active: bool = False) -> int:
        """One MoE layer's MLP: router + routed experts (all, or the top-k a token uses) + shared."""
        per_expert = 3 * self.d_model * self.d_expert
        return self.d_model * self.n_experts + ((self.top_k if active else self.n_experts) + self.n_shared) * per_expert

    def params(self) -> dict[str, int]:
        """total; active (what one token touches, embeddings included, as model cards count it);
        active_matmul (the weights a token is multiplied by: active minus norms and the embedding
        lookup, plus the output head; 6x this is the FLOPs rule)."""
        h = self.d_model
        attention = attention_params(h, self.n_heads, self.n_kv_heads, self.head_dim)
        dense_mlp = 3 * h * self.d_ff
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        shared_part = self.n_layers * (attention + 2 * h + self.qk_norm_params) + self.dense_layers * dense_mlp
        total = embeddings + shared_part + self.n_moe_layers * self.moe_mlp_params() + h
        active = embeddings + shared_part + self.n_moe_layers * self.moe_mlp_params(active=True) + h
        active_matmul = (self.n_layers * attention + self.dense_layers * dense_mlp
                         + self.n_moe_layers * self.moe_mlp_params(active=True) + self.vocab_size * h)
        return {"total": total, "active": active, "active_matmul": active_matmul}

    @property
    def sparsity(self) -> float:
        return sparsity(self.n_experts, self.n_shared, self.top_k)

    @property
    def granularity(self) -> float:
        return granularity(self.d_model, self.d_expert)


# Full shapes from the models' published configs (model cards: Mixtral 46.7B total / 12.9B active,
# OLMoE 6.9B / 1.3B, Qwen3-30B-A3B 30.5B / 3.3B, Qwen3-235B-A22B 235B / 22B).
PLAYBOOK_SHAPES = {
    "Mixtral-8x7B": MoEShape("Mixtral-8x7B", 32000, 4096, 32, 32, 8, 128, 8, 2, 14336),
    "OLMoE-1B-7B": MoEShape("OLMoE-1B-7B", 50304, 2048, 16, 16, 16, 128, 64, 8, 1024, qk_norm_params=2 * 2048),
    "Qwen3-30B-A3B": MoEShape("Qwen3-30B-A3B", 151936, 2048, 48, 32, 4, 128, 128, 8, 768, qk_norm_params=2 * 128),
    "Qwen3-235B-A22B": MoEShape("Qwen3-235B-A22B", 151936, 4096, 94, 64, 4, 128, 128, 8, 1536, qk_norm_params=2 * 128),
}

# The playbook's sparsity table: (d_model, d_expert, routed experts, shared experts, routed per token).
PLAYBOOK_SPARSITY = {
    "Mixtral-8x7B": (4096, 14336, 8, 0, 2),
    "OLMoE-1B-7B": (2048, 1024, 64, 0, 8),
    "gpt-oss-20b": (2880, 2880, 32, 0, 4),
    "GLM-4.5-Air": (4096, 1408, 128, 1, 8),
    "Qwen3-30B-A3B": (2048, 768, 128, 0, 8),
    "Qwen3-235B-A22B": (4096, 1536, 128, 0, 8),
    "GLM-4.5": (5120, 1536, 160, 1, 8),
    "DeepSeek-V3": (7168, 2048, 256, 1, 8),
    "gpt-oss-120b": (2880, 2880, 128, 0, 4),
    "Kimi-K2": (7168, 2048, 384, 1, 8),
    "Qwen3-Next-80B-A3B": (2048, 512, 512, 1, 10),
}


def playbook_table() -> str:
    lines = [f"{'model':<20} {'experts':>9} {'active':>7} {'sparsity':>9} {'G':>6} {'total':>9} {'active':>9}"]
    for name, (d_model, d_expert, routed, shared, k) in PLAYBOOK_SPARSITY.items():
        counts = PLAYBOOK_SHAPES[name].params() if name in PLAYBOOK_SHAPES else None
        params = f"{counts['total'] / 1e9:>8.1f}B {counts['active'] / 1e9:>8.2f}B" if counts else f"{'':>9} {'':>9}"
        lines.append(f"{name:<20} {f'{routed}+{shared}':>9} {f'{k}+{shared}':>7} "
                     f"{sparsity(routed, shared, k):>9.1f} {granularity(d_model, d_expert):>6.2f} {params}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# python moe.py: the playbook's shapes (the CPU demonstration is benchmarks/moe_demo.py)
# --------------------------------------------------------------------------------------------

if __name__ == "__main__":
    print(playbook_table())
