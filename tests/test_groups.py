"""Issue 13: one θ at any swarm size. Real peers on 127.0.0.1 whose rounds form several groups (the swarm
is bigger than averaging.target_group_size) end every round with one θ (averaging/stages.py)."""

from __future__ import annotations

import pytest

from p2p_photon.launch import LocalSwarm

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(600)]


# 8 peers with groups of 2 and 4 (and 8: one group) are also scripts/bench_groups.py's runs (bench/results/
# groups.json). Extended (not in the CI suite: ~50-70 s each, and the suite is at its 15 minutes on 2
# cores); the loop counts are in the closing note. Two causes of
# failures were fixed (issue 13's note): joiners at the seeded init outvoting a swarm that trained (a second
# model at round 0), and a straggler alone in stage 1 outlasting the finished peers' linger (it ended on
# the seeded init); the loop counts are in the closing note.
# The stages' arithmetic and the lone-peer case are in tests/test_averaging.py.
@pytest.mark.extended
@pytest.mark.parametrize("peers,group", [(5, 2), (8, 2), (8, 4)], ids=["5x2-not-full", "8x2", "8x4"])
def test_a_swarm_bigger_than_a_group_ends_every_round_with_one_theta(tmp_path, swarm_overrides, peers, group):
    """Every round: every peer that averaged it holds the same θ, and the average spanned more peers than
    one group holds (stage 1 formed several groups). 5 peers in groups of 2: a peer left alone in stage 1
    (min_group_size 2) joins stage 2 as a group of one (the board's window outlasts its stage-1 timeout); a
    group that still misses a round catches up by download; the round's θ is one either way."""
    n = 3
    run = [*swarm_overrides, f"rounds.num_rounds={n}", f"averaging.target_group_size={group}",
           "averaging.matchmaking_time=2.0", "rounds.target_samples_per_round=192", "dht.startup_timeout=120"]
    names = [f"peer{i}" for i in range(peers)]
    with LocalSwarm(tmp_path, overrides=run) as swarm:
        swarm.start_bootstrap()
        procs = [swarm.start_peer(i % 3, name=name) for i, name in enumerate(names)]
        codes = swarm.wait(procs, timeout=500)
        assert codes == [0] * peers, [swarm.tail(p) for p in procs if p.returncode]
    summaries = {name: swarm.summary(name) for name in names}
    assert len({s["theta"] for s in summaries.values()}) == 1, {k: s["theta"] for k, s in summaries.items()}
    ok = {name: {h["round"]: h for h in s["history"] if h["ok"]} for name, s in summaries.items()}
    for r in range(n):
        averaged = [name for name in names if r in ok[name]]
        assert len({ok[name][r]["theta"] for name in averaged}) == 1, f"round {r}: more than one θ"
        assert len(averaged) > group, f"round {r}: only {averaged} averaged it"
        spanned = max(ok[name][r]["group"] for name in averaged)
        assert spanned > group, f"round {r}: the average spanned {spanned} peers, no more than one group"
    # every peer contributed to most rounds (5 in groups of 2: one may be left alone per round)
    contributions = sum(len(v) for v in ok.values())
    assert contributions >= n * (peers - (peers % group)), {k: sorted(v) for k, v in ok.items()}


def test_bench_groups_figures_by_hand():
    """scripts/bench_groups.py's arithmetic on hand-made summaries: per-round θ count, spanned peers, the
    round time from the median end times, and the repeat means it compares with the one-group runs."""
    import math
    import sys

    from tests.helpers import REPO_ROOT

    sys.path.insert(0, f"{REPO_ROOT}/scripts")
    import bench_groups as bg

    def hist(r, theta, t, ok=True):
        return dict(round=r, ok=ok, theta=theta, time=t, group=3, allreduce_s=1.0 + r, sent=100 * (r + 1))

    summaries = {
        "a": dict(history=[hist(0, "x", 10.0), hist(1, "y", 20.0)], theta="y", final_loss=math.log(100.0),
                  failed_rounds=0, global_step=5, total_samples=40, num_params=7),
        "b": dict(history=[hist(0, "x", 12.0), hist(1, "z", 24.0, ok=False), hist(1, "y", 26.0)], theta="y",
                  final_loss=math.log(400.0), failed_rounds=1, global_step=6, total_samples=48, num_params=7),
    }
    f = bg.figures(summaries, 2)
    assert [x["distinct_theta"] for x in f["per_round"]] == [1, 1] and f["one_theta_every_round"]
    assert f["per_round"][1]["peers_averaged"] == 2 and f["per_round"][1]["sent_max"] == 200
    # median end times (upper median of 2): round 0 at 12, round 1 at 26 -> 14 s
    assert f["round_s"] == 14.0 and f["failed_rounds"] == 1 and f["total_samples"] == 48
    assert f["final_ppl"] == pytest.approx(200.0)  # exp(median(log 100, log 400)) = sqrt(100 * 400)
    summaries["b"]["history"][2]["theta"] = "w"
    assert not bg.figures(summaries, 2)["one_theta_every_round"]

    runs = [dict(target_group_size=8, final_ppl=100.0), dict(target_group_size=8, final_ppl=110.0),
            dict(target_group_size=2, final_ppl=105.0), dict(target_group_size=2, final_ppl=115.0)]
    by = bg.ppl_by_group(runs, 8)
    assert by["one_group_mean"] == 105.0
    assert by["groups"][8]["spread"] == pytest.approx(10 / 105) and by["groups"][8]["vs_one_group"] == 0.0
    assert by["groups"][2]["mean"] == 110.0 and by["groups"][2]["vs_one_group"] == pytest.approx(110 / 105 - 1)


@pytest.mark.extended
def test_a_cohort_waits_for_its_last_peer_and_averages_round_0_together(tmp_path, swarm_overrides):
    """rounds.start_peers = 3: the first two peers are on the DHT and wait (without training) while the third
    is not started yet; once it is, all three average round 0 in one group. (Without the setting the two
    average round 0 as a pair and the third joins at a later round.)"""
    import time

    run = [*swarm_overrides, "rounds.num_rounds=2", "rounds.start_peers=3", "dht.startup_timeout=120"]
    with LocalSwarm(tmp_path, overrides=run) as swarm:
        swarm.start_bootstrap()
        first = [swarm.start_peer(i, name=f"peer{i}") for i in range(2)]
        deadline = time.monotonic() + 240
        while not all("waiting for peers before round 0" in p.log.read_text() for p in first):
            assert time.monotonic() < deadline and all(p.alive() for p in first), [swarm.tail(p) for p in first]
            time.sleep(0.5)
        time.sleep(5)  # they keep waiting: nothing trained, nothing averaged
        assert not any("round 0 |" in p.log.read_text() for p in first), [swarm.tail(p) for p in first]
        procs = [*first, swarm.start_peer(2, name="peer2")]
        codes = swarm.wait(procs, timeout=400)
        assert codes == [0] * 3, [swarm.tail(p) for p in procs if p.returncode]
    summaries = {f"peer{i}": swarm.summary(f"peer{i}") for i in range(3)}
    first_round = {n: next(h for h in s["history"] if h["ok"]) for n, s in summaries.items()}
    assert {n: (h["round"], h["group"]) for n, h in first_round.items()} == {n: (0, 3) for n in summaries}
    assert len({h["theta"] for h in first_round.values()}) == 1
