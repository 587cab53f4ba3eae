"""One average for the whole swarm when a round forms more than one group (the swarm outgrew
`averaging.target_group_size`, or matchmaking split it): the group's result is spread across groups
in two more stages, so that every peer of every group ends the round with the same bits.

    stage 1  the round's groups, as always: group g averages its members' Δ (weights: samples) with
             the run's codec, robust aggregator and error feedback; every member of g holds m_g, bit-
             identical, and knows W_g = Σ of its members' weights (from the group's metadata).
    board    g's representative (its member with the smallest peer id, so all members agree without
             talking) posts (W_g, members, DHT time) under the round's DHT key. Posts form waves: a
             wave closes `board_wait` seconds (the stage-1 timeout + 2 x matchmaking_time: a peer left alone
             in stage 1 learns it only at that timeout, and its post must still make the wave) after its first post, the next
             post opens the next wave (a retry of the round). Every rep derives the same waves from
             the same posts, so the reps agree on their wave's groups without talking; a rep stops
             waiting as soon as its wave covers the peers it expects to average the round (usually
             all groups post within a second or two of each other). A group whose
             wave follows one in which a group applied an average was too late: it fails the round
             and catches up (earlier waves that only failed, as a retry's, do not count).
             One group on the board: m_g is the swarm's average; done (the rep says so to g).
    stage 2  the representatives, one per group, average m_g weighted by W_g in ONE group (the stage's
             target group size is the number of groups on the board, and every rep joins only the
             group led by the smallest rep id, so matchmaking cannot form two halves): Σ W_g m_g / Σ W_g over the
             groups, which is exactly the weighted mean of every contribution of the round. Codec:
             `none`, or `fp16` if the run's codec is lossy (elementwise: the same value encodes to
             the same bytes however the all-reduce partitions it); the run's aggregator (with `mean`, the
             exact weighted mean; `clip` also bounds a group of one attacker); no error feedback. The owner encodes once: every rep holds the same x.
    stage 3  each representative broadcasts x in its own group: an all-reduce of group g's members
             (group key from g's id) in which the rep sends x with weight 1 and the others zeros with
             weight 0, and every owner passes the one weighted contribution on unchanged (no arith-
             metic; x is already fp16-exact, so re-encoding it is exact). Every peer of the swarm ends
             with the bits of x.

Why this design: it needs nothing from hivemind but matchmaking under our own group keys (already
used for rounds) and our own all-reduce; per peer it costs one more all-reduce (two for a rep); it
is exact for any number and sizes of groups (a Moshpit grid is exact only when it is full, and its
columns would compute the same mean with different float rounding, so the peers' θ would differ in
the last bits). One group of representatives holds up to target_group_size groups, so two stages
span target_group_size² peers (4096 with the default 64).

What can go wrong, and what happens:
* a rep dies while it waits for its wave (after stage 1, before stage 2): the next member takes its
  place (`Member`): every member holds m_g and W_g, so it re-posts the group under the dead rep's post
  time and joins stage 2 with the same leader, then leads stage 3 for the members left. A rep refreshes
  its phase mark every HEARTBEAT_S (`PhaseMarks`), so a dead rep is noticed when the mark expires
  (~LIVE_TTL), by its members and by later groups waiting for its decision, not at the phase's bound.
* a rep dies or times out during stage 2 or 3, or it led stage 2: its group's stage 3 has no sender,
  every member of the group sees it (its decision, or `check_broadcast` on the metadata) and fails the
  round; the peer then catches up from the swarm's θ by download, like after any failed round.
* a group finishes stage 1 after the board closed, or the reps split into two stage-2 groups: the
  swarm ends the round with two θ; every peer compares θ hashes in the progress records (tracker.fork)
  and the minority re-syncs from the majority within the next round: detected and healed, logged.
* a group holds every peer it expected (the largest of its members' counts of peers at this round, the
  same on every member: `swarm_averager.group_expectation`) and applies its
  stage-1 average without stages 2-3: its rep still posts it, decided 'single' (`Spanner.announce`).
  Without this, a pair that believed itself the whole swarm (the others one round behind) averaged
  round after round unseen, and the rest, arriving at those rounds later, averaged them again apart
  (soak: a pair raced from round 8 to 16 while four peers trained another θ). A group arriving later
  finds the applied group on the board (an earlier wave, or its own) and catches up with its θ.
* a member of g misses stage 3 (dies, slow): only it fails the round.
* a rep lies about W_g: its stage-2 weight is capped by the sum of its members' caps (their own
  signed progress records), as any sender's weight is in stage 1.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.utils import get_dht_time

from ..dhtcall import dht_call
from . import consensus
from .protocol import BROADCAST, AveragedWithoutUs, AveragingFailed, check_broadcast, group_bits, totals_of

logger = logging.getLogger(__name__)

BOARD_TTL = 300.0
POLL_S = 0.1
PROPAGATION_S = 1.0  # DHT time margin after the board closes before it is read for the last time
STAGE1_SLACK_S = 10.0  # a representative marks 'posted' right after stage 1 (as its members end it too)
FINAL = ("single", "broadcast", "failed")
LIVE_TTL = 10.0  # a representative's phase mark ('posted', 'stage2') expires this long after its last refresh
HEARTBEAT_S = 2.0  # ... and the representative refreshes it this often while it is in the phase
GONE_GRACE_S = 2.0  # a mark missing this long after it was seen: its representative is gone (not a DHT hiccup)


def stage_bits(round_no: int, stage: int, group_id: str = "") -> str:
    """hivemind group bits of a stage: stage 1 is the round's bits; stage 2 adds '10'; stage 3 adds
    '11' and 32 bits of the group's id, so each group broadcasts only among its own members."""
    bits = group_bits(round_no)
    if stage == 1:
        return bits
    if stage == 2:
        return bits + "10"
    return bits + "11" + format(int(group_id[:8], 16), "032b")


