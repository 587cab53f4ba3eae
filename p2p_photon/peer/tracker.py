"""The round tracker: the swarm as this peer sees it through progress records.

When does the round end, is a majority of the swarm ahead of us, how much weight may a group
member claim. The arithmetic is pure functions over records (tested against hand-computed
values); `RoundTracker` applies them to the background view and logs what it ignores.

Records are signed, not true: every bound here limits how far one peer's claims can move
anybody else.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from hivemind.utils import get_dht_time

from ..config import Config
from ..progress import ProgressRecord
from .swarm_view import HEARTBEAT_S, SwarmView

logger = logging.getLogger(__name__)

EXTRAPOLATE_MAX_S = 10.0  # trust a peer's reported throughput for at most this long after its record
ALIVE_S = 30.0  # a peer whose newest record is older than this is not counted as present


def others(records: Iterable[ProgressRecord], me: str, fingerprint: str) -> list[ProgressRecord]:
    """Records of the other live peers of this run."""
    return [r for r in records if r.peer_id != me and r.fingerprint == fingerprint and r.state != "done"]


def round_progress(
    records: Iterable[ProgressRecord],
    *,
    me: str,
    my_round: int,
    my_samples: int,
    fingerprint: str,
    now: float,
    seq_len: int,
    cap_vs_others: float,
    extrapolate_max_s: float = EXTRAPOLATE_MAX_S,
) -> float:
    """Estimated samples the swarm has trained in `my_round`: mine plus each other live peer's.

    Another peer's estimate is its reported samples plus, while it is training, what its
    reported rate (tokens_per_s / seq_len) adds since it published, for at most
    `extrapolate_max_s` seconds.

    The cap: records are signed, not true, so one peer could claim 100x the samples it
    trained (or an absurd rate) to end everybody's round early. Each other peer's estimate
    therefore counts at most `cap_vs_others` times the largest estimate among all the
    *other* counted peers, me included (my own samples count as they are). A lone liar
    cannot raise its own cap: with cap_vs_others = 1 its claim adds no more than the
    busiest honest peer's. A lone honest peer much faster than everybody else is
    undercounted the same way, which only makes the round end later than its target
    (more local steps), never earlier. The cap is applied after extrapolation, so it
    bounds a claimed rate too.
    """
    estimates = []
    for r in others(records, me, fingerprint):
        if r.round != my_round:
            continue
        rate = r.tokens_per_s / seq_len if r.state == "training" else 0.0
        estimates.append(r.samples + rate * min(max(0.0, now - r.time), extrapolate_max_s))
    # the largest count among "the rest" is the overall largest, except for the peer holding it (runs
    # in the training loop every 0.2 s: two maxima instead of one max per peer)
    pool = [float(my_samples), *estimates]
    top = max(range(len(pool)), key=pool.__getitem__)
    first, second = pool[top], max((x for i, x in enumerate(pool) if i != top), default=0.0)
    return pool[0] + sum(min(e, cap_vs_others * (second if i == top else first))
                         for i, e in enumerate(pool) if i > 0)


def majority_round(rounds: list[int]) -> int:
    """The highest round that a strict majority of these peers has reached (-1 if there are none)."""
    return sorted(rounds, reverse=True)[len(rounds) // 2] if rounds else -1


def swarm_ahead(
    records: Iterable[ProgressRecord], *, me: str, my_round: int, fingerprint: str, max_rounds_ahead: int
) -> tuple[int | None, list[str]]:
    """(round to move on to, or None; reasons for the records that were ignored).

    Other live peers of this run claiming a round more than `max_rounds_ahead` past mine
    are ignored (and named in the reasons, for the log). If a strict majority of the rest
    is past my round, the result is the highest round R that such a majority has reached
    (more than half of them at rounds >= R); otherwise None. One peer alone cannot move a
    swarm of three; when every other peer is ignored, this peer is far behind and needs a
    state sync, not a round jump.
    """
    rounds, ignored = [], []
    for r in others(records, me, fingerprint):
        if r.round > my_round + max_rounds_ahead:
            ignored.append(
                f"{r.peer_id[:16]} claims round {r.round}, more than {max_rounds_ahead} past ours ({my_round})"
            )
        else:
            rounds.append(r.round)
    reached = majority_round(rounds)
    return (reached if reached > my_round else None), ignored


def weight_caps(records: Iterable[ProgressRecord], *, me: str, fingerprint: str, now: float, seq_len: int,
                my_rate: float, floor: float) -> dict[str, float]:
    """The most weight (samples) each other peer may claim in the all-reduce before its contribution
    is refused: 8x what its latest record allows (its samples plus its throughput, capped at 4x the
    median peer's, since then), and never less than 8x `floor` (the round's target plus one batch),
    so an honest peer with a stale record or carried-over work is never refused while a forged 10^6 is."""
    mates = [x for x in records if x.fingerprint == fingerprint and x.peer_id != me]
    if not mates:
        return {}
    rates = [x.tokens_per_s / seq_len for x in mates] + [my_rate / seq_len]
    max_rate = 4.0 * statistics.median_low(rates)
    return {x.peer_id: 8.0 * max(floor, x.samples + min(x.tokens_per_s / seq_len, max_rate)
                                 * min(60.0, max(0.0, now - x.time) + 5)) for x in mates}


def theta_samples(r: ProgressRecord) -> int:
    """The samples a record's θ covers: its total_samples less those of the round in progress."""
    return max(0, r.total_samples - r.samples)


