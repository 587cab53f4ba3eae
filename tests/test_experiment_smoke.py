"""Smoke run of scripts/experiment_photon.py --quick (centralized and Photon with overlapped rounds; the other
federated runs share that code path, and the blocking one runs in every swarm test): they finish and write a
complete JSON and a PNG.

The figures are not asserted against the papers' claims (a 2-round run shows nothing); the committed
full run is bench/results/photon.json.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import PYTHON, REPO_ROOT, python_env

RUNS = ("centralized", "photon_noniid_overlap")


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_experiment_quick_writes_every_run(tmp_path):
    out, png = tmp_path / "photon.json", tmp_path / "photon.png"
    committed = Path(REPO_ROOT) / "bench" / "results" / "photon.json"
    stamp = lambda: committed.stat().st_mtime_ns if committed.exists() else None  # noqa: E731
    before = stamp()
    proc = subprocess.run([PYTHON, "scripts/experiment_photon.py", "--quick", "--runs", *RUNS, "--out", str(out),
                           "--png", str(png),
                           "--workdir", str(tmp_path / "work")],
                          cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    r = json.loads(out.read_text())
    assert r["mode"] == "quick" and r["complete"] and r["p2pd_leaked"] == []
    assert {"config", "command", "machine", "target_ppl"} <= set(r)
    assert set(r["runs"]) == set(RUNS)
    target = r["target_ppl"]
    assert math.isfinite(target) and target > 0
    for name, run in r["runs"].items():
        assert "error" not in run, (name, run.get("error"))
        assert math.isfinite(run["final_ppl"]) and run["final_ppl"] > 0, name
        assert run["tokens"] > 0 and run["wall_s"] > 0, name
        assert len(run["curve"]) >= 2 and all(t >= 0 and p > 0 for t, p in run["curve"]), name
        assert run["curve"][-1][0] == run["tokens"], name
        assert run["final_ppl"] < run["curve"][0][1], name  # it learned something
        assert run["tokens_to_target"] is not None and 0 <= run["tokens_to_target"] <= run["tokens"], name
        if name == "centralized":
            assert len(run["lr_sweep"]) == 3 and run["lr"] in [s["lr"] for s in run["lr_sweep"]]
            continue
        assert run["bytes_sent_per_peer"] > 0 and run["rounds"] == 2 and run["theta_identical"], name
        # averaged tokens = global step x batch x seq_len (a round failed on one side only could break it)
        assert run["tokens"] == run["tokens_check"] or run["failed_rounds"] > 0, name
        assert 0 < run["utilization"] <= 1 and run["allreduce_s_mean"] > 0, name
        assert run["comm_reduction"] > 1, name
    assert stamp() == before  # a quick run never touches the committed full results
    with Image.open(png) as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 100