def stage_codec(lossy: bool) -> str:
    """The codec of stages 2 and 3: elementwise and exact on its own output (see the docstring)."""
    return "fp16" if lossy else "none"


@dataclass(frozen=True)
class Group:
    """What every member of a stage-1 group knows about it, identically."""

    group_id: str
    members: tuple[str, ...]
    weight: float  # W_g: the sum of the members' weights
    clients: frozenset[str] = frozenset()  # members in client mode: they accept no connections
    gone: frozenset[str] = frozenset()  # representatives that died after stage 1 (their Δ is in the average)

    @property
    def rep(self) -> str:
        """The smallest member that accepts connections (it may have to lead stage 2, and it leads stage
        3): a client-mode peer represents its group only when it is alone in it."""
        return min(self.successors(), default=self.members[0])

    def successors(self) -> list[str]:
        """Members that can represent the group: they accept connections and are not gone."""
        return [m for m in self.members if m not in self.clients and m not in self.gone]

    def without(self, rep: str) -> Group:
        """The group after its representative `rep` died: the next member represents it (Member.follow)."""
        return dataclasses.replace(self, gone=self.gone | {rep})

    @classmethod
    def from_metadata(cls, peers: Mapping[str, Mapping[str, Any]]) -> Group:
        group_id = consensus.group_key("", 0, peers).rsplit("_", 1)[-1]
        weight = sum(float(m.get("weight", 0.0)) for m in peers.values())
        clients = frozenset(p for p, m in peers.items() if m.get("client"))
        return cls(group_id, tuple(sorted(peers)), weight, clients)

    def post(self) -> dict[str, Any]:
        """What the representative puts on the round's board."""
        return dict(weight=self.weight, members=list(self.members), rep=self.rep, client=self.rep in self.clients,
                    t=get_dht_time())


def rep_of(post: Mapping[str, Any]) -> str:
    """The representative of a group on the board."""
    rep = post.get("rep")
    return rep if isinstance(rep, str) and rep in post["members"] else min(post["members"])


def stage2_leader(board: Mapping[str, dict]) -> str:
    """Stage 2's leader: the smallest representative that accepts connections (AveragingFailed if every
    group on the board is a lone client-mode peer: none of them can lead)."""
    leader = min((rep_of(v) for v in board.values() if not v.get("client")), default=None)
    if leader is None:
        raise AveragingFailed("every group of the round is a lone client-mode peer: none of them can lead stage 2")
    return leader


