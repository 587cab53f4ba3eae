"""State sync: a joiner, or a peer that fell behind, downloads θ, the outer optimizer's state and
the counters from another peer, and trusts it only after checking it.

Donors are tried by the round they claim. What one serves must be right in itself (names,
shapes, dtypes, finite values, its θ hash matches its claim) and confirmed by the swarm: its θ
hash must also be published by another live peer of the run. A lying donor cannot make up a
model, because it does not write the others' records. A donor whose state is wrong is skipped
for the next one; one whose state is not confirmed yet is retried after a pause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from .global_state import GlobalState

logger = logging.getLogger(__name__)

WAIT_POLL_S = 0.5  # how often a peer waiting out a round it arrived too late for reads the swarm view


class StateSync:
    def __init__(self, gs: GlobalState, averager, records: Callable[[], list], peer_id: str, timeout: float,
                 stop: threading.Event):
        """`records()` returns the swarm's progress records fetched now; `averager` is the SwarmAverager
        whose load_state_from_peers downloads; `timeout` bounds one download."""
        self.gs, self.averager, self.records, self.peer_id = gs, averager, records, peer_id
        self.timeout, self.stop = timeout, stop

    def download(self, attempts: int = 4, max_donors: int = 8, want: str | None = None, min_round: int = 0
                 ) -> tuple[dict, list[torch.Tensor], str] | None:
        """(metadata, tensors, donor) of a checked state, or None if no donor served a usable one.
        With `want`, only a state whose θ hash is `want` is taken (healing a fork); with `min_round`, only
        a state of that round or later (catching up with groups that averaged our round without us)."""
        delay, refused, attempt = 1.0, [], 0
        while attempt < attempts and len(refused) < max_donors and not self.stop.is_set():
            got = self.averager.load_state_from_peers(timeout=self.timeout, exclude=refused)
            if got is not None:
                donor, meta, tensors = got
                problem = self.gs.problem_with(meta, tensors)
                elected = want is not None and meta["theta"] == want
                if problem is None and want is not None and not elected and not self._newer(meta, donor):
                    problem = f"it holds θ {meta['theta'][:8]}, the swarm's is {want[:8]}"
                if problem is None and int(meta["round"]) < min_round:  # not behind us: just not there yet
                    logger.info("peer %s still holds round %s; we need round %d", donor[-8:], meta["round"],
                                min_round)
                    refused.append(donor)
                    continue
                if problem is not None:
                    logger.warning("rejected the state served by peer %s: %s; trying another donor", donor[-8:],
                                   problem)
                    refused.append(donor)
                    continue
                # a θ the swarm's records already elected (`want`) needs no second confirmation
                unconfirmed = None if elected else self.unconfirmed(int(meta["round"]), meta["theta"], donor)
                if unconfirmed is None:
                    return meta, tensors, donor
                logger.info("state of peer %s not used yet: %s", donor[-8:], unconfirmed)  # retried after a pause
            attempt += 1
            if attempt < attempts:
                logger.info("no usable state from peers (attempt %d/%d), retrying in %.0fs", attempt, attempts, delay)
                time.sleep(delay)
                delay *= 2
        return None

    def await_elected(self, elect: Callable[[list], str | None], patience_s: float
                      ) -> tuple[dict, list[torch.Tensor], str] | None:
        """A fresh joiner whose download found no confirmed state keeps asking, for up to `patience_s`, for
        the θ the swarm's records elect (`elect(records)`; None: no live peer holds trained state any more,
        stop). (10-minute soak: joiners that found none trained a second model from the seeded init, and
        once the last peers holding the swarm's θ died, the swarm's round fell from 20 to 0.)"""
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline and not self.stop.wait(2.0):
            want = elect(self.records())
            if want is None:
                return None
            if (got := self.download(attempts=1, want=want)) is not None:
                return got
        return None

    def _newer(self, meta: dict, donor: str) -> bool:
        """Healing a fork, a donor may already hold a later round's θ than the one the swarm elected (the
        swarm moved on meanwhile): that state heals the fork too, once another peer confirms it."""
        return int(meta["round"]) > self.gs.counters.round and \
            self.unconfirmed(int(meta["round"]), meta["theta"], donor) is None

    def unconfirmed(self, round_no: int, claimed: str, donor: str) -> str | None:
        """Why the donor's θ is not confirmed by the swarm, or None. Hashes, not rounds, are compared
        (a peer in overlapped mode trains round r+1 while it holds θ of round r)."""
        theirs = {x.theta_hash for x in self.records() if x.fingerprint == self.gs.fp and x.state != "done"
                  and x.peer_id not in (self.peer_id, donor)}
        if theirs and claimed not in theirs:
            return f"no other peer publishes its θ {claimed[:8]} (round {round_no})"
        return None


def wait_out_formed_round(tracker, r: int, stop: threading.Event, formed_after_s: float, timeout_s: float,
                          waiting: Callable[[], None] = lambda: None) -> bool:
    """A peer that just took θ of round r (a joiner; a catch-up) while the swarm's groups of round r formed
    long ago (tracker.groups_formed) cannot take part in round r: its training would only make it late for
    the round (a failed attempt: soak, 8 of a run's 15 failures came before a joiner's first averaged
    round). It waits instead, without training: True once the swarm applied round r (two peers publish a
    later θ, tracker.theta_past: take it and train round r+1 with them); False when most peers no longer average r
    and no such θ is there (round r failed and they train it again; or a lone survivor of the group that
    applied it trains r+1: soak, five waiters sat 40 s until it gave up; we average r with the other
    waiters), after `timeout_s`, or when the groups did not form long ago (train round r as usual).
    `waiting()` is called once the wait begins (the peer publishes `syncing`: other waiters do not count it
    as the swarm)."""
    if not tracker.groups_formed(r, tracker.records(fresh=True), formed_after_s):
        return False
    logger.info("the swarm's groups of round %d formed before we arrived: waiting for its θ of round %d "
                "instead of training round %d", r, r + 1, r)
    waiting()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.wait(WAIT_POLL_S):
        records = tracker.records(fresh=True)
        if tracker.theta_past(r, records):  # not a majority: the other waiters still publish θ of round r
            return True
        if not tracker.groups_formed(r, records, 0.0):  # round r failed, or a lone survivor applied it
            logger.info("most peers no longer average round %d and no later θ is confirmed: training round %d", r, r)
            return False
    return False


def wait_for_cohort(tracker, want: int, round_no: int, stop: threading.Event, waiting: Callable[[], None],
                    log_every_s: float = 10.0) -> int:
    """Before a fresh run's first round (we are at round 0): wait until `want` peers of the run, this one
    included, are live on the DHT (rounds.start_peers), so that a cohort started together averages round 0
    together; the peers that finish importing first would otherwise average it among themselves, and the
    rest would start late and catch up. No wait once any peer of the run is past round 0 (a joiner of a
    running swarm), nor after a stop request. `waiting()` is called once the wait begins (the peer publishes
    `syncing`: its heartbeat keeps it counted). Returns the peers counted last."""
    if want <= 1 or round_no > 0:
        return 1
    n, told = 1, None
    while not stop.is_set():
        records = tracker.records(fresh=True)
        live = tracker.live_mates(records)
        n = 1 + len(live)
        if n >= want or any(x.round > 0 or x.theta_round > 0 for x in live):
            if told is not None:
                logger.info("%d peers of the run are on the DHT: starting round 0", n)
            return n
        if told is None:
            waiting()
        if told is None or time.monotonic() - told >= log_every_s:
            logger.info("waiting for peers before round 0: %d of %d (rounds.start_peers) on the DHT", n, want)
            told = time.monotonic()
        stop.wait(WAIT_POLL_S)
    return n
