import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, torchrun
from checkpoint import checkpoint_paths
from model import ModelConfig, Transformer, active_params, count_params, flops_per_token, make_mlp, moe_shape
from moe import (PLAYBOOK_SHAPES, PLAYBOOK_SPARSITY, MoE, begin_moe_step, end_moe_step, granularity, grouped_kernel,
                 moe_layers, sparsity)
from train import ConfigError, load_config, main, train


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops on a shared 2-core machine run fastest (and steadiest) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def moe_cfg(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                moe=True, moe_experts=8, moe_top_k=2, moe_d_expert=16)
    base.update(kw)
    return ModelConfig(**base)


def numel(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


# ---------------------------------------------------------------------------------------------
# equivalences


@pytest.mark.parametrize("impl", ["reference", "grouped"])
def test_one_expert_top1_equals_the_dense_mlp_with_the_same_weights(impl):
    dense_cfg = moe_cfg(moe=False)
    moe_one = moe_cfg(moe_experts=1, moe_top_k=1, moe_d_expert=dense_cfg.d_ff, moe_impl=impl)
    torch.manual_seed(0)
    dense, sparse = Transformer(dense_cfg), Transformer(moe_one)
    state = {}
    for k, v in dense.state_dict().items():
        if ".mlp.gate_proj." in k:
            up = dense.state_dict()[k.replace("gate_proj", "up_proj")]
            state[k.replace("gate_proj.weight", "experts.w_gate_up")] = torch.cat([v, up])[None]
        elif ".mlp.down_proj." in k:
            state[k.replace("down_proj.weight", "experts.w_down")] = v[None]
        elif ".mlp.up_proj." not in k:
            state[k] = v
    missing, unexpected = sparse.load_state_dict(state, strict=False)
    assert not unexpected and all(".router." in k or "last_step_load" in k for k in missing)
    idx = torch.randint(0, 97, (3, 20))
    torch.testing.assert_close(sparse(idx), dense(idx), rtol=0, atol=1e-6)
    dense.eval(), sparse.eval()
    (loss_d, _), (loss_s, parts_s) = dense(idx, idx), sparse(idx, idx)
    torch.testing.assert_close(loss_s, loss_d, rtol=0, atol=1e-6)  # evaluation: cross-entropy only
    assert parts_s["balance_loss"].item() == pytest.approx(1.0)     # one expert: f = P = 1


def make_layer(seed=0, **kw):
    torch.manual_seed(seed)
    return make_mlp(moe_cfg(moe_shared_experts=1, **kw))


@pytest.mark.parametrize("score, renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
@pytest.mark.parametrize("kernel", ["grouped_mm", "bmm"])
def test_reference_and_grouped_paths_agree_in_values_and_gradients(score, renormalize, kernel):
    if kernel == "grouped_mm" and grouped_kernel(torch.zeros(1), 32, 32, torch.float32) != "grouped_mm":
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    outs, grads = [], []
    x0 = torch.randn(50, 32)
    for impl in ("reference", "grouped"):
        layer = make_layer(moe_score=score, moe_renormalize=renormalize)
        layer.router.expert_bias[3] = -1e9  # expert 3 gets no token: an empty group
        layer.experts.impl, layer.experts.kernel = impl, kernel
        x = x0.clone().requires_grad_()
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for g_grouped, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_grouped, g_ref, rtol=1e-5, atol=1e-6)
    # the shared expert is added to the routed output for every token, and it learns
    with torch.no_grad():
        _, _, w, e = layer.router(x0)
        torch.testing.assert_close(layer(x0) - layer.experts(x0, w, e), layer.shared(x0), rtol=1e-5, atol=1e-6)
    shared_grads = [g for (n, _), g in zip(layer.named_parameters(), grads[0][1:]) if n.startswith("shared.")]
    assert shared_grads and all(g.abs().sum() > 0 for g in shared_grads)
    w_gate_up_grad = dict(zip([n for n, _ in make_layer().named_parameters()], grads[1][1:]))["experts.w_gate_up"]
    assert torch.all(w_gate_up_grad[3] == 0) and w_gate_up_grad[0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# balance losses


def test_aux_loss_and_router_z_loss_equal_their_formulas():
    """Per layer: alpha * sum_i f_i P_i and the router z-loss; the model reports their mean over
    its MoE layers (two here, so a sum would show)."""
    cfg = moe_cfg(n_layers=2, moe_balance_coef=0.05, moe_router_z_coef=0.001, moe_score="sigmoid")
    torch.manual_seed(1)
    model = Transformer(cfg)
    layers = [block.mlp for block in model.blocks]
    assert all(isinstance(layer, MoE) for layer in layers)
    seen = {}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: seen.update({i: inp[0].reshape(-1, cfg.d_model)}))
    idx = torch.randint(0, 97, (2, 24))
    loss, parts = model(idx, idx)
    balances, router_zs = [], []
    for i, layer in enumerate(layers):
        logits = seen[i] @ layer.router.gate.weight.t()
        scores = logits.sigmoid()
        chosen = scores.topk(2, dim=-1).indices
        f = torch.bincount(chosen.flatten(), minlength=8).float() * 8 / (2 * 48)
        P = (scores / scores.sum(-1, keepdim=True)).mean(0)
        balances.append((f * P).sum())
        router_zs.append(torch.logsumexp(logits, -1).pow(2).mean())
    balance, router_z = torch.stack(balances).mean(), torch.stack(router_zs).mean()
    assert not torch.allclose(balances[0], balances[1])  # two different layers, so the mean is a real test
    torch.testing.assert_close(parts["balance_loss"], balance.detach())
    torch.testing.assert_close(parts["router_z_loss"], router_z.detach())
    torch.testing.assert_close(loss, parts["ce"] + 0.05 * balance + 0.001 * router_z)


def skewed_layer(stats: str) -> MoE:
    """Two experts, top-1: tokens along +u go to expert 0, along -u to expert 1."""
    torch.manual_seed(0)
    layer = make_mlp(ModelConfig(d_model=8, n_heads=2, n_kv_heads=1, d_ff=16, moe=True, moe_experts=2, moe_top_k=1,
                            moe_balance_stats=stats))
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[2.0] + [0.0] * 7, [-2.0] + [0.0] * 7]))
    return layer