def read_decision(dht, key: str, rep: str) -> str | None:
    """What representative `rep` stored under a group's decision key: a phase mark or its decision."""
    found = dht_call(dht, "get", key, latest=True, slow=AveragingFailed)
    if found is not None and isinstance(found.value, dict) and rep in found.value:
        decision = found.value[rep].value
        if isinstance(decision, str):
            return decision
    return None


def board_key(prefix: str, round_no: int) -> str:
    return f"{prefix}_groups_{round_no}"


def decision_key(prefix: str, round_no: int, group_id: str) -> str:
    return f"{prefix}_span_{round_no}_{group_id}"


def read_board(dht, prefix: str, round_no: int) -> dict[str, dict]:
    """group id -> {weight, members} of every group of the round posted so far."""
    found = dht_call(dht, "get", board_key(prefix, round_no), latest=True, slow=AveragingFailed)
    if found is None or not isinstance(found.value, dict):
        return {}
    board = {}
    for gid, item in found.value.items():
        v = item.value
        if isinstance(v, dict) and isinstance(v.get("members"), list) and isinstance(v.get("weight"), (int, float)):
            board[str(gid)] = v
    return board


def covered(board: Mapping[str, dict]) -> int:
    """Distinct peers of these posts (a peer that retried within one wave counts once)."""
    return len({m for v in board.values() for m in v["members"]})


def stage2_caps(board: Mapping[str, dict], member_caps: Mapping[str, float]) -> dict[str, float]:
    """The most weight each group's representative may send in stage 2: the sum of its members' caps
    (a member without one counts as the largest cap; no caps at all: none)."""
    if not member_caps:
        return {}
    biggest = max(member_caps.values())
    return {rep_of(v): sum(member_caps.get(m, biggest) for m in v["members"]) for v in board.values()}


def wave_of(board: Mapping[str, dict], group_id: str, wait: float) -> tuple[float, float, float | None]:
    """(opening, closing time) of the wave of posts holding `group_id`'s, and the opening of the wave
    before it (None: none). A wave opens with a post and closes `wait` seconds later; the first post
    after a close opens the next one."""
    times = sorted(float(v.get("t", 0.0)) for v in board.values())
    mine = float(board[group_id].get("t", 0.0))
    start, before = times[0], None
    for t in times:
        if t > start + wait:
            before, start = start, t
        if t >= mine:
            break
    return start, start + wait, before


def proven(ahead: Callable[[], bool], check: Callable[[], None]) -> bool:
    """A group decided 'single' or 'broadcast': did its members really apply the average? They publish
    θ of the next round as soon as they start it, so wait (LIVE_TTL at most) for a live peer `ahead` of
    us (`check`: the moved-on check). A 'broadcast' whose representative died before stage 3 reached
    nobody (soak: a rep killed right after deciding left its decision on round 5's board, and every later
    attempt of that round, by every peer, failed as 'late' and found nobody to catch up from: the swarm
    stalled for good)."""
    deadline = time.monotonic() + LIVE_TTL
    while not ahead():
        if time.monotonic() > deadline:
            logger.info("a group on the board decided to apply this round, but no live peer holds its θ: "
                        "it never arrived; we go on with our wave")
            return False
        check()
        time.sleep(POLL_S)
    return True


@dataclass
class StageRun:
    """One all-reduce of a stage, as SwarmAverager runs it (see SwarmAverager._run_stage)."""

    tensors: list[torch.Tensor | None]
    stage: int
    bits: str
    weight: float
    policy: dict[str, Any]
    extra_meta: dict[str, Any]
    gather_s: float = 0.0  # how long the stage's leader waits for all of its known members


