"""Averaging across groups (averaging/stages.py): the pure parts against hand-computed values."""

from __future__ import annotations

import time

import pytest
import torch

from p2p_photon.averaging import consensus, stages
from p2p_photon.averaging.protocol import (
    BROADCAST,
    AveragingFailed,
    check_broadcast,
    combine_part,
    group_bits,
    weight_problem,
)
from p2p_photon.codecs import make_codec
from tests.helpers import FakeDHT


def test_stage_bits_keep_rounds_stages_and_groups_apart():
    assert stages.stage_bits(5, 1) == group_bits(5) == "0" * 17 + "101"
    assert stages.stage_bits(5, 2) == group_bits(5) + "10"
    assert stages.stage_bits(5, 3, "0000000a" + "f" * 8) == group_bits(5) + "11" + "0" * 28 + "1010"
    assert stages.stage_bits(5, 3, "0000000b") != stages.stage_bits(5, 3, "0000000a")
    assert stages.stage_bits(6, 2) != stages.stage_bits(5, 2)


def test_every_member_derives_the_same_group_rep_and_weight_from_the_metadata():
    peers = {"Qmc": {"nonce": "n3", "weight": 8.0}, "Qma": {"nonce": "n1", "weight": 24.0},
             "Qmb": {"nonce": "n2", "weight": 40.0}}
    g = stages.Group.from_metadata(peers)
    assert g.members == ("Qma", "Qmb", "Qmc") and g.rep == "Qma" and g.weight == 72.0
    # the id is the consensus key's group id: sha256 of the sorted nonces
    assert consensus.group_key("p", 1, peers).endswith(g.group_id) and len(g.group_id) == 16
    assert stages.Group.from_metadata(dict(reversed(list(peers.items())))) == g


def test_a_client_mode_peer_represents_its_group_only_when_it_is_alone_and_never_leads_stage_two():
    """A client-mode peer accepts no connections: it cannot lead stage 2 or 3, so the smallest member
    that accepts them represents its group; a lone client still posts its group, but the stage-2
    leader is the smallest representative that is not a client (none: the stage fails, with why)."""
    peers = {"Qma": {"nonce": "1", "weight": 1.0, "client": True}, "Qmb": {"nonce": "2", "weight": 2.0},
             "Qmc": {"nonce": "3", "weight": 3.0, "client": False}}
    g = stages.Group.from_metadata(peers)
    assert g.members == ("Qma", "Qmb", "Qmc") and g.clients == {"Qma"} and g.rep == "Qmb"
    post = g.post()
    assert post["rep"] == "Qmb" and post["client"] is False and post["members"] == ["Qma", "Qmb", "Qmc"]
    lone = stages.Group("soloQma", ("Qma",), 1.0, frozenset({"Qma"}))
    assert lone.rep == "Qma" and lone.post()["client"] is True
    board = {g.group_id: post, "soloQma": lone.post(),
             "old": {"members": ["Qmd", "Qmz"], "weight": 1.0}}  # a post without a rep: its smallest member
    assert [stages.rep_of(v) for v in board.values()] == ["Qmb", "Qma", "Qmd"]
    assert stages.stage2_leader(board) == "Qmb"  # Qma is smaller, but a client
    assert stages.stage2_caps(board, {"Qma": 1.0, "Qmb": 2.0, "Qmc": 3.0, "Qmd": 1.0, "Qmz": 1.0}) == \
        {"Qmb": 6.0, "Qma": 1.0, "Qmd": 2.0}
    try:
        stages.stage2_leader({"soloQma": lone.post()})
    except AveragingFailed as e:
        assert "lone client-mode peer" in str(e)
    else:
        raise AssertionError("a board of lone clients has no stage-2 leader")


