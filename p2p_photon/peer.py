"""The peer loop: join, sync, train until the swarm's round ends, average Δ, apply the outer step.

    for r in count(start_round):
        stats = train_until_round_ends()          # progress-based: the swarm's samples reach the target
        report = average_and_step(stats)           # Δ = θ − θ_local, weighted all-reduce, θ ← OuterOpt(θ, Δ̄)
        log_round(report)

A round that cannot be averaged is a failed round: counted, published, logged, never applied
as if it were global. A peer that finds the swarm ahead of it downloads the state instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hivemind.utils import get_dht_time

from . import data, state, trust
from .averaging import AveragingFailed, SwarmAverager
from .config import Config, fingerprint
from .inner import InnerTrainer, evaluate, optimizer_state_bytes, perplexity, resolve_device
from .model import build_model, theta_hash
from .network import prepare_identity, shutdown_dht, start_dht, validate_maddrs
from .outer import OuterOptimizer, active_group, block_groups, load_into_model, pseudo_gradient
from .progress import ProgressPublisher, ProgressRecord, fetch_progress, progress_validators
from .watchdog import stop_on_signals

logger = logging.getLogger(__name__)

STUCK_AFTER = 3  # consecutive failed attempts at one round before re-downloading the swarm's state
EXTRAPOLATE_MAX_S = 10.0  # trust a peer's reported throughput for at most this long after its record


class SwarmView(threading.Thread):
    """Publishes this peer's latest progress record and fetches the swarm's records in the background,
    so the training loop never blocks on the DHT (it reads the cached view)."""

    def __init__(self, dht, run_id: str, publisher: ProgressPublisher, interval: float,
                 members: frozenset[str] | None = None):
        super().__init__(name="swarm-view", daemon=True)
        self.dht, self.run_id, self.publisher, self.interval = dht, run_id, publisher, interval
        self.members = members
        self.stopped = threading.Event()
        self._pending: ProgressRecord | None = None
        self._records: list[ProgressRecord] = []
        self.invalid = 0
        self._lock = threading.Lock()

    def offer(self, record: ProgressRecord) -> None:
        with self._lock:
            self._pending = record

    def records(self) -> list[ProgressRecord]:
        with self._lock:
            return list(self._records)

    def refresh(self) -> list[ProgressRecord]:
        """Fetch now (for decisions that must not use a stale view)."""
        records, invalid = fetch_progress(self.dht, self.run_id, members=self.members, bind_peer_id=True)
        with self._lock:
            self._records, self.invalid = records, invalid
        return records

    def run(self) -> None:
        last_pub = 0.0
        while not self.stopped.wait(min(0.5, self.interval / 2)):
            try:
                pending = None
                if time.monotonic() - last_pub >= self.interval:
                    with self._lock:  # take the newest record only when it is due
                        pending, self._pending = self._pending, None
                if pending is not None:
                    self.publisher.publish(pending)
                    last_pub = time.monotonic()
                self.refresh()
            except Exception as e:  # the DHT may be shutting down; the loop reads the last good view
                logger.debug("swarm view: %s", e)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


class FingerprintMismatch(Exception):
    """The swarm of this run_id trains something else (model, tokenizer, seed or outer optimizer)."""


@dataclass
class RoundStats:
    samples: int = 0
    steps: int = 0
    tokens: int = 0
    loss: float = float("nan")
    train_s: float = 0.0
    wall_s: float = 0.0
    stopped: bool = False


@dataclass
class Counters:
    """Everything about this peer's position in the run that is checkpointed and shared."""

    round: int = 0
    global_step: int = 0
    failed_rounds: int = 0
    total_samples: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    history: list[dict] = field(default_factory=list)
    steps_log: list[list] = field(default_factory=list)  # [round, global step, loss, lr] if logging.record_steps


