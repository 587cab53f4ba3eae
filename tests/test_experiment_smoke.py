"""scripts/experiment_photon.py: smoke run of --quick (centralized and Photon with overlapped rounds; the other
federated runs share that code path, and the blocking one runs in every swarm test): they finish and write a
complete JSON and a PNG.

The figures are not asserted against the papers' claims (a 2-round run shows nothing); the committed
full runs are bench/results/photon.json and photon_scale.json.

The scale sweep (--scale, issue 17): its LR-sweep logic (edge extension, best LR, failed runs, the
per-size summary, resuming) against hand-computed answers with fake runs, and a --quick --scale smoke run
that is then resumed without training again.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import PYTHON, REPO_ROOT, python_env

sys.path.insert(0, str(Path(REPO_ROOT) / "scripts"))  # the script imports benchlib as a sibling
import experiment_photon as E  # noqa: E402

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


# ----------------------------------------------------------------------------- the scale sweep's logic


def fake_run(ppl: float, tokens: int = 1000, curve=None) -> dict:
    return dict(final_ppl=ppl, ppl_at_budget=ppl, tokens=tokens, wall_s=1.0,
                curve=curve or [[0, 1000.0], [tokens // 2, 2 * ppl], [tokens, ppl]])


def bowl(best: float):
    """ppl as a function of LR with its minimum at `best` (symmetric in log LR)."""
    return lambda lr: 100.0 * (1 + abs(math.log2(lr / best)))


@pytest.mark.parametrize(("best", "expected_extra"), [
    (4e-3, []),                     # inside the grid: no extension
    (1.6e-2, [1.6e-2, 3.2e-2]),     # above: x2 until the best is inside (1.6e-2 then 3.2e-2 is worse)
    (2.5e-4, [5e-4, 2.5e-4]),       # below, capped at 2 extensions although the best is still at the edge
])
def test_lr_sweep_extends_past_an_edge(best, expected_extra):
    grid = (1e-3, 2e-3, 4e-3, 8e-3)
    ran = []

    def run_one(lr):
        ran.append(lr)
        return fake_run(bowl(best)(lr))

    done = E.lr_sweep(grid, {}, run_one, max_extensions=2)
    assert ran == [*grid, *expected_extra]
    assert set(done) == set(ran)
    assert E.best_lr(done) == min(ran, key=bowl(best))


def test_lr_sweep_skips_finished_runs_and_never_extends_with_zero():
    done = {1e-3: fake_run(50.0)}
    ran = []
    E.lr_sweep((1e-3, 2e-3), done, lambda lr: ran.append(lr) or fake_run(60.0), max_extensions=0)
    assert ran == [2e-3]  # 1e-3 was finished; its best sits at the low edge but extensions are 0


def test_failed_and_diverged_runs_never_win():
    done = {1e-3: fake_run(80.0), 2e-3: dict(error="RuntimeError: boom"), 4e-3: fake_run(float("nan"))}
    assert E.score(done[2e-3]) == math.inf and E.score(done[4e-3]) == math.inf
    assert E.best_lr(done) == 1e-3
    # the best (1e-3) sits at the low edge of what ran: extend below; an all-failed sweep goes lower too
    assert E.edge_extension({k: E.score(v) for k, v in done.items()}, (1e-3, 2e-3, 4e-3), 2) == 5e-4
    assert E.edge_extension({1e-3: math.inf, 2e-3: math.inf}, (1e-3, 2e-3), 2) == 5e-4
    assert E.best_lr({1e-3: dict(error="x")}) is None


def scale_plan(tokens: int = 1000) -> E.Plan:
    args = E.parse_args(["--scale", "--quick"])
    plan = E.size_plan(args, "nano", E.QUICK_SCALE["nano"])
    plan.rounds = 1
    plan.local_steps = tokens // (plan.peers * plan.batch * plan.seq_len)
    assert plan.tokens == tokens
    return plan


def test_summarize_size_ratio_target_and_curves():
    plan = scale_plan(tokens=2048)
    runs = {"nano/central/0.001": fake_run(120.0, 2048), "nano/central/0.002": fake_run(100.0, 2048),
            "nano/central/0.004": fake_run(130.0, 2048),
            "nano/photon_noniid/0.002": fake_run(90.0, 2048), "nano/photon_noniid/0.004": fake_run(80.0, 2048),
            "nano/photon_noniid/0.008": dict(error="TimeoutError"), "tiny/central/0.002": fake_run(5.0, 2048)}
    s = E.summarize_size("nano", plan, 123, runs)
    assert s["best_central"]["lr"] == 0.002 and s["best_photon"]["lr"] == 0.004
    assert s["ratio_photon_to_central"] == pytest.approx(0.8)
    assert s["target_ppl"] == pytest.approx(110.0)  # 1.1 x the worse best (centralized 100)
    # curve [0, 1000], [1024, 200], [2048, 100]: 110 is crossed between 1024 and 2048, log-linearly
    assert s["best_central"]["tokens_to_target"] == pytest.approx(1024 + 1024 * math.log(200 / 110) / math.log(2))
    assert s["robustness"]["central"]["curve"] == [[0.001, 120.0], [0.002, 100.0], [0.004, 130.0]]
    assert s["robustness"]["central"]["lrs_within_10pct"] == [0.002] and not s["robustness"]["central"]["best_at_edge"]
    assert s["robustness"]["photon_noniid"]["curve"][-1] == [0.008, None]
    assert s["robustness"]["photon_noniid"]["best_at_edge"] is False  # 0.004 is inside 0.002 .. 0.008
    assert s["best_diloco"] is None and "diloco_noniid" not in s["robustness"]
    assert E.scale_verdict({"nano": s, "tiny": dict(s, ratio_photon_to_central=0.9)})["shrinks"] is False
    assert E.scale_verdict({"nano": s, "tiny": dict(s, ratio_photon_to_central=0.7)})["shrinks"] is True


def test_resume_keeps_only_finished_runs_of_an_identically_planned_size(tmp_path):
    out = tmp_path / "scale.json"
    plans = {"nano": {"tokens": 1}, "tiny": {"tokens": 2}}
    out.write_text(json.dumps(dict(sizes={"nano": {"tokens": 1}, "tiny": {"tokens": 3}}, runs={
        "nano/central/0.001": fake_run(10.0), "nano/central/0.002": dict(error="boom"),
        "tiny/central/0.001": fake_run(10.0)})))
    assert set(E.load_previous(out, plans)) == {"nano/central/0.001"}
    assert E.load_previous(tmp_path / "missing.json", plans) == {}


@pytest.mark.swarm
@pytest.mark.extended  # 28 s; the suite is at its 15 minutes on 2 cores: the script's runs are smoke-tested above
@pytest.mark.timeout(420)  # (test_experiment_quick_writes_every_run) and the sweep logic by hand (the tests above)
def test_scale_quick_runs_both_sweeps_and_resumes(tmp_path):
    """Two centralized LRs and one Photon swarm run (kept short), then a resume that trains nothing."""
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    cmd = [PYTHON, "scripts/experiment_photon.py", "--scale", "--quick", "--no-diloco", "--out", str(out),
           "--png", str(png), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    r = json.loads(out.read_text())
    spec = E.QUICK_SCALE["nano"]
    grid = spec.central_lrs
    assert r["complete"] and r["p2pd_leaked"] == [] and r["mode"] == "scale-quick" and r["missing_runs"] == []
    assert set(r["runs"]) == {f"nano/central/{lr:g}" for lr in grid} | {
        f"nano/photon_noniid/{lr:g}" for lr in spec.photon_lrs}
    for key, run in r["runs"].items():
        assert run["final_ppl"] < run["curve"][0][1], key  # it learned something
        assert run["ppl_at_budget"] is not None and run["other_cores"] >= 0, key
        if "photon" in key:
            assert run["theta_identical"] and run["rounds"] == 2, key
    s = r["summary"]["nano"]
    c, p = s["best_central"], s["best_photon"]
    assert s["ratio_photon_to_central"] == pytest.approx(p["ppl_at_budget"] / c["ppl_at_budget"])
    assert c["ppl_at_budget"] == min(r["runs"][f"nano/central/{lr:g}"]["ppl_at_budget"] for lr in grid)
    assert c["tokens_to_target"] is not None and p["tokens_to_target"] is not None
    with Image.open(png) as img:
        img.verify()
    # a second invocation finds every run finished and trains nothing
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"{len(r['runs'])} finished runs" in again.stdout and " ...\n" not in again.stdout
    assert json.loads(out.read_text())["runs"] == r["runs"]