def micro_batch(sign: float, n: int = 32) -> torch.Tensor:
    x = 0.1 * torch.randn(n, 8)
    x[:, 0] = sign * (1 + torch.rand(n))
    return x


def run_step(layer: MoE, batches: list[torch.Tensor]) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor], dict]:
    begin_moe_step(layer, len(batches))
    losses, fs, grads = [], [], []
    for x in batches:
        layer.zero_grad()
        layer(x)
        layer.balance_loss.backward()
        losses.append(layer.balance_loss.item())
        fs.append(layer.balance_f.clone())
        grads.append(layer.router.gate.weight.grad.clone())
    return losses, fs, grads, end_moe_step(layer)


def test_global_and_local_statistics_differ_as_documented_on_a_skewed_batch():
    """Micro-batch 1 is all expert 0, micro-batch 2 all expert 1: each is maximally skewed, the
    step is balanced. Local statistics push each micro-batch toward balance; global ones see a
    balanced step (f = (1, 1), so sum_i f_i P_i = 1 whatever P: no gradient at all)."""
    torch.manual_seed(0)
    step = [micro_batch(+1), micro_batch(-1)]
    local, glob = skewed_layer("local"), skewed_layer("global")
    l_losses, l_fs, l_grads, l_row = run_step(local, step)
    for f in l_fs:
        assert sorted(f.tolist()) == [0.0, 2.0]          # f = E * share = (2, 0) in each micro-batch
    assert min(l_losses) > 1.7 and all(g.abs().sum() > 0 for g in l_grads)

    g_losses, g_fs, g_grads, g_row = run_step(glob, step)  # first step: no previous step to predict from
    assert g_fs[0].tolist() == [2.0, 0.0]                  # only micro-batch 1 seen: its own counts
    assert g_fs[1].tolist() == [1.0, 1.0]                  # the last micro-batch: the exact global f
    assert g_losses[1] == pytest.approx(1.0) and g_grads[1].abs().max() < 1e-7
    # Whatever was trained, the step's metrics report both statistics over the whole step.
    for row in (l_row, g_row):
        assert row["moe/balance_loss"] == pytest.approx(1.0, abs=1e-6)
        assert row["moe/balance_loss_local"] == pytest.approx(sum(l_losses) / 2, rel=1e-5)
        assert row["moe/imbalance"] == 1.0 and row["moe/dead_experts"] == 0

    # Second step: the unseen micro-batch is predicted from the last step (balanced), so the first
    # micro-batch's own counts weigh 1/2, as they do in the true global f.
    g_losses, g_fs, g_grads, _ = run_step(glob, [micro_batch(+1), micro_batch(-1)])
    torch.testing.assert_close(g_fs[0], torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(g_fs[1], torch.tensor([1.0, 1.0]))


def test_without_accumulation_global_equals_the_whole_batch():
    """M = 1: the f of a micro-batch is exact; splitting a batch in two and summing half gradients
    with the global f equals the one-batch gradient (what DDP's average does across ranks)."""
    torch.manual_seed(0)
    x = torch.cat([micro_batch(+1, 40), micro_batch(-1, 24)])
    one = skewed_layer("global")
    _, fs_one, grads_one, _ = run_step(one, [x])
    two = skewed_layer("global")
    begin_moe_step(two, 1)
    f_whole = fs_one[0]
    total = torch.zeros_like(grads_one[0])
    for part in (x[:32], x[32:]):  # two "ranks": each uses the global f, DDP averages
        two.zero_grad()
        two(part)
        P = two.router(part)[1].mean(0)
        ((f_whole * P).sum() / 2).backward()
        total += two.router.gate.weight.grad
    torch.testing.assert_close(total, grads_one[0])


def test_bias_balancing_drives_a_skewed_router_to_uniform_load_without_aux_loss():
    torch.manual_seed(0)
    layer = make_mlp(moe_cfg(moe_experts=8, moe_top_k=2, moe_balance_coef=0.0, moe_bias_rate=0.003, moe_score="sigmoid"))
    u = torch.zeros(32)
    u[0] = 1.0
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.randn(8, 32) / 32 ** 0.5)
        layer.router.gate.weight[:2, 0] += 3.0  # experts 0 and 1 win for most tokens
    gate_before = layer.router.gate.weight.clone()

    def step():
        begin_moe_step(layer, 1)
        layer(torch.randn(1024, 32) + u)
        return end_moe_step(layer)

    first = step()
    assert first["moe/imbalance"] > 2.8  # 4.0 would be every slot on experts 0 and 1
    rows = [step() for _ in range(400)]
    last = [r["moe/imbalance"] for r in rows[-50:]]
    # Uniform routing of 2048 slots has max/mean ~1.1 from sampling alone; the +-gamma steps add a little.
    assert sum(last) / len(last) < 1.25 and max(last) < 1.45
    assert all(r["moe/dead_experts"] == 0 for r in rows[-50:])
    assert torch.equal(layer.router.gate.weight, gate_before)  # nothing learned: only the bias moved
    bias = layer.router.expert_bias
    assert bias[:2].max() < 0 < bias[2:].min()  # the overloaded experts were pushed down
    # The bias changes selection only: the weights are the unbiased scores of the chosen experts.
    logits, scores, weights, experts = layer.router(torch.randn(64, 32) + u)
    chosen = scores.gather(-1, experts)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))
    assert not torch.equal(experts.sort(-1).values, scores.topk(2, dim=-1).indices.sort(-1).values)


