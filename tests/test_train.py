import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import checkpoint_paths, load_meta
from config import parse_override
from conftest import ROOT, tiny_overrides, torchrun
from model import Transformer
from train import ConfigError, load_config, train


def run(small_data, out, name, **extra):
    cfg = load_config(None, tiny_overrides(small_data[0], out, name, **extra))
    return train(cfg)


def losses(run_dir: Path, key="loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def digest(folder: Path) -> dict[str, str]:
    """Every checkpoint file's hash (ckpt_<step>/...), to prove nothing was rewritten."""
    files = sorted(p for p in folder.glob("ckpt_*/*") if p.is_file())
    assert files, f"no checkpoint files in {folder}"
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------------------------------------
# configuration


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(None, ["--model.n_kv_heads=1", "--train.name=mqa", "--optim.betas=[0.9, 0.99]",
                             '--data.weights={ prose = 1.0 }'])
    assert cfg["model"].n_kv_heads == 1 and cfg["train"].name == "mqa"
    assert cfg["optim"].betas == (0.9, 0.99) and cfg["data"].weights == {"prose": 1.0}
    assert parse_override("--optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert parse_override("--train.name=my-run") == ("train.name", "my-run")  # bare strings are fine
    assert parse_override("--train.resume") == ("train.resume", True)
    with pytest.raises(ConfigError, match="overrides look like --section.key=value"):
        parse_override("max_steps=3")


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_kv_head'; did you mean model.n_kv_heads\?"):
        load_config(None, ["--model.n_kv_head=2"])
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.lr'"):
        load_config(None, ["--optimizer.lr=1e-3"])


def test_bad_values_stop_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="n_heads=8 is not divisible by model.n_kv_heads=3"):
        load_config(None, ["--model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match="train.seq_len=1024 is longer than model.max_seq_len=256"):
        load_config(None, ["--train.seq_len=1024"])
    with pytest.raises(ConfigError, match="model.n_layers must be of type int, got 'four'"):
        load_config(None, ["--model.n_layers=four"])
    with pytest.raises(ConfigError, match="config file .*nope.toml not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_overrides_keep_string_text_and_bad_values_are_refused(tmp_path):
    # a string field takes the text as typed, even when it reads as a TOML number or date
    assert load_config(None, ["--train.name=2024-01-01"])["train"].name == "2024-01-01"
    assert load_config(None, ["--train.name=123"])["train"].name == "123"
    assert load_config(None, ["--optim.lr=.001"])["optim"].lr == 0.001
    for arg, words in (("--train.threads=-1", "train.threads must be >= 0"),
                       ("--train.ckpt_interval=-5", "train.ckpt_interval must be >= 0"),
                       ("--train.name=", "train.name must not be empty")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, [arg])
    extra = tmp_path / "extra.toml"
    extra.write_text((ROOT / "configs" / "tiny.toml").read_text() + "\n[trian]\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]; did you mean \[train\]\?"):
        load_config(extra)


def test_cli_prints_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model.n_kv_head=2"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: unknown config key 'model.n_kv_head'; did you mean model.n_kv_heads?"]
    for args in (["--config"], ["--config="], ["--config", "--train.max_steps=2"]):
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                             cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.strip() == "error: --config needs a file, e.g. --config configs/tiny.toml"


# ---------------------------------------------------------------------------------------------
# training, checkpoints, resume


def test_resumed_run_reproduces_the_uninterrupted_run_exactly(small_data, tmp_path):
    full = run(small_data, tmp_path, "full")
    run(small_data, tmp_path, "split", **{"train.max_steps": 3})    # stops at 3, checkpoint at 3
    run(small_data, tmp_path, "split", **{"train.resume": True})    # continues to 6
    a, b = losses(Path(full["run_dir"])), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # bit-for-bit: model, optimizer, loader and RNG state all came back
    assert losses(Path(full["run_dir"]), "val_loss") == losses(tmp_path / "split", "val_loss")
    assert a[6] < a[1]
    assert not list((tmp_path / "split").glob("*.tmp"))
    # every logged figure but the timings: lr (the schedule), tokens, grad norm, validation
    def rows(run_dir):
        return [{k: v for k, v in json.loads(line).items() if k not in ("tok_per_s", "mfu")}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows(Path(full["run_dir"])) == rows(tmp_path / "split")
    from optim import lr_at
    cfg = load_config(None, tiny_overrides(small_data[0], tmp_path, "full"))
    logged = [r for r in rows(tmp_path / "split") if "lr" in r]
    assert [r["lr"] for r in logged] == [lr_at(r["step"] - 1, cfg["optim"], 6) for r in logged]
    assert [r["tokens"] for r in logged] == [r["step"] * 4 * 64 for r in logged]


def test_global_batch_size_sets_the_accumulation_from_the_world_size(small_data, tmp_path):
    """train.global_batch_size = 8 with micro-batches of 4 on one process is 2 accumulation steps:
    the same run, loss for loss, as grad_accum_steps = 2 (on 2 processes it would be 1)."""
    a = losses(Path(run(small_data, tmp_path, "accum", **{"train.grad_accum_steps": 2, "train.max_steps": 3})["run_dir"]))
    b = losses(Path(run(small_data, tmp_path, "global", **{"train.global_batch_size": 8, "train.max_steps": 3})["run_dir"]))
    assert a == b
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not a multiple of train.micro_batch_size x "
                                          r"processes = 4 x 1"):
        run(small_data, tmp_path, "odd", **{"train.global_batch_size": 10})
    assert not (tmp_path / "odd").exists()  # refused before any work
    with pytest.raises(ConfigError, match="not both"):
        run(small_data, tmp_path, "both", **{"train.global_batch_size": 8, "train.grad_accum_steps": 2})


def test_existing_run_is_never_overwritten(small_data, tmp_path):
    run(small_data, tmp_path, "keep", **{"train.max_steps": 3})
    before = digest(tmp_path / "keep")
    with pytest.raises(ConfigError, match="already holds checkpoints; continue it with --train.resume=true"):
        run(small_data, tmp_path, "keep")
    with pytest.raises(ConfigError, match="model.n_layers is 2 in the checkpoint but 3 now"):
        run(small_data, tmp_path, "keep", **{"train.resume": True, "model.n_layers": 3})
    assert digest(tmp_path / "keep") == before


def test_resume_keeps_the_split_but_takes_new_optimizer_settings_and_mixture_stages(small_data, tmp_path):
    """A resumed run refuses another document split (validation documents would leak into
    training), applies the config's betas / eps / weight decay rather than the checkpoint's, and
    treats new mixture weights as a new stage instead of repaying the new source's 'deficit'."""
    import train as train_module
    run(small_data, tmp_path, "stage", **{"train.max_steps": 3})
    before = digest(tmp_path / "stage")
    with pytest.raises(ConfigError, match="data.seed is 1337 in the checkpoint but 7 now"):
        run(small_data, tmp_path, "stage", **{"train.resume": True, "data.seed": 7})
    assert digest(tmp_path / "stage") == before

    seen = {}
    real_restore = train_module.restore_state

    def spy(path, model, optimizer):
        real_restore(path, model, optimizer)
        seen["optimizer"] = optimizer
    train_module.restore_state = spy
    try:
        run(small_data, tmp_path, "stage", **{"train.resume": True, "train.max_steps": 5, "optim.betas": [0.8, 0.9],
                                             "optim.weight_decay": 0.0, "data.weights": {"prose": 0.2, "code": 0.8}})
    finally:
        train_module.restore_state = real_restore
    assert [g["betas"] for g in seen["optimizer"].param_groups] == [(0.8, 0.9), (0.8, 0.9)]
    assert [g["weight_decay"] for g in seen["optimizer"].param_groups] == [0.0, 0.0]
    last = load_meta(checkpoint_paths(tmp_path / "stage")[-1])["loader"]
    stage_mix = {s: last["counts"][s] - last["stage_counts"][s] for s in last["counts"]}
    assert last["stage_samples"] > 0 and sum(stage_mix.values()) == last["samples"] - last["stage_samples"]
    assert abs(stage_mix["code"] - 0.8 * sum(stage_mix.values())) <= 1  # the new weights, from the stage start


def test_mixture_stages_in_one_run_switch_where_the_config_says_and_resume_across(small_data, tmp_path):
    """data.stage_starts / data.stage_weights (SmolLM3's stages, an annealing stage) in one config:
    the first half of the run draws with data.weights, the second only math; resumed from the
    checkpoint before the switch, the run gives the uninterrupted run's rows."""
    import shutil
    from data import DEFAULT_WEIGHTS
    stages = {"train.max_steps": 6, "train.ckpt_interval": 3, "train.eval_interval": 3,
              "data.stage_starts": [0.5], "data.stage_weights": [{"math": 1.0}]}
    run(small_data, tmp_path, "staged", **stages)
    mid, end = (load_meta(p)["loader"] for p in checkpoint_paths(tmp_path / "staged"))
    for source, weight in DEFAULT_WEIGHTS.items():  # 3 steps of the first stage
        assert abs(mid["counts"][source] - weight * mid["samples"]) <= 1
    grew = {s: end["counts"][s] - mid["counts"][s] for s in end["counts"]}
    assert grew == {"prose": 0, "code": 0, "math": end["samples"] - mid["samples"]} and grew["math"] > 0
    rows = (tmp_path / "staged" / "metrics.jsonl").read_text().splitlines()

    shutil.copytree(tmp_path / "staged", tmp_path / "crashed")  # as if the job died after step 3
    shutil.rmtree(tmp_path / "crashed" / "ckpt_0000006")
    run(small_data, tmp_path, "crashed", **{**stages, "train.resume": True})
    drop = ("tok_per_s", "mfu")
    resumed = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [{k: v for k, v in json.loads(r).items() if k not in drop} for r in resumed] == \
           [{k: v for k, v in json.loads(r).items() if k not in drop} for r in rows]
    with pytest.raises(ConfigError, match="data.stage_starts has 1 entries and data.stage_weights 0"):
        load_config(None, ["--data.stage_starts=[0.5]"])
    with pytest.raises(ConfigError, match=r"data.stage_starts=\[0.6, 0.4\] must rise strictly inside \(0, 1\)"):
        load_config(None, ["--data.stage_starts=[0.6, 0.4]", "--data.stage_weights=[{math = 1.0}, {code = 1.0}]"])


def test_a_long_context_stage_switches_seq_len_and_rope_base_with_a_fresh_warmup_and_resumes_across(
        small_data, tmp_path, monkeypatch):
    """SmolLM3's long-context stage in one config: from half of the run on, sequences twice as long
    and a 50x RoPE base (ABF), with a fresh 2-step warmup; resumed from a checkpoint before the
    switch or after it, the run gives the uninterrupted run's rows."""
    from optim import lr_at
    stages = {"model.max_seq_len": 128, "train.seq_len": 32, "train.max_steps": 6, "train.ckpt_interval": 2,
              "train.keep_checkpoints": 3, "train.eval_interval": 3, "data.stage_starts": [0.5],
              "data.stage_weights": [{"prose": 0.7, "code": 0.2, "math": 0.1}],
              "train.stage_settings": [{"seq_len": 64, "rope_base": 500_000.0, "warmup_steps": 2}]}
    bases = []
    real_set_rope = Transformer.set_rope
    monkeypatch.setattr(Transformer, "set_rope", lambda self, base, *a: (bases.append(base), real_set_rope(self, base, *a)))
    run(small_data, tmp_path, "long", **stages)
    assert bases == [500_000.0]  # once, at the switch
    rows = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["tokens"] for r in steps] == [128, 256, 384, 640, 896, 1152]  # 4 x 32, then 4 x 64 tokens a step
    cfg = load_config(None, tiny_overrides(small_data[0], tmp_path, "x", **stages))
    expected = [lr_at(s, cfg["optim"], 6) * (min(1.0, (s - 3 + 1) / 2) if s >= 3 else 1.0) for s in range(6)]
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-12)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]  # validation stays at the first length
    for kept in ("ckpt_0000004", "ckpt_0000002"):  # resume after the switch, then from before it
        shutil.rmtree(tmp_path / "cut", ignore_errors=True)
        shutil.copytree(tmp_path / "long", tmp_path / "cut")
        for ckpt in checkpoint_paths(tmp_path / "cut"):
            if ckpt.name > kept:
                shutil.rmtree(ckpt)
        bases.clear()
        run(small_data, tmp_path, "cut", **stages, **{"train.resume": True})
        assert bases == ([500_000.0] if kept == "ckpt_0000002" else [])  # built with the stage's base otherwise
        drop = ("tok_per_s", "mfu")
        assert [{k: v for k, v in json.loads(r).items() if k not in drop}
                for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == \
            [{k: v for k, v in r.items() if k not in drop} for r in rows], kept
    with pytest.raises(ConfigError, match=r"seq_len 256 is longer than model.max_seq_len=128"):
        load_config(None, tiny_overrides(small_data[0], tmp_path, "x", **{**stages,
                    "train.stage_settings": [{"seq_len": 256}]}))
    with pytest.raises(ConfigError, match="train.stage_settings has 1 entries and data.stage_starts 0"):
        load_config(None, ["--train.stage_settings=[{seq_len = 64}]"])


def test_a_resume_with_another_tokenizer_is_refused(small_data, tmp_path):
    """The checkpoint records its tokenizer's fingerprint: a resume whose tokenizer file changed
    (its shards are rebuilt silently) stops with one line instead of training on other ids."""
    from corpus import corpus_documents
    from tokenizer import save_tokenizer, train_bpe
    cfg = small_data[0]
    data_copy = tmp_path / "data"
    shutil.copytree(cfg.dir, data_copy)
    run(small_data, tmp_path, "tok", **{"train.max_steps": 3, "data.dir": str(data_copy)})
    other = train_bpe(corpus_documents("code")[:40], 512)  # code only: other merges than the mixed sample's
    save_tokenizer(other, data_copy / "vocab512" / "tokenizer.json")
    with pytest.raises(ConfigError, match="trained with another tokenizer"):
        run(small_data, tmp_path, "tok", **{"train.resume": True, "data.dir": str(data_copy)})


def test_a_fresh_start_starts_a_fresh_metrics_file(small_data, tmp_path):
    """A run that crashed before its first checkpoint and is started again (e.g. a requeued Slurm
    job with --train.resume) must not keep the first attempt's rows."""
    run_dir = tmp_path / "again"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "tokens": 0, "val_loss": 9.0}\n{"step": 1, "lo')
    run(small_data, tmp_path, "again", **{"train.resume": True, "train.max_steps": 2})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2] and rows[0]["val_loss"] != 9.0


