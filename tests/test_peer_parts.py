"""The peer's parts, each alone: the round tracker's arithmetic, the contribution policy, the global
state, the overlapped round's local correction; compared against hand-computed values."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from p2p_photon.averaging import RoundResult
from p2p_photon.config import ConfigError, load_config
from p2p_photon.hashing import theta_hash
from p2p_photon.peer.contribution import ContributionPolicy
from p2p_photon.peer.global_state import GlobalState
from p2p_photon.peer.overlap import InFlight, progress_since, swap_in_group_step
from p2p_photon.peer.tracker import (
    RoundTracker,
    majority_round,
    round_progress,
    swarm_ahead,
    swarm_theta,
    weight_caps,
)
from p2p_photon.peer.training import RoundStats
from p2p_photon.progress import ProgressRecord
from tests.helpers import make_record

pytestmark = pytest.mark.timeout(30)

# ----------------------------------------------------------------------------- tracker: round arithmetic (pure)

FP = "ab12" * 4
NOW = 1000.0
SEQ = 64


def rec(peer_id: str, **changes) -> ProgressRecord:
    base = dict(round=5, samples=0, tokens_per_s=0.0, state="averaging", time=NOW, fingerprint=FP)
    return ProgressRecord(**make_record(peer_id, **{**base, **changes}))


def progress(records, my_samples: int, cap: float = 1.0) -> float:
    return round_progress(
        records,
        me="me",
        my_round=5,
        my_samples=my_samples,
        fingerprint=FP,
        now=NOW,
        seq_len=SEQ,
        cap_vs_others=cap,
    )


@pytest.mark.timeout(10)
def test_round_progress_hand_computed():
    records = [
        rec("me", samples=999),  # my own record: my_samples counts instead
        rec("p1", samples=100, state="training", tokens_per_s=10.0 * SEQ, time=NOW - 5),  # 100 + 10/s * 5 s
        rec("p2", samples=200, state="averaging", tokens_per_s=640.0, time=NOW - 5),  # not training: 200
        rec("p3", samples=50, state="training", tokens_per_s=10.0 * SEQ, time=NOW - 100),  # at most 10 s: 150
        rec("p4", samples=70, state="training", tokens_per_s=10.0 * SEQ, time=NOW + 3),  # clock ahead: 70
        rec("old", round=4, samples=500),
        rec("next", round=6, samples=500),
        rec("gone", samples=500, state="done"),
        rec("other-run", samples=500, fingerprint="ffff"),
    ]
    # with cap 1, each peer counts at most as much as the largest of the rest: p2's 200 counts as 150
    assert progress(records, my_samples=120) == 120 + 150 + 150 + 150 + 70
    assert progress(records, my_samples=120, cap=2.0) == 120 + 150 + 200 + 150 + 70
    assert progress([], my_samples=7) == 7.0
    # p2 (200) against a cap of 1 x max(120, 150, 150, 70) = 150
    assert progress(records[:3], my_samples=120) == 120 + 150 + 150


@pytest.mark.timeout(10)
def test_a_claim_far_past_our_round_is_ignored_and_moves_nothing(caplog):
    """A peer claiming round 10^6 (rounds.max_rounds_ahead = 2 past ours at most) neither ends our round nor
    counts as the swarm being ahead, and is logged once; honest peers a round ahead still are."""
    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    view = _View([rec("liar", round=1_000_000), rec("p1", round=5)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    with caplog.at_level("WARNING"):
        assert tracker.ahead(5, tracker.records()) == (None, True)
        assert tracker.ahead(5, tracker.records()) == (None, True)
    assert sum("claims round 1000000, more than 2 past ours" in m for m in caplog.messages) == 1
    view.records_now = [rec("liar", round=1_000_000), rec("p1", round=6), rec("p2", round=6)]
    assert tracker.ahead(5, tracker.records()) == (6, False)


def test_one_peer_claiming_100x_cannot_end_the_round():
    target, honest = 1000, 100
    liar = [rec("honest", samples=honest), rec("liar", samples=100 * honest)]
    # the liar counts at most as much as the largest of the rest (100): 100 + 100 + 100 = the true total
    assert progress(liar, my_samples=honest) == 300 < target
    fast = [
        rec("honest", samples=honest),
        rec("liar", samples=honest, state="training", tokens_per_s=1e12, time=NOW - 5),
    ]
    assert progress(fast, my_samples=honest) == 300 < target  # an absurd rate is capped the same way
    assert progress([rec("liar", samples=100 * honest)], my_samples=honest) == 200  # of two, mine bounds it
    assert progress(liar, my_samples=honest, cap=2.0) == 400
    assert progress(liar, my_samples=honest, cap=1e9) > target  # without the cap it would end the round
    everyone = [rec(f"p{i}", samples=honest) for i in range(9)]
    assert progress(everyone, my_samples=honest) == 10 * honest  # honest peers are not capped


def ahead(rounds: list[int], my_round: int = 5, max_ahead: int = 2, extra=()):
    records = [rec(f"p{i}", round=r) for i, r in enumerate(rounds)] + list(extra)
    return swarm_ahead(records, me="me", my_round=my_round, fingerprint=FP, max_rounds_ahead=max_ahead)


@pytest.mark.timeout(10)
def test_swarm_ahead_needs_a_majority():
    r = 5
    assert ahead([r, r + 1]) == (None, [])  # a swarm of 3: one peer ahead moves nobody
    round_, reasons = ahead([r, r + 10**6])
    assert round_ is None and len(reasons) == 1 and str(r + 10**6) in reasons[0]
    assert ahead([r, r + 2]) == (None, [])
    assert ahead([r + 1, r + 1]) == (r + 1, [])  # two of three
    assert ahead([r + 1, r + 2]) == (r + 1, [])  # both passed r + 1, only one reached r + 2
    assert ahead([r + 2, r + 2, r + 2, r + 1, r]) == (r + 2, [])
    assert ahead([r + 1, r + 1, r + 2, r, r]) == (r + 1, [])
    assert ahead([r + 1, r + 1, r, r]) == (None, [])  # half is not a majority
    assert ahead([r + 1]) == (r + 1, [])  # a swarm of two: the other peer finished the round
    assert ahead([]) == (None, [])
    not_counted = [
        rec("me", round=r + 1),
        rec("gone", round=r + 1, state="done"),
        rec("other-run", round=r + 1, fingerprint="ffff"),
    ]
    assert ahead([r], extra=not_counted) == (None, [])
    round_, reasons = ahead([r + 3, r + 3, r + 3])  # everybody far ahead: a state sync, not a jump
    assert round_ is None and len(reasons) == 3
    # the join / catch-up rule (no far-ahead filter): the highest round a strict majority has reached
    assert majority_round([5, 5, 10**6]) == 5 and majority_round([3, 9]) == 3
    assert majority_round([1, 2, 3, 4]) == 2 and majority_round([]) == -1


def test_weight_caps_hand_computed():
    records = [
        rec("a", samples=100, tokens_per_s=10.0 * SEQ, time=NOW - 5),  # 10 samples/s, 5 s old
        rec("b", samples=0, tokens_per_s=1000.0 * SEQ, time=NOW - 100),  # claims 1000/s, 100 s old
        rec("me", samples=10**6),
        rec("other-run", samples=10**6, fingerprint="ffff"),
    ]
    caps = weight_caps(records, me="me", fingerprint=FP, now=NOW, seq_len=SEQ, my_rate=10.0 * SEQ, floor=50)
    # rates 10, 1000 and mine 10: median 10, so at most 40/s counts; the time since a record (+5 s) at most 60 s
    assert caps == {"a": 8 * (100 + 10 * (5 + 5)), "b": 8 * (0 + 40 * 60)}
    assert weight_caps([rec("me")], me="me", fingerprint=FP, now=NOW, seq_len=SEQ, my_rate=1.0, floor=50) == {}
    lazy = weight_caps([rec("a", samples=1)], me="me", fingerprint=FP, now=NOW, seq_len=SEQ, my_rate=0.0, floor=50)
    assert lazy == {"a": 8 * 50}  # never below 8x the floor (the round's target plus one batch)


def test_swarm_theta_is_the_hash_most_peers_hold_with_deterministic_ties():
    def theta(records, mine="h-me", total=100):
        return swarm_theta(records, me="me", fingerprint=FP, theta_round=5, my_hash=mine, my_total=total)

    a, b = "a" * 16, "b" * 16
    two_b = [rec("p1", theta_round=5, theta_hash=b, total_samples=10), rec("p2", theta_round=5, theta_hash=b)]
    assert theta(two_b, mine=a) == (b, {a: 1, b: 2})  # two peers hold b, only we hold a: b is the swarm's
    assert theta(two_b, mine=b) == (b, {b: 3})
    ignored = [rec("old", theta_round=4, theta_hash=b), rec("gone", theta_round=5, theta_hash=b, state="done"),
               rec("other-run", theta_round=5, theta_hash=b, fingerprint="ffff"), rec("me", theta_round=5,
                                                                                      theta_hash=b)]
    assert theta(ignored, mine=a) == (a, {a: 1})  # other rounds, finished peers, other runs, our old record
    # one against one: the larger total_samples wins, then the smaller hash; one peer's claim is one vote
    assert theta([rec("p1", theta_round=5, theta_hash=b, total_samples=101)], mine=a)[0] == b
    assert theta([rec("p1", theta_round=5, theta_hash=b, total_samples=99)], mine=a)[0] == a
    assert theta([rec("p1", theta_round=5, theta_hash=b, total_samples=100)], mine=a)[0] == a
    liar = [rec("p1", theta_round=5, theta_hash=b, total_samples=10**12), rec("p2", theta_round=5, theta_hash=a)]
    assert theta(liar, mine=a)[0] == a
    # two tied peers, each mid-round: a record's total_samples includes its round in progress, which is not
    # in the θ; counted, each saw the other's total as the larger and both switched (a swarm test)
    seen_by_a = swarm_theta([rec("b", theta_round=5, theta_hash=b, total_samples=130, samples=30)], me="a",
                            fingerprint=FP, theta_round=5, my_hash=a, my_total=100)[0]
    seen_by_b = swarm_theta([rec("a", theta_round=5, theta_hash=a, total_samples=150, samples=50)], me="b",
                            fingerprint=FP, theta_round=5, my_hash=b, my_total=100)[0]
    assert seen_by_a == seen_by_b == a  # equal samples of θ: the smaller hash, on both sides


def test_a_tie_is_broken_when_every_peer_has_published_this_rounds_theta_or_after_a_grace():
    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    a, b = "a" * 16, "b" * 16
    view = _View([rec("p1", theta_round=5, theta_hash=a, total_samples=500), rec("p2", theta_round=4, theta_hash=b)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    assert tracker.fork(tracker.records(), 5, b, my_total=100) is None  # 1 vs 1 while p2 is stale: wait
    # ... but not for ever: under churn some peer always lags, and a split swarm must become one again
    tracker.tie_grace_s = 0.05
    assert tracker.fork(tracker.records(), 5, b, my_total=100) is None
    time.sleep(0.1)
    assert tracker.fork(tracker.records(), 5, b, my_total=100) == a  # tied 1-1: the larger total samples
    # a tie seen again in a later round, after a round without one, starts a new clock
    tracker.tie_grace_s = 3600.0
    view.records_now = [rec("p1", theta_round=6, theta_hash=a, total_samples=500), rec("p2", theta_round=4)]
    assert tracker.fork(tracker.records(), 6, b, my_total=100) is None
    view.records_now = [rec("p1", theta_round=5, theta_hash=a, total_samples=500), rec("p2", theta_round=4, theta_hash=b)]
    view.records_now[1] = rec("p2", theta_round=5, theta_hash=a)
    assert tracker.fork(tracker.records(), 5, b, my_total=100) == a  # 2 vs 1
    view.records_now[1] = rec("p2", theta_round=5, theta_hash="c" * 64, total_samples=10)
    assert tracker.fork(tracker.records(), 5, b, my_total=100) == a  # all in, 1-1-1: larger total samples
    assert tracker.fork(tracker.records(), 5, a, my_total=100) is None


def test_a_tie_that_lasts_round_after_round_keeps_its_clock():
    """Two peers averaging together on two θ hold a new pair of hashes every round while a third lags: a
    clock per round never ran out. The tie's clock runs on from one θ round to the next."""
    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    a, b = "a" * 16, "b" * 16
    view = _View([rec("p1", theta_round=5, theta_hash=a, total_samples=500), rec("p2", theta_round=3)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    tracker.tie_grace_s = 0.3
    assert tracker.fork(tracker.records(), 5, b, my_total=100) is None
    time.sleep(0.35)
    view.records_now[0] = rec("p1", theta_round=6, theta_hash=a, total_samples=500)
    assert tracker.fork(tracker.records(), 6, b, my_total=100) == a  # round 6's tie is round 5's, 0.35 s on
    assert tracker.fork(tracker.records(), 6, b, my_total=100) is None  # broken: a new tie starts afresh
    view.records_now[0] = rec("p1", theta_round=8, theta_hash=a, total_samples=500)
    time.sleep(0.35)
    assert tracker.fork(tracker.records(), 8, b, my_total=100) is None  # round 7 had no tie: a new clock


def test_a_fork_inside_our_group_is_healed_at_once_by_the_one_that_loses_the_tie():
    """We averaged round 5 in one group with p1 on another θ than ours; p2 lags. The tie (one hash each)
    is broken at once, the same way on both sides: the loser takes the winner's θ, the winner keeps it."""
    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    a, b, old_a, old_b = "a" * 16, "b" * 16, "c" * 16, "d" * 16
    view = _View([rec("p1", theta_round=6, theta_hash=a, total_samples=500), rec("p2", theta_round=5)])
    loser, winner = (RoundTracker(cfg, FP, me, view, banned=dict) for me in ("me", "p1"))
    group = {"me": dict(theta=old_b), "p1": dict(theta=old_a), "p2-not-there": "malformed"}
    assert loser.fork(loser.records(), 6, b, my_total=100) is None  # no group noted: the tie waits
    loser.note_group(group, old_b, 6)
    assert loser.fork(loser.records(), 6, b, my_total=100) == a  # a: the larger total samples
    # the winner, seeing our record, keeps its θ
    view.records_now = [rec("me", theta_round=6, theta_hash=b, total_samples=100), rec("p2", theta_round=5)]
    winner.note_group(group, old_a, 6)
    assert winner.fork(winner.records(), 6, a, my_total=500) is None
    # a group mate that averaged on our θ is no proof of a fork in the group; another round's group neither
    view.records_now = [rec("p1", theta_round=6, theta_hash=a, total_samples=500), rec("p2", theta_round=5)]
    loser.note_group({"p1": dict(theta=old_b)}, old_b, 6)
    assert loser.fork(loser.records(), 6, b, my_total=100) is None
    loser.note_group(group, old_b, 5)
    assert loser.fork(loser.records(), 6, b, my_total=100) is None


def test_a_lone_survivor_ahead_of_a_swarm_that_trains_the_round_again_re_syncs_to_it():
    """We alone hold θ m of round 6 (the rest of our round-5 group died); two live peers train round 5
    again on θ a, and a joiner waits (syncing). They will never take a θ one peer holds: we re-sync to a at
    once instead of failing round 6 for want of a group. Each precondition, removed, keeps our θ."""
    from hivemind.utils import get_dht_time

    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    m, a, now = "m" * 16, "a" * 16, get_dht_time()

    def back(pid, **kw):
        return rec(pid, time=now, state="training", round=5, theta_round=5, theta_hash=a, **kw)

    view = _View([back("p1"), back("p2"), rec("j", time=now, state="syncing", round=5, theta_round=5, theta_hash=a),
                  *(rec(f"dead{i}", time=now - 3600, round=5, theta_round=5, theta_hash=a) for i in (1, 2))]
    )  # the records of two dead peers that were averaging round 5 do not count
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    assert tracker.fork(tracker.records(), 6, m, my_total=100) == a
    live = view.records_now[:3]
    cases = {
        "a live peer publishes our θ": [back("p1"), rec("p2", time=now, round=6, theta_round=6, theta_hash=m)],
        "a live peer holds another θ of round 6": [back("p1"), back("p2"), rec("p3", time=now, round=6,
                                                                                theta_round=6, theta_hash="e" * 16)],
        "one of two still averages round 5": [back("p1"), rec("p2", time=now, round=5, theta_round=5, theta_hash=a)],
        "only one other peer trains or averages": [back("p1"), live[2]],
        "the two train round 5 on two θ": [back("p1"), rec("p2", time=now, state="training", round=5,
                                                            theta_round=5, theta_hash="b" * 16)],
        "overlapped peers train round 6 with round 5 in flight": [
            rec("p1", time=now, state="training", round=6, theta_round=5, theta_hash=a),
            rec("p2", time=now, state="training", round=6, theta_round=5, theta_hash=a)],
    }
    for why, records in cases.items():
        view.records_now = records
        assert tracker.fork(tracker.records(), 6, m, my_total=100) is None, why
    # a majority of three suffices; the third may average
    view.records_now = [back("p1"), back("p2"), rec("p3", time=now, round=5, theta_round=5, theta_hash=a)]
    assert tracker.fork(tracker.records(), 6, m, my_total=100) == a


def test_a_survivor_of_a_group_whose_other_members_died_re_syncs_while_the_others_average_apart():
    """Our group of two (us, q) averaged round 5 alone (no other group's stages) and q died before it
    published θ 6: nobody else can ever hold our θ m, even while p1 and p2 still average round 5 (a later
    wave without us). We re-sync to their θ a. Not while q's record is fresh (it will publish m), nor when the
    average spanned other groups, nor for a group of one, nor for another round's group."""
    from hivemind.utils import get_dht_time

    from p2p_photon.peer.tracker import MATES_DEAD_S

    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    m, a, now = "m" * 16, "a" * 16, get_dht_time()
    busy = [rec(p, time=now, round=5, theta_round=5, theta_hash=a) for p in ("p1", "p2")]  # state: averaging

    def q(age):
        return rec("q", time=now - age, round=5, theta_round=5, theta_hash="0" * 16)

    view = _View(busy + [q(MATES_DEAD_S + 5)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    group = {"me": dict(theta="0" * 16), "q": dict(theta="0" * 16)}
    assert tracker.fork(tracker.records(), 6, m, my_total=100) is None  # no group noted yet
    tracker.note_group(group, "0" * 16, 6, spanned=2)
    assert tracker.fork(tracker.records(), 6, m, my_total=100) == a
    view.records_now = busy  # q's record gone altogether
    assert tracker.fork(tracker.records(), 6, m, my_total=100) == a
    view.records_now = busy + [q(1.0)]
    assert tracker.fork(tracker.records(), 6, m, my_total=100) is None, "q is alive: it will publish our θ"
    view.records_now = busy + [q(MATES_DEAD_S + 5)]
    for gathered, spanned, r in ((group, 5, 6), ({"me": {}}, 1, 6), (group, 2, 5)):
        tracker.note_group(gathered, "0" * 16, r, spanned=spanned)
        assert tracker.fork(tracker.records(), 6, m, my_total=100) is None, (gathered, spanned, r)
    tracker.note_group(group, "0" * 16, 6, spanned=2)
    view.records_now = busy[:1] + [q(MATES_DEAD_S + 5)]  # one other θ holder is not two: it may take ours
    assert tracker.fork(tracker.records(), 6, m, my_total=100) is None


def test_fresh_peers_do_not_outvote_the_peers_that_trained():
    """Three joiners starting together next to two peers at θ round 5: by plain majority the swarm's θ
    round is 0 (a joiner would start a second model); counting only peers with an averaged θ it is 5."""
    from hivemind.utils import get_dht_time

    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    now = get_dht_time()
    view = _View([rec("j2", time=now, theta_round=0, round=0), rec("j3", time=now, theta_round=0, round=0),
                  rec("p1", time=now, theta_round=5, round=5), rec("p2", time=now, theta_round=5, round=5)])
    tracker = RoundTracker(cfg, FP, "j1", view, banned=dict)
    assert tracker.theta_round(tracker.records()) == 0
    assert tracker.established_round(tracker.records()) == 5
    # established peers at 6, 6 and 4: a strict majority (2 of 3) has reached 6
    view.records_now = [rec("p1", time=now, theta_round=6), rec("p2", time=now, theta_round=6), rec("p3", time=now, theta_round=4),
                        rec("j2", time=now, theta_round=0)]
    assert tracker.established_round(tracker.records()) == 6
    view.records_now = [rec("j2", time=now, theta_round=0)]
    assert tracker.established_round(tracker.records()) == -1
    # peers that died (no record for ALIVE_S) do not vote: a resumed peer behind them was told the swarm
    # was at its own old round, and trained it alone (soak)
    view.records_now = [rec("d1", time=now - 60, theta_round=2), rec("d2", time=now - 60, theta_round=2),
                        rec("p1", time=now, theta_round=6)]
    assert tracker.theta_round(tracker.records()) == tracker.established_round(tracker.records()) == 6


def test_the_swarm_went_on_without_us_only_when_most_peers_averaged_the_round_after_ours():
    """Polled while round 5's averaging waits: peers holding θ of round 6 averaged round 5 (ours may still
    land: our group can be slower); θ of round 7 means they averaged round 6 too. One peer far ahead is
    not the swarm."""
    from hivemind.utils import get_dht_time

    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    now = get_dht_time()
    view = _View([rec("p1", time=now, theta_round=6), rec("p2", time=now, theta_round=6), rec("p3", time=now, theta_round=5)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    assert tracker.went_on_without_us(5, tracker.records()) is None
    view.records_now = [rec("p1", time=now, theta_round=9), rec("p2", time=now, theta_round=5), rec("p3", time=now, theta_round=5)]
    assert tracker.went_on_without_us(5, tracker.records()) is None
    view.records_now = [rec("p1", time=now, theta_round=7), rec("p2", time=now, theta_round=8), rec("p3", time=now, theta_round=5)]
    assert "round 7" in tracker.went_on_without_us(5, tracker.records())



def test_a_peer_looking_for_a_group_stops_once_the_swarm_applied_its_round():
    """While matchmaking for round 5. Stage 1: when most other live peers hold θ of round 6 or later and that θ
    could be taken (two publish it), any group we could still form is late (the joiner that downloaded θ just
    as the swarm averaged its round waited a whole round; the record of a peer killed at round 5 held it
    there too). A minority ahead, or a later θ nobody confirms, keeps us waiting. Stages 2 and 3 are the
    round's own groups: only every other live peer (finished ones aside) ahead ends the wait."""
    from hivemind.utils import get_dht_time

    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    now = get_dht_time()
    a, b = "a1" * 32, "b2" * 32
    view = _View([rec("p1", theta_round=6, theta_hash=a, time=now), rec("p2", theta_round=7, theta_hash=b, time=now),
                  rec("p3", theta_round=5, time=now)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    assert tracker.missed(5, tracker.records()) is None  # a majority ahead, but no θ two peers agree on
    view.records_now[1] = rec("p2", theta_round=6, theta_hash=a, time=now)
    assert "2 of 3 other live peers hold θ of round 6 or later" in tracker.missed(5, tracker.records())
    assert tracker.counts([], 5)["missed"]() is not None  # the averager's poll: stage 1 by default
    assert tracker.missed(5, tracker.records(), stage=2) is None  # p3 may still be in our stage-2/3 group
    assert tracker.counts([], 5)["missed"](3) is None
    view.records_now[1] = rec("p2", theta_round=5, time=now)
    assert tracker.missed(5, tracker.records()) is None  # one of three ahead is not the swarm
    view.records_now = [rec("p1", theta_round=6, theta_hash=a, time=now), rec("p2", theta_round=7, theta_hash=b,
                        time=now), rec("p3", theta_round=5, time=now, state="done")]
    assert "round 6 or later" in tracker.missed(5, tracker.records(), stage=2)  # every live peer is ahead
    view.records_now[2] = rec("p3", theta_round=5, time=now - 60)  # gone: its record is past ALIVE_S
    assert "round 6 or later" in tracker.missed(5, tracker.records(), stage=3)
    assert tracker.missed(6, tracker.records()) is None  # p1 is still at θ 6: it may average round 6
    view.records_now = [rec("p1", theta_round=6, time=now, state="done")]
    assert tracker.missed(5, tracker.records()) is None  # nobody live: the run's end is someone else's call
    assert tracker.counts([], 5)["missed"]() is None
    # a catch-up that found nothing to take refutes the verdict for that round (not for the next one)
    view.records_now = [rec("p1", theta_round=7, time=now), rec("p2", theta_round=7, time=now)]
    tracker.missed_refuted = 5
    assert tracker.missed(5, tracker.records()) is None
    assert "round 7 or later" in tracker.missed(6, tracker.records())


def test_a_round_counts_as_applied_only_when_its_theta_could_be_taken():
    """proven()'s evidence that a group applied round 5: two live peers publish the same later θ, or the
    only other live peer holds it. A lone survivor of the applying group next to peers still at round 5
    is not enough (its θ is unconfirmed: no joiner could take it)."""
    from hivemind.utils import get_dht_time

    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    now = get_dht_time()
    view = _View([rec("p1", theta_round=6, theta_hash="a" * 64, time=now),
                  rec("p2", theta_round=5, theta_hash="b" * 64, time=now)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    assert not tracker.theta_past(5, tracker.records())
    view.records_now.append(rec("p3", theta_round=6, theta_hash="a" * 64, time=now, state="done"))
    assert tracker.theta_past(5, tracker.records())
    assert not tracker.theta_past(6, tracker.records())
    view.records_now = [rec("p1", theta_round=6, theta_hash="a" * 64, time=now),
                        rec("p2", theta_round=6, theta_hash="c" * 64, time=now)]  # two different θ: a fork
    assert not tracker.theta_past(5, tracker.records())
    view.records_now = [rec("p1", theta_round=6, theta_hash="a" * 64, time=now),
                        rec("p2", theta_round=5, theta_hash="b" * 64, time=now - 60)]  # p2 gone
    assert tracker.theta_past(5, tracker.records())  # the only other live peer holds it
    assert tracker.counts(tracker.records(), 5)["ahead"]()


class _View:
    """The swarm view's read side, with records set by the test."""

    def __init__(self, records):
        self.records_now = records

    def records(self):
        return list(self.records_now)

    refresh = records


class Script(_View):
    """A swarm view whose each fetch moves on to the next list of records (the last one stays)."""

    def __init__(self, *steps):
        self.steps, self.fetches = list(steps), 0
        super().__init__(self.steps[0])

    def refresh(self):
        self.records_now = self.steps[min(self.fetches, len(self.steps) - 1)]
        self.fetches += 1
        return list(self.records_now)


def test_round_tracker_ends_rounds_and_ignores_banned_peers():
    cfg = load_config(None, ["rounds.target_samples_per_round=100", f"model.seq_len={SEQ}"])
    view = _View([rec("p1", samples=60), rec("liar", samples=60)])
    banned = {}
    tracker = RoundTracker(cfg, FP, "me", view, banned=lambda: banned)
    # p1 60 and liar 60 (each capped at the largest of the rest, 60): 30 + 60 + 60 = 150 >= 100
    assert tracker.round_over(5, samples=30)
    banned["liar"] = "sent NaN"
    assert [r.peer_id for r in tracker.records()] == ["p1"]
    assert not tracker.round_over(5, samples=30)  # 30 + 30 (p1 capped at my 30) = 60 < 100
    assert tracker.round_over(5, samples=50)  # 50 + 50 = 100
    view.records_now = [rec("p1", round=6), rec("p2", round=6), rec("p3", round=5)]
    assert tracker.ahead(5, tracker.records()) == (6, True) and tracker.round_over(5, samples=0)
    assert tracker.swarm_round(tracker.records()) == 6


# ----------------------------------------------------------------------------- contribution policy


def test_self_check_refuses_non_finite_and_outsized_deltas():
    policy = ContributionPolicy(max_delta_norm_ratio=10.0)
    assert policy.self_check([torch.tensor([3.0, 4.0])], None) == (5.0, None)
    for _ in range(3):
        policy.remember(1.0, None)
    assert policy.self_check([torch.tensor([6.0, 8.0])], None) == (10.0, None)  # 10x the median: still sent
    norm, why = policy.self_check([torch.tensor([30.0, 40.0])], None)
    assert norm == 50.0 and "more than 10x the median" in why
    norm, why = policy.self_check([torch.tensor([float("nan"), 1.0])], None)
    assert math.isnan(norm) and "non-finite" in why
    # block cycling: only the active tensors count, with a history per group
    deltas = [torch.tensor([3.0, 4.0]), torch.tensor([100.0])]
    assert policy.self_check(deltas, [0]) == (5.0, None)
    assert policy.self_check(deltas, [1])[0] == 100.0 and policy.self_check(deltas, [1])[1] is None
    assert policy.weight(0) == 1.0 and policy.weight(96) == 96.0


# ----------------------------------------------------------------------------- global state


def _model(w: list[float], b: float) -> torch.nn.Module:
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w]))
        m.bias.fill_(b)
    return m


def _state(model) -> GlobalState:
    return GlobalState(model, load_config(None, []).outer, fingerprint="f" * 16)


def test_global_state_outer_step_hand_computed():
    model = _model([1.0, 2.0], 0.5)
    gs = _state(model)
    with torch.no_grad():
        model.weight.sub_(torch.tensor([[0.25, 0.5]]))  # local training moved θ_local
    assert [d.tolist() for d in gs.pseudo_gradient(model)] == [[[0.25, 0.5]], [0.0]]
    res = RoundResult(deltas=[torch.tensor([[0.5, -1.0]]), None], group_size=2,
                      gathered={"a": dict(steps=3, samples=96), "b": dict(steps=2, samples=64)},
                      bytes_sent=100, bytes_received=80, seconds=0.1)
    before = gs.hash
    gs.apply(res, model)  # photon: θ ← θ − Δ̄; the bias was not averaged this round
    assert gs.theta[0].tolist() == [[0.5, 3.0]] and gs.theta[1].tolist() == [0.5]
    assert model.weight.tolist() == [[0.5, 3.0]]  # the local model starts the next round from θ
    c = gs.counters
    assert (c.round, c.global_step, c.total_samples, c.bytes_sent, c.bytes_received) == (1, 5, 160, 100, 80)
    assert gs.hash != before and gs.hash == theta_hash(gs.theta)


def test_global_state_share_check_and_load():
    donor = _state(_model([1.0, 2.0], 0.5))
    donor.counters.round, donor.counters.global_step = 7, 70
    meta, tensors = donor.share()
    joiner_model = _model([0.0, 0.0], 0.0)
    joiner = _state(joiner_model)
    assert joiner.problem_with(meta, tensors) is None
    assert joiner.problem_with({**meta, "fingerprint": "x"}, tensors) == "fingerprint differs"
    assert joiner.problem_with({**meta, "round": -1}, tensors) == "malformed round"
    assert joiner.problem_with({**meta, "theta": "0" * 16}, tensors) == "θ hash does not match the donor's claim"
    assert "non-finite" in joiner.problem_with(meta, [torch.full_like(t, math.nan) for t in tensors])
    assert "shapes differ" in joiner.problem_with(meta, [torch.zeros(3, 3), *tensors[1:]])
    joiner.load(meta, tensors, joiner_model)
    assert joiner.hash == donor.hash and joiner.counters.round == 7 and joiner.counters.global_step == 70
    assert joiner_model.weight.tolist() == [[1.0, 2.0]]


# ----------------------------------------------------------------------------- overlapped rounds


def test_landing_swaps_our_delta_for_the_groups_step():
    model = _model([1.0, 1.0], 0.0)
    snapshot = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight.add_(torch.tensor([[0.5, -0.5]]))  # the round's local progress
    deltas = progress_since(snapshot, model)
    assert deltas[0].tolist() == [[-0.5, 0.5]]
    old = [torch.tensor([[1.0, 1.0]]), torch.tensor([0.0])]
    new = [torch.tensor([[2.0, 0.0]]), torch.tensor([0.0])]
    flight = InFlight(round=3, stats=RoundStats(), deltas=deltas, norm=0.0)
    swap_in_group_step(model, new, old, flight)
    # local = θ_new − (progress of the round in flight): the group's step replaced our own Δ
    assert model.weight.tolist() == [[2.0, 0.0]]
    assert flight.wait(0.01) == "the all-reduce did not finish"
    flight.error = "no group"
    flight.done.set()
    assert flight.wait(0.01) == "no group"


def test_healing_a_fork_takes_the_elected_theta_or_a_newer_one_the_swarm_confirms():
    """Soak finding: the swarm moved on while a forked peer tried to download the θ it had elected, so
    every donor held a newer θ, all were refused, and the fork stayed ('no peer served the swarm's θ')."""
    import threading
    from types import SimpleNamespace

    from p2p_photon.peer.sync import StateSync

    mine = _state(_model([1.0, 2.0], 0.5))
    mine.counters.round = 5
    elected, newer, stale = (_state(_model([w, 2.0], 0.5)) for w in (3.0, 4.0, 5.0))
    elected.counters.round, newer.counters.round, stale.counters.round = 5, 7, 4

    class Averager:
        def __init__(self, donors):
            self.donors = donors

        def load_state_from_peers(self, timeout, exclude):
            for name, gs in self.donors:
                if name not in exclude:
                    meta, tensors = gs.share()
                    return name, meta, tensors
            return None

    def sync(donors, published):
        records = [SimpleNamespace(theta_hash=h, fingerprint=mine.fp, state="training", peer_id=f"p{i}")
                   for i, h in enumerate(published)]
        return StateSync(mine, Averager(donors), lambda: records, "me", 1.0, threading.Event()).download(
            attempts=1, want=elected.hash)

    assert sync([("d1", elected)], [])[2] == "d1"
    # the swarm moved on: a newer θ that another peer publishes heals the fork as well
    assert sync([("d2", newer)], [newer.hash])[2] == "d2"
    # ... but not one nobody else confirms, nor an older one
    assert sync([("d2", newer)], [elected.hash]) is None
    assert sync([("d3", stale), ("d1", elected)], [stale.hash])[2] == "d1"
    # catching up with groups that averaged our round without us: a donor still at our round does not do
    same = _state(_model([6.0, 2.0], 0.5))
    same.counters.round = 5
    records = [SimpleNamespace(theta_hash=h, fingerprint=mine.fp, state="training", peer_id=f"p{i}")
               for i, h in enumerate([same.hash, newer.hash])]

    def catch_up(donors):
        return StateSync(mine, Averager(donors), lambda: records, "me", 1.0, threading.Event()).download(
            attempts=1, min_round=6)

    assert catch_up([("d4", same)]) is None
    assert catch_up([("d4", same), ("d2", newer)])[2] == "d2"


def test_a_fresh_joiner_waits_for_the_theta_the_swarm_elects_instead_of_starting_a_second_model(monkeypatch):
    """10-minute soak: joiners whose download found no confirmed state (two peers, two θ) trained from the
    seeded init, and when the last peers holding the swarm's θ died, its round fell from 20 to 0. The joiner
    keeps asking for the θ the records elect; it stops when no live peer holds trained state, or after its
    patience."""
    import threading
    from types import SimpleNamespace

    from p2p_photon.peer.sync import StateSync

    mine = _state(_model([1.0, 2.0], 0.5))
    a, b = (_state(_model([w, 2.0], 0.5)) for w in (3.0, 4.0))
    a.counters.round = b.counters.round = 9

    class Averager:
        asked = 0

        def load_state_from_peers(self, timeout, exclude):  # nobody answers at first; then b, then a
            Averager.asked += 1
            donor = {1: None, 2: b}.get(Averager.asked, a) if "db" not in exclude else a
            return None if donor is None else (("da" if donor is a else "db"), *donor.share())

    records = [SimpleNamespace(theta_hash=a.hash, fingerprint=mine.fp, state="training", peer_id="p1")]
    sync = StateSync(mine, Averager(), lambda: records, "me", 1.0, threading.Event())
    monkeypatch.setattr(sync.stop, "wait", lambda s: False)  # no 2 s pauses in a test
    elects = []
    got = sync.await_elected(lambda recs: elects.append(1) or a.hash, patience_s=5.0)
    # asked again after nobody answered; b's θ (not elected, nobody publishes it) refused, a's taken
    assert got[2] == "da" and got[0]["theta"] == a.hash and len(elects) == 2 and Averager.asked == 3
    assert sync.await_elected(lambda recs: None, patience_s=5.0) is None
    Averager.load_state_from_peers = lambda self, timeout, exclude: None  # nobody serves it: patience ends
    t0 = time.monotonic()
    assert sync.await_elected(lambda recs: a.hash, patience_s=0.3) is None
    assert time.monotonic() - t0 < 2.0


def test_the_elected_theta_is_the_hash_most_trained_live_peers_hold():
    from hivemind.utils import get_dht_time

    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    now = get_dht_time()
    view = _View([rec("p1", theta_round=9, theta_hash="a" * 64, total_samples=10, time=now),
                  rec("p2", theta_round=9, theta_hash="b" * 64, total_samples=50, time=now),
                  rec("j1", theta_round=0, theta_hash="c" * 64, time=now),
                  rec("j2", theta_round=0, theta_hash="c" * 64, time=now)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    assert tracker.elected_theta(tracker.records()) == "b" * 64  # a 1-1 tie: more samples
    view.records_now.append(rec("p3", theta_round=9, theta_hash="a" * 64, time=now))
    assert tracker.elected_theta(tracker.records()) == "a" * 64  # two peers hold it
    view.records_now = [rec("j1", theta_round=0, theta_hash="c" * 64, time=now),
                        rec("p1", theta_round=9, theta_hash="a" * 64, time=now - 60)]  # gone
    assert tracker.elected_theta(tracker.records()) is None


def test_a_dead_dht_never_hangs_a_call_and_says_what_to_do():
    """hivemind's DHT.store/get wait without a deadline for the DHT's child process: a peer whose DHT
    process had exited hung in its final progress record, SIGTERM unanswered. dht_call bounds it."""
    import hivemind
    from hivemind.utils import get_dht_time

    from p2p_photon.dhtcall import DHTUnavailable, dht_call
    from p2p_photon.network import shutdown_dht

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=120)
    try:
        assert dht_call(dht, "store", "k", "v", expiration_time=get_dht_time() + 60, timeout=30)
        assert dht_call(dht, "get", "k", latest=True, timeout=30).value == "v"
        # hivemind's futures write to their pipes under process-shared locks: a child SIGKILLed inside one
        # (it may still be leaving the lock of the answer we just read) holds it for good, and every DHT this
        # process starts later hangs before it is ready (suite: test_progress, test_runspec and test_trust
        # all timed out after this test). Holding the locks while we kill keeps the child out of them.
        from hivemind.utils.mpfuture import MPFuture, SharedBytes

        with MPFuture._initialization_lock, MPFuture._update_lock, SharedBytes._lock:
            dht.kill()
            dht.join(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(DHTUnavailable, match="the DHT process has exited .*--resume"):
            dht_call(dht, "get", "k", latest=True, timeout=30)
        assert time.monotonic() - t0 < 5
    finally:
        shutdown_dht(dht)


def test_a_dht_call_that_gets_no_answer_raises_the_callers_error_in_time():
    from p2p_photon.averaging.protocol import AveragingFailed
    from p2p_photon.dhtcall import dht_call

    class Silent:  # a live DHT whose answer never comes
        pid = None

        def is_alive(self):
            return True

        def get(self, *a, return_future=False, **kw):
            import concurrent.futures
            return concurrent.futures.Future()

    t0 = time.monotonic()
    with pytest.raises(AveragingFailed, match="did not answer a get within 0.5 s"):
        dht_call(Silent(), "get", "k", timeout=0.5, slow=AveragingFailed)
    assert time.monotonic() - t0 < 3


def test_a_finished_peer_lingers_at_least_one_averaging_attempt_for_a_live_straggler():
    """Seen: a straggler left alone in stage 1 spent 37 s on its first attempt and ended on the seeded init,
    because the finished peers had lingered only rounds.linger_seconds (20 s) and left."""
    import threading

    from hivemind.utils import get_dht_time

    from p2p_photon.peer.parts import linger

    # one averaging attempt: 3 x step timeout (4 x 0.025 s of matchmaking) + 0.1 s of all-reduce = 0.4 s
    fast = ["averaging.matchmaking_time=0.025", "averaging.allreduce_timeout=0.1"]
    cfg = load_config(None, [f"model.seq_len={SEQ}", "rounds.num_rounds=3", "rounds.linger_seconds=0.05", *fast])
    assert cfg.averaging.attempt_s == pytest.approx(0.4)
    view = _View([rec("straggler", round=0, theta_round=0, time=get_dht_time())])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    stop = threading.Event()
    t0 = time.monotonic()
    linger(cfg, tracker, view, stop, my_round=3)
    assert 0.4 <= time.monotonic() - t0 < 1.5  # waited the attempt, not just the 0.05 s
    view.records_now = [rec("straggler", round=3, theta_round=3, time=get_dht_time())]  # nobody behind: leave at once
    t0 = time.monotonic()
    linger(cfg, tracker, view, stop, my_round=3)
    assert time.monotonic() - t0 < 0.3
    cfg = load_config(None, [f"model.seq_len={SEQ}", "rounds.num_rounds=3", "rounds.linger_seconds=0", *fast])
    view.records_now = [rec("straggler", round=0, theta_round=0, time=get_dht_time())]
    t0 = time.monotonic()
    linger(cfg, tracker, view, stop, my_round=3)  # 0 = leave at once, whoever is behind
    assert time.monotonic() - t0 < 0.3


def test_a_fork_in_the_last_round_is_settled_before_the_peer_leaves():
    """8 peers in groups of 2 (extended test, 1 run in 10): one peer ended a 3-round run on another θ; no
    next round compared hashes. After the last round a peer waits (at most one averaging attempt) for
    live peers still averaging it, counts every record at its θ round, finished peers' included, and
    downloads the swarm's θ if ours is a minority; finished peers linger while a peer at their round
    holds another θ."""
    import threading
    from types import SimpleNamespace

    from hivemind.utils import get_dht_time

    from p2p_photon.peer.parts import linger, settle_final_theta

    fast = ["averaging.matchmaking_time=0.025", "averaging.allreduce_timeout=0.1"]
    cfg = load_config(None, [f"model.seq_len={SEQ}", "rounds.num_rounds=3", "rounds.linger_seconds=0.05", *fast])
    ours, theirs = "a" * 16, "b" * 16
    gs = SimpleNamespace(counters=SimpleNamespace(round=3, total_samples=100), hash=ours)
    now = get_dht_time()
    view = _View([rec("p1", round=3, theta_round=3, theta_hash=theirs, state="done", time=now),
                  rec("p2", round=3, theta_round=3, theta_hash=theirs, state="done", time=now),
                  rec("p3", round=2, theta_round=2, theta_hash="c" * 64, state="averaging", time=now)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    healed, stop = [], threading.Event()
    t0 = time.monotonic()
    settle_final_theta(cfg, tracker, stop, gs, heal=lambda want: healed.append(want) or True)
    assert healed == [theirs]  # 2 finished peers hold theirs, only we hold ours
    assert 0.4 <= time.monotonic() - t0 < 1.5  # waited one attempt for p3, still averaging the last round
    healed.clear()
    view.records_now = view.records_now[:1] + [rec("p2", round=3, theta_round=3, theta_hash=ours, state="done",
                                                   time=now, total_samples=10**6)]
    settle_final_theta(cfg, tracker, stop, gs, heal=lambda want: healed.append(want) or True)
    assert healed == []  # 2 vs 1: ours is the swarm's
    stop.set()
    view.records_now = [rec("p1", round=3, theta_round=3, theta_hash=theirs, state="done", time=now)]
    settle_final_theta(cfg, tracker, stop, gs, heal=lambda want: healed.append(want) or True)
    assert healed == []  # interrupted: no settling
    # the finished side lingers for a live peer at its round on another θ, and not for one on its own
    stop.clear()
    view.records_now = [rec("p3", round=3, theta_round=3, theta_hash="c" * 64, state="averaging", time=get_dht_time())]
    t0 = time.monotonic()
    linger(cfg, tracker, view, stop, my_round=3, my_hash=ours)
    assert time.monotonic() - t0 >= 0.4
    view.records_now = [rec("p3", round=3, theta_round=3, theta_hash=ours, state="averaging", time=get_dht_time())]
    t0 = time.monotonic()
    linger(cfg, tracker, view, stop, my_round=3, my_hash=ours)
    assert time.monotonic() - t0 < 0.3


def test_a_state_change_record_is_republished_with_a_fresh_time_while_nothing_newer_comes():
    """'averaging' can outlast tracker.ALIVE_S: the view re-publishes the last state-change record every
    HEARTBEAT_S with a fresh time (soak: peers waiting on the stages looked gone to the others). Training
    records are not restamped (their time dates the samples they claim); a newer offer goes out instead."""
    from hivemind.utils import get_dht_time

    from p2p_photon.peer import swarm_view

    class Publisher:
        def __init__(self):
            self.sent = []

        def publish(self, record):
            self.sent.append(record)
            return True

    pub = Publisher()
    view = swarm_view.SwarmView(None, "run", pub, interval=0.5)
    t0 = get_dht_time() - 100
    view.publish(rec("me", state="averaging", time=t0))
    assert view._due() is None  # just published
    view._last_pub -= swarm_view.HEARTBEAT_S
    beat = view._due()
    assert beat.state == "averaging" and beat.time > t0 + 99 and beat.round == 5
    assert beat.model_copy(update=dict(time=t0)) == pub.sent[0]  # only the time changed
    view.offer(rec("me", state="training", samples=40, time=t0 + 1))
    assert view._due().samples == 40  # the interval passed: the newest offer, not a heartbeat
    view.publish(rec("me", state="training", time=t0 + 2))
    view._last_pub -= 2 * swarm_view.HEARTBEAT_S
    assert view._due() is None
    view.offer(rec("me", state="training", samples=80, time=t0 + 3))  # older than the state change below
    view.publish(rec("me", state="syncing", time=t0 + 4))
    view._last_pub -= 1.0
    assert view._due() is None and pub.sent[-1].state == "syncing"


def test_a_peer_arriving_after_its_rounds_groups_formed_waits_for_the_rounds_theta(monkeypatch):
    """A joiner that took θ of round 5 while most peers have been averaging round 5 for longer than the
    groups need to form (their records' `since`) waits without training: until the swarm applied round 5
    (two peers publish θ of round 6: take it), or went back to training round 5 (train it with them).
    A round whose averaging just began, or a minority averaging, is joined as usual."""
    from hivemind.utils import get_dht_time

    from p2p_photon.peer import sync

    cfg = load_config(None, [f"model.seq_len={SEQ}"])
    now = get_dht_time()
    long_ago, just_now = now - 20, now - 1
    formed = [rec(p, round=5, theta_round=5, state="averaging", since=long_ago, time=now) for p in ("p1", "p2")]
    view = _View(formed + [rec("p3", round=5, theta_round=5, state="training", since=long_ago, time=now)])
    tracker = RoundTracker(cfg, FP, "me", view, banned=dict)
    assert tracker.groups_formed(5, tracker.records(), after_s=10)
    assert not tracker.groups_formed(5, tracker.records(), after_s=30)  # not that long ago
    assert not tracker.groups_formed(6, tracker.records(), after_s=10)
    view.records_now[1] = rec("p2", round=5, theta_round=5, state="averaging", since=just_now, time=now)
    assert not tracker.groups_formed(5, tracker.records(), after_s=10)  # one of three
    view.records_now[1] = rec("p2", round=5, theta_round=5, state="averaging", time=now)  # since not said
    assert not tracker.groups_formed(5, tracker.records(), after_s=10)
    # peers syncing (other waiters among them) are in no group: two averaging of three others that train or
    # average is most of the swarm; and waiters holding θ of round 5 do not hold back the applied round's θ
    waiters = [rec(p, round=5, theta_round=5, state="syncing", time=now) for p in ("w1", "w2", "w3")]
    view.records_now = formed + [rec("p3", round=5, theta_round=5, state="training", time=now)] + waiters
    assert tracker.groups_formed(5, tracker.records(), after_s=10)

    stop, waited = threading.Event(), []
    monkeypatch.setattr(sync, "WAIT_POLL_S", 0.01)
    applied = [rec(p, round=6, theta_round=6, state="training", time=now, theta_hash="c3" * 32) for p in ("p1", "p2")]
    tracker.view = Script(formed + waiters, formed + waiters, formed + waiters, applied + waiters)
    assert sync.wait_out_formed_round(tracker, 5, stop, 10, 5.0, waiting=lambda: waited.append(1))
    assert waited == [1] and tracker.view.fetches == 4
    back = [rec(p, round=5, theta_round=5, state="training", time=now) for p in ("p1", "p2")]
    tracker.view = Script(formed + waiters, formed + waiters, back + waiters)
    assert not sync.wait_out_formed_round(tracker, 5, stop, 10, 5.0)
    assert tracker.view.fetches == 3
    tracker.view = Script(formed, waiters)  # nobody left but other waiters
    assert not sync.wait_out_formed_round(tracker, 5, stop, 10, 5.0) and tracker.view.fetches == 2
    # the one survivor of the group that applied round 5 trains round 6: its θ is no proof, and nobody averages
    survivor = [rec("p1", round=6, theta_round=6, state="training", time=now, theta_hash="c3" * 32)]
    tracker.view = Script(formed + waiters, survivor + waiters)
    assert not sync.wait_out_formed_round(tracker, 5, stop, 10, 5.0)
    assert tracker.view.fetches == 2
    # peers that failed the round publish `syncing` on their way back: no verdict until they train or average
    failing = [rec(p, round=5, theta_round=5, state="syncing", time=now) for p in ("p1", "p2")]
    tracker.view = Script(formed, failing + [rec("p3", round=5, theta_round=5, state="averaging", since=long_ago,
                                                 time=now)], applied + waiters)
    assert sync.wait_out_formed_round(tracker, 5, stop, 10, 5.0) and tracker.view.fetches == 3
    tracker.view = Script(formed)  # the round never lands: the wait is bounded
    assert not sync.wait_out_formed_round(tracker, 5, stop, 10, 0.1)
    tracker.view = Script(back, applied)  # not formed: no wait, one look
    assert not sync.wait_out_formed_round(tracker, 5, stop, 10, 5.0, waiting=lambda: waited.append(2))
    assert waited == [1] and tracker.view.fetches == 1


def test_a_fresh_run_waits_for_its_cohort_before_round_0(monkeypatch):
    """rounds.start_peers: a peer of a fresh run starts round 0 once that many peers of the run (itself
    included) are live; peers of another run, and records older than ALIVE_S, do not count; a run already
    past round 0, a resumed peer (round > 0) or a stop request end the wait at once."""
    from hivemind.utils import get_dht_time

    from p2p_photon.peer import sync

    cfg = load_config(None, [f"model.seq_len={SEQ}", "rounds.start_peers=3"])
    assert cfg.rounds.start_peers == 3
    with pytest.raises(ConfigError, match="rounds.start_peers"):
        load_config(None, ["rounds.start_peers=0"])
    now = get_dht_time()
    one = [rec("p1", round=0, theta_round=0, state="syncing", time=now)]
    stale = [rec("old", round=0, theta_round=0, state="syncing", time=now - 120)]
    foreign = [rec("f1", round=0, theta_round=0, state="syncing", time=now, fingerprint="other" * 4)]
    two = one + [rec("p2", round=0, theta_round=0, state="training", time=now)]

    monkeypatch.setattr(sync, "WAIT_POLL_S", 0.01)
    stop, waited = threading.Event(), []
    tracker = RoundTracker(cfg, FP, "me", Script(one + stale + foreign, one + stale + foreign, two), banned=dict)
    assert sync.wait_for_cohort(tracker, 3, 0, stop, waiting=lambda: waited.append(1)) == 3
    assert tracker.view.fetches == 3 and waited == [1]  # told the others once that it waits
    # a run that started without us: join it at once, however few peers are left
    started = one + [rec("p2", round=1, theta_round=1, state="training", time=now)]
    tracker.view = Script(started)
    assert sync.wait_for_cohort(tracker, 5, 0, stop, waiting=lambda: waited.append(2)) == 3 and waited == [1]
    tracker.view = Script(one)
    assert sync.wait_for_cohort(tracker, 5, 4, stop, waiting=lambda: waited.append(3)) == 1  # resumed at 4
    assert sync.wait_for_cohort(tracker, 1, 0, stop, waiting=lambda: waited.append(4)) == 1  # the default
    assert tracker.view.fetches == 0 and waited == [1]
    stopper = threading.Timer(0.2, stop.set)
    stopper.start()
    assert sync.wait_for_cohort(tracker, 5, 0, stop, waiting=lambda: waited.append(5)) == 2  # stopped
    assert waited == [1, 5] and stop.is_set()