# ---------------------------------------------------------------------------------------------
# parameter counts, FLOPs, the playbook's shapes


@pytest.mark.parametrize("seed", range(8))
def test_param_counts_equal_numel(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    n_layers = r(1, 4)
    experts = r(1, 9)
    cfg = moe_cfg(vocab_size=r(50, 500), n_layers=n_layers, d_ff=r(8, 100), moe_experts=experts,
                  moe_top_k=r(1, experts), moe_d_expert=r(0, 40), moe_shared_experts=r(0, 2),
                  moe_dense_layers=r(0, n_layers - 1), tie_embeddings=bool(seed % 2))
    model = Transformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    routed = sum(m.experts.w_gate_up.numel() + m.experts.w_down.numel() for m in moe_layers(model))
    unvisited = routed * (cfg.moe_experts - cfg.moe_top_k) // cfg.moe_experts
    assert active_params(cfg) == count_params(cfg) - unvisited
    # FLOPs: 6 x every weight a token is multiplied by (the k experts it visits) + attention.
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "lm_head" not in n
                 and "experts" not in n) + routed * cfg.moe_top_k // cfg.moe_experts + cfg.vocab_size * cfg.d_model
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 32
    assert flops_per_token(cfg, 32) == 6 * matmul + attn


def test_playbook_shapes_give_the_published_counts():
    # (total, active, the precision of the model card's figure), in billions; Qwen's card truncates
    # (3.35B active is listed as 3.3B), so the precision is one unit of the last digit.
    published = {"Mixtral-8x7B": (46.7, 12.9, 0.1), "OLMoE-1B-7B": (6.9, 1.3, 0.1),
                 "Qwen3-30B-A3B": (30.5, 3.3, 0.1), "Qwen3-235B-A22B": (235, 22, 1)}
    for name, (total, active, precision) in published.items():
        p = PLAYBOOK_SHAPES[name].params()
        assert p["total"] / 1e9 == pytest.approx(total, abs=precision)
        assert p["active"] / 1e9 == pytest.approx(active, abs=precision)
    # Mixtral's shape is this codebase's model: the calculator equals numel of the built model.
    mixtral = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                          tie_embeddings=False, moe=True, moe_experts=8, moe_top_k=2)
    assert numel(mixtral) == count_params(mixtral) == PLAYBOOK_SHAPES["Mixtral-8x7B"].params()["total"]
    assert moe_shape(mixtral).params()["active"] == active_params(mixtral)
    # The playbook's sparsity table runs from Mixtral's 4 to Kimi K2's 42.8.
    table = {n: round(sparsity(*v[2:]), 1) for n, v in PLAYBOOK_SPARSITY.items()}
    assert table["Mixtral-8x7B"] == 4.0 and table["DeepSeek-V3"] == 28.6 and table["Kimi-K2"] == 42.8
    assert granularity(2048, 768) == pytest.approx(5.33, abs=0.01) and granularity(7168, 2048) == 7.0
    assert PLAYBOOK_SHAPES["Qwen3-30B-A3B"].sparsity == 16.0