def test_a_representative_may_send_no_more_weight_than_its_members_caps_allow():
    board = {"g1": {"weight": 30.0, "members": ["a", "b"]}, "g2": {"weight": 9.0, "members": ["c"]}}
    assert stages.stage2_caps(board, {"a": 10.0, "b": 20.0, "c": 5.0}) == {"a": 30.0, "c": 5.0}
    assert stages.stage2_caps(board, {"a": 10.0, "c": 5.0}) == {"a": 20.0, "c": 5.0}  # b unknown: the biggest cap
    assert stages.stage2_caps(board, {}) == {}
    assert stages.covered(board) == 3


def test_the_board_lists_well_formed_groups_of_the_round_only():
    dht = FakeDHT()
    key = stages.board_key("run", 4)
    dht.store(key, subkey="g1", value={"weight": 3.0, "members": ["a", "b"]}, expiration_time=0)
    dht.store(key, subkey="g2", value={"weight": "lots", "members": ["c"]}, expiration_time=0)
    dht.store(key, subkey="g3", value="junk", expiration_time=0)
    assert stages.read_board(dht, "run", 4) == {"g1": {"weight": 3.0, "members": ["a", "b"]}}
    assert stages.read_board(dht, "run", 5) == {}


def test_a_broadcast_passes_the_one_weighted_contribution_on_bit_for_bit():
    x = torch.randn(1000) * 1e-3
    fp16 = make_codec("fp16")
    x16 = fp16.decode(fp16.encode(x))  # what stage 2 hands over is already fp16-exact
    zeros = torch.zeros(1000)
    out = combine_part([(zeros, 0.0), (x16, 1.0), (zeros, 0.0)], 1000, codec=fp16, aggregator=BROADCAST,
                       clip_factor=2.0, carried=None)
    assert torch.equal(out.decoded, x16) and out.dropped == []
    # no sender, or two: a zero part (the members fail the round on the metadata, check_broadcast)
    none = combine_part([(zeros, 0.0), (x16, 0.0)], 1000, codec=fp16, aggregator=BROADCAST, clip_factor=2.0,
                        carried=None)
    assert torch.equal(none.decoded, zeros)
    assert check_broadcast({"a": {"source": False}, "b": {"source": True}}) == "b"
    for peers in ({"a": {"source": False}}, {"a": {"source": True}, "b": {"source": True}}):
        try:
            check_broadcast(peers)
        except AveragingFailed as e:
            assert "senders of the swarm's average" in str(e)
        else:
            raise AssertionError(f"accepted {peers}")


def test_only_a_broadcast_accepts_a_zero_weight():
    assert "not a positive number" in weight_problem(0.0, None)
    assert weight_problem(0.0, None, zero_ok=True) is None
    assert "not a positive number" in weight_problem(-1.0, None, zero_ok=True)


def test_posts_form_waves_that_every_representative_derives_alike():
    board = {"a": {"t": 100.0}, "b": {"t": 101.5}, "c": {"t": 103.9}, "d": {"t": 104.5}, "e": {"t": 180.0}}
    assert stages.wave_of(board, "a", 4.0) == (100.0, 104.0, None)
    assert stages.wave_of(board, "c", 4.0) == (100.0, 104.0, None)
    assert stages.wave_of(board, "d", 4.0) == (104.5, 108.5, 100.0)  # too late for the first wave
    assert stages.wave_of(board, "e", 4.0) == (180.0, 184.0, 104.5)  # a retry of the round, much later


def _spanner(dht, stage_timeout=0.3):
    def no_stage(run):
        raise AssertionError("no stage should run")
    return stages.Spanner(dht, "run", "me", no_stage, codec="none", board_wait=0.2, gather_s=0.0,
                          stage_timeout=stage_timeout)