class Spanner:
    """Stages 2 and 3 for one peer (see the module docstring)."""

    def __init__(self, dht, prefix: str, peer_id: str, run_stage: Callable[[StageRun], tuple[list, dict]], *,
                 codec: str, board_wait: float, gather_s: float, stage_timeout: float, client: bool = False):
        self.dht, self.prefix, self.peer_id, self.run_stage = dht, prefix, peer_id, run_stage
        self.client = client  # we accept no connections: we never lead a stage
        self.codec, self.board_wait, self.gather_s, self.stage_timeout = codec, board_wait, gather_s, stage_timeout
        self.moved_on: Callable[[], str | None] = lambda: None  # the round's (SwarmAverager.average)
        self.ahead: Callable[[], bool] = lambda: True  # a live peer holds θ of a later round (ditto)

    def check_moved_on(self) -> None:
        """While we wait: the swarm averaged past this round without us? Stop waiting (the peer catches up)."""
        if (why := self.moved_on()) is not None:
            raise AveragedWithoutUs(why)

    def span(self, averaged: list, peers: Mapping[str, Mapping[str, Any]], round_no: int,
             member_caps: Mapping[str, float], expected: int = 0) -> tuple[list, int, dict[str, int]]:
        """(the swarm's average, peers it covers, their steps and samples) from our group's stage-1
        `averaged`; `expected`: the peers we believe average this round (a wave holding them all closes
        early); AveragingFailed."""
        group = Group.from_metadata(peers)
        totals = totals_of(peers)
        if group.rep == self.peer_id:
            return self.as_rep(averaged, group, totals, round_no, member_caps, expected)
        return Member(self, group, round_no).follow(averaged, totals, member_caps, expected)

    def announce(self, peers: Mapping[str, Mapping[str, Any]], round_no: int) -> None:
        """Our stage-1 group held every peer we expected: its rep still posts it, decided 'single', so that a
        group arriving later catches up with its θ (module docstring). Best effort: the average stands."""
        group = Group.from_metadata(peers)
        if group.rep != self.peer_id:
            return
        try:
            self._decide(decision_key(self.prefix, round_no, group.group_id), "single")
            dht_call(self.dht, "store", board_key(self.prefix, round_no), subkey=group.group_id, value=group.post(),
                     expiration_time=get_dht_time() + BOARD_TTL, slow=AveragingFailed)
        except AveragingFailed as e:
            logger.debug("round %d: could not announce our group: %s", round_no, e)

    def alone(self, deltas: list, weight: float, round_no: int, member_caps: Mapping[str, float],
              why: AveragingFailed, totals: dict[str, int], expected: int = 0) -> tuple[list, int, dict[str, int]]:
        """Stage 1 found us no group (left over when the groups filled up, or our group failed): take part
        in stage 2 as a group of one, so our Δ still counts and we end with the swarm's θ; if no other
        group posted to the board, the round fails with `why`."""
        group = Group("solo" + self.peer_id[-12:], (self.peer_id,), float(weight),
                      frozenset([self.peer_id]) if self.client else frozenset())
        try:
            board = self.post_and_wait(group, round_no, expected)
        except AveragedWithoutUs:
            raise
        except AveragingFailed:
            raise why from None
        if len(board) <= 1:
            raise why
        return self.stage2(deltas, group, totals, board, round_no, member_caps)

    def as_rep(self, averaged, group: Group, totals: dict[str, int], round_no: int, member_caps, expected: int,
               replacing: str | None = None) -> tuple[list, int, dict[str, int]]:
        """Our group's representative, from the board to stage 3. `replacing`: the rep that died while it
        waited for its wave, whose place we take (Member.follow): its post stays as the others read it."""
        marks = PhaseMarks(self, decision_key(self.prefix, round_no, group.group_id))
        try:
            marks.mark("posted")  # our members now know we are alive and waiting for the wave
            try:
                board = self.post_and_wait(group, round_no, expected, replacing)
                if replacing is not None:  # stage 2 as the other reps run it: led by the same leader, same caps
                    board[group.group_id] = dict(board[group.group_id], rep=replacing)
                    if len(board) > 1 and stage2_leader(board) == replacing:
                        raise AveragingFailed(f"across groups: our representative {replacing[-8:]} died; it was "
                                              "stage 2's leader, and the others go on without our group")
            except AveragingFailed:
                marks.final("failed")
                raise
            if len(board) <= 1:
                marks.final("single")
                return averaged, len(group.members), totals
            marks.mark("stage2")
            try:
                x, spanned, swarm_totals = self.stage2(averaged, group, totals, board, round_no, member_caps)
            except AveragingFailed:
                marks.final("failed")
                raise
            marks.final("broadcast")
        finally:
            marks.stop()
        return self.broadcast(x, group, round_no, source=True, spanned=spanned, totals=swarm_totals)

    def stage2(self, averaged, group: Group, totals: dict[str, int], board: Mapping[str, dict], round_no: int,
               member_caps, retry: bool = True) -> tuple[list, int, dict[str, int]]:
        """The representatives' average of their groups' results: (x, peers it covers, their totals). A leader
        that goes silent is dropped once: the others redo the stage without its group (without_dead_leader)."""
        outer, watch = self.moved_on, None
        try:
            leader = stage2_leader(board)
            policy = dict(codec=self.codec, aggregator=None, error_feedback=False, target_group_size=len(board),
                          weight_caps=stage2_caps(board, member_caps), leader=leader)
            watch = LeaderWatch(self, board, leader, round_no)
            self.moved_on = watch.check
            x, reps = self.run_stage(StageRun(averaged, 2, stage_bits(round_no, 2) + ("" if retry else "1"),
                                              group.weight, policy, dict(groups=len(board), group_totals=totals),
                                              self._gather(leader)))
        except AveragedWithoutUs:  # the swarm went on; or the leader died (below)
            if not (watch and watch.gone):
                raise
        except AveragingFailed as e:
            raise AveragingFailed(f"across groups (stage 2): {e}") from None
        finally:
            self.moved_on = outer
        if watch.gone:
            return without_dead_leader(self, averaged, group, totals, board, round_no, member_caps, watch, retry)
        if len(reps) < len(board):
            logger.warning("round %d: only %d of the %d groups' representatives averaged together; the swarm "
                           "will hold more than one θ until the minority re-syncs", round_no, len(reps), len(board))
        swarm_totals = totals_of({p: m.get("group_totals") or {} for p, m in reps.items()})
        return x, sum(len(v["members"]) for g, v in board.items() if rep_of(v) in reps or g == group.group_id), \
            swarm_totals

    def broadcast(self, tensors, group: Group, round_no: int, *, source: bool, spanned: int,
                  totals: dict[str, int]) -> tuple[list, int, dict[str, int]]:
        policy = dict(codec=self.codec, aggregator=BROADCAST, error_feedback=False,
                      target_group_size=len(group.members) - len(group.gone), weight_caps={}, leader=group.rep)
        try:
            x, peers = self.run_stage(StageRun(tensors, 3, stage_bits(round_no, 3, group.group_id),
                                               1.0 if source else 0.0, policy,
                                               dict(source=source, spanned=spanned, swarm_totals=totals),
                                               self._gather(group.rep)))
        except AveragedWithoutUs:
            raise
        except AveragingFailed as e:
            raise AveragingFailed(f"across groups (stage 3): {e}") from None
        sender = check_broadcast(peers)
        return x, int(peers[sender].get("spanned", 0)), totals_of({sender: peers[sender].get("swarm_totals") or {}})

    def _gather(self, leader: str) -> float:
        """How long we wait for a stage's group: the leader `gather_s` plus the board's window (reps leave the
        board up to a window apart), the others twice that: hivemind's leader refuses a follower whose request
        expires before its own declaration (BAD_EXPIRATION_TIME; with equal waits, 'could not find a group')."""
        base = self.gather_s + self.board_wait + PROPAGATION_S
        return base if leader == self.peer_id else 2 * base

    def post_and_wait(self, group: Group, round_no: int, expected: int = 0, replacing: str | None = None
                      ) -> dict[str, dict]:
        """Post our group, then our wave of the round's board as every representative sees it (waves: the
        module docstring); the wait ends early once the wave covers the `expected` peers. AveragedWithoutUs
        if a group of an earlier wave, or of ours, already applied an average: we were late for it.
        `replacing`: our dead rep posted the group; the post keeps its time (the others' waves hold it)."""
        key = board_key(self.prefix, round_no)
        mine = group.post()
        if replacing is not None and (old := read_board(self.dht, self.prefix, round_no).get(group.group_id)):
            if rep_of(old) not in (replacing, group.rep):  # we were too slow: the member after us took it
                raise AveragingFailed(f"across groups: {rep_of(old)[-8:]} already took our group's place")
            mine = dict(old, rep=group.rep)
        dht_call(self.dht, "store", key, subkey=group.group_id, value=mine,
                 expiration_time=get_dht_time() + BOARD_TTL, slow=AveragingFailed)
        board = read_board(self.dht, self.prefix, round_no)
        board[group.group_id] = mine
        start, _, before = wave_of(board, group.group_id, self.board_wait)
        if before is not None:  # already known to be late: say so now, not after our own wave's window
            self._raise_if_applied({g: v for g, v in board.items() if float(v.get("t", start)) < start},
                                   round_no, start - before, wait=False)
        while True:
            board = read_board(self.dht, self.prefix, round_no)
            board[group.group_id] = mine
            start, close, before = wave_of(board, group.group_id, self.board_wait)
            now = get_dht_time()
            if now > close + PROPAGATION_S:
                break
            if expected and covered({g: v for g, v in board.items() if start <= float(v.get("t", start)) <= close
                                     }) >= expected and now > mine["t"] + POLL_S:
                break
            self.check_moved_on()
            time.sleep(POLL_S)
        board = read_board(self.dht, self.prefix, round_no)
        board[group.group_id] = mine
        wave = {g: v for g, v in board.items() if start <= float(v.get("t", start)) <= close}
        if before is not None:
            self._raise_if_applied({g: v for g, v in board.items() if float(v.get("t", start)) < start},
                                   round_no, start - before)
        # a group of our own wave that already applied an average went without us (it closed the wave early,
        # covering the peers it expected, or announced a whole-swarm group): stage 2 with it cannot happen
        applied = self._applied({g: v for g, v in wave.items() if g != group.group_id}, round_no, wait=False)
        if applied and proven(self.ahead, self.check_moved_on):
            raise AveragedWithoutUs(f"across groups: {applied} group(s) of our wave averaged this round without us; "
                                    "we catch up with their θ")
        return wave

    def _raise_if_applied(self, earlier: Mapping[str, dict], round_no: int, late_s: float, wait: bool = True) -> None:
        applied = self._applied(earlier, round_no, wait)
        if applied and proven(self.ahead, self.check_moved_on):
            raise AveragedWithoutUs(f"across groups: {applied} other group(s) had already averaged this round "
                                    f"when ours finished ({late_s:.1f}s after their board opened); "
                                    f"we catch up with their θ")

    def _applied(self, earlier: Mapping[str, dict], round_no: int, wait: bool = True) -> int:
        """How many groups of earlier waves of this round applied an average ('single' or 'broadcast'):
        waits for their representatives' decisions, each at most as long as its stages can run. Earlier
        waves whose groups all failed (a retry of the round after a failed attempt) do not make ours late:
        without this, every retry found its previous attempt's post on the board and failed again."""
        pending = {g: rep_of(v) for g, v in earlier.items() if not g.startswith("solo")}
        deadline = max((float(earlier[g].get("t", 0.0)) for g in pending), default=0.0) \
            + self.board_wait + PROPAGATION_S + 2 * self.stage_timeout
        while pending:
            for g, rep in list(pending.items()):
                decision = read_decision(self.dht, decision_key(self.prefix, round_no, g), rep)
                if decision in ("single", "broadcast"):
                    return 1 + sum(read_decision(self.dht, decision_key(self.prefix, round_no, o), r) in ("single", "broadcast")
                                   for o, r in pending.items() if o != g)
                if decision == "failed" or (decision is None and get_dht_time() - float(earlier[g].get("t", 0.0))
                                            > LIVE_TTL + GONE_GRACE_S):
                    del pending[g]  # failed, or its rep is gone: its phase mark (stored before its post) expired
            if not pending or not wait or get_dht_time() > deadline:
                return 0
            self.check_moved_on()
            time.sleep(POLL_S)
        return 0

    def _decide(self, key: str, decision: str, ttl: float = BOARD_TTL) -> None:
        dht_call(self.dht, "store", key, subkey=self.peer_id, value=decision,
                 expiration_time=get_dht_time() + ttl, slow=AveragingFailed)