def test_keeps_only_the_newest_checkpoints(small_data, tmp_path):
    run(small_data, tmp_path, "rot", **{"train.ckpt_interval": 1, "train.keep_checkpoints": 2})
    assert [p.name for p in checkpoint_paths(tmp_path / "rot")] == ["ckpt_0000005", "ckpt_0000006"]
    saved = load_meta(tmp_path / "rot" / "ckpt_0000006")
    assert saved["step"] == 6 and saved["config"]["model"]["d_model"] == 64
    assert {"loader", "rng", "tokens"} <= set(saved)
    state = torch.load(tmp_path / "rot" / "ckpt_0000006" / "state.pt", weights_only=False)
    assert {"model", "optimizer"} == set(state)
    from config import config_to_toml
    cfg = load_config(None, tiny_overrides(small_data[0], tmp_path, "rot", **{"train.ckpt_interval": 1,
                                                                             "train.keep_checkpoints": 2}))
    assert (tmp_path / "rot" / "config.toml").read_text() == config_to_toml(cfg)  # the resolved config
    assert load_config(tmp_path / "rot" / "config.toml")["model"].d_model == 64  # resolved config reloads


def test_truncated_shard_stops_the_run_with_one_line(small_data, tmp_path):
    import shutil
    cfg = small_data[0]
    data_copy = tmp_path / "data"
    shutil.copytree(cfg.dir, data_copy)
    shard = data_copy / cfg.shard_dir(512).relative_to(cfg.dir) / "code_train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    args = tiny_overrides(cfg, tmp_path, "trunc", **{"data.dir": str(data_copy)})
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: shard ") and "truncated or corrupt" in last and "rebuild" in last
    assert not (tmp_path / "trunc").exists() or not checkpoint_paths(tmp_path / "trunc")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(small_data, tmp_path):
    """DDP on 2 CPU processes (micro-batch 4 each) == 1 process with 2 micro-batches of 4."""
    cfg = small_data[0]
    run(small_data, tmp_path, "one", **{"train.grad_accum_steps": 2})
    torchrun(2, tiny_overrides(cfg, tmp_path, "two"), tmp_path)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)
    va, vb = losses(tmp_path / "one", "val_loss"), losses(tmp_path / "two", "val_loss")
    for step in va:
        assert vb[step] == pytest.approx(va[step], abs=1e-5)


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_checkpoints_reshard(small_data, tmp_path, monkeypatch):
    """FSDP2 on 2 gloo ranks gives the one-process loss curve, with or without gradient accumulation
    and whether gradients are reduced after every micro-batch or only the last; its sharded
    checkpoint (written by 2 ranks) resumes on 1 rank, and a 1-rank sharded checkpoint resumes on
    2, both exactly."""
    cfg = small_data[0]
    reference = losses(Path(run(small_data, tmp_path, "ref", **{"train.grad_accum_steps": 2})["run_dir"]))

    torchrun(2, tiny_overrides(cfg, tmp_path, "fsdp2", **{"train.parallelism": "fsdp"}), tmp_path)
    fsdp = losses(tmp_path / "fsdp2")
    assert sorted(fsdp) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert fsdp[step] == pytest.approx(reference[step], abs=1e-5)
    assert (tmp_path / "fsdp2" / "ckpt_0000006").is_dir()
    assert len(list((tmp_path / "fsdp2" / "ckpt_0000006").glob("*.distcp"))) == 2  # one shard per rank
    # 2 micro-batches per rank: reducing only after the last one (unsharded gradients in between) and
    # reduce-scattering after each (train.reduce_every_micro_batch: sharded) give the same steps
    four = losses(Path(run(small_data, tmp_path, "ref4", **{"train.grad_accum_steps": 4, "train.max_steps": 3})["run_dir"]))
    for every in (False, True):
        name = f"accum-every-{every}"
        torchrun(2, tiny_overrides(cfg, tmp_path, name, **{"train.parallelism": "fsdp", "train.grad_accum_steps": 2,
                                                          "train.max_steps": 3, "train.reduce_every_micro_batch": every}),
                 tmp_path)
        accumulated = losses(tmp_path / name)
        assert sorted(accumulated) == sorted(four) == [1, 2, 3]
        for step in four:
            assert accumulated[step] == pytest.approx(four[step], abs=1e-5), (every, step)
    # ... and the setting reaches FSDP: per step, [no sync, sync] by default, [sync, sync] when set
    from torch.distributed.fsdp import FSDPModule
    calls = []
    monkeypatch.setattr(FSDPModule, "set_requires_gradient_sync", lambda self, sync, **kw: calls.append(sync))
    for every in (False, True):
        calls.clear()
        run(small_data, tmp_path, f"spy-{every}", **{"train.parallelism": "fsdp", "train.grad_accum_steps": 2,
                                                    "train.max_steps": 2, "train.reduce_every_micro_batch": every})
        assert calls == [every, True] * 2

    # 2 ranks write at step 3, 1 rank resumes to 6 (grad_accum 2 keeps the global batch)
    torchrun(2, tiny_overrides(cfg, tmp_path, "two2one", **{"train.parallelism": "fsdp", "train.max_steps": 3}), tmp_path)
    run(small_data, tmp_path, "two2one", **{"train.parallelism": "fsdp", "train.resume": True, "train.grad_accum_steps": 2})
    # 1 rank writes at step 3, 2 ranks resume to 6
    run(small_data, tmp_path, "one2two", **{"train.parallelism": "fsdp", "train.max_steps": 3, "train.grad_accum_steps": 2})
    torchrun(2, tiny_overrides(cfg, tmp_path, "one2two", **{"train.parallelism": "fsdp", "train.resume": True}), tmp_path)
    for name in ("two2one", "one2two"):
        resumed = losses(tmp_path / name)
        assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
        for step in reference:
            assert resumed[step] == pytest.approx(reference[step], abs=1e-5), (name, step)


