"""Smoke run of scripts/bench_tokenize.py (the full 1 GB run writes bench/results/tokenize.json)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PYTHON, REPO_ROOT, python_env


@pytest.mark.timeout(300)
def test_bench_tokenize_smoke_run_writes_its_figures(tmp_path):
    out = tmp_path / "tokenize.json"
    r = subprocess.run([PYTHON, f"{REPO_ROOT}/scripts/bench_tokenize.py", "--mb", "2", "--out", str(out),
                        "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=python_env(),
                       timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ours"]["tokens"] == res["tokenizers_batch"]["tokens"] + 2  # an EOS after each of the 2 files
    assert res["ours"]["mb_per_s"] > 0 and 0 < res["ours"]["peak_rss_mb"] < 1024 and res["ratio"] > 0
    assert not (tmp_path / "work").exists()  # the generated corpus is removed