class Peer:
    def __init__(self, cfg: Config, *, resume: bool = False, stop_event: threading.Event | None = None,
                 summary_out: str | None = None):
        self.cfg, self.resume, self.summary_out = cfg, resume, summary_out
        self.stop = stop_event or threading.Event()
        self.counters = Counters()
        self.lock = threading.RLock()  # guards θ_global/outer state against the state-sharing thread
        self.dht = self.averager = None
        self.members: frozenset[str] | None = None
        self._tmp_identity: str | None = None  # private dir of an ephemeral identity (no dht.identity_path)
        self.delta_norms: dict[int, list[float]] = {}  # active group -> this peer's recent ‖Δ‖ (self-check)
        self.peak_opt_bytes = 0
        self._ignored_claims: set[str] = set()
        self._trained_group: int | None = None  # FedCyBGD: the group the inner optimizer currently holds
        self.inflight: dict | None = None  # overlapped mode: the all-reduce running while the next round trains
        self.pending: RoundStats | None = None  # work of a failed attempt, carried into the retry
        self.failed_at, self.failed_here = -1, 0  # consecutive failed attempts at one round
        self.last_rate, self.last_wait_s = 0.0, 0.0  # tokens/s of the last round; its averaging/sync seconds
        self.theta_hash_cached = ""
        self.joined = False  # checkpoints and summaries only for a peer that took part

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        self.prep = data.load_prepared(data.prepare(cfg.data, cfg.seed, progress=cfg.logging.progress_bar))
        self.fp = fingerprint(cfg, self.prep.tokenizer_hash)
        self.device = resolve_device(cfg.inner)
        self.model = build_model(cfg.model.preset, self.prep.vocab_size, cfg.model.seq_len, cfg.seed, self.device)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.groups = block_groups(self.names, cfg.outer.block_cycle) if cfg.outer.block_cycle else None
        self.theta = [p.detach().clone() for p in self.model.parameters()]
        self.outer = OuterOptimizer(self.theta, cfg.outer)
        self.trainer = InnerTrainer(self.model, cfg.inner, self.device)
        self.stream = data.open_silo_stream(self.prep, [cfg.data.silo], seq_len=cfg.model.seq_len,
                                            batch_size=cfg.inner.batch_size, seed=cfg.seed, stream_id=cfg.data.silo)
        self.heldout = data.heldout_batches(self.prep, seq_len=cfg.model.seq_len, batch_size=cfg.inner.batch_size,
                                            n_batches=cfg.logging.eval_batches)
        self.initial_loss = evaluate(self.model, self.heldout, cfg.inner, self.device)
        if self.resume:
            self._restore(state.load_latest(cfg.checkpoint.dir, self.fp))
        self._theta_changed()
        self._start_network()

    def _start_network(self) -> None:
        """Progress records are signed with the peer's identity key (an ephemeral one in a private
        temp dir if dht.identity_path is empty), so every record is bound to its sender's peer ID."""
        run_id, dht_cfg = self.cfg.dht.run_id, self.cfg.dht
        self.members = trust.load_members(dht_cfg.members) if dht_cfg.members else None
        if not dht_cfg.identity_path:
            self._tmp_identity = tempfile.mkdtemp(prefix="p2p-photon-id-")
            dht_cfg = dataclasses.replace(dht_cfg, identity_path=f"{self._tmp_identity}/identity.key")
        key = trust.signing_key_from_identity(prepare_identity(dht_cfg.identity_path)[0])
        self.validators = progress_validators(run_id, key, members=self.members, bind_peer_id=True)
        self.dht = start_dht(dht_cfg, record_validators=self.validators)
        self.publisher = ProgressPublisher(self.dht, run_id, self.validators)
        self.view = SwarmView(self.dht, run_id, self.publisher, self.cfg.logging.progress_interval, self.members)
        self.averager = SwarmAverager(self.dht, [t.shape for t in self.theta], prefix=f"{run_id}-{self.fp}",
                                      cfg=self.cfg.averaging, state_fn=self._share_state, members=self.members)
        self.peer_id = self.averager.peer_id
        logger.info("peer %s joined run %s (fingerprint %s, silo %d, model %s)", self.peer_id[-8:], run_id,
                    self.fp, self.cfg.data.silo, self.cfg.model.preset)

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        try:
            self.setup()
            self._join_swarm()
            self._loop()
            return 0
        finally:
            self.close()

    def _loop(self) -> None:
        cfg = self.cfg
        while not self.stop.is_set():
            if cfg.rounds.num_rounds and self.counters.round >= cfg.rounds.num_rounds:
                break
            if cfg.averaging.overlap and (not cfg.rounds.num_rounds
                                          or self.counters.round + 1 < cfg.rounds.num_rounds or self.inflight):
                report = self._overlapped_round()
                if report is None:
                    break
                if not report:
                    continue
            else:
                stats = self.train_until_round_ends()
                if stats.stopped:
                    break
                t0 = time.perf_counter()
                report = self.average_and_step(stats)
                self.last_wait_s = time.perf_counter() - t0
            if report["ok"] and cfg.logging.eval_every_rounds and self.counters.round % cfg.logging.eval_every_rounds == 0:
                report["eval_loss"] = evaluate(self.model, self.heldout, cfg.inner, self.device)
            self.log_round(report)
            if not report["ok"] and cfg.rounds.num_rounds and self.failed_here >= 2 and self._swarm_finished():
                logger.warning("every other peer of run %s has finished and left: stopping at round %d "
                               "(rounds.num_rounds = %d not reached)", cfg.dht.run_id, self.counters.round,
                               cfg.rounds.num_rounds)
                break
            every = cfg.checkpoint.every_rounds
            if report["ok"] and every and self.counters.round % every == 0:
                self.save_checkpoint()

    def _join_swarm(self) -> None:
        """Refuse a foreign swarm; download state if the swarm is ahead of us."""
        records, _ = fetch_progress(self.dht, self.cfg.dht.run_id, members=self.members, bind_peer_id=True)
        others = [r for r in records if r.peer_id != self.peer_id and r.state != "done"]
        ours = [r for r in others if r.fingerprint == self.fp]
        foreign = [r for r in others if r.fingerprint != self.fp]
        if foreign and not ours:
            raise FingerprintMismatch(
                f"refusing to join run '{self.cfg.dht.run_id}': its peers have run fingerprint "
                f"{foreign[0].fingerprint}, ours is {self.fp} (different model, tokenizer, seed or outer optimizer); "
                "use the swarm's config or another dht.run_id")
        if foreign:
            logger.warning("ignoring %d peer(s) of run %s with another fingerprint (%s): they are not averaged with",
                           len(foreign), self.cfg.dht.run_id, foreign[0].fingerprint)
        ahead = trust.majority_round([r.round for r in ours])
        if ahead > self.counters.round:
            logger.info("swarm is at round %d, we are at %d: downloading state from peers", ahead, self.counters.round)
            if not self.sync_from_peers():
                logger.warning("no peer served its state: starting from %s at round %d",
                               "our checkpoint" if self.resume else "the seeded init", self.counters.round)
        elif not ours:
            logger.info("no other peers yet: starting from %s at round %d",
                        "our checkpoint" if self.resume else "the seeded init", self.counters.round)
        self._publish(RoundStats(), "training", now=True)
        self.view.start()
        self.joined = True

    # ------------------------------------------------------------------ local training

    def train_until_round_ends(self) -> RoundStats:
        """Train from θ until the round ends; after a failed attempt, continue the same round's work."""
        cfg = self.cfg
        self._prepare_round()
        st, self.pending = self.pending or RoundStats(), None
        t0 = last_pub = last_check = time.perf_counter()
        wall0, loss_sum = st.wall_s, st.loss * st.steps if st.steps else 0.0
        self._publish(st, "training", now=True)  # others see at once that we are in this round
        while not self.stop.is_set():
            step = self.trainer.step(self.stream.next_batch, self.counters.global_step + st.steps)
            if cfg.inner.simulate_slowdown:  # counts as compute: a slower machine
                time.sleep(cfg.inner.simulate_slowdown)
            if cfg.logging.record_steps:
                self.counters.steps_log.append([self.counters.round, self.counters.global_step + st.steps,
                                                step.loss, step.lr])
            st.steps, st.samples, st.tokens = st.steps + 1, st.samples + step.samples, st.tokens + step.tokens
            st.train_s += step.seconds + cfg.inner.simulate_slowdown
            loss_sum += step.loss
            st.loss = loss_sum / st.steps
            now = time.perf_counter()
            st.wall_s = wall0 + now - t0
            if now - last_pub >= min(1.0, cfg.logging.progress_interval / 2):
                self._publish(st, "training")  # handed to the background thread: no DHT call here
                last_pub = now
            if self._local_cap_reached(st) or (now - last_check >= 0.2 and self._round_over(st)):
                self.peak_opt_bytes = max(self.peak_opt_bytes, optimizer_state_bytes(self.trainer.optimizer))
                return st
            if now - last_check >= 0.2:
                last_check = now
        st.stopped = True
        return st

    def _prepare_round(self) -> None:
        """FedCyBGD: only the round's group requires grad, and the inner optimizer holds state for
        it alone (a new optimizer whenever the group changes)."""
        if self.groups is None:
            return
        active = self._active_indices()
        key = self._group_key(active)
        if key == self._trained_group:
            return
        on = set(active)
        for i, p in enumerate(self.model.parameters()):
            p.requires_grad_(i in on)
            p.grad = None
        self.trainer.reset_optimizer()
        self._trained_group = key

    def _local_cap_reached(self, st: RoundStats) -> bool:
        r = self.cfg.rounds
        return bool((r.max_local_steps and st.steps >= r.max_local_steps)
                    or (r.max_round_seconds and st.wall_s >= r.max_round_seconds))

    def _round_over(self, st: RoundStats) -> bool:
        """Progress-based end: the swarm's samples for this round (each peer's extrapolated by its
        reported throughput for a few seconds, and capped relative to the median peer, see
        trust.round_progress) reach the target, or a majority of the other peers already moved on."""
        records = self._records(self.view.records())
        ahead, _ = self._majority_ahead(records)
        if ahead is not None:
            return True
        total = trust.round_progress(records, me=self.peer_id, my_round=self.train_round, my_samples=st.samples,
                                     fingerprint=self.fp, now=get_dht_time(), seq_len=self.cfg.model.seq_len,
                                     cap_vs_others=self.cfg.rounds.sample_cap_vs_others,
                                     extrapolate_max_s=EXTRAPOLATE_MAX_S)
        return total >= self.cfg.rounds.target_samples_per_round

    @property
    def train_round(self) -> int:
        """The round being trained: in overlapped mode, one past the round whose all-reduce is in flight."""
        return self.counters.round + (1 if self.inflight is not None else 0)

    def _majority_ahead(self, records: list[ProgressRecord]) -> tuple[int | None, bool]:
        """(round a majority of the other peers has reached beyond ours or None, whether any other peer
        is still in our round). Claims more than rounds.max_rounds_ahead ahead are ignored."""
        r = self.train_round
        ahead, ignored = trust.swarm_ahead(records, me=self.peer_id, my_round=r, fingerprint=self.fp,
                                           max_rounds_ahead=self.cfg.rounds.max_rounds_ahead)
        for why in ignored:
            if why not in self._ignored_claims:
                self._ignored_claims.add(why)
                logger.warning("ignoring a progress claim: %s", why)
        mates_here = any(x.round == r and x.fingerprint == self.fp and x.peer_id != self.peer_id
                         and x.state != "done" for x in records)
        return ahead, mates_here

    # ------------------------------------------------------------------ averaging

    def average_and_step(self, st: RoundStats) -> dict:
        self._publish(st, "averaging")
        r = self.counters.round
        records = self._records(self.view.refresh())
        ahead, mates_here = self._majority_ahead(records)
        if ahead is not None and not mates_here:
            return self._on_failed_round(st, f"missed round {r}: the swarm is already at round {ahead}")
        active = self._active_indices()
        with self.lock:
            deltas = self._contribution(pseudo_gradient(self.theta, self.model))
        norm, problem = self._self_check(deltas, active)
        if problem:
            return self._on_failed_round(st, f"not contributing: {problem}; local work discarded", keep_work=False)
        try:
            res = self.averager.average(deltas, active=active, **self._request(st, r, records))
        except AveragingFailed as e:
            return self._on_failed_round(st, str(e))
        self._remember_norm(norm, active)
        self._apply(res)
        return self._report(r, st, res)

    def _request(self, st: RoundStats, r: int, records: list[ProgressRecord]) -> dict:
        """What SwarmAverager.average needs besides the tensors (blocking and overlapped rounds alike)."""
        meta = dict(fingerprint=self.fp, samples=st.samples, steps=st.steps, theta=self.theta_hash_cached)
        return dict(round_no=r, weight=self._weight(st), meta=meta, weight_caps=self._weight_caps(records),
                    timeout=min(self.cfg.averaging.round_timeout, 4 * self.cfg.averaging.matchmaking_time))

    @staticmethod
    def _report(r: int, st: RoundStats, res) -> dict:
        return dict(ok=True, round=r, stats=st, group=res.group_size, seconds=res.seconds,
                    sent=res.bytes_sent, received=res.bytes_received)

    # ------------------------------------------------------------------ overlapped ("eager") mode

    def _overlapped_round(self) -> dict | None:
        """Overlapped ("eager") mode: round T's all-reduce runs in a background thread while round T+1
        trains; its update is applied one round late. Each round's Δ is the local progress during that
        round (snapshot at its start − local at its end), so round T+1's all-reduce starts as soon as
        its training ends, before round T's result is applied. Landing round T: θ ← OuterOpt(θ, Δ̄_T),
        and the local model swaps its own Δ_T for the group's step (local += θ_new − θ_old + Δ_T),
        which keeps local = θ − (progress of the round in flight).
        Returns the landed round's report, {} if nothing landed yet, None to stop."""
        n = self.cfg.rounds.num_rounds
        last = bool(n and self.inflight is not None and self.inflight["round"] + 1 >= n)  # nothing to train after it
        st = RoundStats()
        if not last:
            with self.lock:
                snapshot = [p.detach().clone() for p in self.model.parameters()]
            st = self.train_until_round_ends()
        if st.stopped and self.inflight is None:
            return None
        t0 = time.perf_counter()
        launched = None
        if not last and not st.stopped and not (n and self.train_round >= n):
            launched = self._launch(st, self.train_round, snapshot)
        landing, self.inflight = self.inflight, launched
        report = self._land(landing) if landing is not None else {}
        self.last_wait_s = time.perf_counter() - t0
        if st.stopped:
            self.stop.set()
        return report

    def _launch(self, st: RoundStats, r: int, snapshot: list[torch.Tensor]) -> dict | None:
        self._publish(st, "averaging")
        with self.lock, torch.no_grad():
            deltas = self._contribution([s - p.detach() for s, p in zip(snapshot, self.model.parameters())])
        norm, problem = self._self_check(deltas, None)
        if problem:
            logger.warning("round %d: not contributing: %s; local work discarded", r, problem)
            with self.lock, torch.no_grad():
                for p, s in zip(self.model.parameters(), snapshot):
                    p.copy_(s)
            return None
        kwargs = self._request(st, r, self._records(self.view.refresh()))
        box: dict = dict(round=r, stats=st, deltas=deltas, norm=norm, done=threading.Event(), reset=False)

        def run():
            try:
                box["result"] = self.averager.average(deltas, **kwargs)
            except AveragingFailed as e:
                box["error"] = str(e)
            except Exception as e:  # never let the thread die silently
                box["error"] = f"{type(e).__name__}: {e}"
            finally:
                box["done"].set()

        threading.Thread(target=run, name=f"allreduce-{r}", daemon=True).start()
        return box

    def _land(self, box: dict) -> dict:
        r, st = box["round"], box["stats"]
        box["done"].wait(self.cfg.averaging.round_timeout + self.cfg.averaging.allreduce_timeout + 30)
        why = box.get("error") if box["done"].is_set() else "the all-reduce did not finish"
        if why is None and self.counters.round != r:
            why = f"our global model is at round {self.counters.round}, the group averaged round {r}"
        if why is not None:
            # this round's work is lost; the local model goes back to θ (or the swarm's state)
            if self.inflight is not None:
                self.inflight["reset"] = True
            return self._on_failed_round(st, why, keep_work=False)
        res = box["result"]
        self._remember_norm(box["norm"], None)
        with self.lock:
            old = [t.clone() for t in self.theta]
        self._apply(res, reset_local=False)  # θ ← OuterOpt(θ, Δ̄); the local model keeps its progress
        with self.lock, torch.no_grad():
            for p, new, prev, d in zip(self.model.parameters(), self.theta, old, box["deltas"]):
                p.add_(new - prev)  # the group's step ...
                if not box["reset"]:
                    p.add_(d)  # ... instead of our own Δ (unless a re-sync already dropped it)
        return self._report(r, st, res)

    # hooks (tests/attackers.py overrides them to play a hostile peer)
    def _contribution(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        return deltas

    def _weight(self, st: RoundStats) -> float:
        return float(max(st.samples, 1))

    def _active_indices(self) -> list[int] | None:
        """Tensors trained and averaged this round: all, or FedCyBGD's active group."""
        if self.groups is None:
            return None
        g = active_group(self.counters.round, self.cfg.outer.block_cycle, self.cfg.outer.block_order, self.cfg.seed)
        return [i for i, x in enumerate(self.groups) if x == g]

    def _self_check(self, deltas: list[torch.Tensor], active: list[int] | None) -> tuple[float, str | None]:
        """(‖Δ‖ of the tensors sent, why it must not be sent or None): a non-finite Δ, or one far larger
        than this peer's recent rounds, is not sent."""
        idx = range(len(deltas)) if active is None else active
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(deltas[i])) ** 2 for i in idx))
        if not math.isfinite(norm):
            return norm, "the pseudo-gradient has non-finite values"
        history = self.delta_norms.get(self._group_key(active), [])
        ratio = self.cfg.averaging.max_delta_norm_ratio
        if len(history) >= 3 and norm > ratio * statistics.median(history):
            return norm, (f"the pseudo-gradient norm {norm:.3g} is more than {ratio:g}x the median of this "
                          f"peer's recent rounds ({statistics.median(history):.3g})")
        return norm, None

    @staticmethod
    def _group_key(active: list[int] | None) -> int:
        return -1 if active is None else active[0]

    def _remember_norm(self, norm: float, active: list[int] | None) -> None:
        hist = self.delta_norms.setdefault(self._group_key(active), [])
        hist.append(norm)
        del hist[:-8]

    def _weight_caps(self, records: list[ProgressRecord]) -> dict[str, float]:
        """The most weight (samples) a group member may claim before its contribution is refused: 8x
        what its latest record allows (its samples plus its throughput, capped at 4x the median peer's,
        since then), and never less than 8x the round's target, so an honest peer with a stale record
        or carried-over work is never refused while a forged 10^6 is."""
        now, seq = get_dht_time(), self.cfg.model.seq_len
        mates = [x for x in records if x.fingerprint == self.fp and x.peer_id != self.peer_id]
        if not mates:
            return {}
        rates = [x.tokens_per_s / seq for x in mates] + [self.last_rate / seq]
        max_rate = 4.0 * statistics.median_low(rates)
        floor = self.cfg.rounds.target_samples_per_round + self.cfg.inner.batch_size * self.cfg.inner.grad_accum
        return {x.peer_id: 8.0 * max(floor, x.samples + min(x.tokens_per_s / seq, max_rate)
                                     * min(60.0, max(0.0, now - x.time) + 5)) for x in mates}

    def _apply(self, res, reset_local: bool = True) -> None:
        c = self.counters
        with self.lock:
            self.outer.step(res.deltas)  # tensors not averaged this round (None) stay as they are
            if reset_local:
                load_into_model(self.theta, self.model)
            c.round += 1
            c.global_step += sum(int(m.get("steps", 0)) for m in res.gathered.values())
            c.total_samples += sum(int(m.get("samples", 0)) for m in res.gathered.values())
            self._theta_changed()
        c.bytes_sent += res.bytes_sent
        c.bytes_received += res.bytes_received
        self.averager.set_priority(c.round)

    def _on_failed_round(self, st: RoundStats, why: str, keep_work: bool = True) -> dict:
        """Counted and published; the local work is kept for the next attempt unless the swarm moved on."""
        c, r = self.counters, self.counters.round
        c.failed_rounds += 1
        logger.warning("round %d failed (%s); failed rounds so far: %d", r, why, c.failed_rounds)
        self._publish(st, "syncing")
        self.failed_here = self.failed_here + 1 if self.failed_at == r else 1
        self.failed_at = r
        if self._catch_up():
            return dict(ok=False, round=r, stats=st, why=why)
        if self.failed_here >= STUCK_AFTER and self.sync_from_peers(attempts=1):
            logger.warning("%d failed attempts at round %d: re-synchronized with the swarm", self.failed_here, r)
            return dict(ok=False, round=r, stats=st, why=why)
        if keep_work:
            self.pending = st  # keep the local work (Δ stays relative to the last agreed θ) and retry
        else:
            with self.lock:
                load_into_model(self.theta, self.model)
        return dict(ok=False, round=r, stats=st, why=why)

    def _catch_up(self) -> bool:
        """If a majority of the other peers finished our round without us, download the swarm's state
        instead of averaging a stale Δ (a lone peer far ahead is not enough)."""
        records = self._records(self.view.refresh())
        ahead = trust.majority_round([x.round for x in records if x.fingerprint == self.fp and x.peer_id != self.peer_id
                                and x.state != "done"])
        if ahead <= self.train_round:
            return False
        logger.info("the swarm is at round %d, we are at %d: downloading its state", ahead, self.train_round)
        return self.sync_from_peers()

    def _swarm_finished(self) -> bool:
        """All other peers of this run we know of have published 'done' (a bounded run is over)."""
        mates = [x for x in self.view.records() if x.fingerprint == self.fp and x.peer_id != self.peer_id]
        return bool(mates) and all(x.state == "done" for x in mates)

    def _records(self, records: list[ProgressRecord]) -> list[ProgressRecord]:
        """The swarm's records without those of peers our averager banned for sending bad data."""
        banned = self.averager.banned if self.averager is not None else {}
        return [x for x in records if x.peer_id not in banned] if banned else records

    # ------------------------------------------------------------------ state sharing

    def _share_state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a late joiner downloads: θ, the outer optimizer's momentum, round and global step."""
        with self.lock:
            tensors = [t.detach().clone() for t in self.theta] + [b.clone() for b in self.outer.state_tensors()]
            meta = dict(round=self.counters.round, global_step=self.counters.global_step, fingerprint=self.fp,
                        theta=self.theta_hash_cached, names=self.names, total_samples=self.counters.total_samples)
        return meta, tensors

    def sync_from_peers(self, attempts: int = 4, max_donors: int = 8) -> bool:
        """Download the swarm's state. Donors are tried by the round they claim; what one serves is
        checked (names, shapes, dtypes, finite values, its θ hash against the swarm's records) and a
        donor whose state fails is skipped for the next one."""
        delay, refused = 1.0, []
        attempt = 0
        while attempt < attempts and len(refused) < max_donors and not self.stop.is_set():
            got = self.averager.load_state_from_peers(timeout=max(10.0, self.cfg.averaging.allreduce_timeout),
                                                      exclude=refused)
            if got is not None:
                donor, meta, tensors = got
                problem = self._check_state(meta, tensors)
                if problem is not None:
                    logger.warning("rejected the state served by peer %s: %s; trying another donor", donor[-8:],
                                   problem)
                    refused.append(donor)
                    continue
                unconfirmed = self._check_swarm_agrees(int(meta["round"]), meta["theta"], donor)
                if unconfirmed is None:
                    self._load_state(meta, tensors, donor)
                    return True
                logger.info("state of peer %s not used yet: %s", donor[-8:], unconfirmed)  # retried after a pause
            attempt += 1
            if attempt < attempts:
                logger.info("no usable state from peers (attempt %d/%d), retrying in %.0fs", attempt, attempts, delay)
                time.sleep(delay)
                delay *= 2
        return False

    def _check_state(self, meta, tensors) -> str | None:
        """Why the served state is wrong in itself (its donor is refused), or None."""
        if not isinstance(meta, dict) or meta.get("fingerprint") != self.fp:
            return "fingerprint differs"
        if meta.get("names") != self.names:
            return "parameter names differ"
        for key in ("round", "global_step", "total_samples"):
            if not isinstance(meta.get(key), int) or meta[key] < 0:
                return f"malformed {key}"
        expected = [t.shape for t in self.theta] + [b.shape for b in self.outer.state_tensors()]
        if [tuple(t.shape) for t in tensors] != [tuple(s) for s in expected]:
            return "tensor names/shapes differ from this run's model"
        if any(t.dtype != torch.float32 or not torch.isfinite(t).all() for t in tensors):
            return "non-finite or non-fp32 values"
        if theta_hash(tensors[: len(self.theta)]) != meta.get("theta"):
            return "θ hash does not match the donor's claim"
        return None

    def _check_swarm_agrees(self, round_no: int, claimed: str, donor: str) -> str | None:
        """The donor's θ hash must also be published by another live peer of the run (each record
        carries the hash of the global θ its peer holds): a lying donor cannot make up a model,
        because it does not write the others' records. Hashes, not rounds, are compared (a peer in
        overlapped mode trains round r+1 while it holds θ of round r)."""
        records = self.view.refresh() if self.view.is_alive() else fetch_progress(
            self.dht, self.cfg.dht.run_id, members=self.members, bind_peer_id=True)[0]
        others = {x.theta_hash for x in records if x.fingerprint == self.fp and x.state != "done"
                  and x.peer_id not in (self.peer_id, donor)}
        if others and claimed not in others:
            return f"no other peer publishes its θ {claimed[:8]} (round {round_no})"
        return None

    def _load_state(self, meta: dict, tensors: list[torch.Tensor], donor: str = "") -> None:
        n = len(self.theta)
        with self.lock:
            for dst, src in zip(self.theta, tensors[:n]):
                dst.copy_(src)
            self.outer.load_state_tensors(tensors[n:])
            load_into_model(self.theta, self.model)
            self.counters.round = int(meta["round"])
            self.counters.global_step = int(meta["global_step"])
            self.counters.total_samples = int(meta.get("total_samples", 0))
            self.pending = None
        self.averager.set_priority(self.counters.round)
        self.counters.history.append(dict(round=self.counters.round, event="sync", ok=False,
                                          theta=self._theta_changed()))
        logger.info("loaded state of round %d (global step %d, θ %s) from peer %s", self.counters.round,
                    self.counters.global_step, self.theta_hash_cached, donor[-8:])

    # ------------------------------------------------------------------ reporting

    def _theta_changed(self) -> str:
        """Hash θ once whenever it changes (setup, outer step, download); everything else reads the cache."""
        with self.lock:
            self.theta_hash_cached = theta_hash(self.theta)
            return self.theta_hash_cached

    def _publish(self, st: RoundStats, phase: str, now: bool = False) -> None:
        """State changes are published at once; progress during training goes through the background thread."""
        c = self.counters
        if st.train_s > 0:
            self.last_rate = st.tokens / st.train_s
        busy = st.wall_s + self.last_wait_s  # this round's training plus the last round's averaging/sync
        rec = ProgressRecord(
            peer_id=self.peer_id, round=self.train_round, samples=st.samples, steps=st.steps,
            total_samples=c.total_samples + st.samples, loss=st.loss if st.steps and st.loss == st.loss else 0.0,
            tokens_per_s=self.last_rate, fingerprint=self.fp, theta_hash=self.theta_hash_cached,
            failed_rounds=c.failed_rounds, bytes_sent=c.bytes_sent, bytes_received=c.bytes_received,
            utilization=min(1.0, st.train_s / busy) if busy > 0 else 0.0, time=get_dht_time(), state=phase)
        if now or phase != "training" or not self.view.is_alive():
            self.publisher.publish(rec)
        else:
            self.view.offer(rec)

    def log_round(self, report: dict) -> None:
        st: RoundStats = report["stats"]
        records = self.view.records()
        alive = 1 + sum(1 for r in records if r.fingerprint == self.fp and r.peer_id != self.peer_id
                        and r.state != "done" and get_dht_time() - r.time < 30)
        tok_s = st.tokens / st.train_s if st.train_s else 0.0
        if report["ok"]:
            logger.info("round %d | loss %.3f | peers %d/%d | tok/s %.3g | steps %d | allreduce %.1fs | sent %.2fMB"
                        " | θ %s", report["round"], st.loss, report["group"], alive, tok_s, st.steps,
                        report["seconds"], report["sent"] / 1e6, self.theta_hash_cached[:8])
        else:
            logger.info("round %d | loss %.3f | FAILED (%s) | failed rounds %d", report["round"], st.loss,
                        report["why"], self.counters.failed_rounds)
        self.counters.history.append(dict(round=report["round"], ok=report["ok"], loss=st.loss, steps=st.steps,
                                          samples=st.samples, tokens=st.tokens, group=report.get("group", 0),
                                          theta=self.theta_hash_cached, sent=report.get("sent", 0), why=report.get("why"),
                                          eval_loss=report.get("eval_loss"), wall_s=st.wall_s, train_s=st.train_s,
                                          allreduce_s=report.get("seconds", 0.0), time=time.time(),
                                          global_step=self.counters.global_step,
                                          total_samples=self.counters.total_samples))
        if report.get("eval_loss") is not None:
            logger.info("round %d | held-out perplexity of the global model %.2f", report["round"],
                        perplexity(report["eval_loss"]))

    # ------------------------------------------------------------------ checkpoints and shutdown

    def save_checkpoint(self, final: bool = False) -> Path | None:
        """A periodic checkpoint that cannot be written is a warning (training goes on, the earlier
        checkpoints stay); the final one raises CheckpointError."""
        with self.lock:
            payload = state.CheckpointPayload(
                theta={n: t for n, t in zip(self.names, self.theta)},
                outer=self.outer.state_tensors(), inner=self.trainer.optimizer.state_dict(),
                meta=dict(round=self.counters.round, global_step=self.counters.global_step,
                          failed_rounds=self.counters.failed_rounds, total_samples=self.counters.total_samples,
                          fingerprint=self.fp, theta=self.theta_hash_cached, data_cursor=self.stream.state_dict()),
                rng=state.capture_rng(), config=self.cfg)
            try:
                path = state.save_checkpoint(self.cfg.checkpoint.dir, payload, keep=self.cfg.checkpoint.keep)
            except state.CheckpointError as e:
                if final:
                    raise
                logger.warning("checkpoint of round %d failed: %s; training goes on", self.counters.round, e)
                return None
        logger.info("checkpoint %s (round %d, θ %s)", path, self.counters.round, payload.meta["theta"][:8])
        return path

    def _restore(self, ckpt: state.CheckpointPayload | None) -> None:
        if ckpt is None:
            logger.info("no checkpoint in %s: starting from the seeded init", self.cfg.checkpoint.dir)
            return
        with self.lock:
            for name, dst in zip(self.names, self.theta):
                dst.copy_(ckpt.theta[name])
            self.outer.load_state_tensors(ckpt.outer)
            load_into_model(self.theta, self.model)
            m = ckpt.meta
            self.counters.round, self.counters.global_step = int(m["round"]), int(m["global_step"])
            self._prepare_round()  # block cycling: the optimizer saved holds the round's group
            self.trainer.optimizer.load_state_dict(ckpt.inner)
            self.counters.failed_rounds, self.counters.total_samples = int(m["failed_rounds"]), int(m["total_samples"])
            self.stream.load_state_dict(m["data_cursor"])
            state.restore_rng(ckpt.rng)
        logger.info("resumed from %s: round %d, global step %d, θ %s", ckpt.path, self.counters.round,
                    self.counters.global_step, self._theta_changed())

    def close(self) -> None:
        if getattr(self, "view", None) is not None and self.view.is_alive():
            self.view.stop()
        failed = None
        if self.joined:
            try:
                self.save_checkpoint(final=True)
            except Exception as e:  # raised below, after the shutdown; the earlier checkpoints stay
                failed = e
            self._write_summary()
            self._publish(RoundStats(), "done")
        if self.averager is not None:
            self.averager.shutdown()
        shutdown_dht(self.dht)
        self.averager = self.dht = None
        if self._tmp_identity:
            shutil.rmtree(self._tmp_identity, ignore_errors=True)
        if failed is not None:
            import sys

            if sys.exc_info()[1] is None:  # nothing else is failing: exit non-zero with this message
                raise failed
            logger.error("final checkpoint failed: %s", failed)

    def _write_summary(self) -> None:
        final = evaluate(self.model, self.heldout, self.cfg.inner, self.device)
        logger.info("held-out perplexity of the global model: %.2f (initial %.2f) after %d rounds",
                    perplexity(final), perplexity(self.initial_loss), self.counters.round)
        if self.summary_out:
            out = dict(peer_id=self.peer_id, fingerprint=self.fp, initial_loss=self.initial_loss, final_loss=final,
                       initial_ppl=perplexity(self.initial_loss), final_ppl=perplexity(final),
                       rounds=self.counters.round, global_step=self.counters.global_step,
                       total_samples=self.counters.total_samples,
                       failed_rounds=self.counters.failed_rounds, bytes_sent=self.counters.bytes_sent,
                       bytes_received=self.counters.bytes_received, compression=self.cfg.averaging.compression,
                       block_cycle=self.cfg.outer.block_cycle, num_params=sum(t.numel() for t in self.theta),
                       optimizer_state_bytes=max(self.peak_opt_bytes, optimizer_state_bytes(self.trainer.optimizer)),
                       theta=self.theta_hash_cached, history=self.counters.history, steps=self.counters.steps_log)
            Path(self.summary_out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.summary_out).write_text(json.dumps(out, indent=1))


def run_peer(cfg: Config, *, resume: bool = False, summary_out: str | None = None) -> int:
    # fail fast on bad addresses, before minutes of data preparation
    validate_maddrs(cfg.dht.initial_peers, "--initial-peers", require_peer_id=True)
    validate_maddrs(cfg.dht.host_maddrs, "--host-maddrs")
    validate_maddrs(cfg.dht.announce_maddrs, "--announce-maddrs")
    state.check_writable(cfg.checkpoint.dir)  # and a read-only checkpoint.dir, before any training
    stop = threading.Event()
    with stop_on_signals(stop, "finishing the current step, checkpointing and leaving"):
        return Peer(cfg, resume=resume, stop_event=stop, summary_out=summary_out).run()
