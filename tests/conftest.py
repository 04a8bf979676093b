"""Shared fixtures: a small tokenizer and shards built once per test session (about 15 s)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import DataConfig, prepare_data  # noqa: E402

TEST_VOCAB = 512


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """(DataConfig, tiktoken Encoding) for a 512-token tokenizer over 120 documents per source."""
    d = tmp_path_factory.mktemp("data")
    cfg = DataConfig(dir=str(d), max_docs=120, tokenizer_train_bytes=150_000, num_workers=1, val_fraction=0.1)
    enc = prepare_data(cfg, TEST_VOCAB, log=lambda *a: None)
    return cfg, enc


def tiny_overrides(data_cfg, out_dir, name, **extra):
    """Command-line overrides for a seconds-long CPU run on the session's small data."""
    args = {
        "model.vocab_size": TEST_VOCAB, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.d_ff": 128, "model.max_seq_len": 64,
        "data.dir": data_cfg.dir, "data.max_docs": data_cfg.max_docs, "data.val_fraction": data_cfg.val_fraction,
        "data.tokenizer_train_bytes": data_cfg.tokenizer_train_bytes, "data.num_workers": 1,
        "train.seq_len": 64, "train.micro_batch_size": 4, "train.max_steps": 6, "train.eval_interval": 3,
        "train.eval_batches": 2, "train.log_interval": 1, "train.ckpt_interval": 3, "train.sample_tokens": 0,
        "train.out_dir": str(out_dir), "train.name": name, "train.threads": 1, "optim.warmup_steps": 2,
    }
    args.update(extra)
    return [f"--{k}={_toml(v)}" for k, v in args.items()]


def torchrun(n: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """train.py under torchrun with n CPU (gloo) processes; fails the test with both output tails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                          str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-3000:]
    return out


def _toml(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)
