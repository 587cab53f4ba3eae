"""Reporting: what this peer tells the swarm (progress records) and the person watching it (one
log line per round, the round history, the JSON summary at exit)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind.utils import get_dht_time

from ..config import Config
from ..inner import perplexity
from ..progress import ProgressRecord, ban_entries
from .contribution import ContributionPolicy
from .global_state import GlobalState
from .swarm_view import SwarmView
from .training import RoundStats

logger = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """One attempt at a round: averaged (ok) or failed (why), with this peer's local work."""

    round: int
    stats: RoundStats
    ok: bool
    group: int = 0  # members of the group that averaged
    seconds: float = 0.0  # matchmaking + all-reduce
    sent: int = 0  # bytes put on the wire
    received: int = 0
    why: str | None = None
    eval_loss: float | None = None  # held-out loss of the new global model, when evaluated

    @classmethod
    def averaged(cls, round_no: int, st: RoundStats, res) -> RoundReport:
        """From an averaging.RoundResult."""
        return cls(round_no, st, True, group=res.group_size, seconds=res.seconds, sent=res.bytes_sent,
                   received=res.bytes_received)

    @classmethod
    def failed(cls, round_no: int, st: RoundStats, why: str) -> RoundReport:
        return cls(round_no, st, False, why=why)


class Reporter:
    def __init__(self, cfg: Config, gs: GlobalState, policy: ContributionPolicy, peer_id: str,
                 view: SwarmView, banned: Callable[[], dict[str, str]] = dict):
        self.cfg, self.gs, self.policy, self.peer_id, self.banned = cfg, gs, policy, peer_id, banned
        self.view = view  # publishes our records (state changes at once, training progress in its thread)
        self.last_rate = 0.0  # tokens/s of the latest training
        self.last_wait_s = 0.0  # seconds the last round spent outside training (averaging, sync)
        self.eval_loss: float | None = None  # the latest held-out loss of the global model, and its θ round
        self.eval_round = 0
        self._state = ("", -1, 0.0)  # (phase, round, DHT time it began) of the latest record: its `since`

    def publish(self, st: RoundStats, phase: str, train_round: int, now: bool = False) -> None:
        """State changes are published at once; progress during training goes through the view's thread."""
        c = self.gs.counters
        if st.train_s > 0:
            self.last_rate = st.tokens / st.train_s
        busy = st.wall_s + self.last_wait_s  # this round's training plus the last round's averaging/sync
        t = get_dht_time()
        if self._state[:2] != (phase, train_round):
            self._state = (phase, train_round, t)
        rec = ProgressRecord(
            peer_id=self.peer_id, round=train_round, samples=st.samples, steps=st.steps,
            total_samples=c.total_samples + st.samples, loss=st.loss if st.steps and st.loss == st.loss else 0.0,
            tokens_per_s=self.last_rate, fingerprint=self.gs.fp, theta_hash=self.gs.hash,
            failed_rounds=c.failed_rounds, bytes_sent=c.bytes_sent, bytes_received=c.bytes_received,
            utilization=min(1.0, st.train_s / busy) if busy > 0 else 0.0, time=t, state=phase, since=self._state[2],
            target_samples=self.cfg.rounds.target_samples_per_round, seq_len=self.cfg.model.seq_len,
            theta_round=c.round, bans=ban_entries(self.banned()), eval_loss=self.eval_loss,
            eval_round=self.eval_round, client=self.cfg.dht.client_mode)
        rec = self.policy.record(rec)
        if now or phase != "training" or not self.view.is_alive():
            self.view.publish(rec)
        else:
            self.view.offer(rec)

    def log_round(self, report: RoundReport, present: int) -> None:
        """One line per round, and the round's entry in the history."""
        st, c = report.stats, self.gs.counters
        tok_s = st.tokens / st.train_s if st.train_s else 0.0
        if report.ok:
            logger.info("round %d | loss %.3f | peers %d/%d | tok/s %.3g | steps %d | allreduce %.1fs | sent %.2fMB"
                        " | θ %s", report.round, st.loss, report.group, present, tok_s, st.steps,
                        report.seconds, report.sent / 1e6, self.gs.hash[:8])
        else:
            logger.info("round %d | loss %.3f | FAILED (%s) | failed rounds %d", report.round, st.loss,
                        report.why, c.failed_rounds)
        c.history.append(dict(round=report.round, ok=report.ok, loss=st.loss, steps=st.steps,
                              samples=st.samples, tokens=st.tokens, group=report.group, theta=self.gs.hash,
                              sent=report.sent, why=report.why, eval_loss=report.eval_loss, wall_s=st.wall_s,
                              train_s=st.train_s, allreduce_s=report.seconds, time=time.time(),
                              global_step=c.global_step, total_samples=c.total_samples))
        if report.eval_loss is not None and math.isfinite(report.eval_loss):
            self.eval_loss, self.eval_round = float(report.eval_loss), c.round
        if report.eval_loss is not None:
            logger.info("round %d | held-out perplexity of the global model %.2f", report.round,
                        perplexity(report.eval_loss))

    def write_summary(self, path: str | None, *, initial_loss: float, final_loss: float,
                      **extra: Any) -> None:
        """The closing log line, and with `path` a JSON summary of the run as this peer saw it."""
        c = self.gs.counters
        logger.info("held-out perplexity of the global model: %.2f (initial %.2f) after %d rounds",
                    perplexity(final_loss), perplexity(initial_loss), c.round)
        if not path:
            return
        out = dict(peer_id=self.peer_id, fingerprint=self.gs.fp, initial_loss=initial_loss, final_loss=final_loss,
                   initial_ppl=perplexity(initial_loss), final_ppl=perplexity(final_loss), rounds=c.round,
                   global_step=c.global_step, total_samples=c.total_samples, failed_rounds=c.failed_rounds,
                   bytes_sent=c.bytes_sent, bytes_received=c.bytes_received,
                   compression=self.cfg.averaging.compression, block_cycle=self.cfg.outer.block_cycle,
                   num_params=sum(t.numel() for t in self.gs.theta), **extra, theta=self.gs.hash,
                   history=c.history, steps=c.steps_log)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=1))