def test_a_retry_after_failed_waves_proceeds_but_a_group_after_an_applied_wave_is_late():
    """The livelock seen in CI: every failed attempt of a round leaves its post on the board, and the next
    attempt, alone in a new wave after it, used to fail as 'late' forever. Only an earlier wave in which
    a group applied an average makes a group late."""
    from hivemind.utils import get_dht_time

    dht, now = FakeDHT(), get_dht_time()
    earlier = {"g1": {"t": now - 10, "members": ["a", "b"]}, "solo1": {"t": now - 9, "members": ["c"]}}
    sp = _spanner(dht)
    dht.store(stages.decision_key("run", 3, "g1"), subkey="a", value="failed", expiration_time=0)
    assert sp._applied(earlier, 3) == 0  # a failed attempt; the solo never decides
    dht.store(stages.decision_key("run", 3, "g1"), subkey="b", value="broadcast", expiration_time=0)
    assert sp._applied(earlier, 3) == 0  # only the representative's (smallest id) decision counts
    dht.store(stages.decision_key("run", 4, "g1"), subkey="a", value="single", expiration_time=0)
    assert sp._applied(earlier, 4) == 1
    # without waiting (checked as soon as we post, before our own wave's window): what is known now
    t0 = get_dht_time()
    assert sp._applied(earlier, 4, wait=False) == 1
    assert sp._applied({"g2": {"t": t0, "members": ["d", "e"]}}, 3, wait=False) == 0 and get_dht_time() - t0 < 0.5
    # no decision yet: wait for it as long as the earlier group's stages can run, then count it as failed
    t0 = get_dht_time()
    assert sp._applied({"g2": {"t": t0, "members": ["d", "e"]}}, 3) == 0
    assert 0.2 + 2 * 0.3 <= get_dht_time() - t0 < 0.2 + stages.PROPAGATION_S + 2 * 0.3 + 1.0


def test_a_member_notices_a_silent_representative_within_the_bound_of_its_phase(monkeypatch):
    """A rep marks 'posted' and 'stage2' before it decides; each phase has its own bound (soak finding: the
    members of a group whose rep was killed between stages waited 129 s)."""
    import threading

    monkeypatch.setattr(stages, "STAGE1_SLACK_S", 0.1)
    monkeypatch.setattr(stages, "PROPAGATION_S", 0.05)
    dht = FakeDHT()
    sp = _spanner(dht, stage_timeout=0.3)  # board_wait 0.2
    key = stages.decision_key("run", 1, "g")

    def timed(rep):
        t0 = time.monotonic()
        out = stages.Member(sp, stages.Group("g", (rep, "x"), 2.0), 1).decision_of(rep)
        return out[:2], time.monotonic() - t0

    (decision, phase), took = timed("never")  # no mark after stage 1: gone within slack + propagation
    assert decision is None and "never after stage 1" in phase and 0.15 <= took < 1.0
    dht.store(key, subkey="posted-rep", value="posted", expiration_time=0)
    (decision, phase), took = timed("posted-rep")  # 0.2 + 0.05 + 2 x 0.3 + 0.1 = 0.95 s
    assert decision is None and "posted" in phase and 0.9 <= took < 2.0

    def rep_runs():
        for mark in ("posted", "stage2", "broadcast"):
            dht.store(key, subkey="live-rep", value=mark, expiration_time=0)
            time.sleep(0.12)

    thread = threading.Thread(target=rep_runs)
    thread.start()
    (decision, phase), took = timed("live-rep")
    thread.join()
    assert decision == "broadcast" and phase == "stage2"


def test_every_wait_of_the_stages_ends_when_the_swarm_went_past_our_round():
    """Following a rep, waiting for the board's wave, waiting for an earlier wave's decisions: each polls
    the round's `moved_on` and ends with AveragedWithoutUs (bounds here are seconds; it takes ~0.1 s)."""
    import pytest
    from hivemind.utils import get_dht_time

    from p2p_photon.averaging.protocol import AveragedWithoutUs

    dht = FakeDHT()
    sp = stages.Spanner(dht, "run", "me", None, codec="none", board_wait=5.0, gather_s=5.0, stage_timeout=5.0)
    sp.moved_on = lambda: "the swarm went on"
    key = stages.decision_key("run", 1, "g")
    dht.store(key, subkey="rep", value="posted", expiration_time=0)
    for wait in (lambda: stages.Member(sp, stages.Group("g", ("me", "rep"), 2.0), 1).decision_of("rep"),
                 lambda: sp.post_and_wait(stages.Group("g2", ("me", "x"), 2.0), 1, expected=5),
                 lambda: sp._applied({"g": {"t": get_dht_time(), "members": ["rep", "y"]}}, 1)):
        t0 = time.monotonic()
        with pytest.raises(AveragedWithoutUs, match="went on"):
            wait()
        assert time.monotonic() - t0 < 1.0