# ---------------------------------------------------------------------------------------------
# configuration and training


def test_top1_router_learns_from_the_task_loss_even_with_renormalisation():
    """Renormalising one chosen weight makes it 1 and would cut the router off from the loss
    (only the aux loss would train it); top-1 keeps the raw probability, as in Switch."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16,
                      moe=True, moe_experts=4, moe_top_k=1, moe_d_expert=16, moe_renormalize=True)
    layer = make_mlp(cfg)
    x = torch.randn(40, 32)
    layer(x).pow(2).sum().backward()  # a task loss only: no balance term
    assert layer.router.gate.weight.grad.norm() > 1e-4


@pytest.mark.parametrize("override, message", [
    ("--model.moe_top_k=9", "model.moe_top_k=9 must be between 1 and model.moe_experts=8"),
    ("--model.moe_experts=0", "model.moe_experts=0: a MoE layer needs at least 1 expert"),
    ("--model.moe_dense_layers=5", r"model.moe_dense_layers=5 must be in \[0, n_layers=4\)"),
    ("--model.moe_score=relu", "model.moe_score='relu' is not one of"),
])
def test_bad_moe_configs_stop_with_one_line(override, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["--model.moe=true", override])
    with pytest.raises(SystemExit) as e:
        main(["--model.moe=true", override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.moe")


def moe_run_args(small_data, out, name, **extra):
    args = {"model.moe": True, "model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_d_expert": 32,
            "model.moe_bias_rate": 0.01, "model.moe_dense_layers": 1, "train.grad_accum_steps": 2}
    args.update(extra)
    return tiny_overrides(small_data[0], out, name, **args)


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_logs_balance_metrics_updates_the_bias_and_resumes_exactly(small_data, tmp_path):
    full = train(load_config(None, moe_run_args(small_data, tmp_path, "full")))
    rows = [r for r in rows_of(Path(full["run_dir"])) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:  # layer 0 is dense, layer 1 MoE
        assert {"moe/imbalance/L1", "moe/dead/L1", "moe/balance_loss", "moe/balance_loss_local"} <= set(r)
        assert "moe/imbalance/L0" not in r
        assert 1.0 <= r["moe/imbalance/L1"] <= 2.0 and 0 <= r["moe/dead/L1"] <= 4
        # sum_j f_j P_j with P a distribution is at most max_j f_j, which is the imbalance (max over
        # mean load); a perfectly balanced router gives 1
        assert 0 < r["moe/balance_loss"] <= r["moe/imbalance/L1"] + 1e-6
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = torch.load(checkpoint_paths(full["run_dir"])[-1] / "state.pt", weights_only=False)
    bias = saved["model"]["blocks.1.mlp.router.expert_bias"]
    assert bias.abs().sum() > 0 and saved["model"]["blocks.1.mlp.last_step_load"].sum() == pytest.approx(1.0)
    # Resume: the balance state (bias, last step's load) comes back with the checkpoint.
    train(load_config(None, moe_run_args(small_data, tmp_path, "split", **{"train.max_steps": 3})))
    train(load_config(None, moe_run_args(small_data, tmp_path, "split", **{"train.resume": True})))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rs]  # noqa: E731
    assert strip(rows_of(tmp_path / "split")) == strip(rows_of(Path(full["run_dir"])))


@pytest.mark.slow
def test_two_gloo_ranks_with_global_statistics_equal_one_process_with_the_whole_batch(small_data, tmp_path):
    """Across ranks the global statistics are exact: 2 DDP processes of 4 sequences == 1 process of 8."""
    extra = {"train.grad_accum_steps": 1, "model.moe_bias_rate": 0.0, "model.moe_balance_coef": 0.1}
    train(load_config(None, moe_run_args(small_data, tmp_path, "one", **{"train.micro_batch_size": 8, **extra})))
    torchrun(2, moe_run_args(small_data, tmp_path, "two", **extra), tmp_path)
    one, two = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    assert len(one) == len(two)
    train_rows = [(a, b) for a, b in zip(one, two) if "loss" in a]
    assert len(train_rows) == 6
    for a, b in train_rows:
        # Same losses (balance term with alpha = 0.1 included) at every step: same gradients.
        # (val_loss is left out: evaluation batches are micro-batch sized, 8 sequences vs 4.)
        for key in ("loss", "ce", "moe/balance_loss", "moe/imbalance/L1"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    # The local statistic depends on how the batch is cut (one batch of 8 vs two of 4); the global does not.
    assert any(abs(a["moe/balance_loss_local"] - b["moe/balance_loss_local"]) > 1e-4 for a, b in train_rows)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_moe_equals_eager_in_loss_gradients_and_balance_state(scope):
    """torch.compile of the whole forward (train.py without FSDP) or per block (under FSDP), with
    aot_eager (dynamo's graphs without a C++ compiler), in bf16 autocast so the grouped path runs
    torch._grouped_mm inside the graph."""
    torch._dynamo.reset()
    cfg = moe_cfg(moe_experts=4, moe_top_k=2, moe_bias_rate=0.01)
    torch.manual_seed(0)
    eager = Transformer(cfg)
    compiled = Transformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled_fwd = compiled
    if scope == "blocks":
        for block in compiled.blocks:
            block.compile(backend="aot_eager")
    else:
        compiled_fwd = torch.compile(compiled, backend="aot_eager")
    idx = torch.randint(0, 97, (2, 17))
    results = []
    for model, fwd in ((eager, eager), (compiled, compiled_fwd)):
        rows = []
        for _ in range(2):
            begin_moe_step(model, 1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, parts = fwd(idx[:, :-1], idx[:, 1:])
            loss.backward()
            rows.append((loss.item(), end_moe_step(model)))
        results.append((rows, [p.grad.clone() for p in model.parameters()], model.blocks[1].mlp.router.expert_bias))
    (rows_e, grads_e, bias_e), (rows_c, grads_c, bias_c) = results
    assert rows_c == rows_e
    for a, b in zip(grads_c, grads_e):  # bf16: the graph may round at other points than eager
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-4)
    assert torch.equal(bias_c, bias_e) and bias_e.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_gpu_grouped_gemm_matches_reference_in_bf16_and_compiles():
    torch.manual_seed(0)
    layer = make_mlp(moe_cfg(d_model=256, moe_experts=64, moe_top_k=8, moe_d_expert=128)).cuda()
    x = torch.randn(4096, 256, device="cuda")
    outs = {}
    for impl in ("reference", "grouped"):
        layer.experts.impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[impl] = layer(x).float()
    def rel_err(a, b):  # bf16: compare the whole tensor, relative to its size
        return ((a - b).norm() / b.norm()).item()

    assert rel_err(outs["grouped"], outs["reference"]) < 1e-2
    compiled = torch.compile(layer)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x).float()
    out.sum().backward()
    assert rel_err(out, outs["grouped"]) < 1e-2
    assert layer.experts.w_down.grad is not None


def test_moe_output_keeps_the_residual_dtype_and_refuses_activation_checkpointing():
    """Routing runs in float32 but a MoE layer returns its input's dtype (a bf16 residual stream
    stays bf16); and activation checkpointing, which would count tokens twice, is refused."""
    from model import ModelConfig, Transformer
    from train import ConfigError, load_config
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                moe=True, moe_experts=4, moe_top_k=2))
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    for impl in ("grouped", "reference"):
        layer = m.blocks[1].mlp.to(torch.bfloat16)
        layer.experts.impl = impl
        assert layer(x).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="activation_checkpointing cannot be combined with model.moe"):
        load_config(None, ["--model.moe=true", "--train.activation_checkpointing=true"])


def test_global_f_sums_to_the_expert_count_in_every_micro_batch_with_top2():
    """f_i = E * (share of the step's k * tokens assignments going to expert i), so sum_i f_i = E
    exactly, also mid-step when unseen micro-batches are predicted (with k = 2 every token makes
    two assignments: a prediction that forgot k would not sum to E)."""
    torch.manual_seed(0)
    layer = make_mlp(ModelConfig(d_model=8, n_heads=2, n_kv_heads=1, d_ff=16, moe=True, moe_experts=4, moe_top_k=2,
                            moe_balance_stats="global"))
    for _ in range(2):  # the first step predicts from itself, the second from the first
        begin_moe_step(layer, 3)
        for _ in range(3):
            layer(torch.randn(20, 8))
            assert layer.balance_f.sum().item() == pytest.approx(4.0, rel=1e-5)
        end_moe_step(layer)
