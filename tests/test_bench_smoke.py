"""Smoke runs of the benchmark scripts in a tiny mode: they finish and write JSON with sane figures.

The figures themselves are not asserted against targets (benchmarks are not timed tests); see
bench/results/ for the committed full runs.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PYTHON, REPO_ROOT, python_env


def run_script(name: str, *args: str, timeout: float) -> None:
    proc = subprocess.run([PYTHON, f"scripts/{name}", *args], cwd=REPO_ROOT, env=python_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")


@pytest.mark.timeout(120)
def test_bench_overhead_writes_ratio_and_optimizer_state(tmp_path):
    out = tmp_path / "overhead.json"
    run_script("bench_overhead.py", "--repeats", "2", "--steps", "3", "--warmup", "1", "--batch", "2",
               "--seq-len", "32", "--out", str(out), timeout=100)
    r = json.loads(out.read_text())
    for key in ("ratio", "ours_steps_per_s", "bare_steps_per_s", "optimizer_state_bytes_8bit",
                "optimizer_state_bytes_fp32", "optimizer_state_ratio", "machine", "config", "command"):
        assert key in r, key
    assert r["ours_steps_per_s"] > 0 and r["bare_steps_per_s"] > 0 and r["ratio"] > 0
    assert 0 < r["optimizer_state_bytes_8bit"] < r["optimizer_state_bytes_fp32"]
    assert r["optimizer_state_ratio"] < 0.5  # 1 byte vs 4 per moment, plus block scales
    assert len(r["repeats"]["ours_steps_per_s"]) == 2
    assert {"torch", "threads", "device"} <= set(r["machine"])
    assert {"preset", "batch", "seq_len"} <= set(r["config"])


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_bench_allreduce_quick_writes_throughput(tmp_path):
    out = tmp_path / "allreduce.json"
    run_script("bench_allreduce.py", "--quick", "--sizes", "1e5", "--peers", "2", "--rounds", "1",
               "--tcp-mb", "32", "--out", str(out), timeout=100)
    r = json.loads(out.read_text())
    assert r["tcp_MBps"] > 0
    assert r["p2pd_leaked"] == []
    [run] = r["runs"]
    assert run["params"] == 100_000 and run["peers"] == 2
    # 2(n-1)/n of the fp32 vector for n = 2, measured on the wire: protobuf framing adds well under 1%
    assert 100_000 * 4 <= run["bytes_sent_per_peer"] <= 100_000 * 4 * 1.01
    assert run["throughput_MBps"] > 0 and run["ratio_to_tcp"] > 0
    assert 0 < run["allreduce_s"] <= run["total_s"] and run["matchmaking_s"] >= 0
    assert {"machine", "command", "config"} <= set(r)


@pytest.mark.timeout(60)
def test_bench_reaper_writes_its_cpu_share(tmp_path):
    out = tmp_path / "reaper.json"
    run_script("bench_reaper.py", "--seconds", "1", "--settle", "1", "--children", "2", "--out", str(out),
               timeout=50)
    r = json.loads(out.read_text())
    assert r["cpu_percent"] >= 0 and r["window_s"] >= 1 and r["rss_mb"] > 0 and r["followed"] == 2
    assert {"machine", "command", "poll_interval_s"} <= set(r)


@pytest.mark.timeout(120)
def test_bench_data_writes_cold_and_cache_hit_times(tmp_path):
    out = tmp_path / "data.json"
    run_script("bench_data.py", "--max-corpus-mb", "0.3", "--vocab-size", "512", "--hits", "2",
               "--out", str(out), timeout=100)
    r = json.loads(out.read_text())
    assert r["cold_s"] > 0 and len(r["cache_hits_s"]) == 2 and r["tokens"] > 0
    assert {"machine", "command", "cache_hit_s"} <= set(r)


@pytest.mark.timeout(100)
def test_bench_gpu_on_the_cpu_writes_rows_with_8bit_state(tmp_path):
    """The GPU benchmark's own code path, run on the CPU (CUDA figures: bench/results/gpu.json, from a GPU;
    the ranks' DDP/FSDP2 path is tested in tests/test_ranks.py)."""
    out = tmp_path / "gpu.json"
    run_script("bench_gpu.py", "--device", "cpu", "--presets", "nano", "--optimizers", "adamw8bit", "--ranks", "",
               "--precision", "fp32", "--seq-len", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
               "--out", str(out), timeout=90)
    r = json.loads(out.read_text())
    assert {"device", "versions", "runs", "command"} <= set(r)
    [row] = r["runs"]
    assert (row["optimizer"], row["parallel"], row["ranks"]) == ("adamw8bit", "none", 1)
    assert row["tokens_per_s"] > 0 and row["peak_mb"] > 0 and row["params"] > 0
    # AdamW8bit: two uint8 moments per parameter plus an fp32 scale per 256-value block (AdamW: 8 bytes)
    assert 2.0 <= row["optimizer_state_mb"] * 2**20 / row["params"] <= 2.2
    assert row["loss_last"] < row["loss_first"] + 0.5 and row["model_tflops"] > 0
