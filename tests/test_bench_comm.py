"""benchmarks/bench_comm.py: the bus-bandwidth formulas of nccl-tests, and every collective it times
giving the right values on 2 gloo processes (the same code measures NCCL on GPUs)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_comm import bus_factor  # noqa: E402


def test_bus_bandwidth_factors_are_nccl_tests():
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)  # a ring sends each byte 2(n-1)/n times
    assert bus_factor("reduce_scatter", 8) == bus_factor("all_gather", 8) == pytest.approx(7 / 8)
    assert bus_factor("all_reduce", 2) == 1.0 and bus_factor("all_gather", 2) == 0.5


@pytest.mark.slow
def test_two_gloo_processes_time_every_collective_and_check_its_values(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "benchmarks" / "bench_comm.py"), "--device", "cpu", "--min-mb", "0.25",
                          "--max-mb", "1", "--warmup", "1", "--iters", "2", "--out", str(tmp_path / "comm.json")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "comm.json").read_text())
    assert result["world"] == 2
    assert [(r["op"], r["bytes"]) for r in result["rows"]] == [
        (op, size) for op in ("all_reduce", "reduce_scatter", "all_gather") for size in (2 ** 18, 2 ** 20)]
    for r in result["rows"]:
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * bus_factor(r["op"], 2))
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
