"""The speedrun at its test size on the session's small data: every stage runs and is wired to the
one before it (phases end on their checkpoints, the long-context one with its RoPE base, the merges
are the weighted sums they claim), report.md holds every stage's numbers, a rerun skips what is
complete, and a failing stage stops the run with its reason. About 30 s on 2 cores."""

import dataclasses
import hashlib
import json
import shutil
import socket
import tomllib

import pytest
import torch

import speedrun
from checkpoint import load_model
from config import ConfigError


def sized(small_data, **changes) -> speedrun.Size:
    """The test size on the session's tokenizer and shards (the same settings, so nothing is rebuilt)."""
    size = speedrun.SIZES["test"]
    return dataclasses.replace(size, pretrain={**size.pretrain, "data.dir": small_data[0].dir}, **changes)


@pytest.fixture(scope="module")
def finished(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "run"
    speedrun.run_pipeline(sized(small_data), out, threads=1, log=lambda *a: None)
    return out


def stage_rows(report: str) -> dict[str, list[str]]:
    lines = report.split("## Stages")[1].split("##")[0].splitlines()
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in (line.split("|") for line in lines)
            if len(cells) > 3 and cells[1].strip() not in ("stage", "---")}


def test_every_stage_runs_and_the_report_has_each_stages_numbers(finished, small_data):
    size = sized(small_data)
    report = (finished / "report.md").read_text()
    rows = stage_rows(report)
    # tokens, steps, minutes, tok/s per phase: the boundaries fall where the size puts them
    # (4 steps x 4 x 32 tokens, 2 x 4 x 32, then 2 x 1 x 128 at the long-context length)
    assert rows["pretrain 1: main"][:2] == ["512", "4"] and rows["pretrain 2: anneal"][:2] == ["256", "2"]
    assert rows["pretrain 3: long"][:2] == ["256", "2"]
    for stage in ("sft", "apo-s0", "apo-s1", "grpo"):
        tokens, steps, minutes, tok_s = rows[stage][:4]
        assert int(tokens.replace(",", "")) > 0 and int(steps) > 0 and float(minutes) > 0 and tok_s, stage
    assert {"data: tokenizer and shards", "soup", "final", "eval"} <= rows.keys()
    state = json.loads((finished / "speedrun.json").read_text())
    assert list(state["stages"]) == ["data", "pretrain", "sft", "apo-s0", "apo-s1", "grpo", "soup", "final", "eval"]
    # the test model never answers right: the APO runs fell back to off-policy pairs, and say why
    assert state["apo_pairs"]["kind"] == "off_policy" and "fallback: probe: 0 pair(s)" in state["apo_pairs"]["why"]
    assert json.loads((finished / "apo-s0" / "report.json").read_text())["pairs_kind"] == "off_policy"
    # every model scored on the same items, with its row in each evaluation table
    results = {k: json.loads((finished / "eval" / f"{k}.json").read_text()) for k in speedrun.models(size, finished)}
    counts = {k: {m: v["n"] for m, v in r["metrics"].items()} for k, r in results.items()}
    assert all(c == counts["main"] for c in counts.values())
    assert {"ctx/near", "ctx/mid", "ctx/far"} <= counts["main"].keys()
    for r in results.values():
        assert report.count(f"| {r['label']} |") == len(speedrun.METRIC_GROUPS)
    assert report.count("does not help beyond noise at this size") >= 1  # SFT of a 2-layer toy teaches no answers
    assert (finished / "pretrain.png").is_file() == (finished / "posttrain.png").is_file()


def test_stages_are_wired_as_the_recipe_says(finished, small_data):
    """Phases end on checkpoints that rebuild with their own RoPE base; the soup is the mean of the
    APO runs and the final model 0.9 x soup + 0.1 x the long-context checkpoint, tensor by tensor."""
    size = sized(small_data)
    spec = {k: s for k, (_, s) in speedrun.models(size, finished).items()}
    loaded = {k: load_model(spec[k])[0] for k in ("main", "anneal", "long", "apo-s0", "apo-s1", "soup", "final")}
    assert [loaded[k].cfg.rope_base for k in ("main", "anneal", "long")] == [10000.0, 10000.0, 100_000.0]
    assert loaded["final"].cfg.rope_base == 100_000.0  # post-training kept the long-context base
    state = {k: m.state_dict() for k, m in loaded.items()}
    for name, soup in state["soup"].items():
        torch.testing.assert_close(soup, (state["apo-s0"][name].double() + state["apo-s1"][name].double()).float() / 2)
        final = (0.9 * soup.double() + 0.1 * state["long"][name].double()).float()
        torch.testing.assert_close(state["final"][name], final)
    assert tomllib.loads((finished / "grpo" / "config.toml").read_text())["run"]["init"] == str(finished / "apo-s0")