def swarm_theta(records: Iterable[ProgressRecord], *, me: str, fingerprint: str, theta_round: int,
                my_hash: str, my_total: int) -> tuple[str, dict[str, int]]:
    """(the swarm's θ hash at `theta_round`, peers per hash), this peer included.

    The swarm's θ is the hash held by the most peers; ties go to the larger sum of the holders'
    samples of their θ (`my_total` for ours: the samples the averaged rounds of that θ cover; for the
    others, their record's total_samples less the round in progress, the same number: with the
    round in progress counted, two tied peers each saw the other's total as the larger, and both
    switched), then to the smaller hash, so every peer that sees the same records picks the
    same one. Peers are counted rather than their claimed samples weighed, so one peer claiming
    10^6 samples cannot make the swarm adopt its θ (sync.py also requires another peer to publish a
    donor's θ before it is downloaded)."""
    votes = tally([r for r in others(records, me, fingerprint) if r.theta_round == theta_round],
                  {my_hash: [1, my_total]})
    return elect(votes), {h: v[0] for h, v in votes.items()}


def tally(records: Iterable[ProgressRecord], votes: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """θ hash -> [peers holding it, samples their θ covers], added to `votes`."""
    votes = {} if votes is None else votes
    for r in records:
        v = votes.setdefault(r.theta_hash, [0, 0])
        v[0], v[1] = v[0] + 1, v[1] + theta_samples(r)
    return votes


def elect(votes: Mapping[str, list[int]]) -> str:
    """The hash most peers hold; ties: more samples, then the smaller hash (the same on every peer)."""
    return min(votes, key=lambda h: (-votes[h][0], -votes[h][1], h))


MATES_DEAD_S = 3 * HEARTBEAT_S  # a record not refreshed this long: its peer died (see group_gone)


def stranded_theta(settled: list[ProgressRecord], live: list[ProgressRecord], theta_round: int, my_hash: str,
                   group_is_gone: bool) -> tuple[str, str, int, int] | None:
    """The θ of round R = `theta_round` that we alone hold can never become the swarm's when no other live
    peer (`live`) publishes it or any θ of round R or later, two or more other live peers train or average
    (`settled`), and either (a) most of those went back to training round R-1 on θ of R-1, or (b) the others
    of the group that averaged R-1 with us are dead (`group_is_gone`: group_gone). Two live peers besides us
    never download a θ one peer publishes (theta_past, StateSync.unconfirmed): they average R-1 without us
    and win the fork. Returns (the θ of round R-1 most of them hold, two at least: heal_fork re-syncs to it
    at once; why; its holders; len(settled)), else None. (20-minute soak: such a lone survivor failed round R
    three times with "could not find a group", 40 s, before STUCK_AFTER re-synchronized it.) Otherwise,
    peers still averaging R-1 (they may yet apply our θ) keep us waiting, and so do overlapped peers
    training R on θ of R-1 (their R-1 is in flight)."""
    if any(x.theta_hash == my_hash or x.theta_round >= theta_round for x in live):
        return None
    back = [x for x in settled if x.state == "training" and x.round == x.theta_round == theta_round - 1]
    if 2 * len(back) > len(settled):
        why = f"the others train round {theta_round - 1} again"
    elif group_is_gone:
        why, back = "the others of our group are gone", [x for x in settled if x.theta_round == theta_round - 1]
    else:
        return None
    votes = tally(back)
    if not votes or max(v[0] for v in votes.values()) < 2:
        return None
    best = elect(votes)
    return best, why, votes[best][0], len(settled)


def group_gone(only_group: bool, members: set[str], mates: list[ProgressRecord], theta_round: int,
               now: float) -> bool:
    """Our θ of `theta_round` came from an average of our stage-1 group alone (`only_group`, from
    RoundTracker.note_group), which had other `members`, and each of them is dead: no record among `mates`,
    or none refreshed for MATES_DEAD_S (a live peer's record is refreshed every progress interval while it
    trains and every HEARTBEAT_S otherwise), or it publishes another θ. Nobody else took part in that average, so nobody else
    can ever hold our θ, whatever the other peers are doing. (10-minute soak: a peer whose partner of a
    group of two was killed right after their round failed the next round three times while the others
    averaged the round again.)"""
    if not only_group or not members:
        return False
    return not any(x.peer_id in members and now - x.time < MATES_DEAD_S and x.theta_round < theta_round
                   for x in mates)


class RoundTracker:
    """This peer's reading of the swarm: the background view's records, less those of banned peers."""

    def __init__(self, cfg: Config, fingerprint: str, peer_id: str, view: SwarmView,
                 banned: Callable[[], Mapping[str, str]]):
        self.cfg, self.fp, self.peer_id, self.view, self._banned = cfg, fingerprint, peer_id, view, banned
        self._ignored_claims: set[str] = set()
        # (θ round, when we first saw a tie with a lagging peer): the clock runs on while the tie is seen
        # again in the next θ round (two peers that keep averaging together hold a new pair of hashes
        # every round; a clock per round never ran out while a third peer lagged)
        self._tie: tuple[int, float] | None = None
        # our last average (note_group): the θ round it produced, the other members of our stage-1 group with
        # the θ hash their metadata gave (None: malformed) and ours, and whether it covered that group alone
        self._group: tuple[int, dict[str, str | None], str, bool] = (-1, {}, "", False)
        # a lagging peer publishes its θ of a round within about one round's averaging; past that, a tie
        # is broken anyway (under churn some peer always lags, and a 2+2 split must not last for ever)
        self.tie_grace_s = cfg.averaging.attempt_s
        self.missed_refuted: int | None = None  # a round whose `missed` verdict a failed catch-up refuted

    def records(self, fresh: bool = False) -> list[ProgressRecord]:
        """The swarm's records (fetched now if `fresh`, else the cached view) without banned peers'."""
        records = self.view.refresh() if fresh else self.view.records()
        banned = self._banned()
        return [x for x in records if x.peer_id not in banned] if banned else records

    def mates(self, records: Iterable[ProgressRecord]) -> list[ProgressRecord]:
        return others(records, self.peer_id, self.fp)

    def live_mates(self, records: Iterable[ProgressRecord]) -> list[ProgressRecord]:
        """The other peers of this run that have not finished and published within ALIVE_S (a peer that
        averages or syncs re-publishes every few seconds: swarm_view.HEARTBEAT_S)."""
        now = get_dht_time()
        return [x for x in self.mates(records) if now - x.time < ALIVE_S]

    def round_over(self, train_round: int, samples: int) -> bool:
        """Progress-based end: the swarm's samples for this round (see round_progress) reach the
        target, or a majority of the other peers already moved on."""
        records = self.records()
        if self.ahead(train_round, records)[0] is not None:
            return True
        total = round_progress(records, me=self.peer_id, my_round=train_round, my_samples=samples,
                               fingerprint=self.fp, now=get_dht_time(), seq_len=self.cfg.model.seq_len,
                               cap_vs_others=self.cfg.rounds.sample_cap_vs_others)
        return total >= self.cfg.rounds.target_samples_per_round

    def ahead(self, train_round: int, records: list[ProgressRecord]) -> tuple[int | None, bool]:
        """(round a majority of the other peers has reached beyond ours or None, whether any other peer
        is still in our round). Claims more than rounds.max_rounds_ahead ahead are ignored (logged once)."""
        ahead, ignored = swarm_ahead(records, me=self.peer_id, my_round=train_round, fingerprint=self.fp,
                                     max_rounds_ahead=self.cfg.rounds.max_rounds_ahead)
        for why in ignored:
            if why not in self._ignored_claims:
                self._ignored_claims.add(why)
                logger.warning("ignoring a progress claim: %s", why)
        mates_here = any(x.round == train_round for x in self.mates(records))
        return ahead, mates_here

    def swarm_round(self, records: list[ProgressRecord]) -> int:
        """The round a majority of the other live peers of this run has reached (-1: none)."""
        return majority_round([x.round for x in self.mates(records)])

    def fork(self, records: list[ProgressRecord], theta_round: int, my_hash: str, my_total: int) -> str | None:
        """The swarm's θ hash if ours is not it (a fork: groups that averaged apart), else None. A tie is
        broken once every live peer has published its θ of this round (a stale record must not make an
        honest peer follow a broken one), when it has lasted `tie_grace_s` (some peer always lags
        under churn; two halves of a split swarm must not keep their θ for ever), or at once when a
        holder of the other θ averaged with us on a θ other than ours (note_group): the two of us
        then applied one average to two θ, and the lagging peer cannot end that tie, since it can
        only download a θ that two peers publish."""
        best, held = swarm_theta(records, me=self.peer_id, fingerprint=self.fp, theta_round=theta_round,
                                 my_hash=my_hash, my_total=my_total)
        if best == my_hash:
            return self.stranded(records, theta_round, my_hash) if held[my_hash] == 1 else None
        tied = held[best] == held[my_hash] and any(m.theta_round < theta_round for m in self.mates(records))
        if tied and not self._forked_in_group(records, theta_round, best):
            if self._tie is None or self._tie[0] < theta_round - 1:
                self._tie = (theta_round, time.monotonic())
            if time.monotonic() - self._tie[1] < self.tie_grace_s:
                return None
        logger.warning("θ forked at round %d: %d peer(s) hold %s, %d (this one included) hold ours %s; "
                       "re-synchronizing with the swarm's", theta_round, held[best], best[:8], held[my_hash],
                       my_hash[:8])
        self._tie = None
        return best

    def stranded(self, records: list[ProgressRecord], theta_round: int, my_hash: str) -> str | None:
        """The θ of round R-1 to re-sync to when the θ of round R = `theta_round` we alone hold can never
        become the swarm's (stranded_theta), else None."""
        r, thetas, _, only_group = self._group
        gone = group_gone(r == theta_round and only_group, set(thetas), self.mates(records), theta_round,
                          get_dht_time())
        live = self.live_mates(records)
        got = stranded_theta([x for x in live if x.state != "syncing"], live, theta_round, my_hash, gone)
        if got is None:
            return None
        best, why, holders, of = got
        logger.warning("no other peer holds our θ %s of round %d, nor ever will (%s); %d of the %d other live "
                       "peers hold θ %s of round %d: re-synchronizing with it", my_hash[:8], theta_round, why,
                       holders, of, best[:8], theta_round - 1)
        return best

    def note_group(self, gathered: Mapping[str, Mapping], my_hash: str, theta_round: int,
                   spanned: int | None = None) -> None:
        """Remember the group we just averaged with on θ `my_hash`, which gives θ round `theta_round`:
        each member's θ hash as its metadata (`theta`) says; and whether the average covered that group
        alone (`spanned`, the peers it covers, equals the group's size)."""
        self._group = (theta_round, {p: str(m.get("theta")) if isinstance(m, Mapping) else None
                                     for p, m in gathered.items() if p != self.peer_id}, my_hash, spanned == len(gathered))

    def _forked_in_group(self, records: list[ProgressRecord], theta_round: int, best: str) -> bool:
        """A peer that publishes `best` at `theta_round` averaged that round with us on another θ than ours."""
        r, thetas, mine, _ = self._group
        differed = {p for p, h in thetas.items() if h is not None and h != mine}
        return r == theta_round and any(x.peer_id in differed and x.theta_round == theta_round
                                        and x.theta_hash == best for x in self.mates(records))

    def theta_round(self, records: list[ProgressRecord]) -> int:
        """The θ round a majority of the other live peers holds (-1: none)."""
        return majority_round([x.theta_round for x in self.live_mates(records)])

    def went_on_without_us(self, r: int, records: list[ProgressRecord]) -> str | None:
        """Polled while our round r's averaging waits: most other live peers hold θ of round r+2 or later,
        so the swarm averaged the round after ours and waiting for our group is pointless (soak: a joiner
        sat 102 s in a stage-2 wait while the swarm went from round 6 to 23). The reason, else None."""
        theta = self.theta_round(records)
        if theta >= r + 2:
            return f"the swarm went on without us: most peers hold θ of round {theta}, we were averaging round {r}"
        return None

    def established_round(self, records: list[ProgressRecord]) -> int:
        """The θ round a majority of the other live peers that hold an averaged θ (round > 0) has reached
        (-1: none). For a fresh peer: peers still at the seeded init carry no work of the swarm, so they
        must not outvote the ones that trained (several joiners starting together would otherwise start
        a second model at round 0 next to a swarm at round 5)."""
        return majority_round([x.theta_round for x in self.live_mates(records) if x.theta_round > 0])

    def elected_theta(self, records: list[ProgressRecord]) -> str | None:
        """The θ a fresh joiner waits for: at the round most live peers with trained state hold
        (established_round), the hash most of them publish (ties: more samples, then the smaller hash, as
        swarm_theta breaks them); None when no live peer holds trained state."""
        r = self.established_round(records)
        votes = tally([x for x in self.live_mates(records) if r > 0 and x.theta_round == r])
        return elect(votes) if votes else None

    def swarm_finished(self) -> bool:
        """All other peers of this run we know of have published 'done' (a bounded run is over); for a
        client-mode peer, also when every peer that could lead a group (not in client mode) is done:
        client-mode peers cannot average with each other."""
        mates = [x for x in self.view.records() if x.fingerprint == self.fp and x.peer_id != self.peer_id]
        if not mates:
            return False
        if all(x.state == "done" for x in mates):
            return True
        return self.cfg.dht.client_mode and any(x.state == "done" for x in mates) \
            and all(x.state == "done" or x.client for x in mates)

    def only_clients(self, records: list[ProgressRecord]) -> bool:
        """We are in client mode and so is every other live peer of the run: nobody can lead a group."""
        live = self.live_mates(records)
        return self.cfg.dht.client_mode and bool(live) and all(x.client for x in live)

    def weight_caps(self, records: list[ProgressRecord], my_rate: float) -> dict[str, float]:
        floor = self.cfg.rounds.target_samples_per_round + self.cfg.inner.batch_size * self.cfg.inner.grad_accum
        return weight_caps(records, me=self.peer_id, fingerprint=self.fp, now=get_dht_time(),
                           seq_len=self.cfg.model.seq_len, my_rate=my_rate, floor=floor)

    def averaging_peers(self, records: list[ProgressRecord], round_no: int) -> int:
        """Peers that will average round `round_no`, this one included: live peers of this run at that
        round or beyond (overlapped peers train the next one meanwhile) that have not finished."""
        return 1 + sum(1 for x in self.live_mates(records) if x.round >= round_no)

    def counts(self, records: list[ProgressRecord], round_no: int) -> dict:
        """SwarmAverager.average's view of the swarm for round `round_no`: the peers that will average it,
        whether the swarm went past it without us, whether a live peer already applied it."""
        return dict(swarm_size=self.averaging_peers(records, round_no),
                    moved_on=lambda: self.went_on_without_us(round_no, self.records()),
                    missed=lambda stage=1: self.missed(round_no, self.records(), stage),
                    ahead=lambda: self.theta_past(round_no, self.records()))

    def missed(self, r: int, records: list[ProgressRecord], stage: int = 1) -> str | None:
        """Polled while we look for a group of round r (`stage` of its all-reduce): the swarm applied round r
        without us, so a group we could still form would only be late (stages.py: a late wave catches up).
        Looking for our stage-1 group: most other live peers hold θ of a later round and we could take it
        (theta_past). A stage-2/3 group is the round's own: only when every other live peer (finished ones
        aside) holds a later θ. The reason, else None.
        (A joiner that downloaded θ of round r just as the swarm averaged r sat a whole round in
        matchmaking until went_on_without_us's r+2 fired, and took part only 2 rounds after its join; with
        'every peer' in stage 1 too, the record of a peer killed in round r, alive for ALIVE_S, held it
        there: soak smoke, a joiner killed 7 s after its join before its first round.)
        Not again for a round whose catch-up found no state to take (`missed_refuted`, set by the loop): the
        view was wrong or the later θ is unconfirmed, and failing the round again at once only repeats it
        (soak: a joiner failed the same round 5 times in 25 s while peers still at that round were there)."""
        if self.missed_refuted == r:
            return None
        live = self.live_mates(records)
        later = [x.theta_round for x in live if x.theta_round > r]
        everyone = bool(later) and len(later) == len(live)
        most = stage == 1 and 2 * len(later) > len(live) and self.theta_past(r, records)
        if not (everyone or most):
            return None
        return (f"the swarm averaged round {r} without us: {len(later)} of {len(live)} other live peers hold θ of "
                f"round {min(later)} or later")

    def groups_formed(self, r: int, records: list[ProgressRecord], after_s: float) -> bool:
        """Most other live peers (those syncing aside: they are in no group) stopped training round r on θ of
        round r and have been averaging it for more than `after_s` (their `since`): its stage-1 groups
        formed, a peer arriving now can only be late for it."""
        live, now = self.settled_mates(records), get_dht_time()
        busy = [x for x in live if x.round == r == x.theta_round and x.state == "averaging"
                and 0 < x.since < now - after_s]
        return 2 * len(busy) > len(live)

    def settled_mates(self, records: list[ProgressRecord]) -> list[ProgressRecord]:
        """Live mates that train or average: not syncing (downloading θ, or waiting for a round's θ as we do:
        soak, four joiners that counted each other as the swarm waited 76 s while two peers went 7 rounds on)."""
        return [x for x in self.live_mates(records) if x.state != "syncing"]

    def theta_past(self, round_no: int, records: list[ProgressRecord]) -> bool:
        """Live peers of the run (finished ones too) hold θ of a round after `round_no`, and we could take
        it: two of them publish the same θ, or the one holding it is the only other live peer (what a
        joiner's download needs, StateSync.unconfirmed). One survivor of a group that applied the round,
        next to peers still at it, is not proof: they average the round again and it re-syncs as the
        minority (soak: every later wave of a round failed as 'late' for 50 s, and no catch-up could take
        the lone survivor's θ)."""
        now = get_dht_time()
        live = [x for x in records if now - x.time < ALIVE_S and x.fingerprint == self.fp and x.peer_id != self.peer_id]
        later = Counter(x.theta_hash for x in live if x.theta_round > round_no)
        return bool(later) and (len(live) == 1 or max(later.values()) >= 2)

    def present(self) -> int:
        """Peers of this run present now, this one included (for the round's log line)."""
        return 1 + len(self.live_mates(self.view.records()))