class Member:
    """A member of a stage-1 group that is not its representative: it follows the rep's decision, takes
    part in stage 3, and takes the rep's place when the rep dies while waiting for its wave.

    Takeover: the rep's 'posted' mark expired (it died after stage 1, before stage 2: most of a rep's
    time in a round is that wait). Every member holds the group's stage-1 average and weight, so the next
    member (Group.without) posts the group again under the dead rep's post time and joins stage 2 in its
    place, led by the same leader and capped like it; the others follow the new rep. Not when the dead rep
    was stage 2's leader (the others redo stage 2 without its group: without_dead_leader) or died in
    stage 2 (its stage failed or went on without it). (Soak: every killed rep failed its whole group's
    round; one group waited 75 s on a second representative that failed too.) A successor that never marks
    its phase within its bound was dead too (it marks at once when it takes over, and it noticed the death
    when we did): the next member takes the place, as the first rep's replacement (the board still holds
    that rep's post). (20-minute soak: a group of four lost its rep and then its successor, killed 10 s
    apart; the two left failed the round, which no other group averaged.) A successor that was only slow
    finds the later member's post on the board when it posts, and steps back (post_and_wait): one
    representative per group."""

    def __init__(self, spanner: Spanner, group: Group, round_no: int):
        self.spanner, self.group, self.round_no = spanner, group, round_no
        self.key = decision_key(spanner.prefix, round_no, group.group_id)

    def follow(self, averaged, totals: dict[str, int], member_caps, expected: int) -> tuple[list, int, dict[str, int]]:
        sp, group = self.spanner, self.group
        decision, why, gone_in = self.decision_of(group.rep)
        on_board = None  # the dead rep whose post the board holds (a successor that never marked did not post)
        while decision is None and (gone_in == "posted" or (on_board and gone_in is None)) \
                and len(group.successors()) > 1:
            dead, group = group.rep, group.without(group.rep)
            on_board = dead if gone_in == "posted" else on_board
            logger.warning("round %d: our group's representative %s %s; %s its place", self.round_no, dead[-8:],
                           "died before stage 2" if gone_in else "never took the place of the dead one (dead too)",
                           "we take" if group.rep == sp.peer_id else f"{group.rep[-8:]} takes")
            if group.rep == sp.peer_id:
                return sp.as_rep(averaged, group, totals, self.round_no, member_caps, expected, replacing=on_board)
            decision, why, gone_in = self.decision_of(group.rep)
        if decision == "single":
            return averaged, len(group.members), totals
        if decision != "broadcast":
            raise AveragingFailed(f"across groups: our group's representative {group.rep[-8:]} "
                                  + ("failed" if decision else f"went silent ({why})"))
        zeros = [None if t is None else torch.zeros_like(t) for t in averaged]
        return sp.broadcast(zeros, group, self.round_no, source=False, spanned=0, totals={})

    def decision_of(self, rep: str) -> tuple[str | None, str, str | None]:
        """(what the representative decided for our group: 'single', 'broadcast', 'failed', or None if it
        went silent; why it counts as silent; the phase whose mark expired, None if none did). It marks its
        phases ('posted': on the board and waiting for its wave; 'stage2': averaging with the other
        representatives) and refreshes the mark every HEARTBEAT_S while in it; a mark lives LIVE_TTL. A rep
        that dies is noticed when its mark expires (~LIVE_TTL); a live rep stuck in a phase, at that phase's
        bound. (Soak: with phase bounds alone, the members of a killed rep's group waited 136-157 s, and the
        swarm stalled a whole round.)"""
        sp = self.spanner
        bounds = {None: STAGE1_SLACK_S + PROPAGATION_S,
                  "posted": sp.board_wait + PROPAGATION_S + 2 * sp.stage_timeout + STAGE1_SLACK_S,
                  "stage2": sp.stage_timeout + 2 * (sp.gather_s + sp.board_wait + PROPAGATION_S) + STAGE1_SLACK_S}
        seen, since = None, time.monotonic()
        alive_at = since
        while True:
            decision = read_decision(sp.dht, self.key, rep)
            if decision in FINAL:
                return decision, str(seen), None
            now = time.monotonic()
            if decision is not None and decision in bounds:
                alive_at = now
                if decision != seen:
                    seen, since = decision, now
            elif seen is not None and now - alive_at > GONE_GRACE_S:
                return None, f"last seen: {seen}, its mark expired {now - since:.0f}s after it entered that phase", seen
            if now - since > bounds[seen]:
                return None, f"last seen: {seen or 'never after stage 1'}, {bounds[seen]:.0f}s ago", None
            sp.check_moved_on()
            time.sleep(POLL_S)