@pytest.mark.slow
def test_simulated_two_node_launch_trains_checkpoints_and_resumes(small_data, tmp_path):
    """torchrun --nnodes=2 on one host (one process per "node", c10d rendezvous), as on a cluster:
    it trains with sharded checkpoints, and a second launch resumes, matching one process."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(**extra):
        args = tiny_overrides(small_data[0], tmp_path, "twonode", **{"train.parallelism": "fsdp", **extra})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=twonode",
               str(ROOT / "train.py"), *args]
        nodes = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [n.communicate(timeout=300) for n in nodes]
        assert all(n.returncode == 0 for n in nodes), outs[0][1][-2000:] + outs[1][1][-2000:]

    launch(**{"train.max_steps": 3})
    assert (tmp_path / "twonode" / "ckpt_0000003").is_dir()
    launch(**{"train.resume": True})
    reference = losses(Path(run(small_data, tmp_path, "ref1", **{"train.grad_accum_steps": 2})["run_dir"]))
    resumed = losses(tmp_path / "twonode")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5)


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_job_instead_of_hanging(small_data, tmp_path):
    """Kill rank 1 mid-training: torchrun must stop rank 0 and exit non-zero, promptly."""
    import signal
    import time
    args = tiny_overrides(small_data[0], tmp_path, "dies", **{"train.max_steps": 100000, "train.ckpt_interval": 0,
                                                                "train.eval_interval": 100000})
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(ROOT / "train.py"), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "dies" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    assert metrics.exists(), "training never started"
    rank1 = [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_rank(int(pid), 1, job.pid)]
    assert rank1, "rank 1 not found"
    os.kill(int(rank1[0]), signal.SIGKILL)
    try:
        _, err = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the job hung after a rank died")
    assert job.returncode != 0
    assert "ChildFailedError" in err or "Signal 9" in err or "exitcode" in err


def _is_rank(pid: int, rank: int, agent_pid: int) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return ppid == agent_pid and f"RANK={rank}".encode() in environ


def test_validation_loss_is_the_cross_entropy_alone(small_data):
    """z-loss (and MoE's balance loss) help training; validation reports the plain cross-entropy,
    so runs with and without them compare on the same scale."""
    import contextlib
    import torch.nn.functional as F
    from conftest import TEST_VOCAB
    from data import MixtureLoader
    from model import ModelConfig, Transformer
    from tokenizer import eot_id
    from train import evaluate
    cfg, enc = small_data
    val = MixtureLoader(cfg.shard_dir(TEST_VOCAB), cfg.weights, "val", 32, cfg.seed, eot_id(enc))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=TEST_VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_seq_len=32, z_loss_coef=1.0))
    got = evaluate(model, val, 2, 4, torch.device("cpu"), contextlib.nullcontext())
    val.load_state_dict({"samples": 0, "counts": {}})
    with torch.no_grad():
        batches = [val.next_step(4, 1)[0] for _ in range(2)]
        want = sum(F.cross_entropy(model(x, doc_ids=doc).flatten(0, 1), y.flatten()).item()
                   for x, y, doc in batches) / 2
        with_z = sum(model(x, y, doc)[0].item() for x, y, doc in batches) / 2
    assert got == pytest.approx(want, rel=1e-5)
    assert with_z > want + 1  # the training loss does carry the z-loss here


def test_training_passes_each_batch_its_document_ids(small_data, tmp_path, monkeypatch):
    """Document masking in the loop: every training forward gets the doc_ids of its own windows
    (a new document after each end-of-text token), not None."""
    import numpy as np
    from data import window_doc_ids
    from model import Transformer
    from tokenizer import eot_id
    seen = []
    real_forward = Transformer.forward

    def spy(self, idx, targets=None, doc_ids=None, kv_cache=None):
        if targets is not None and self.training:
            seen.append((idx.clone(), targets.clone(), None if doc_ids is None else doc_ids.clone()))
        return real_forward(self, idx, targets, doc_ids, kv_cache)
    monkeypatch.setattr(Transformer, "forward", spy)
    run(small_data, tmp_path, "docs", **{"train.max_steps": 2, "data.weights": {"math": 1.0}})  # short documents
    eot = eot_id(small_data[1])
    assert len(seen) == 2
    for x, y, doc in seen:
        assert doc is not None
        for b in range(x.shape[0]):
            window = np.append(x[b].numpy(), y[b, -1].item())
            assert np.array_equal(doc[b].numpy(), window_doc_ids(window, eot))
    assert any(int(doc.max()) > 0 for _, _, doc in seen)  # the windows really hold several documents


def test_document_masking_off_gives_every_forward_plain_causal_attention(small_data, tmp_path, monkeypatch):
    """train.document_masking=false (the playbook's ablation of intra-document masking, and the
    path SDPA's flash kernels take): no training or validation forward gets doc_ids; on (the
    default) every one does."""
    from model import Transformer
    seen = []
    real_forward = Transformer.forward

    def spy(self, idx, targets=None, doc_ids=None, kv_cache=None):
        if targets is not None:
            seen.append((self.training, doc_ids is None))
        return real_forward(self, idx, targets, doc_ids, kv_cache)
    monkeypatch.setattr(Transformer, "forward", spy)
    off = run(small_data, tmp_path, "plain", **{"train.max_steps": 2, "train.eval_interval": 2,
                                                 "train.document_masking": False})
    assert {training for training, _ in seen} == {True, False}  # training and validation both seen
    assert all(no_docs for _, no_docs in seen)
    seen.clear()
    on = run(small_data, tmp_path, "docs", **{"train.max_steps": 2, "train.eval_interval": 2})
    assert seen and not any(no_docs for _, no_docs in seen)
    assert off["val_loss"] != on["val_loss"]  # the mask changes what the model computes


def test_a_warmup_longer_than_the_run_is_pointed_out(small_data, tmp_path, capsys):
    run(small_data, tmp_path, "short", **{"train.max_steps": 2, "optim.warmup_steps": 5})
    assert "note: optim.warmup_steps=5 is above train.max_steps=2: the learning rate never reaches" in capsys.readouterr().out
    run(small_data, tmp_path, "wsd", **{"train.max_steps": 4, "optim.warmup_steps": 4, "optim.schedule": "wsd",
                                        "optim.decay_fraction": 0.5})
    assert "note: the WSD decay starts at step 2, before warmup ends at 4" in capsys.readouterr().out
    run(small_data, tmp_path, "fine", **{"train.max_steps": 4, "optim.warmup_steps": 2})
    assert "note:" not in capsys.readouterr().out


def test_accumulation_equals_one_big_micro_batch_and_clipping_holds(small_data, tmp_path, monkeypatch):
    """2 micro-batches of 4 == 1 micro-batch of 8 (same samples, loss and gradient averaged over
    the step, not summed); and the optimizer only ever sees gradients clipped to optim.grad_clip."""
    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    run(small_data, tmp_path, "big", **{"train.micro_batch_size": 8, "train.max_steps": 3})
    norms = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for g in self.param_groups for p in g["params"]])).item())
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    run(small_data, tmp_path, "accum", **{"train.grad_accum_steps": 2, "train.max_steps": 3, "optim.grad_clip": 0.5})
    monkeypatch.undo()
    run(small_data, tmp_path, "accum_noclip", **{"train.grad_accum_steps": 2, "train.max_steps": 1,
                                                 "optim.grad_clip": 0.0})
    big, accum, noclip = rows("big"), rows("accum"), rows("accum_noclip")
    first = lambda r: next(x for x in r if x.get("step") == 1 and "loss" in x)  # noqa: E731
    assert first(accum)["loss"] == pytest.approx(first(big)["loss"], rel=1e-5)
    assert first(noclip)["grad_norm"] == pytest.approx(first(big)["grad_norm"], rel=1e-4)
    assert first(accum)["grad_norm"] > 0.5  # so clipping had work to do
    assert len(norms) == 3 and max(norms) <= 0.5 * (1 + 1e-4)


def test_out_of_memory_names_the_knobs(small_data, tmp_path, monkeypatch):
    from model import Transformer

    real_forward = Transformer.forward

    def oom(self, *args, **kwargs):  # the first training forward runs out (validation at step 0 fits)
        if self.training:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(Transformer, "forward", oom)
    with pytest.raises(ConfigError) as e:
        run(small_data, tmp_path, "oom", **{"train.max_steps": 1})
    message = str(e.value)
    assert message.startswith("out of GPU memory at step 1") and "\n" not in message
    for knob in ("train.micro_batch_size", "train.grad_accum_steps", "train.activation_checkpointing",
                 "train.parallelism=fsdp", "train.seq_len"):
        assert knob in message


# ---------------------------------------------------------------------------------------------
# Muon, batch-size warmup


def test_muon_run_lowers_the_loss_and_resumes_exactly(small_data, tmp_path):
    full = run(small_data, tmp_path, "full", **{"optim.name": "muon"})
    run(small_data, tmp_path, "split", **{"optim.name": "muon", "train.max_steps": 3})
    run(small_data, tmp_path, "split", **{"optim.name": "muon", "train.resume": True})
    a, b = losses(Path(full["run_dir"])), losses(tmp_path / "split")
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and a == b  # bit-for-bit: the momentum buffers came back
    assert losses(Path(full["run_dir"]), "val_loss") == losses(tmp_path / "split", "val_loss")
    assert a[6] < a[1]
    adamw = losses(Path(run(small_data, tmp_path, "adamw")["run_dir"]))
    assert adamw[2] != a[2]  # really another optimizer
    # the optimizer's state cannot change kind on resume
    with pytest.raises(ConfigError, match="optim.name is 'muon' in the checkpoint but 'adamw' now"):
        run(small_data, tmp_path, "split", **{"train.resume": True, "train.max_steps": 8})
    with pytest.raises(ConfigError, match="optim.name is 'adamw' in the checkpoint but 'muon' now"):
        run(small_data, tmp_path, "adamw", **{"optim.name": "muon", "train.resume": True, "train.max_steps": 8})


def test_bad_optimizer_and_ramp_settings_stop_with_one_line(small_data, tmp_path):
    with pytest.raises(ConfigError, match=r"optim.name='lion' is not one of \('adamw', 'muon'\)"):
        load_config(None, ["--optim.name=lion"])
    with pytest.raises(ConfigError, match="a batch ramp needs both train.batch_ramp_start and train.batch_ramp_tokens"):
        load_config(None, ["--train.batch_ramp_start=4"])
    with pytest.raises(ConfigError, match="train.batch_ramp_tokens must be >= 0"):
        load_config(None, ["--train.batch_ramp_start=4", "--train.batch_ramp_tokens=-1"])
    for start in (6, 16, 32):  # not whole micro-batches; not below the global batch of 16
        with pytest.raises(ConfigError, match=rf"train.batch_ramp_start={start} must be a multiple of "
                                              r"train.micro_batch_size x processes = 4 x 1 and below the global batch 16"):
            run(small_data, tmp_path, "ramp", **{"train.global_batch_size": 16, "train.batch_ramp_start": start,
                                                 "train.batch_ramp_tokens": 1000})
    assert not (tmp_path / "ramp").exists()


def test_batch_ramp_grows_the_batch_counts_tokens_and_resumes_mid_ramp(small_data, tmp_path):
    """4 -> 16 sequences over 2048 tokens, micro-batches of 4 (so steps of 4 sequences), lr scaled
    by sqrt(batch / 16): the logged batch sizes follow batch_size_at of the tokens seen, tokens
    add up step by step, the run trains on the tokens of max_steps full batches (in more steps),
    the lr schedule runs on tokens and ends where the unramped one ends, and a run stopped
    mid-ramp resumes into the same figures. (The resume part uses a constant schedule: cosine's
    values depend on max_steps, which the stopped run changes.)"""
    from optim import batch_size_at, lr_at, sqrt_lr_scale
    ramp = {"train.global_batch_size": 16, "train.batch_ramp_start": 4, "train.batch_ramp_tokens": 2048,
            "optim.lr_base_batch": 16, "train.max_steps": 8, "train.ckpt_interval": 4, "train.eval_interval": 4}
    cosine = run(small_data, tmp_path, "cosine", **{**ramp, "optim.schedule": "cosine", "optim.warmup_steps": 2})
    rows = [json.loads(line) for line in (Path(cosine["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["batch_size"] for r in steps] == [4, 4, 4, 8, 8, 12] + [16] * 6  # 12 steps for 8 full batches
    cfg = load_config(None, tiny_overrides(small_data[0], tmp_path, "x", **{**ramp, "optim.schedule": "cosine"}))
    tokens = 0
    for r in steps:
        assert r["batch_size"] == batch_size_at(tokens, 16, 4, 2048, 4)
        position = tokens / (16 * 64)  # full batches seen: the schedule's clock
        assert r["lr"] == pytest.approx(lr_at(position, cfg["optim"], 8) * sqrt_lr_scale(r["batch_size"], 16))
        tokens += r["batch_size"] * 64
        assert r["tokens"] == tokens
    assert cosine["tokens"] == tokens == 136 * 64 and 8 * 16 * 64 <= tokens < 9 * 16 * 64
    assert position == 7.5 and steps[-1]["lr"] == pytest.approx(cfg["optim"].min_lr, rel=0.05)  # decayed

    ramp["optim.schedule"] = "constant"
    full = run(small_data, tmp_path, "ramp", **ramp)
    rows = [json.loads(line) for line in (Path(full["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    run(small_data, tmp_path, "split", **{**ramp, "train.max_steps": 4})  # 8 steps, 72 sequences: mid-ramp
    run(small_data, tmp_path, "split", **{**ramp, "train.resume": True})
    resumed = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    drop = ("tok_per_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rows]

    # a ramped run ends on tokens: resumed with a new shape, it stops once the new budget is reached
    run(small_data, tmp_path, "reshaped", **{**ramp, "train.max_steps": 4})  # 72 sequences x 64 = 4608 tokens
    reshaped = run(small_data, tmp_path, "reshaped", **{**ramp, "train.max_steps": 16, "train.seq_len": 32,
                                                         "train.resume": True})
    budget, full_step = 16 * 16 * 32, 16 * 32
    assert budget <= reshaped["tokens"] < budget + full_step and reshaped["steps"] == 8 + 7


@pytest.mark.slow
def test_muon_under_fsdp_matches_one_process_and_resumes_from_shards(small_data, tmp_path):
    """Muon on FSDP2 shards gathers each matrix for Newton-Schulz and keeps its own shard of the
    update: 2 gloo ranks give the one-process loss curve, and their sharded checkpoint (with the
    momentum buffers) resumes on 1 rank."""
    cfg = small_data[0]
    muon = {"optim.name": "muon"}
    reference = losses(Path(run(small_data, tmp_path, "ref", **{**muon, "train.grad_accum_steps": 2})["run_dir"]))
    torchrun(2, tiny_overrides(cfg, tmp_path, "fsdp", **{**muon, "train.parallelism": "fsdp", "train.max_steps": 3}),
             tmp_path)
    assert len(list((tmp_path / "fsdp" / "ckpt_0000003").glob("*.distcp"))) == 2
    run(small_data, tmp_path, "fsdp", **{**muon, "train.parallelism": "fsdp", "train.resume": True,
                                         "train.grad_accum_steps": 2})
    sharded = losses(tmp_path / "fsdp")
    assert sorted(sharded) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert sharded[step] == pytest.approx(reference[step], abs=1e-5), step


def test_spike_skipper_flags_a_planted_outlier_and_nothing_else():
    import random
    from train import SpikeSkipper
    rng = random.Random(0)
    skipper = SpikeSkipper(sigma=6.0, window=64)
    reasons = []
    for i in range(300):
        loss, norm = 3.0 + rng.gauss(0, 0.05), 1.0 + rng.gauss(0, 0.1)
        if i == 200:
            norm = 4.0  # a bad batch: its gradient is 30 std above the recent ones
        reasons.append(skipper.check(loss, norm))
    assert [i for i, r in enumerate(reasons) if r] == [200] and reasons[200].startswith("grad_norm 4")
    assert skipper.skipped == 1 and 4.0 not in skipper.history["grad_norm"]  # kept out of the history
    assert len(skipper.history["loss"]) == 64
    assert "loss is nan" in skipper.check(float("nan"), 1.0) and "inf" in skipper.check(3.0, float("inf"))
    # a lasting rise is a new level, not a spike: a quarter window is skipped, then training goes on
    shifted = SpikeSkipper(sigma=6.0, window=64)
    for i in range(200):
        shifted.check(3.0 + rng.gauss(0, 0.03), 1.0 + rng.gauss(0, 0.1))
    after = [shifted.check(3.4 + rng.gauss(0, 0.03), 1.0 + rng.gauss(0, 0.1)) for _ in range(300)]
    assert [bool(r) for r in after[:16]] == [True] * 15 + [False] and shifted.level_shifts == 1
    assert not any(after[16:]) and shifted.skipped == 15
    early = SpikeSkipper(sigma=6.0, window=64)
    assert all(early.check(3.0 + 10 * i, 1.0) == "" for i in range(32))  # no judgement before half a window
    assert early.check(1e6, 1.0) != ""


def test_a_planted_bad_batch_is_skipped_and_the_skipping_resumes_exactly(small_data, tmp_path, monkeypatch):
    """PaLM's remedy for loss spikes, online: the step of a planted bad batch (every target one rare
    token) takes no optimizer update; the same run without the plant skips nothing; a run stopped
    and resumed after the spike logs the same rows (the history travels in the checkpoint)."""
    from data import MixtureLoader
    real_next_step = MixtureLoader.next_step
    planted_at = {"step": 0}
    calls = {}

    def next_step(self, micro_batch_size, grad_accum_steps):
        batches = real_next_step(self, micro_batch_size, grad_accum_steps)
        if grad_accum_steps == 2:  # the training loader (validation asks for one micro-batch)
            calls[id(self)] = calls.get(id(self), 0) + 1
            if calls[id(self)] == planted_at["step"]:
                batches = [(x, torch.full_like(y, 7), doc) for x, y, doc in batches]
        return batches
    monkeypatch.setattr(MixtureLoader, "next_step", next_step)
    updates = {"n": 0}
    real_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        updates["n"] += 1
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    args = {"train.max_steps": 30, "train.grad_accum_steps": 2, "train.spike_sigma": 6.0, "train.spike_window": 32,
            "train.eval_interval": 30, "train.ckpt_interval": 24, "optim.lr": 1e-3,
            "optim.schedule": "constant"}  # cosine would depend on the stopped run's max_steps

    def rows(name):
        return [{k: v for k, v in json.loads(line).items() if k not in ("tok_per_s", "mfu")}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    run(small_data, tmp_path, "clean", **args)
    assert updates["n"] == 30 and all(r["skipped_steps"] == 0 for r in rows("clean"))
    planted_at["step"], updates["n"] = 20, 0
    run(small_data, tmp_path, "planted", **args)
    planted = rows("planted")
    assert updates["n"] == 29
    assert [r["skipped_steps"] for r in planted] == [0] * 19 + [1] * 11
    # the plant really is a bad batch: loss up by a nat, gradient norm up fivefold
    assert planted[19]["loss"] > planted[18]["loss"] + 1 and planted[19]["grad_norm"] > 5 * planted[18]["grad_norm"]
    calls.clear()
    run(small_data, tmp_path, "resumed", **{**args, "train.max_steps": 24})
    run(small_data, tmp_path, "resumed", **{**args, "train.resume": True})
    assert rows("resumed") == planted
