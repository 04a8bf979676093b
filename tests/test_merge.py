"""merge.py: merging a model with itself gives it back bit for bit, each merge equals its formula,
SLERP keeps the norm linear averaging loses, every bad input stops with one line, and the CLI
writes a folder that loads as the in-memory merge, or no folder at all."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch

import merge
from checkpoint import load_model
from conftest import ROOT, TEST_VOCAB
from merge import MergeError, check_states, linear_merge, slerp, slerp_merge, task_arithmetic
from model import ModelConfig, Transformer
from test_dpo import save_start


def tiny_model(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{"vocab_size": TEST_VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                      "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 256, **changes}))


def logits(state: dict, seed: int = 0) -> torch.Tensor:
    model = tiny_model(seed)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.arange(48).view(2, 24) % TEST_VOCAB)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_merging_a_model_with_itself_at_any_weights_gives_it_back_bit_for_bit():
    state = tiny_model().state_dict()
    rng = random.Random(0)
    for n in (1, 2, 3, 5):
        raw = [rng.random() for _ in range(n)]
        for weights in (None, [w / sum(raw) for w in raw], [1.0] + [0.0] * (n - 1)):
            assert_same(linear_merge([state] * n, weights), state)
        assert_same(task_arithmetic(state, [state] * n, [rng.uniform(0, 3) for _ in range(n)]), state)
    for t in (0.0, 0.3, 1.0):
        assert_same(slerp_merge(state, state, t), state)
    assert torch.equal(logits(linear_merge([state] * 3)), logits(state))


def test_linear_merge_is_the_weighted_sum_and_a_uniform_soup_is_the_mean():
    a, b = ({"w": torch.tensor(w), "n": torch.tensor([7])} for w in ([1.0, 2.0], [3.0, -2.0]))
    merged = linear_merge([a, b], [0.25, 0.75])
    assert merged["w"].tolist() == [2.5, -1.0] and merged["n"].tolist() == [7]  # by hand; integers copied
    states = [tiny_model(seed).state_dict() for seed in range(3)]
    weights = [0.5, 0.3, 0.2]
    merged = linear_merge(states, weights)
    for k, v in merged.items():
        torch.testing.assert_close(v, sum(w * s[k] for w, s in zip(weights, states)), rtol=0, atol=1e-7)
        torch.testing.assert_close(linear_merge(states)[k], torch.stack([s[k] for s in states]).mean(0))
    assert_same(linear_merge(states[:2], [1.0, 0.0]), states[0])  # (1, 0): the first model
    assert not torch.equal(logits(merged), logits(states[0]))


def test_weights_must_be_non_negative_and_sum_to_one_unless_normalised():
    states = [tiny_model(seed).state_dict() for seed in range(2)]
    for weights, message in (([0.5, 0.6], "sum to 1.1, not 1; pass --normalize"), ([1.5, -0.5], "non-negative"),
                             ([1.0], "1 weights for 2 models"), ([float("nan"), 1.0], "finite")):
        with pytest.raises(MergeError, match=message.replace(".", r"\.")):
            linear_merge(states, weights)
    assert_same(linear_merge(states, [3.0, 1.0], normalize=True), linear_merge(states, [0.75, 0.25]))
    with pytest.raises(MergeError, match="sum to 0"):
        linear_merge(states, [0.0, 0.0], normalize=True)


def test_slerp_endpoints_arc_and_linear_fallback():
    a, b = tiny_model(0).state_dict(), tiny_model(1).state_dict()
    assert_same(slerp_merge(a, b, 0.0), a)
    assert_same(slerp_merge(a, b, 1.0), b)
    x, y = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 3.0], dtype=torch.float64)
    for t in (0.25, 0.5, 0.9):  # orthogonal, one norm: along the arc, the norm stays
        angle = t * math.pi / 2
        torch.testing.assert_close(slerp(x, y, t), torch.tensor([3 * math.cos(angle), 3 * math.sin(angle)],
                                                                dtype=torch.float64))
    assert (0.5 * x + 0.5 * y).norm() == pytest.approx(3 / math.sqrt(2))  # what linear averaging gives
    v = torch.randn(100)
    torch.testing.assert_close(slerp(v, 2 * v, 0.3), 0.7 * v + 0.6 * v)  # parallel: linear
    with pytest.raises(MergeError, match="within"):
        slerp_merge(a, b, 1.5)


def test_task_arithmetic_adds_scaled_changes_to_the_base():
    base, m1, m2 = ({"w": torch.tensor(v)} for v in ([1.0, 1.0], [2.0, 1.0], [1.0, 3.0]))
    assert task_arithmetic(base, [m1, m2], [1.0, 0.5])["w"].tolist() == [2.0, 2.0]  # by hand
    states = [tiny_model(seed).state_dict() for seed in range(3)]
    assert_same(task_arithmetic(states[0], states[1:], [0.0, 0.0]), states[0])  # zero weights: the base
    for k, v in task_arithmetic(states[0], states[1:], [0.4, 0.6]).items():  # summing to 1: linear, any base
        torch.testing.assert_close(v, linear_merge(states[1:], [0.4, 0.6])[k], rtol=0, atol=1e-6)


def test_each_bad_input_stops_with_one_line():
    a = tiny_model().state_dict()
    wide = tiny_model(d_ff=96).state_dict()
    fewer = {k: v for k, v in a.items() if k != "norm.weight"}
    counted = [{**a, "steps": torch.tensor([i])} for i in (1, 2)]
    for states, message in (([a, wide], r"tensor blocks\.0\.mlp\.gate_proj\.weight has shape \(64, 32\) in model 0 "
                                        r"but \(96, 32\) in model 1"),
                            ([a, fewer], r"lacks \['norm\.weight'\]"),
                            (counted, "non-float tensor steps .* differs"), ([], "nothing to merge")):
        with pytest.raises(MergeError, match=message) as e:
            check_states(states)
        assert "\n" not in str(e.value)
    assert linear_merge([counted[0]] * 2)["steps"].tolist() == [1]


def save_run(path, model, data_cfg, chat: bool) -> str:
    save_start(model, data_cfg, path)
    if chat:
        (path / "report.json").write_text(json.dumps({"accuracy_after": {}}))
    return str(path)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cli_writes_a_folder_that_loads_as_the_in_memory_merge(small_data, tmp_path, monkeypatch, capsys, device):
    data_cfg, _ = small_data
    a = save_run(tmp_path / "a", tiny_model(0), data_cfg, chat=True)  # one chat model: all get chat scores
    b = save_run(tmp_path / "b", tiny_model(1), data_cfg, chat=False)
    flags = [f"--merge.out_dir={tmp_path}", "--merge.eval_batches=1", "--merge.max_new_tokens=4",
             f"--merge.device={device}", f'--merge.runs=["{a}", "{b}"]']
    merge.main(["--merge.weights=[0.75, 0.25]", "--merge.name=m", "--merge.eval_examples=1", *flags])
    loaded = load_model(str(tmp_path / "m"))[0]
    with torch.no_grad():
        on_disk = loaded(torch.arange(48).view(2, 24) % TEST_VOCAB)
    expected = linear_merge([load_model(a)[0].state_dict(), load_model(b)[0].state_dict()], [0.75, 0.25])
    if device == "cpu":
        assert torch.equal(on_disk, logits(expected))
    else:  # the GPU may fuse a*w + b*v into one rounding
        torch.testing.assert_close(on_disk, logits(expected), rtol=1e-5, atol=1e-5)
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert list(report["scores"]) == [a, b, "merge (linear 0.75/0.25)"] and "accuracy_after" in report
    for s in report["scores"].values():
        assert math.isfinite(s["val_loss"]) and math.isfinite(s["chat_loss"]) and "add/think" in s["accuracy"]
    assert not (tmp_path / "m.tmp").exists()
    with pytest.raises(SystemExit):
        merge.main(["--merge.name=m", *flags])
    assert "exists already" in capsys.readouterr().err

    def broken_save(run_dir, step, model, optimizer, meta, keep=0):  # a crash halfway through writing
        (run_dir / "ckpt_0000000.tmp").mkdir(parents=True)
        (run_dir / "ckpt_0000000.tmp" / "state.pt").write_bytes(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(merge, "save_checkpoint", broken_save)
    with pytest.raises(SystemExit):  # one line, not a traceback
        merge.main(["--merge.name=crashed", "--merge.eval_examples=0", *flags])
    assert capsys.readouterr().err == "error: disk full\n"
    assert not (tmp_path / "crashed").exists() and not (tmp_path / "crashed.tmp").exists()


def test_cli_refuses_other_configs_and_missing_runs_in_one_line(small_data, tmp_path):
    data_cfg, _ = small_data
    a = save_run(tmp_path / "a", tiny_model(0), data_cfg, chat=False)
    other = save_run(tmp_path / "other", tiny_model(1, rope_base=500_000.0), data_cfg, chat=False)  # same shapes
    with pytest.raises(MergeError, match="model.rope_base is 500000.0 there, 10000.0"):
        merge.merge_runs([a, other], out_dir=str(tmp_path), name="x")
    with pytest.raises(MergeError, match="cannot load .*nothing.*; make it first with sft.py"):
        merge.merge_runs([a, str(tmp_path / "nothing")], out_dir=str(tmp_path), name="x")
    out = subprocess.run([sys.executable, str(ROOT / "merge.py"), f'--merge.runs=["{a}", "{other}"]',
                          "--merge.weights=[0.9, 0.2]", "--merge.name=x", f"--merge.out_dir={tmp_path}"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "sum to 1.1" in out.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()
