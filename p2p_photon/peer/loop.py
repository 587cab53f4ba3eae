"""The peer: join, then round after round train until the swarm's round ends, average Δ, step θ.

    join()                                     refuse a foreign swarm; download θ if the swarm is ahead
    every round:
        stats  = train_until_round_ends()      progress-based: the swarm's samples reach the target
        report = average_and_step(stats)       Δ = θ − θ_local, weighted all-reduce, θ ← OuterOpt(θ, Δ̄)
        after_round(report)                    evaluate, log, checkpoint

The parts, one job each: `GlobalState` (θ, outer state, counters, hash), `LocalTraining` (inner
steps, block cycling), `RoundTracker` (the swarm's records: when a round ends, who is ahead,
weight caps), `ContributionPolicy` (what this peer sends, its self-check), `StateSync` (donor
choice and verification), `overlap` (the round in flight), `Reporter` (records, log, summary).
hivemind is reached through `averaging.SwarmAverager` and `progress` only.

A round that cannot be averaged is a failed round: counted, published, logged, never applied
as if it were global. A peer that finds the swarm ahead of it downloads the state instead.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from .. import memory
from ..averaging import AveragedWithoutUs, AveragingFailed
from ..config import Config
from ..watchdog import StartupInterrupted, stop_on_signals
from .contribution import ContributionPolicy
from .overlap import InFlight, carry_progress, launch, progress_since, swap_in_group_step
from .parts import PeerParts
from .reporting import RoundReport
from .sync import wait_for_cohort, wait_out_formed_round
from .training import RoundStats

logger = logging.getLogger(__name__)

STUCK_AFTER = 3  # consecutive failed attempts at one round before re-downloading the swarm's state


NO_LEADER = ("every live peer of run %s is in client mode (accepts no connections), and client-mode peers cannot "
             "average with each other: waiting for a peer that accepts connections (a public address, a forwarded "
             "port, or dht.auto_relay)")


class Peer(PeerParts):
    def __init__(self, cfg: Config, *, resume: bool = False, stop_event: threading.Event | None = None,
                 summary_out: str | None = None, policy: ContributionPolicy | None = None):
        super().__init__(cfg, resume=resume, stop_event=stop_event, summary_out=summary_out,
                         policy=policy or ContributionPolicy(cfg.averaging.max_delta_norm_ratio))
        self.inflight: InFlight | None = None  # overlapped mode: the all-reduce running while the next round trains
        self.failed_at, self.failed_here = -1, 0  # consecutive failed attempts at one round

    def run(self, starting: threading.Event | None = None) -> int:
        """Start up (then clear `starting`: see stop_on_signals), train until stopped or done."""
        try:
            self.setup()
            self.join(starting)
            while not self.stop.is_set() and not self._all_rounds_done():
                report = self.overlapped_round() if self._overlapping() else self.blocking_round()
                if report is not None and not self.after_round(report):
                    break
            return 0
        finally:
            self.close()

    @property
    def train_round(self) -> int:
        """The round being trained: in overlapped mode, one past the round whose all-reduce is in flight."""
        return self.gs.counters.round + (1 if self.inflight is not None else 0)

    def _all_rounds_done(self) -> bool:
        return bool(self.cfg.rounds.num_rounds and self.gs.counters.round >= self.cfg.rounds.num_rounds)

    def _overlapping(self) -> bool:
        n = self.cfg.rounds.num_rounds
        return self.cfg.averaging.overlap and (not n or self.gs.counters.round + 1 < n or self.inflight is not None)

    # ------------------------------------------------------------------ one round, blocking

    def blocking_round(self) -> RoundReport | None:
        """Train, then average and step (None: stopped while training)."""
        st = self.train_until_round_ends()
        if st.stopped:
            return None
        t0 = time.perf_counter()
        report = self.average_and_step(st)
        self.reporter.last_wait_s = time.perf_counter() - t0
        return report

    def train_until_round_ends(self) -> RoundStats:
        """Train from θ until the round ends; after a failed attempt, continue the same round's work."""
        st, self.pending = self.pending or RoundStats(), None
        self.publish(st, "training", now=True)  # others see at once that we are in this round
        return self.training.train(st, round_over=lambda s: self.tracker.round_over(self.train_round, s.samples),
                                   publish=lambda s: self.publish(s, "training"), stop=self.stop)

    def average_and_step(self, st: RoundStats) -> RoundReport:
        self.publish(st, "averaging")
        r = self.gs.counters.round
        records = self.tracker.records(fresh=True)
        ahead, mates_here = self.tracker.ahead(r, records)
        if ahead is not None and not mates_here:
            return self.fail_round(st, f"missed round {r}: the swarm is already at round {ahead}")
        if (want := self._forked(records)) is not None:
            return self.heal_fork(st, want)
        active = self.training.active_indices(r)
        deltas = self.policy.contribution(self.gs.pseudo_gradient(self.model))
        norm, problem = self.policy.self_check(deltas, active)
        if problem:
            return self.fail_round(st, f"not contributing: {problem}; local work discarded", keep_work=False)
        try:
            res = self.averager.average(deltas, active=active, **self._request(st, r, records))
        except AveragingFailed as e:
            return self.fail_round(st, str(e), moved_on=isinstance(e, AveragedWithoutUs))
        self.policy.remember(norm, active)
        self._apply(res, reset_local=True)
        return RoundReport.averaged(r, st, res)

    def _request(self, st: RoundStats, r: int, records: list) -> dict:
        """What SwarmAverager.average needs besides the tensors (blocking and overlapped rounds alike)."""
        meta = dict(fingerprint=self.fp, samples=st.samples, steps=st.steps, theta=self.gs.hash)
        return dict(round_no=r, weight=self.policy.weight(st.samples), meta=meta,
                    weight_caps=self.tracker.weight_caps(records, self.reporter.last_rate),
                    timeout=self.cfg.averaging.step_timeout, **self.tracker.counts(records, r))

    # ------------------------------------------------------------------ one round, overlapped

    def overlapped_round(self) -> RoundReport | None:
        """Train round T+1 while round T's all-reduce runs (overlap.py), then land T: its report, or None."""
        n = self.cfg.rounds.num_rounds
        last = bool(n and self.inflight is not None and self.inflight.round + 1 >= n)  # nothing to train after it
        st = RoundStats()
        if not last:
            with self.gs.lock:
                snapshot = [p.detach().clone() for p in self.model.parameters()]
            st = self.train_until_round_ends()
        if st.stopped and self.inflight is None:
            return None
        t0 = time.perf_counter()
        launched = None
        if not st.stopped and (want := self._forked(self.tracker.records(fresh=True))) is not None:
            self.inflight = None  # it was launched on top of a θ that is not the swarm's
            return self.heal_fork(st, want)
        if not last and not st.stopped and not (n and self.train_round >= n):
            launched = self._launch(st, self.train_round, snapshot)
        landing, self.inflight = self.inflight, launched
        report = self._land(landing) if landing is not None else None
        self.reporter.last_wait_s = time.perf_counter() - t0
        return report

    def _launch(self, st: RoundStats, r: int, snapshot: list[torch.Tensor]) -> InFlight | None:
        self.publish(st, "averaging")
        with self.gs.lock:
            deltas = self.policy.contribution(progress_since(snapshot, self.model))
        norm, problem = self.policy.self_check(deltas, None)
        if problem:
            logger.warning("round %d: not contributing: %s; local work discarded", r, problem)
            with self.gs.lock, torch.no_grad():
                for p, s in zip(self.model.parameters(), snapshot):
                    p.copy_(s)
            return None
        kwargs = self._request(st, r, self.tracker.records(fresh=True))
        return launch(InFlight(r, st, deltas, norm), lambda: self.averager.average(deltas, **kwargs), AveragingFailed)

    def _land(self, flight: InFlight) -> RoundReport | None:
        if flight.external:
            return self._land_by_download(flight)
        why = flight.wait(self.cfg.averaging.landing_timeout)
        if why is None and self.gs.counters.round != flight.round:
            why = f"our global model is at round {self.gs.counters.round}, the group averaged round {flight.round}"
        if why is not None:
            # round T did not land: the round after it, already launched on top of T, can never land
            # either (its group applies it to θ_T+1, which we do not hold). Drop it and train round T
            # again from θ (or the swarm's newer state): the pipeline restarts at the round that failed
            # instead of staying one round ahead of a global model that never advances.
            self.inflight = None
            return self.fail_round(flight.stats, why, keep_work=False)
        self.policy.remember(flight.norm, None)
        with self.gs.lock:
            old = [t.clone() for t in self.gs.theta]
        self._apply(flight.result, reset_local=False)  # θ ← OuterOpt(θ, Δ̄); the local model keeps its progress
        with self.gs.lock:
            swap_in_group_step(self.model, self.gs.theta, old, flight)
        return RoundReport.averaged(flight.round, flight.stats, flight.result)

    def join(self, starting: threading.Event | None = None) -> None:
        super().join(starting)
        wait_for_cohort(self.tracker, self.cfg.rounds.start_peers, self.gs.counters.round, self.stop,
                        waiting=lambda: self.publish(RoundStats(), "syncing"))
        if self.inflight is None:
            self._join_pipeline()

    def sync_from_peers(self, *args, **kwargs) -> bool:
        if ok := super().sync_from_peers(*args, **kwargs):
            self._join_pipeline()
        return ok

    def _join_pipeline(self) -> None:
        """After we took θ of round R. Overlapped: when most peers hold θ R and train R+1, enough to form a group
        without us (averaging.min_group_size), R's all-reduce is in the air without us: train R+1 and land R by
        download (overlap.py). Blocking: R's groups formed long ago: wait for its θ (sync.wait_out_formed_round)."""
        if not self.cfg.averaging.overlap:
            r, a = self.gs.counters.round, self.cfg.averaging
            if self.joined and wait_out_formed_round(self.tracker, r, self.stop, 2 * a.matchmaking_time, a.attempt_s,
                                                     waiting=lambda: self.publish(RoundStats(), "syncing")):
                PeerParts.sync_from_peers(self, attempts=3, min_round=r + 1)
            return
        records, r = self.tracker.records(fresh=True), self.gs.counters.round
        ahead = [m for m in self.tracker.mates(records) if m.theta_round == r and m.round > r]
        in_air = (self.tracker.theta_round(records) == r and self.tracker.swarm_round(records) > r
                  and len(ahead) >= self.cfg.averaging.min_group_size)
        self.inflight = InFlight(r, RoundStats(), [], 0.0, external=True) if in_air else None

    def _land_by_download(self, flight: InFlight) -> RoundReport | None:
        """Land a round the swarm averaged without us: wait until most peers hold a newer θ, download it
        and move our progress onto it (None: landed). If the swarm's round did not land either (most
        peers went back to training it), fail the round and train it again with them."""
        deadline = time.monotonic() + self.cfg.averaging.landing_timeout
        while time.monotonic() < deadline and not self.stop.wait(0.2):
            records = self.tracker.records(fresh=True)
            if (self.tracker.theta_round(records) > flight.round
                    or self.tracker.swarm_round(records) <= flight.round):
                break
        progress = self.gs.pseudo_gradient(self.model)
        if (self.tracker.theta_round(self.tracker.records(fresh=True)) <= flight.round
                or not super().sync_from_peers(attempts=2) or self.gs.counters.round <= flight.round):
            self.inflight = None
            return self.fail_round(flight.stats, f"the swarm's θ after round {flight.round} was not served",
                                   keep_work=False)
        with self.gs.lock:
            carry_progress(self.model, progress, self.gs.theta)
        return None

    # ------------------------------------------------------------------ failed rounds

    def fail_round(self, st: RoundStats, why: str, keep_work: bool = True, moved_on: bool = False) -> RoundReport:
        """Counted and published; local work kept for the next attempt unless the swarm moved on (`moved_on`:
        others averaged this round without us: take their state now, even if they are not a majority)."""
        c, r = self.gs.counters, self.gs.counters.round
        c.failed_rounds += 1
        logger.warning("round %d failed (%s); failed rounds so far: %d", r, why, c.failed_rounds)
        self.publish(st, "syncing")
        self.failed_here = self.failed_here + 1 if self.failed_at == r else 1
        self.failed_at = r
        report = RoundReport.failed(r, st, why)
        if self._catch_up():
            return report
        if moved_on and self.sync_from_peers(attempts=3, min_round=r + 1):
            logger.info("took the state the other groups of round %d averaged", r)
            return report
        if moved_on:  # nothing to take: the next attempt averages round r with whoever is still at it
            self.tracker.missed_refuted = r
        if self.failed_here >= STUCK_AFTER and self.sync_from_peers(attempts=1):
            logger.warning("%d failed attempts at round %d: re-synchronized with the swarm", self.failed_here, r)
            return report
        if keep_work:
            self.pending = st  # keep the local work (Δ stays relative to the last agreed θ) and retry
        else:
            self.gs.reset_local(self.model)
        return report

    def _catch_up(self) -> bool:
        """If a majority of the other peers finished our round without us, download the swarm's state
        instead of averaging a stale Δ (a lone peer far ahead is not enough)."""
        # θ rounds, not training rounds: overlapped peers train r+1 while they hold θ of round r
        ahead, ours = self.tracker.theta_round(self.tracker.records(fresh=True)), self.gs.counters.round
        if ahead <= ours:
            return False
        logger.info("the swarm holds θ of round %d, we of round %d: downloading its state", ahead, ours)
        return self.sync_from_peers()

    # ------------------------------------------------------------------ after a round

    def after_round(self, report: RoundReport) -> bool:
        """Evaluate, log, checkpoint; False when this peer should stop (a bounded run whose other
        peers have all finished)."""
        cfg, c = self.cfg, self.gs.counters
        if report.ok and cfg.logging.eval_every_rounds and c.round % cfg.logging.eval_every_rounds == 0:
            report.eval_loss = self.evaluate()
        self.reporter.log_round(report, self.tracker.present())
        if not report.ok and self.tracker.only_clients(self.tracker.records()):
            logger.warning(NO_LEADER, cfg.dht.run_id)
        if not report.ok and cfg.rounds.num_rounds and self.failed_here >= 2 and self.tracker.swarm_finished():
            # the others finished the run; they serve their final state a while (rounds.linger_seconds)
            if self.sync_from_peers(attempts=2):
                logger.info("every other peer of run %s has finished: took their final state", cfg.dht.run_id)
                return True
            logger.warning("every other peer of run %s has finished and left: stopping at round %d "
                           "(rounds.num_rounds = %d not reached)", cfg.dht.run_id, c.round, cfg.rounds.num_rounds)
            return False
        every = cfg.checkpoint.every_rounds
        if report.ok and every and c.round % every == 0:
            self.save_checkpoint()
        return True


def run_peer(cfg: Config, *, resume: bool = False, summary_out: str | None = None,
             policy_class: type[ContributionPolicy] = ContributionPolicy) -> int:
    """`p2p-photon peer`: run until stopped (SIGINT/SIGTERM finish the step, checkpoint and leave)."""
    PeerParts.check_inputs(cfg)  # fail fast on bad addresses and paths, before minutes of data preparation
    policy = policy_class(cfg.averaging.max_delta_norm_ratio)
    stop, starting = threading.Event(), threading.Event()
    starting.set()
    memory.limit_arenas()  # before the DHT and averager are forked and the threads start
    memory.start_trimmer(stop, in_children=True)
    try:
        with stop_on_signals(stop, "finishing the current step, checkpointing and leaving", starting):
            return Peer(cfg, resume=resume, stop_event=stop, summary_out=summary_out, policy=policy).run(starting)
    except StartupInterrupted as e:
        logger.info("stopped by %s during start-up: nothing trained, nothing written", e)
        return 0