def without_dead_leader(spanner: Spanner, averaged, group: Group, totals: dict[str, int], board: Mapping[str, dict],
                        round_no: int, member_caps, watch: LeaderWatch, retry: bool) -> tuple[list, int, dict[str, int]]:
    """Stage 2's leader went silent: the other representatives (each notices its mark expire) redo stage 2
    once, under other group bits, without the dead leader's group; its members fail the round and catch up.
    Left alone, our group's average is the round's. (Soak: each killed leader failed the round of every
    group; two in a row held round 5 for 85 s.) A second silent leader fails the round."""
    if not retry:
        raise AveragingFailed(f"across groups (stage 2): {watch.gone}")
    rest = {g: v for g, v in board.items() if rep_of(v) != watch.leader}
    logger.warning("round %d: %s; the other %d group(s) average without its group", round_no, watch.gone, len(rest))
    if len(rest) <= 1:
        return averaged, len(group.members), totals
    return spanner.stage2(averaged, group, totals, rest, round_no, member_caps, retry=False)


class LeaderWatch:
    """While a representative waits in stage 2 for the stage's leader (another group's representative),
    the leader's phase mark is checked every second: a leader whose mark expired is dead, and the wait
    ends (soak: a killed leader held every other representative, and so the swarm, for its whole stage-2
    bound, ~75 s). A lone peer's group (`solo…`) has no mark and is not watched. `check` also asks the
    round's moved-on check, and is what the stage's step polls (SwarmAverager._step)."""

    def __init__(self, spanner: Spanner, board: Mapping[str, dict], leader: str, round_no: int):
        self.spanner, self.leader, self.outer = spanner, leader, spanner.moved_on
        gid = next((g for g, v in board.items() if rep_of(v) == leader), None)
        watched = gid is not None and not gid.startswith("solo") and leader != spanner.peer_id
        self.key = decision_key(spanner.prefix, round_no, gid) if watched else None
        self.checked = self.alive = time.monotonic()
        self.gone: str | None = None

    def check(self) -> str | None:
        if (why := self.outer()) is not None:
            return why
        now = time.monotonic()
        if self.key is None or now - self.checked < 1.0:
            return None
        self.checked = now
        try:
            if read_decision(self.spanner.dht, self.key, self.leader) is not None:  # a phase mark or its decision
                self.alive = now
        except AveragingFailed:  # a slow DHT is not a dead leader
            self.alive = now
        if now - self.alive > LIVE_TTL + GONE_GRACE_S:
            self.gone = f"stage 2's leader {self.leader[-8:]} went silent (its mark expired)"
        return self.gone


