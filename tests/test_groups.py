"""Issue 13: one θ at any swarm size. Real peers on 127.0.0.1 whose rounds form several groups (the swarm
is bigger than averaging.target_group_size) end every round with one θ (averaging/stages.py)."""

from __future__ import annotations

import pytest

from p2p_photon.launch import LocalSwarm

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(600)]


# 8 peers with groups of 2 and 4 (and 8: one group) are scripts/bench_groups.py's runs (bench/results/groups.json):
# 8 peer processes are too many for the suite's time on 2 cores; this test is its short version
# extended (not in the CI suite: ~95 s, and the suite is at its 15 minutes on 2 cores). Two causes of
# failures were fixed (issue 13's note): joiners at the seeded init outvoting a swarm that trained (a second
# model at round 0), and a straggler alone in stage 1 outlasting the finished peers' linger (it ended on
# the seeded init); the loop counts are in the closing note.
# The stages' arithmetic and the lone-peer case are in tests/test_averaging.py.
@pytest.mark.extended
@pytest.mark.parametrize("peers,group", [(5, 2)], ids=["5x2-not-full"])
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
