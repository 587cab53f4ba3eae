"""The swarm as the monitor sees it, computed from progress records alone.

Pure: no DHT, no threads, no clock (callers pass `now`), so every number the views show can be
checked against a hand-computed value. `poller.Monitor` feeds `Swarm` and calls `swarm_summary`.

Run-wide constants (the round target, seq_len) are read from the records themselves: every peer
of a run agrees on them (they are part of the config fingerprint), so the value most records
carry is the run's. A record saying 0 did not say; when no record says, the value is None
("unknown") rather than a default that may belong to another run.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from p2p_photon.progress import ProgressRecord

T = TypeVar("T", bound=Hashable)


@dataclass
class PeerView:
    """The newest record of one peer and when it was seen."""

    record: ProgressRecord
    seen_at: float
    """min(observed_at, record.time): a record stamped in the future cannot keep a peer alive."""
    observations: int = 1


class Swarm:
    """The newest record of every peer ever seen; peers are never forgotten, only shown as gone."""

    def __init__(self) -> None:
        self.peers: dict[str, PeerView] = {}

    def observe(self, records: Iterable[ProgressRecord], now: float) -> list[ProgressRecord]:
        """Keep each peer's newest record; return the records not seen before (deduped by peer and time)."""
        new = []
        for rec in records:
            view = self.peers.get(rec.peer_id)
            if view is not None and rec.time <= view.record.time:
                continue
            seen = 1 + (view.observations if view else 0)
            self.peers[rec.peer_id] = PeerView(rec, min(now, rec.time), seen)
            new.append(rec)
        return new

    def rows(self, now: float, gone_after: float) -> list[dict[str, Any]]:
        """Table rows, alive peers first, then by peer ID (a stable order for every view)."""
        rows = [peer_row(v, now, gone_after) for v in self.peers.values()]
        rows.sort(key=lambda r: (not r["alive"], r["peer_id"]))
        return rows


def peer_row(view: PeerView, now: float, gone_after: float) -> dict[str, Any]:
    """One table row: every record field plus the short ID, seconds since seen and liveness."""
    rec = view.record
    last_seen = max(0.0, now - view.seen_at)
    gone = last_seen > gone_after
    row = rec.model_dump()
    ppl = None if rec.eval_loss is None else round(math.exp(min(rec.eval_loss, 50.0)), 2)
    row.update(peer=rec.peer_id[-8:], last_seen_s=round(last_seen, 1), gone=gone, eval_ppl=ppl,
               alive=not gone and rec.state != "done", state="gone" if gone else rec.state,
               observations=view.observations)
    return row


def swarm_summary(rows: Sequence[dict]) -> dict[str, Any]:
    """The swarm line: global round among alive peers of the majority fingerprint, and its progress."""
    alive = [r for r in rows if r["alive"]]
    fingerprint = majority(r["fingerprint"] for r in alive)
    members = [r for r in alive if r["fingerprint"] == fingerprint]
    rnd = max((r["round"] for r in members), default=None)
    current = [r for r in members if r["round"] == rnd]
    target = run_setting(r["target_samples"] for r in members)
    seq_len = run_setting(r["seq_len"] for r in members)
    # θ agreement: the hashes published for the newest global model (θ round, not training round:
    # an overlapped peer trains round r+1 while it holds θ of round r); more than one is a fork
    theta_round = max((r.get("theta_round", 0) for r in members), default=None)
    hashes = {r["theta_hash"] for r in members if r.get("theta_round", 0) == theta_round}
    return dict(
        round=rnd, samples=sum(r["samples"] for r in current), target_samples=target, seq_len=seq_len,
        eta_s=round_eta(current, target, seq_len),
        tokens_per_s=sum(r["tokens_per_s"] for r in alive), alive_peers=len(alive), known_peers=len(rows),
        fingerprint=fingerprint, other_fingerprint_peers=len(alive) - len(members),
        theta_same=(len(hashes) == 1) if members else None, theta_hashes=sorted(hashes),
        theta_round=theta_round, distinct_theta=len(hashes), bans=swarm_bans(rows), **heldout(members),
    )


def heldout(members: Sequence[dict]) -> dict[str, Any]:
    """The swarm's held-out perplexity: the median over the peers that evaluated the newest θ round
    any of them evaluated, on the run's public eval set (every peer of a run has the same one)."""
    rated = [r for r in members if r.get("eval_loss") is not None]
    if not rated:
        return dict(eval_ppl=None, eval_round=None)
    newest = max(r["eval_round"] for r in rated)
    losses = sorted(r["eval_loss"] for r in rated if r["eval_round"] == newest)
    return dict(eval_ppl=round(math.exp(min(losses[(len(losses) - 1) // 2], 50.0)), 2), eval_round=newest)


def swarm_bans(rows: Sequence[dict]) -> list[dict[str, str]]:
    """Every ban the peers report: who was left out, by whom, why."""
    bans = []
    for r in rows:
        for entry in r.get("bans") or ():
            who, _, why = entry.partition(": ")
            bans.append(dict(who=who[-8:], by=r["peer"], why=why))
    return bans


def round_eta(current: Sequence[dict], target: int | None, seq_len: int | None) -> float | None:
    """Seconds until the peers of the global round reach `target` samples at their current speed.

    None when it cannot be known: no peers in the round, no one training, or an unknown target
    or seq_len (samples/s = tokens/s / seq_len).
    """
    if not current or target is None or seq_len is None:
        return None
    samples_per_s = sum(r["tokens_per_s"] for r in current) / seq_len
    if samples_per_s <= 0:
        return None
    return max(0, target - sum(r["samples"] for r in current)) / samples_per_s


def run_setting(values: Iterable[object]) -> int | None:
    """The run-wide value most records carry, ignoring 0 (not said) and anything not a positive int."""
    said = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return majority(said)


def majority(values: Iterable[T]) -> T | None:
    """Most common value; ties go to the smallest, so every monitor picks the same one."""
    counts = Counter(values)
    if not counts:
        return None
    return min(counts, key=lambda v: (-counts[v], v))