def test_a_group_that_held_every_expected_peer_is_on_the_board_and_a_later_group_catches_up():
    """A group holding every peer it expected applies its stage-1 average at once; its representative (not
    a member) still posts it, decided 'single'. A group posting into the same wave a moment later must not
    average apart (two θ): it catches up (soak: a pair raced from round 8 to 16 unseen by four others)."""
    import pytest

    from p2p_photon.averaging.protocol import AveragedWithoutUs

    dht = FakeDHT()
    peers = {"a": {"nonce": "1", "weight": 2.0}, "b": {"nonce": "2", "weight": 3.0}}

    def spanner(me):
        return stages.Spanner(dht, "run", me, None, codec="none", board_wait=5.0, gather_s=1.0, stage_timeout=1.0)

    spanner("b").announce(peers, 7)
    assert stages.read_board(dht, "run", 7) == {}
    spanner("a").announce(peers, 7)
    g = stages.Group.from_metadata(peers)
    board = stages.read_board(dht, "run", 7)
    assert list(board) == [g.group_id] and board[g.group_id]["members"] == ["a", "b"]
    assert board[g.group_id]["weight"] == 5.0
    assert stages.read_decision(spanner("c").dht, stages.decision_key("run", 7, g.group_id), "a") == "single"
    t0 = time.monotonic()
    with pytest.raises(AveragedWithoutUs, match="of our wave averaged this round without us"):
        spanner("c").post_and_wait(stages.Group("g2", ("c", "d"), 2.0), 7, expected=4)
    assert time.monotonic() - t0 < 1.0


def test_an_applied_decision_that_no_live_peer_holds_does_not_make_a_group_late(monkeypatch):
    """Soak: a representative killed right after deciding 'broadcast' left that decision on round 5's board;
    its stage 3 never ran, nobody reached round 6, and every later attempt of round 5, by every peer,
    failed as 'late' (the swarm stalled for good). A decision counts only once a live peer holds θ of a
    later round (`ahead`); without one within LIVE_TTL, the group goes on with its own wave."""
    import pytest

    from p2p_photon.averaging.protocol import AveragedWithoutUs

    monkeypatch.setattr(stages, "LIVE_TTL", 0.5)
    dht = FakeDHT()
    peers = {"a": {"nonce": "1", "weight": 2.0}, "b": {"nonce": "2", "weight": 3.0}}
    stages.Spanner(dht, "run", "a", None, codec="none", board_wait=5.0, gather_s=1.0, stage_timeout=1.0
                   ).announce(peers, 5)
    late = stages.Spanner(dht, "run", "c", None, codec="none", board_wait=5.0, gather_s=1.0, stage_timeout=1.0)
    late.ahead = lambda: False  # the decided group's θ is nowhere: its members died
    t0 = time.monotonic()
    wave = late.post_and_wait(stages.Group("g2", ("c", "d"), 2.0), 5, expected=4)
    assert "g2" in wave and 0.5 <= time.monotonic() - t0 < 3.0
    late.ahead = lambda: True  # a member published θ of round 6: it did apply
    with pytest.raises(AveragedWithoutUs, match="of our wave averaged this round without us"):
        late.post_and_wait(stages.Group("g3", ("e", "f"), 2.0), 5, expected=6)


