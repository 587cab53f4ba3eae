"""Smoke run of scripts/bench_comm.py --quick: none, int8 and int8_block3 finish and write a complete JSON and a PNG.

Only relations that hold by construction are asserted (int8 sends fewer bytes than fp32, block cycling
sends one parameter group per round instead of all of them); perplexities of a 2-round run are only
checked to be finite. The committed full run is bench/results/comm.json.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import PYTHON, REPO_ROOT, python_env

RUNS = ("int8", "int8_block3")  # the uncompressed run is the same code path with another codec
RUN_KEYS = {"name", "compression", "block_cycle", "reduction_vs_ddp", "bytes_sent_per_peer", "bytes_per_token",
            "tokens_per_peer", "ppl", "optimizer_state_bytes", "wall_s", "rounds", "failed_rounds"}
SETUP_KEYS = {"preset", "peers", "batch", "seq_len", "target_samples_per_round", "rounds", "num_params", "command"}


@pytest.mark.swarm
@pytest.mark.timeout(420)  # 2 runs of 2 peer processes; process start-up dominates on 2 busy cores
def test_bench_comm_quick_writes_every_setting(tmp_path):
    out, png = tmp_path / "comm.json", tmp_path / "comm.png"
    committed = Path(REPO_ROOT) / "bench" / "results" / "comm.json"
    stamp = lambda: committed.stat().st_mtime_ns if committed.exists() else None  # noqa: E731
    before = stamp()
    # 2 peers (the script's default is 3): the relations below hold for any N, and a third peer process per run
    # cost the suite ~20 s on 2 cores
    proc = subprocess.run([PYTHON, "scripts/bench_comm.py", "--quick", "--peers", "2", "--only", ",".join(RUNS),
                           "--out", str(out),
                           "--png", str(png), "--workdir", str(tmp_path / "work")],
                          cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    r = json.loads(out.read_text())
    assert r["mode"] == "quick" and r["complete"] and r["p2pd_leaked"] == []
    assert SETUP_KEYS <= set(r["setup"]) and r["setup"]["rounds"] == 2 and r["setup"]["num_params"] > 0
    runs = {run["name"]: run for run in r["runs"]}
    assert list(runs) == list(RUNS)
    for name, run in runs.items():
        assert "error" not in run and "warning" not in run, (name, run.get("error") or run.get("warning"))
        assert RUN_KEYS <= set(run), (name, RUN_KEYS - set(run))
        assert run["reduction_vs_ddp"] > 0 and run["bytes_per_token"] > 0 and run["bytes_sent_per_peer"] > 0, name
        assert run["tokens_per_peer"] > 0 and run["wall_s"] > 0 and run["rounds"] == 2, name
        assert math.isfinite(run["ppl"]) and run["ppl"] > 0 and run["theta_identical"], name
        assert run["optimizer_state_bytes"] is None or run["optimizer_state_bytes"] > 0, name
    # by construction: int8 sends ~1 byte per value each way (fp32 would be 2 (N-1)/N x 4 x P per round),
    # block cycling one group of the parameters per round
    n, p = r["setup"]["peers"], r["setup"]["num_params"]
    fp32_per_round = 2 * (n - 1) / n * 4 * p
    per_round = {name: run["bytes_sent_per_peer"] / run["rounds"] for name, run in runs.items()}
    assert 0.2 * fp32_per_round < per_round["int8"] < 0.3 * fp32_per_round, (per_round, fp32_per_round)
    assert per_round["int8_block3"] < per_round["int8"]
    assert runs["int8_block3"]["reduction_vs_ddp"] > runs["int8"]["reduction_vs_ddp"]
    d = r["default"]
    assert d["name"] == "int8" and d["reduction_vs_ddp"] == runs["int8"]["reduction_vs_ddp"]
    assert d["ppl"] == runs["int8"]["ppl"] and d["ppl_uncompressed"] is None  # no uncompressed run here
    assert stamp() == before  # a quick run never touches the committed full results
    with Image.open(png) as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 100
