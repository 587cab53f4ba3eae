"""Issue 15: the round model of scripts/project_scale.py against hand-computed values, and the time-to-
target arithmetic of scripts/wan_photon.py; the script end to end on the committed measurements."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PYTHON, REPO_ROOT, python_env

sys.path.insert(0, str(Path(REPO_ROOT) / "scripts"))
import project_scale as ps  # noqa: E402
import wan_photon  # noqa: E402

POINTS = [(100.0, 0.9), (1000.0, 0.75)]


def test_fill_is_interpolated_in_log_rate_and_flat_outside():
    assert ps.fill_at(10, POINTS) == 0.9 and ps.fill_at(10_000, POINTS) == 0.75
    assert ps.fill_at(math.sqrt(100 * 1000), POINTS) == pytest.approx(0.825)


def test_transfer_time_of_full_members_and_clients_by_hand():
    size = 10e6  # bytes of one peer's Δ on the wire
    two = [dict(up=100.0, down=100.0, client=False)] * 2
    # a member of two sends half its Δ to the other owner and the average of its half back: S up, S down
    assert ps.transfer_s(two, size, POINTS) == pytest.approx(size * 8 / 1e6 / (100 * 0.9))
    # 4 members, 2 owners (one on 1 Gbit, one on 100), 2 clients (100/20 and 10): a client sends S and
    # receives S at once (owners stream its results); the 10 Mbit client is the slowest: 10 MB at 10 x 0.9
    mixed = [dict(up=1000.0, down=1000.0, client=False), dict(up=100.0, down=100.0, client=False),
             dict(up=100.0, down=20.0, client=True), dict(up=10.0, down=10.0, client=True)]
    assert ps.transfer_s(mixed, size, POINTS) == pytest.approx(size * 8 / 1e6 / (10 * 0.9))
    # the 100/20 client alone with the owners: its 20 Mbit downlink (10 MB at 20 x 0.9) sets the time
    assert ps.transfer_s(mixed[:3], size, POINTS) == pytest.approx(size * 8 / 1e6 / (20 * 0.9))
    # the owner on 100 Mbit: parts (k-1)/k S to the other owner + results (g-1)/k S = 2 S = 20 MB
    assert ps.transfer_s(mixed[:2] + [dict(up=1000.0, down=1000.0, client=True)] * 2, size, POINTS) == \
        pytest.approx(2 * size * 8 / 1e6 / (100 * 0.9))
    # latency: 2 streams of a 4 MiB window at 200 ms carry at most 2 x 4 MiB x 8 / 0.2 s = 335.5 Mbit/s
    fast = [dict(up=10_000.0, down=10_000.0, client=False)] * 3
    cap = 2 * ps.TCP_WINDOW * 8 / 1e6 / 0.2
    assert ps.transfer_s(fast, size, POINTS, rtt_s=0.2) == pytest.approx(4 / 3 * size * 8 / 1e6 / (cap * 0.75))


def test_params_of_a_preset_by_hand():
    # 125m: 32000 x 768 tied embeddings + 12 blocks of (4 d^2 + 3 d ff + 2 d) + the final norm
    assert ps.params_of("125m") == 32000 * 768 + 12 * (4 * 768**2 + 3 * 768 * 2560 + 2 * 768) + 768


def _cal(a=1.0, b=0.0):
    return dict(fill_points=POINTS, codec_params_per_s=1e8, overhead_a_s=a, overhead_b_s_per_param=b)


def test_one_group_round_without_and_with_overlap_by_hand():
    p = ps.params_of("125m")
    r = ps.project(_cal(), peers=8, link=100, rtt_ms=0, model="125m", codec="none", overlap=False, local_steps=10)
    step = 6 * p * ps.SEQ_LEN * ps.LOCAL_BATCH / (ps.HARDWARE["125m"][1] * ps.MFU)
    transfer = 2 * 7 / 8 * 4 * p * 8 / 1e6 / (100 * 0.9)
    assert r["groups"] == 1 and r["stage2_s"] == 0
    assert r["compute_s"] == pytest.approx(10 * step)
    assert r["comm_s"] == pytest.approx(1.0 + transfer)
    assert r["round_s"] == pytest.approx(10 * step + 1.0 + transfer)
    o = ps.project(_cal(), peers=8, link=100, rtt_ms=0, model="125m", codec="none", overlap=True, local_steps=10)
    assert o["round_s"] == pytest.approx(max(10 * step, 1.0 + transfer))
    assert o["utilization"] > r["utilization"]


def test_clients_in_a_group_send_their_whole_delta_and_slow_the_stage_by_hand():
    p = ps.params_of("125m")
    r = ps.project(_cal(), peers=4, link=100, rtt_ms=0, model="125m", codec="none", overlap=False, local_steps=10,
                   clients=2, cores=1)
    # 2 owners, 2 clients: an owner sends (1/2 + 3/2) S = 2 S each way (a client S): the owners set the time
    size = 4 * p
    assert (r["clients"], r["sent_per_peer_mb"]) == (2, pytest.approx(2 * size / 1e6))
    assert r["comm_s"] == pytest.approx(1.0 + 2 * size * 8 / 1e6 / (100 * 0.9))
    # at least one member of a group owns a slice
    assert ps.project(_cal(), peers=4, link=100, rtt_ms=0, model="125m", codec="none", overlap=False,
                      clients=9)["clients"] == 3


def test_more_peers_than_a_group_add_stages_two_and_three():
    one = ps.project(_cal(), peers=64, link=100, rtt_ms=50, model="125m", codec="int8", overlap=False)
    three = ps.project(_cal(), peers=1000, link=100, rtt_ms=50, model="125m", codec="int8", overlap=False)
    assert (one["stages"], three["stages"], three["groups"]) == (1, 3, 16)
    assert three["stage2_s"] > 0 and three["stage3_s"] > 0 and three["round_s"] > one["round_s"]
    assert three["sent_per_peer_mb"] > one["sent_per_peer_mb"]


def test_time_to_target_interpolates_in_log_perplexity():
    curve = [dict(seconds=0.0, ppl=1000.0), dict(seconds=10.0, ppl=100.0), dict(seconds=30.0, ppl=10.0)]
    assert wan_photon.time_to(curve, 100.0) == 10.0
    assert wan_photon.time_to(curve, math.sqrt(1000 * 100)) == pytest.approx(5.0)  # halfway in log-ppl
    assert wan_photon.time_to(curve, math.sqrt(10)) is None


def test_photon_curve_from_summaries():
    hist = lambda t, loss: [dict(ok=True, round=0, time=t + 10, wall_s=8, allreduce_s=2, tokens=100, sent=5,  # noqa: E731
                                 eval_loss=loss), dict(ok=True, round=1, time=t + 20, wall_s=8, allreduce_s=2,
                                                       tokens=50, sent=7, eval_loss=loss and loss - 1)]
    summaries = {"a": dict(initial_loss=5.0, history=hist(100.0, 4.0)), "b": dict(history=hist(101.0, None))}
    curve, sent = wan_photon.photon_curve(summaries)
    assert [(c["seconds"], c["tokens"]) for c in curve] == [(0.0, 0), (10.0, 200), (20.0, 300)]
    assert [c["ppl"] for c in curve] == pytest.approx([math.exp(5), math.exp(4), math.exp(3)])
    assert sent == 7


@pytest.mark.skipif(not (Path(REPO_ROOT) / "bench/results/wan.json").exists(), reason="no wan.json")
def test_the_script_checks_itself_against_the_measured_wan(tmp_path):
    out = tmp_path / "proj.json"
    r = subprocess.run([PYTHON, str(Path(REPO_ROOT) / "scripts" / "project_scale.py"), "--out", str(out)],
                       capture_output=True, text=True, env=python_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    validation = [c for c in res["checks"] if c["role"] == "validation"]
    assert validation and all(abs(c["error"]) <= 0.2 for c in validation) and res["within_20pct"]
    assert {c["source"] for c in validation} >= {"wan.json"}
    assert len(res["grid"]) == math.prod(len(v) for v in ps.GRID.values())
    row = next(g for g in res["grid"] if (g["model"], g["peers"], g["link_mbit"], g["codec"]) == ("7b", 1000, 10, "none"))
    assert row["utilization"] < 0.5  # 7b fp32 over 10 Mbit cannot hide its communication


def test_the_ddp_baseline_trains_two_gloo_ranks_on_loopback(tmp_path, swarm_overrides):
    """wan_photon's synchronous baseline without namespaces: 2 gloo ranks, DDP, stops at its token budget."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(python_env(), WAN_PHOTON_OVERRIDES=json.dumps([*swarm_overrides, "model.preset=nano"]),
               GLOO_SOCKET_IFNAME="lo")
    out = tmp_path / "ddp.json"
    procs = [subprocess.Popen([PYTHON, str(Path(REPO_ROOT) / "scripts" / "wan_photon.py"), "--ddp-rank", str(r),
                               "--ddp-world", "2", "--ddp-master", f"127.0.0.1:{port}", "--ddp-target", "0",
                               "--ddp-tokens", "4096", "--ddp-out", str(out), "--eval-every", "2",
                               "--ddp-max-s", "600"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    res = json.loads(out.read_text())
    # 8 rows x 64 tokens per rank and step, 2 ranks: the budget of 4096 tokens is reached after 4 steps
    assert (res["steps"], res["tokens"]) == (4, 4096)
    assert [c["step"] for c in res["curve"]] == [0, 2, 4]
    assert all(math.isfinite(c["ppl"]) for c in res["curve"])
    assert res["curve"][1]["seconds"] < res["curve"][2]["seconds"] == pytest.approx(res["train_s"])
