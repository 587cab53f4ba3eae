"""Issue 4: late joiners, peers killed mid-all-reduce, resume from checkpoints, no orphans."""

from __future__ import annotations

import signal

import psutil
import pytest

from p2p_photon.config import DHTConfig
from p2p_photon.launch import LocalSwarm
from p2p_photon.network import shutdown_dht, start_dht
from p2p_photon.progress import fetch_progress, progress_validators
from tests.helpers import alive, wait_until

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(500)]


def _run_id(overrides):
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("dht.run_id="))


class Watcher:
    """A client-mode DHT node that reads the swarm's progress records (what a monitor sees)."""

    def __init__(self, maddrs, run_id):
        self.run_id = run_id
        self.dht = start_dht(DHTConfig(run_id=run_id, initial_peers=tuple(maddrs), client_mode=True,
                                       startup_timeout=60), record_validators=progress_validators(run_id), reaper=False)

    def records(self):
        return fetch_progress(self.dht, self.run_id)[0]

    def min_round(self, n):
        recs = self.records()
        return min(r.round for r in recs) if len(recs) >= n else -1

    def close(self):
        shutdown_dht(self.dht)


def _ok_rounds(summary):
    return {h["round"]: h for h in summary["history"] if h.get("ok")}


def test_late_joiner_downloads_theta_then_takes_part(tmp_path, swarm_overrides):
    """A joiner downloads θ, then takes part within two rounds although its Δ is ~100x smaller than the
    others' (its inner LR is): a heuristic that compares the group's average with a peer's own Δ once
    banned the honest peers here; bans need proof."""
    run = [*swarm_overrides, "rounds.num_rounds=12", "rounds.target_samples_per_round=700"]
    with LocalSwarm(tmp_path, overrides=run) as swarm:
        maddrs = swarm.start_bootstrap()
        first = [swarm.start_peer(i) for i in range(2)]
        watcher = Watcher(maddrs, _run_id(run))
        try:
            assert wait_until(lambda: watcher.min_round(2) >= 2, timeout=240), [swarm.tail(p) for p in first]
        finally:
            watcher.close()
        late = swarm.start_peer(2, name="late", overrides=["inner.lr=3e-5"])  # 1/100 of the others' LR
        assert swarm.wait([*first, late], timeout=300) == [0, 0, 0], [swarm.tail(p) for p in (*first, late)]
        logs = [swarm.tail(p, 3000) for p in (*first, late)]
    s0, late_s = swarm.summary("peer0"), swarm.summary("late")
    sync = next(h for h in late_s["history"] if h.get("event") == "sync")
    assert sync["round"] >= 2
    # θ right after the download equals the θ the others held at the start of that round
    theirs = {h["round"] + 1: h["theta"] for h in s0["history"] if h.get("ok")}
    assert sync["theta"] == theirs[sync["round"]]
    late_ok = _ok_rounds(late_s)
    assert late_ok, "the late joiner never took part in a round"
    assert {sync["round"], sync["round"] + 1} & set(late_ok), (sync["round"], sorted(late_ok))
    assert not any("left out of this run's all-reduces" in log for log in logs)
    for r, h in late_ok.items():
        assert h["theta"] == _ok_rounds(s0)[r]["theta"]
    assert late_s["theta"] == s0["theta"] and late_s["rounds"] == 12


@pytest.mark.extended  # 48 s; the suite is at its 15 minutes on 2 cores: tests/test_soak_smoke.py SIGKILLs peers at
def test_killing_a_peer_mid_allreduce_survivors_go_on_and_agree(tmp_path, swarm_overrides):  # random times (their
    # process trees must be gone, the survivors end on one θ); this one times the kill to an all-reduce
    run = [*swarm_overrides, "rounds.num_rounds=5", "averaging.allreduce_timeout=15"]
    with LocalSwarm(tmp_path, overrides=run) as swarm:
        maddrs = swarm.start_bootstrap()
        procs = [swarm.start_peer(i) for i in range(3)]
        victim = procs[2]
        watcher = Watcher(maddrs, _run_id(run))
        try:
            def victim_averaging():
                recs = {r.peer_id: r for r in watcher.records()}
                return len(recs) == 3 and min(r.round for r in recs.values()) >= 1 and any(
                    r.state == "averaging" for r in recs.values())
            assert wait_until(victim_averaging, timeout=240, interval=0.02)
        finally:
            watcher.close()
        family = psutil.Process(victim.popen.pid).children(recursive=True)
        assert any(p.name() == "p2pd" for p in family)
        victim.popen.send_signal(signal.SIGKILL)
        # no orphans: the victim's DHT child, averager child and p2pd are gone within 10 s
        assert wait_until(lambda: not alive(family), timeout=10), [p.name() for p in alive(family)]
        codes = swarm.wait(procs[:2], timeout=300)
        assert codes == [0, 0], [swarm.tail(p) for p in procs[:2]]
    a, b = swarm.summary("peer0"), swarm.summary("peer1")
    assert a["rounds"] == b["rounds"] == 5
    assert a["theta"] == b["theta"]
    for r in set(_ok_rounds(a)) & set(_ok_rounds(b)):
        assert _ok_rounds(a)[r]["theta"] == _ok_rounds(b)[r]["theta"]


