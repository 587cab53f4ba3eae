"""Issue 8 end to end: real peers on 127.0.0.1 next to a hostile one (tests/attacker.py, the real peer
with one behaviour replaced): poisoned pseudo-gradients, inflated progress claims, a lying state donor,
and an outsider in a closed swarm."""

from __future__ import annotations

import math
import re
import signal
from pathlib import Path

import pytest

from p2p_photon.launch import LocalSwarm
from p2p_photon.trust import identity_new
from tests.helpers import wait_until

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(600)]
ATTACKER = str(Path(__file__).with_name("attacker.py"))


def _ok_rounds(summary):
    return {h["round"]: h for h in summary["history"] if h.get("ok")}


def _run(tmp_path, overrides, attackers=(), honest=2):
    """Bootstrap, honest0, honest1 (…) and the attackers ((name, silo, P2P_PHOTON_ATTACK), ...) until the honest
    peers finish; returns every peer's summary and the honest peers' logs joined."""
    names = [f"honest{i}" for i in range(honest)]
    with LocalSwarm(tmp_path, overrides=overrides) as swarm:
        swarm.start_bootstrap()
        honest = [swarm.start_peer(i, name=n) for i, n in enumerate(names)]
        bad = [swarm.start_peer(silo, name=n, script=ATTACKER, env={"P2P_PHOTON_ATTACK": attack})
               for n, silo, attack in attackers]
        assert swarm.wait(honest, timeout=400) == [0] * len(names), [swarm.tail(p) for p in honest]
        for p in bad:
            swarm.signal(p)
        swarm.wait(bad, timeout=60)
        summaries = {p.name: swarm.summary(p.name) for p in (*honest, *bad) if swarm.summary_path(p.name).exists()}
        return summaries, "".join(_log(swarm, n) for n in names)


@pytest.mark.extended
def test_poisoned_pseudo_gradients_leave_honest_peers_finite_and_close_to_a_clean_run(tmp_path, swarm_overrides):
    """Two honest peers alone, then the same two next to one peer sending Δ × 10⁶ and one sending NaN
    (uncompressed: int8 on the wire cannot carry a NaN). Clipping bounds the first, the second is
    refused and banned without failing the honest peers' round; their θ stays finite and their held-out
    loss within 5%."""
    names = ["honest0", "honest1"]
    run = [*swarm_overrides, "averaging.compression='none'", "rounds.num_rounds=3"]
    clean, _ = _run(tmp_path / "clean", run)
    baseline = clean["honest0"]["final_loss"]
    summaries, logs = _run(tmp_path / "attacked", run, [("scaler", 2, "scale=1e6"), ("nan", 1, "nan")])
    got = {n: summaries[n] for n in names}
    assert len({s["theta"] for s in got.values()}) == 1, "honest peers disagree"
    for name, s in got.items():
        assert math.isfinite(s["final_loss"]), f"{name} ended with a non-finite model"
        assert s["final_loss"] <= baseline * 1.05, (s["final_loss"], baseline)
        # the NaN is refused and its sender named in the group: the honest peers apply the same result without it
        ok = _ok_rounds(s)
        assert 2 in ok and len(ok) >= 2, (name, sorted(ok), [h.get("why") for h in s["history"] if not h.get("ok")])
    assert "sent non-finite values" in logs and "left out of this run's all-reduces" in logs


@pytest.mark.extended  # 25 s; the suite is at its 15 minutes on 2 cores: tests/test_peer_parts.py checks the same caps
def test_inflated_claims_neither_end_rounds_early_nor_move_the_round(tmp_path, swarm_overrides):  # by hand
    """One peer publishes 100x the samples it trains, another a round 10^6 ahead: the honest peers'
    rounds still hold (at least) the target's worth of real samples and advance one by one."""
    target = 192
    run = [*swarm_overrides, f"rounds.target_samples_per_round={target}", "rounds.num_rounds=3"]
    summaries, logs = _run(tmp_path, run, [("samples_liar", 2, "samples=100"), ("round_liar", 1, "round=1000000")])
    assert re.search(r"claims round 1000\d{3}, more than 2 past ours", logs)  # ignored, and said so
    counted = ("honest0", "honest1", "samples_liar")
    for n in ("honest0", "honest1"):
        ok, history = _ok_rounds(summaries[n]), summaries[n]["history"]
        # the swarm's round never moved past ours: no round (or state loaded) beyond the last one, and the last
        # round done (a peer that finished starting up late may miss round 0 and catch up: timing, not the liar)
        assert 2 in ok and all(h["round"] <= 2 for h in history), (n, history)
    for r in range(1, 3):  # round 0 includes start-up; from round 1 on, every peer trains from the start
        real = sum(_ok_rounds(summaries[n]).get(r, {}).get("samples", 0) for n in counted)
        # the liar's 100x claim counts no more than the busiest honest peer's: real samples reach the target
        assert real >= 0.8 * target, (r, real, {n: _ok_rounds(summaries[n]).get(r) for n in counted})