def test_a_rerun_skips_every_completed_stage(finished, small_data):
    def digests():
        return {str(p.relative_to(finished)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in finished.rglob("*") if p.is_file() and p.name not in ("report.md", "speedrun.json")
                and p.suffix != ".png"}
    before, lines = digests(), []
    speedrun.run_pipeline(sized(small_data), finished, threads=1, log=lines.append)
    assert [line for line in lines if line.startswith("==")] == \
        ["== data"] + [f"== {s}: complete, skipped" for s in
                       ("pretrain", "sft", "apo-s0", "apo-s1", "grpo", "soup", "final", "eval")]
    assert digests() == before


def test_a_failing_stage_stops_the_run_with_its_reason(finished, small_data, tmp_path):
    out = tmp_path / "cut"
    shutil.copytree(finished, out)
    for stage in ("sft", "apo-s0", "apo-s1", "grpo", "soup", "final", "eval"):
        shutil.rmtree(out / stage)
    bad = sized(small_data, sft={**speedrun.SIZES["test"].sft, "sft.seq_len": 4096})
    reason = r"stage sft failed: sft.seq_len=4096 exceeds the model's max_seq_len 256"
    with pytest.raises(speedrun.StageFailed, match=reason):
        speedrun.run_pipeline(bad, out, threads=1, log=lambda *a: None)
    assert not (out / "apo-s0").exists()  # nothing after the failure ran
    assert "**Stopped: stage `sft` failed: ConfigError: sft.seq_len=4096" in (out / "report.md").read_text()
    assert json.loads((out / "speedrun.json").read_text())["failed"]["stage"] == "sft"
    with pytest.raises(ConfigError, match="holds a speedrun of size 'test', not 'cpu'"):
        speedrun.run_pipeline(dataclasses.replace(bad, name="cpu"), out, threads=1, log=lambda *a: None)


def test_verdicts_pair_items_and_do_not_call_noise_a_change():
    share = lambda hits: speedrun.share_metric([float(h) for h in hits])  # noqa: E731
    # McNemar's exact test: 5 items gained and none lost is p = 2 / 32, not yet beyond noise; 6 is
    assert speedrun.sign_test(5, 0) == pytest.approx(0.0625) and speedrun.sign_test(6, 0) == pytest.approx(0.03125)
    assert speedrun.sign_test(0, 0) == 1.0 and speedrun.sign_test(3, 3) == 1.0
    assert speedrun.verdict("a", share([0] * 20), share([1] * 5 + [0] * 15))[0] == "within noise"
    assert speedrun.verdict("a", share([0] * 20), share([1] * 6 + [0] * 14))[0] == "better"
    assert speedrun.verdict("a", share([1] * 6 + [0] * 14), share([0] * 20))[0] == "worse"
    # losses pair window by window: a small shift on every window is beyond noise even where the
    # windows' own spread is wide; lower is better
    before = [1.0, 3.0, 5.0, 7.0]
    lower = speedrun.loss_metric([x - 0.01 for x in before])
    assert speedrun.verdict("l", speedrun.loss_metric(before), lower)[0] == "better"
    assert speedrun.verdict("l", lower, speedrun.loss_metric(before))[0] == "worse"
    assert speedrun.verdict("l", speedrun.loss_metric(before), speedrun.loss_metric([1.1, 2.9, 5.1, 6.9]))[0] == \
        "within noise"
    assert speedrun.context_buckets(256, 1024) == {"ctx/near": (0, 256), "ctx/mid": (256, 512), "ctx/far": (512, 1024)}
    assert speedrun.context_buckets(32, 64) == {"ctx/near": (0, 32), "ctx/mid": (32, 64)}


def test_train_leaves_a_callers_process_group_alone(small_data, tmp_path, monkeypatch):
    """The speedrun makes the process group once and runs every training stage in it: train() must
    not end a group it did not make (making a new one in the same torchrun job races on the
    store's keys), while a group it made itself is still ended."""
    import torch.distributed as dist
    from conftest import tiny_overrides
    from distributed import setup_distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    setup_distributed("cpu", 1, "fsdp")  # a group of one process, made before train() runs
    try:
        speedrun.train.train(speedrun.train.load_config(None, tiny_overrides(small_data[0], tmp_path, "inside",
                                                                             **{"train.max_steps": 2})))
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    summary = speedrun.train.train(speedrun.train.load_config(None, tiny_overrides(
        small_data[0], tmp_path, "own", **{"train.max_steps": 2, "train.parallelism": "fsdp"})))
    assert summary["process_group"] and not dist.is_initialized()


# ids: a test whose id is "gpu" counts as a GPU test and is skipped on CPU
@pytest.mark.parametrize("name", sorted(speedrun.SIZES), ids=lambda n: f"size-{n}")
def test_every_sizes_stage_configs_load(name, tmp_path):
    """A size is config overrides: an unknown key or a bad value in any stage's stops here, not
    minutes into a run (the gpu size never runs on the CPU test machine)."""
    size = speedrun.SIZES[name]
    cfg = speedrun.pretrain_config(size, tmp_path, 0)
    ends = speedrun.phase_ends(size)
    assert cfg["data"].stage_at(ends["main"] / size.pretrain_steps) == 1 > cfg["data"].stage_at(
        (ends["main"] - 1) / size.pretrain_steps)  # phase 2 starts right after phase 1's last step
    assert cfg["data"].stage_at(ends["anneal"] / size.pretrain_steps) == 2
    assert all(step % cfg["train"].ckpt_interval == 0 for step in ends.values())  # a checkpoint ends each phase
    assert cfg["train"].keep_checkpoints >= len(ends)
    for module, overrides in ((speedrun.sft, size.sft), (speedrun.dpo, size.apo), (speedrun.rl, size.grpo)):
        speedrun.post_config(module, overrides, tmp_path / "init", "x", tmp_path, 0, 0, size.chat_per_task)