def test_a_dead_stage_two_leader_is_dropped_and_the_other_representatives_go_on_without_its_group(monkeypatch):
    """Soak: the peer killed was stage 2's leader, and every other representative (and so the swarm) waited
    for it until the stage-2 bound, ~75 s; then each such kill failed the round of every group. While it waits
    in stage 2, a representative checks the leader's phase mark every second (what SwarmAverager._step
    polls); once it expired, the representatives redo stage 2 once without the leader's group, under other
    group bits and with the next leader; left alone, a group's own average is the round's. A second dead
    leader fails the round (not a 'moved on': the swarm did not average it). A live leader's stage ends
    normally."""
    from p2p_photon.averaging.protocol import AveragedWithoutUs

    monkeypatch.setattr(stages, "LIVE_TTL", 0.3)
    monkeypatch.setattr(stages, "GONE_GRACE_S", 0.2)
    g = lambda *m: {"members": list(m), "weight": 1.0, "t": 0.0}  # noqa: E731
    two = {"g1": g("a", "x"), "g2": g("b", "y")}
    three = {**two, "g3": g("c", "z", "w")}

    def attempt(board, dies_after: dict):
        """dies_after: leader -> seconds into its stage after which its mark is gone (absent: it lives)."""
        dht, runs = FakeDHT(), []
        for gid, v in board.items():
            dht.store(stages.decision_key("run", 4, gid), subkey=v["members"][0], value="stage2", expiration_time=0)

        def run_stage(run):  # hivemind's step as SwarmAverager._step runs it: the spanner's check is polled
            leader = run.policy["leader"]
            runs.append((leader, run.bits, run.policy["target_group_size"]))
            gid = next(k for k, v in board.items() if v["members"][0] == leader)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:
                if leader in dies_after and time.monotonic() - t0 > dies_after[leader]:
                    dht.data.pop(stages.decision_key("run", 4, gid), None)  # its mark expires
                if (why := sp.moved_on()) is not None:
                    raise AveragedWithoutUs(why)
                time.sleep(0.05)
            reps = {v["members"][0]: {"group_totals": {}} for v in board.values()
                    if v["members"][0] not in dies_after or v["members"][0] == "b"}
            return [torch.full((2,), float(len(runs)))], reps

        sp = stages.Spanner(dht, "run", "b", run_stage, codec="none", board_wait=1.0, gather_s=1.0, stage_timeout=1.0)
        t0 = time.monotonic()
        try:
            out = sp.stage2([torch.zeros(2)], stages.Group("g2", ("b", "y"), 1.0), {"b": 1}, board, 4, {})
        except AveragingFailed as e:
            out = e
        assert sp.moved_on() is None  # the round's own check is back
        return out, time.monotonic() - t0, runs

    # two groups, the leader dies: our group's own average is the round's (covering our 2 peers)
    out, took, runs = attempt(two, {"a": 0.3})
    assert not isinstance(out, Exception) and out[1] == 2 and float(out[0][0][0]) == 0.0, out
    assert len(runs) == 1 and 0.6 <= took < 1.5, (runs, took)
    # three groups, the leader dies: b and c redo stage 2 under other bits, led by b, and cover 5 peers
    out, took, runs = attempt(three, {"a": 0.3})
    assert not isinstance(out, Exception) and out[1] == 5 and float(out[0][0][0]) == 2.0, out
    assert [r[0] for r in runs] == ["a", "b"] and runs[1][1] == runs[0][1] + "1" and runs[1][2] == 2, runs
    # three groups, both leaders die in turn: the round fails
    out, _, runs = attempt({"g0": g("a", "x"), "g1": g("aa", "q"), "g2": g("b", "y")}, {"a": 0.3, "aa": 0.3})
    assert isinstance(out, AveragingFailed) and not isinstance(out, AveragedWithoutUs), out
    assert "stage 2's leader aa went silent" in str(out), out
    assert [r[0] for r in runs] == ["a", "aa"], runs
    # a live leader's stage ends normally: all three groups, 7 peers
    out, took, runs = attempt(three, {})
    assert not isinstance(out, Exception) and out[1] == 7 and took >= 1.5 and len(runs) == 1, out