def test_a_lying_donor_is_rejected_and_the_joiner_loads_from_an_honest_one(tmp_path, swarm_overrides):
    run = [*swarm_overrides, "rounds.num_rounds=0", "rounds.target_samples_per_round=160"]
    with LocalSwarm(tmp_path, overrides=run) as swarm:
        swarm.start_bootstrap()
        honest = [swarm.start_peer(i, name=f"honest{i}") for i in range(2)]
        donor = swarm.start_peer(2, name="donor", script=ATTACKER, env={"P2P_PHOTON_ATTACK": "donor"})
        assert wait_until(lambda: "round 1 |" in _log(swarm, "honest0"), timeout=240), swarm.tail(honest[0])
        joiner = swarm.start_peer(0, name="joiner")
        # the joiner downloads, then takes part in a round with the swarm
        assert wait_until(lambda: _log(swarm, "joiner").count("| peers ") >= 1, timeout=300), swarm.tail(joiner)
        for p in (*honest, donor, joiner):
            swarm.signal(p)
        assert swarm.wait([*honest, joiner], timeout=120) == [0, 0, 0], [swarm.tail(p) for p in (*honest, joiner)]
        swarm.wait([donor], timeout=60)
        log = _log(swarm, "joiner")
        joined, reference = swarm.summary("joiner"), swarm.summary("honest0")
    assert "rejected the state served by peer" in log, log[-3000:]
    syncs = [h for h in joined["history"] if h.get("event") == "sync"]
    assert syncs, "the joiner never loaded state"
    # what it loaded is the swarm's θ of that round (what honest0 held after the round before)
    after = {h["round"] + 1: h["theta"] for h in reference["history"] if h.get("ok")}
    assert syncs[0]["theta"] == after[syncs[0]["round"]]
    ref_ok, joined_ok = _ok_rounds(reference), _ok_rounds(joined)
    assert len(joined_ok) >= 1 and all(joined_ok[r]["theta"] == ref_ok[r]["theta"] for r in joined_ok if r in ref_ok)
    assert math.isfinite(joined["final_loss"])


# a round a peer did not take part in: it found the round already averaged and caught up with the swarm
CAUGHT_UP = re.compile(r"went on without us|other group\(s\) had already averaged|of our wave averaged|missed round")


def _took_part(log: str) -> bool:
    """The peer's log shows a round it took part in: one it averaged, or one that failed for another
    reason than having come too late (a fresh attacker's first attempt is often a catch-up)."""
    return any(re.search(r"round \d+ \|.*\| peers \d+/\d+", line) or ("FAILED" in line and not CAUGHT_UP.search(line))
               for line in log.splitlines() if re.search(r"round \d+ \|", line))


def _log(swarm, name):
    path = swarm.workdir / f"{name}.log"
    return path.read_text() if path.exists() else ""