class PhaseMarks:
    """A representative's phase marks under its group's decision key: `mark(phase)` stores the phase with
    a LIVE_TTL expiry and a background thread refreshes it every HEARTBEAT_S, so the mark outlives the
    rep by at most LIVE_TTL; `final(decision)` stops the refresh and stores the decision for BOARD_TTL (a
    later expiry: the DHT keeps it over any refresh still in flight)."""

    def __init__(self, spanner: Spanner, key: str):
        self.spanner, self.key = spanner, key
        self.phase: str | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def mark(self, phase: str) -> None:
        with self.lock:
            self.phase = phase
        self.spanner._decide(self.key, phase, ttl=LIVE_TTL)
        if self.thread is None:
            self.thread = threading.Thread(target=self._beat, name="rep-heartbeat", daemon=True)
            self.thread.start()

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            with self.lock:
                phase = self.phase
            if phase is None:
                return
            try:
                self.spanner._decide(self.key, phase, ttl=LIVE_TTL)
            except Exception as e:  # noqa: BLE001 - a missed beat is what a dead rep looks like; the round decides
                logger.debug("phase mark %s not refreshed: %r", phase, e)

    def final(self, decision: str) -> None:
        self.stop()
        self.spanner._decide(self.key, decision)

    def stop(self) -> None:
        with self.lock:
            self.phase = None
        self.done.set()