def test_a_member_takes_the_place_of_a_representative_that_died_waiting_for_its_wave(monkeypatch):
    """Soak: a killed representative failed its whole group's round. Group g2 = (c, d, e) posted by c, which
    dies while 'posted' (its mark expires): d, the next member, posts g2 again under c's post time and joins
    stage 2 in c's place, led by the same leader (a), at the same group size; then it leads stage 3 for the
    two members left, and e follows d. If the dead rep was stage 2's leader, its members fail (the others
    redo stage 2 without its group); a rep that dies in stage 2 is not replaced."""
    import threading

    from hivemind.utils import get_dht_time

    monkeypatch.setattr(stages, "LIVE_TTL", 0.3)
    monkeypatch.setattr(stages, "GONE_GRACE_S", 0.2)
    monkeypatch.setattr(stages, "HEARTBEAT_S", 0.05)
    t_post = get_dht_time() - 5.0  # the wave closed long ago (board_wait 0.2 s)
    x = torch.tensor([1.5, -2.0])

    def setup(dies_in: str, groups):
        dht, runs = FakeDHT(), []
        for gid, members in groups.items():
            dht.store(stages.board_key("run", 4), subkey=gid, value=dict(members=list(members), weight=float(
                len(members)), rep=members[0], t=t_post), expiration_time=0)
        rep, gid = groups["000000b2"][0], "000000b2"
        dht.store(stages.decision_key("run", 4, gid), subkey=rep, value=dies_in, expiration_time=0)
        dht.store(stages.decision_key("run", 4, "000000a1"), subkey=groups["000000a1"][0], value="stage2", expiration_time=0)
        threading.Timer(0.3, lambda: dht.data[stages.decision_key("run", 4, gid)].pop(rep)).start()  # it dies
        return dht, runs

    def member(dht, runs, me, group):
        def run_stage(run):
            runs.append((me, run.stage, run.policy["leader"], run.policy["target_group_size"], run.weight))
            if run.stage == 2:
                return [x.clone()], {"a": {"group_totals": {"steps": 3, "samples": 30}},
                                     me: {"group_totals": {"steps": 9, "samples": 90}}}
            peers = {"d": {"source": True, "spanned": 5, "swarm_totals": {"steps": 12, "samples": 120}},
                     "e": {"source": False}}
            return [x.clone()], peers
        sp = stages.Spanner(dht, "run", me, run_stage, codec="none", board_wait=0.2, gather_s=0.1, stage_timeout=0.5)
        return stages.Member(sp, group, 4)

    groups = {"000000a1": ("a", "x"), "000000b2": ("c", "d", "e")}
    g2 = stages.Group("000000b2", ("c", "d", "e"), 3.0)
    dht, runs = setup("posted", groups)
    out = {}
    follower = threading.Thread(target=lambda: out.setdefault("e", member(dht, runs, "e", g2).follow(
        [torch.zeros(2)], {"steps": 9, "samples": 90}, {}, 5)))
    follower.start()
    got_d = member(dht, runs, "d", g2).follow([torch.ones(2)], {"steps": 9, "samples": 90}, {}, 5)
    follower.join(timeout=10)
    assert sorted(r for r in runs if r[0] == "d") == [("d", 2, "a", 2, 3.0), ("d", 3, "d", 2, 1.0)], runs
    assert [r for r in runs if r[0] == "e"] == [("e", 3, "d", 2, 0.0)], runs
    post = dht.get(stages.board_key("run", 4)).value["000000b2"].value
    assert post["rep"] == "d" and post["t"] == t_post and post["members"] == ["c", "d", "e"]
    for got in (got_d, out["e"]):
        assert torch.equal(got[0][0], x) and got[1] == 5 and got[2] == {"steps": 12, "samples": 120}, got
    assert stages.read_decision(dht, stages.decision_key("run", 4, "000000b2"), "d") == "broadcast"

    # the dead rep led stage 2 (a < c): its successor does not take part; the members fail
    groups = {"000000a1": ("e", "y"), "000000b2": ("a", "d", "f")}
    dht, runs = setup("posted", groups)
    with pytest.raises(AveragingFailed, match="stage 2's leader"):
        member(dht, runs, "d", stages.Group("000000b2", ("a", "d", "f"), 3.0)).follow([torch.ones(2)], {}, {}, 5)
    assert runs == []
    # the rep died in stage 2: nobody takes over
    dht, runs = setup("stage2", {"000000a1": ("a", "x"), "000000b2": ("c", "d", "e")})
    with pytest.raises(AveragingFailed, match="went silent.*stage2"):
        member(dht, runs, "d", g2).follow([torch.ones(2)], {}, {}, 5)
    assert runs == []

    # the rep died waiting, and its successor d is dead too (it never marks): e takes c's place in turn,
    # as c's replacement (the board holds c's post), and broadcasts to itself alone
    monkeypatch.setattr(stages, "STAGE1_SLACK_S", 0.3)
    groups = {"000000a1": ("a", "x"), "000000b2": ("c", "d", "e")}
    dht, runs = setup("posted", groups)

    def run_stage_e(run):
        runs.append(("e", run.stage, run.policy["leader"], run.policy["target_group_size"], run.weight))
        if run.stage == 2:
            return [x.clone()], {"a": {"group_totals": {"steps": 3, "samples": 30}},
                                 "e": {"group_totals": {"steps": 9, "samples": 90}}}
        return [x.clone()], {"e": {"source": True, "spanned": 5, "swarm_totals": {"steps": 12, "samples": 120}}}

    sp = stages.Spanner(dht, "run", "e", run_stage_e, codec="none", board_wait=0.2, gather_s=0.1, stage_timeout=0.5)
    got_e = stages.Member(sp, g2, 4).follow([torch.zeros(2)], {"steps": 9, "samples": 90}, {}, 5)
    assert runs == [("e", 2, "a", 2, 3.0), ("e", 3, "e", 1, 1.0)], runs
    post = dht.get(stages.board_key("run", 4)).value["000000b2"].value
    assert post["rep"] == "e" and post["t"] == t_post and post["members"] == ["c", "d", "e"]
    assert torch.equal(got_e[0][0], x) and got_e[1] == 5
    assert stages.read_decision(dht, stages.decision_key("run", 4, "000000b2"), "e") == "broadcast"
    # d, alive after all but too slow to mark, finds e's post when it takes the place in turn: it steps back
    dht, runs = setup("posted", groups)
    board = dht.data[stages.board_key("run", 4)]
    board["000000b2"].value = dict(board["000000b2"].value, rep="e")
    with pytest.raises(AveragingFailed, match="e already took our group's place"):
        member(dht, runs, "d", g2).follow([torch.ones(2)], {}, {}, 5)
    assert runs == []
    # ... but not when the rep that never marked is the first one (it may not have posted the group at all)
    dht, runs = setup("never", groups)  # "never" is no phase: c is never seen alive after stage 1
    with pytest.raises(AveragingFailed, match="went silent.*never after stage 1"):
        stages.Member(sp, g2, 4).follow([torch.zeros(2)], {}, {}, 5)
    assert runs == []


def test_every_member_of_a_group_expects_the_same_swarm_from_the_groups_metadata():
    """Suite finding (overlapped 3-peer swarm): one member counted 2 peers at round 0 and applied its group's
    average, the other counted 3 and went on to stage 2 with the third peer: two θ after round 0, for 4
    rounds. The group now decides from its members' metadata, the same for all: the largest count sent
    (malformed counts ignored); no counts at all: 0 (nothing to span)."""
    from p2p_photon.averaging.swarm_averager import group_expectation

    group = {"a": {"expect": 2}, "b": {"expect": 3}}
    assert group_expectation(group) == 3
    assert group_expectation(dict(reversed(list(group.items())))) == 3  # the same whoever computes it
    assert group_expectation({"a": {"expect": 2}, "b": {"expect": "9"}, "c": {"expect": True}, "d": {}}) == 2
    assert group_expectation({"a": {}, "b": {"expect": -4}}) == 0