@pytest.mark.extended
def test_an_outsider_cannot_join_or_change_a_closed_swarm(tmp_path, swarm_overrides):
    keys = tmp_path / "keys"
    ids = {n: identity_new(keys / f"{n}.key") for n in ("m0", "m1", "m2", "outsider")}
    members = tmp_path / "members.txt"
    members.write_text("".join(f"{ids[n]}  # {n}\n" for n in ("m0", "m1", "m2")))
    run = [*swarm_overrides, "rounds.num_rounds=4", "rounds.target_samples_per_round=144"]
    with LocalSwarm(tmp_path, overrides=run) as swarm:
        swarm.start_bootstrap()
        procs = [swarm.start_peer(i, name=n, overrides=[f"dht.identity_path={keys / (n + '.key')}",
                                                        f"dht.members={members}"])
                 for i, n in enumerate(("m0", "m1", "m2"))]
        # the outsider runs the open-swarm config with its own key, and would poison any average it got into
        out = swarm.start_peer(0, name="outsider", script=ATTACKER, env={"P2P_PHOTON_ATTACK": "nan"},
                               overrides=[f"dht.identity_path={keys / 'outsider.key'}"])
        assert swarm.wait(procs, timeout=400) == [0, 0, 0], [swarm.tail(p) for p in procs]
        swarm.signal(out)
        swarm.wait([out], timeout=60)
        summaries = {n: swarm.summary(n) for n in ("m0", "m1", "m2")}
        logs = "".join(_log(swarm, n) for n in ("m0", "m1", "m2"))
        outsider = swarm.summary("outsider") if swarm.summary_path("outsider").exists() else {"history": []}
    assert len({s["theta"] for s in summaries.values()}) == 1
    # the outsider was never in a member's group: no member led a group with it or followed its group, and its
    # NaN never reached a member's reducer (which would have refused it and failed the round)
    assert "leaving non-member" not in logs and "refused the data of" not in logs, logs[-3000:]
    for n, s in summaries.items():
        ok = _ok_rounds(s)
        # a member that finished starting up late may miss the first rounds and catch up (timing, not trust);
        # the last round all three members average together
        assert 3 in ok and ok[3]["group"] == 3, (n, s["history"])
        assert math.isfinite(s["final_loss"]) and s["final_loss"] < s["initial_loss"]
    assert not _ok_rounds(outsider), "the outsider completed a round with the members"


@pytest.mark.extended
def test_an_attacker_rejoining_with_a_fresh_identity_every_round_fails_no_honest_round(tmp_path, swarm_overrides):
    """Three honest peers in an open swarm; an attacker sends NaN Δ or Δ × 10⁶ (alternately, uncompressed)
    and is killed and restarted with a fresh identity after each round it takes part in, so bans never
    catch it. The owners refuse (NaN) or clip (×10⁶) its contribution, name it in the group, and the
    honest peers apply the identical result: at least 5 of 6 rounds succeed on every honest peer, θ is
    identical, and the held-out loss is within 5% of a clean run."""
    names = ["honest0", "honest1", "honest2"]
    # rounds of 16x the other tests' target (~15 s on a quiet 2-core machine), so that a restarted attacker is up
    # before the round it joins ends
    run = [*swarm_overrides, "averaging.compression='none'", "rounds.num_rounds=6", "averaging.target_group_size=4",
           "rounds.target_samples_per_round=1536"]
    clean, _ = _run(tmp_path / "clean", run, honest=3)
    baseline = max(clean[n]["final_loss"] for n in names)

    def attacker(k):
        return swarm.start_peer(k % 3, name=f"attacker{k}", script=ATTACKER,
                                env={"P2P_PHOTON_ATTACK": "nan" if k % 2 == 0 else "scale=1e6"})

    with LocalSwarm(tmp_path / "attacked", overrides=run) as swarm:
        swarm.start_bootstrap()
        honest = [swarm.start_peer(i, name=n) for i, n in enumerate(names)]
        assert wait_until(lambda: all("joined run" in _log(swarm, n) for n in names), timeout=300), \
            [swarm.tail(p) for p in honest]
        bad, attempts = attacker(0), 0  # joins a running swarm, as each of its successors does
        while any(p.alive() for p in honest) and attempts < 12:
            # once this identity has taken part in a round (not just caught up), the next one is on its way
            wait_until(lambda: _took_part(_log(swarm, bad.name))  # noqa: B023
                       or not any(p.alive() for p in honest), timeout=600)
            attempts += 1
            nxt = attacker(attempts)
            swarm.signal(bad, signal.SIGKILL)
            swarm.wait([bad], timeout=30)
            bad = nxt
        swarm.signal(bad, signal.SIGKILL)
        swarm.wait([bad], timeout=30)
        assert swarm.wait(honest, timeout=400) == [0, 0, 0], [swarm.tail(p) for p in honest]
        summaries = {n: swarm.summary(n) for n in names}
        logs = "".join(_log(swarm, n) for n in names)
    assert attempts >= 2, "the attacker never got into a round"
    assert len({s["theta"] for s in summaries.values()}) == 1, "honest peers disagree"
    for name, s in summaries.items():
        assert math.isfinite(s["final_loss"]) and s["final_loss"] <= baseline * 1.05, (name, s["final_loss"], baseline)
        ok = _ok_rounds(s)
        assert len(ok) >= 5, (name, sorted(ok), [h.get("why") for h in s["history"] if not h.get("ok")])
    assert "sent non-finite values" in logs, "no NaN contribution was ever refused (the attacker never averaged?)"