def _fixed_h(overrides):
    """Rounds end after exactly 4 local steps: the run is deterministic (fixed H, lossless averaging: with a
    lossy codec the result depends on which peer owns which slice, i.e. on the peer IDs, and the error
    feedback residual is not checkpointed, so a resumed lossy run is close to, not bit-equal with, the
    uninterrupted one)."""
    return [*overrides, "rounds.max_local_steps=4", "rounds.target_samples_per_round=100000000",
            "averaging.compression='none'",
            "checkpoint.every_rounds=1", "logging.record_steps=true", "inner.optimizer=adamw8bit"]


def test_resume_continues_from_the_saved_round_and_reproduces_the_uninterrupted_run(tmp_path, swarm_overrides):
    base = _fixed_h(swarm_overrides)
    # the uninterrupted reference: 4 rounds
    with LocalSwarm(tmp_path / "ref", overrides=[*base, "rounds.num_rounds=4"]) as ref:
        ref.start_bootstrap()
        procs = [ref.start_peer(i) for i in range(2)]
        assert ref.wait(procs, timeout=300) == [0, 0], [ref.tail(p) for p in procs]
    # the same run stopped after 2 rounds, then resumed to 4
    run_id = f"{_run_id(swarm_overrides)}-b"
    with LocalSwarm(tmp_path / "cut", overrides=[*base, f"dht.run_id={run_id}"]) as cut:
        cut.start_bootstrap()
        procs = [cut.start_peer(i, overrides=["rounds.num_rounds=2"]) for i in range(2)]
        assert cut.wait(procs, timeout=300) == [0, 0], [cut.tail(p) for p in procs]
        saved = cut.summary("peer0")
        assert saved["rounds"] == 2
        procs = [cut.start_peer(i, overrides=["rounds.num_rounds=4", f"checkpoint.dir={cut.workdir / f'ckpt-peer{i}'}"],
                                extra_args=["--resume"], name=f"res{i}") for i in range(2)]
        assert cut.wait(procs, timeout=300) == [0, 0], [cut.tail(p) for p in procs]
        log = cut.tail(procs[0], 400)
    assert "resumed from" in log and "round 2" in log and saved["theta"][:8] in log
    resumed, reference = cut.summary("res0"), ref.summary("peer0")
    assert resumed["rounds"] == 4 and resumed["theta"] == cut.summary("res1")["theta"]
    ref_steps = {(r, g): (loss, lr) for r, g, loss, lr in reference["steps"] if r >= 2}
    got = {(r, g): (loss, lr) for r, g, loss, lr in resumed["steps"]}
    assert set(got) == set(ref_steps) and len(got) == 2 * 4
    for key, (loss, lr) in got.items():
        assert lr == ref_steps[key][1], key  # bit-identical learning rates
        assert abs(loss - ref_steps[key][0]) <= 1e-6, (key, loss, ref_steps[key][0])


def test_sigterm_checkpoints_and_exits_cleanly_while_the_others_go_on(tmp_path, swarm_overrides):
    from p2p_photon.state import load_latest

    run = [*swarm_overrides, "rounds.num_rounds=0"]
    with LocalSwarm(tmp_path, overrides=run) as swarm:
        maddrs = swarm.start_bootstrap()
        procs = [swarm.start_peer(i) for i in range(3)]
        watcher = Watcher(maddrs, _run_id(run))
        try:
            assert wait_until(lambda: watcher.min_round(3) >= 2, timeout=240), [swarm.tail(p) for p in procs]
            family = psutil.Process(procs[2].popen.pid).children(recursive=True)
            swarm.signal(procs[2], signal.SIGTERM)
            assert swarm.wait([procs[2]], timeout=90) == [0], swarm.tail(procs[2])
            assert wait_until(lambda: not alive(family), timeout=10), [p.name() for p in alive(family)]
            # the other two keep training: their round advances after the departure
            here = watcher.min_round(2)
            assert wait_until(lambda: min(r.round for r in watcher.records() if r.state != "done") >= here + 2,
                              timeout=120)
        finally:
            watcher.close()
        for p in procs[:2]:
            swarm.signal(p, signal.SIGINT)
        assert swarm.wait(procs[:2], timeout=90) == [0, 0]
    ckpt = load_latest(tmp_path / "ckpt-peer2")
    assert ckpt is not None and ckpt.meta["round"] >= 2
    assert ckpt.meta["theta"] == swarm.summary("peer2")["theta"]
    assert "finishing the current step" in swarm.tail(procs[2], 400)
