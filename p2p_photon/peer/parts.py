"""The peer's parts and their lifecycle: build them (data, model, global state, local training,
network), checkpoint and restore them, and shut them down. `loop.Peer` adds the algorithm."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hivemind.utils import get_dht_time

from .. import data, runspec, state, trust
from ..averaging import SwarmAverager
from ..config import Config, fingerprint
from ..errors import UsageError
from ..inner import InnerTrainer, evaluate, optimizer_state_bytes, resolve_device
from ..model import build_model
from ..network import prepare_identity, shutdown_dht, start_dht, validate_maddrs
from ..progress import ProgressPublisher, progress_validators
from .contribution import ContributionPolicy
from .global_state import GlobalState
from .reporting import Reporter, RoundReport
from .swarm_view import SwarmView
from .sync import StateSync
from .tracker import ALIVE_S, RoundTracker, swarm_theta
from .training import LocalTraining, RoundStats

logger = logging.getLogger(__name__)


class FingerprintMismatch(UsageError):
    """The swarm of this run_id trains something else (model, tokenizer, seed, outer optimizer, round target)."""


def export_hf(ckpt: Path, out: Path) -> None:
    """checkpoint.export_hf: the checkpoint just written, as a Hugging Face model directory (replaced
    atomically). A failure is a warning: the checkpoint itself is written, training goes on."""
    from ..export import export_checkpoint

    try:
        export_checkpoint(ckpt, out, force=True, eval_ppl=False)
    except Exception as e:  # noqa: BLE001 - exporting is a convenience; it must never stop a peer
        logger.warning("checkpoint.export_hf: could not write %s: %s; the checkpoint %s is complete", out, e, ckpt)


class PeerParts:
    def __init__(self, cfg: Config, *, resume: bool, stop_event: threading.Event | None, summary_out: str | None,
                 policy: ContributionPolicy):
        self.cfg, self.resume, self.summary_out, self.policy = cfg, resume, summary_out, policy
        self.stop = stop_event or threading.Event()
        self.dht = self.averager = self.view = None
        self._tmp_identity: str | None = None  # private dir of an ephemeral identity (no dht.identity_path)
        self.joined = False  # checkpoints and summaries only for a peer that took part
        self.pending: RoundStats | None = None  # work of a failed attempt, carried into the retry
        self.rank_group = None  # a multi-rank peer's ranks (peer/ranks.PeerRanks); None: one process

    @staticmethod
    def check_inputs(cfg: Config) -> None:
        """Bad addresses and an unwritable checkpoint.dir fail at once, before any data preparation."""
        validate_maddrs(cfg.dht.initial_peers, "--initial-peers", require_peer_id=True)
        validate_maddrs(cfg.dht.host_maddrs, "--host-maddrs")
        validate_maddrs(cfg.dht.announce_maddrs, "--announce-maddrs")
        state.check_writable(cfg.checkpoint.dir)

    def setup(self) -> None:
        cfg = self.cfg
        self.data = data.peer_data(cfg, progress=cfg.logging.progress_bar)  # a silo, or a private corpus
        self.fp = fingerprint(cfg, self.data.tokenizer_hash)
        self.device = resolve_device(cfg.inner)
        self.model = build_model(cfg.model.preset, self.data.vocab_size, cfg.model.seq_len, cfg.seed, self.device)
        self.gs = GlobalState(self.model, cfg.outer, self.fp)
        stream, trainer = self._stream_and_trainer()
        self.training = LocalTraining(cfg, self.model, trainer, stream, self.gs.counters)
        self.heldout = self.data.eval_batches  # the swarm's comparable number (the run's public eval set)
        self.initial_loss = self.evaluate()
        if self.resume:
            self.restore(state.load_latest(cfg.checkpoint.dir, self.fp))
        self._start_network()

    def _stream_and_trainer(self):
        """The peer's data stream and inner trainer; a multi-rank peer's come from its ranks (peer/ranks.py)."""
        cfg = self.cfg
        if self.rank_group is not None:  # the shared corpus' silo, split across the ranks
            prep = data.load_prepared(data.prepare(cfg.data, cfg.seed, progress=False))
            return self.rank_group.parts(cfg, prep, self.model, self.device)
        return self.data.stream, InnerTrainer(self.model, cfg.inner, self.device)

    def _start_network(self) -> None:
        """Progress records are signed with the peer's identity key (an ephemeral one in a private
        temp dir if dht.identity_path is empty), so every record is bound to its sender's peer ID."""
        cfg, run_id, dht_cfg = self.cfg, self.cfg.dht.run_id, self.cfg.dht
        members = trust.load_members(dht_cfg.members) if dht_cfg.members else None
        if not dht_cfg.identity_path:
            self._tmp_identity = tempfile.mkdtemp(prefix="p2p-photon-id-")
            dht_cfg = dataclasses.replace(dht_cfg, identity_path=f"{self._tmp_identity}/identity.key")
        key = trust.signing_key_from_identity(prepare_identity(dht_cfg.identity_path)[0])
        validators = progress_validators(run_id, key, members=members, bind_peer_id=True)
        self.dht = start_dht(dht_cfg, record_validators=validators)
        self.spec_server = runspec.serve(self.dht, runspec.load_run(cfg.data.run_spec)) if cfg.data.run_spec else None
        publisher = ProgressPublisher(self.dht, run_id, validators)
        self.view = SwarmView(self.dht, run_id, publisher, cfg.logging.progress_interval, members)
        self.averager = SwarmAverager(self.dht, [t.shape for t in self.gs.theta], prefix=f"{run_id}-{self.fp}",
                                      cfg=cfg.averaging, state_fn=self._share_state, members=members)
        self.averager.set_priority(self.policy.sharing_priority(self.gs.counters.round))
        self.peer_id = self.averager.peer_id
        if self.averager.client_mode:
            logger.info("client mode: accepting no connections; we send our parts of Δ and receive the averages "
                        "(owning no slice) and serve no state")
        self.tracker = RoundTracker(cfg, self.fp, self.peer_id, self.view, banned=self._banned)
        self.reporter = Reporter(cfg, self.gs, self.policy, self.peer_id, self.view, self._banned)
        if math.isfinite(self.initial_loss):  # of the seeded init (θ round 0), until the first round's evaluation
            self.reporter.eval_loss, self.reporter.eval_round = self.initial_loss, 0
        self.sync = StateSync(self.gs, self.averager, self.view.refresh, self.peer_id,
                              cfg.averaging.state_download_timeout, self.stop)
        logger.info("peer %s is on the DHT of run %s (fingerprint %s, silo %d, model %s)", self.peer_id[-8:],
                    run_id, self.fp, cfg.data.silo, cfg.model.preset)

    def _banned(self) -> dict[str, str]:
        """Peers our averager banned for sending bad data (their records are ignored too)."""
        return self.averager.banned if self.averager is not None else {}

    def _share_state(self):
        """What a late joiner downloads (called by the averager's state-sharing thread)."""
        return self.policy.served_state(*self.gs.share())

    def publish(self, st: RoundStats, phase: str, now: bool = False) -> None:
        self.reporter.publish(st, phase, self.train_round, now=now)

    @property
    def train_round(self) -> int:
        return self.gs.counters.round

    def evaluate(self) -> float:
        """Held-out loss of the local model (= the global model right after a round)."""
        return evaluate(self.model, self.heldout, self.cfg.inner, self.device)

    # ------------------------------------------------------------------ joining

    def join(self, starting: threading.Event | None = None) -> None:
        """Refuse a foreign swarm; download state if the swarm is ahead of us. `starting` is cleared before
        the peer counts as joined: a stop request from then on ends with the final checkpoint."""
        records = self.tracker.records(fresh=True)
        others = [r for r in records if r.peer_id != self.peer_id and r.state != "done"]
        foreign = [r for r in others if r.fingerprint != self.fp]
        ours = len(others) - len(foreign)
        if foreign and not ours:
            raise FingerprintMismatch(
                f"refusing to join run '{self.cfg.dht.run_id}': its peers have run fingerprint "
                f"{foreign[0].fingerprint}, ours is {self.fp} (different model, tokenizer, seed, outer optimizer "
                "or round target); use the swarm's config or another dht.run_id")
        if foreign:
            logger.warning("ignoring %d peer(s) of run %s with another fingerprint (%s): they are not averaged with",
                           len(foreign), self.cfg.dht.run_id, foreign[0].fingerprint)
        ahead, start = self.tracker.theta_round(records), "our checkpoint" if self.resume else "the seeded init"
        fresh = self.gs.counters.round == 0 and not self.gs.counters.history
        if fresh:  # join the swarm that trained; wait for its state rather than start a second model
            ahead = max(ahead, self.tracker.established_round(records))
        if ahead > self.gs.counters.round:
            logger.info("swarm is at round %d, we are at %d: downloading state from peers", ahead, self.gs.counters.round)
            if not self.sync_from_peers(patience_s=self.cfg.averaging.attempt_s if fresh else 0.0):
                logger.warning("no peer served its state: starting from %s at round %d", start, self.gs.counters.round)
        elif not ours:
            logger.info("no other peers yet: starting from %s at round %d", start, self.gs.counters.round)
        self.publish(RoundStats(), "training", now=True)
        self.view.start()
        if starting is not None:
            starting.clear()
        self.joined = True
        logger.info("peer %s joined run %s at round %d", self.peer_id[-8:], self.cfg.dht.run_id, self.gs.counters.round)

    # ------------------------------------------------------------------ state from the swarm

    def sync_from_peers(self, attempts: int = 4, want: str | None = None, min_round: int = 0,
                        patience_s: float = 0.0) -> bool:
        """Download and load the swarm's state (see sync.py); False if no donor served a usable one.
        With `want`, only a state whose θ hash is `want`; with `min_round`, only one of that round or later;
        with `patience_s`, then keep asking that long for the θ the swarm elects (StateSync.await_elected)."""
        got = self.sync.download(attempts, want=want, min_round=min_round)
        if got is None and patience_s > 0:
            got = self.sync.await_elected(self.tracker.elected_theta, patience_s)
        if got is None:
            return False
        meta, tensors, donor = got
        self.gs.load(meta, tensors, self.model)
        self.pending = None
        c = self.gs.counters
        self.averager.set_priority(self.policy.sharing_priority(c.round))
        c.history.append(dict(round=c.round, event="sync", ok=False, theta=self.gs.hash))
        logger.info("loaded state of round %d (global step %d, θ %s) from peer %s", c.round, c.global_step,
                    self.gs.hash, donor[-8:])
        return True

    def _forked(self, records: list) -> str | None:
        """The swarm's θ hash if the θ we hold is not it (see tracker.swarm_theta), else None."""
        c = self.gs.counters
        return self.tracker.fork(records, c.round, self.gs.hash, c.total_samples)

    def _apply(self, res, reset_local: bool) -> None:
        """θ ← OuterOpt(θ, Δ̄) for a group's result (the local model reset to it if `reset_local`)."""
        self.tracker.note_group(res.gathered, self.gs.hash, self.gs.counters.round + 1, res.group_size)
        self.gs.apply(res, self.model if reset_local else None)
        self.averager.set_priority(self.policy.sharing_priority(self.gs.counters.round))

    def heal_fork(self, st: RoundStats, want: str) -> RoundReport:
        """Our θ is not the swarm's (groups that averaged apart): download the swarm's θ and drop this
        round's work, which was trained on ours. Counted and published as a failed round."""
        c, r, ours = self.gs.counters, self.gs.counters.round, self.gs.hash
        c.failed_rounds += 1
        self.publish(st, "syncing")
        healed = self.sync_from_peers(attempts=2, want=want)
        if not healed:
            self.gs.reset_local(self.model)
        why = (f"θ forked: ours {ours[:8]} is not the swarm's {want[:8]}; "
               + ("re-synchronized" if healed else "no peer served the swarm's θ yet"))
        logger.warning("round %d failed (%s); failed rounds so far: %d", r, why, c.failed_rounds)
        return RoundReport.failed(r, st, why)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, final: bool = False) -> Path | None:
        """A periodic checkpoint that cannot be written is a warning (training goes on, the earlier
        checkpoints stay); the final one raises CheckpointError."""
        t = self.training
        with self.gs.lock:
            payload = self.gs.checkpoint(t.trainer.optimizer.state_dict(), t.stream.state_dict(), self.cfg)
            try:
                path = state.save_checkpoint(self.cfg.checkpoint.dir, payload, keep=self.cfg.checkpoint.keep)
            except state.CheckpointError as e:
                if final:
                    raise
                logger.warning("checkpoint of round %d failed: %s; training goes on", self.gs.counters.round, e)
                return None
        logger.info("checkpoint %s (round %d, θ %s)", path, self.gs.counters.round, payload.meta["theta"][:8])
        if self.cfg.checkpoint.export_hf:
            export_hf(path, Path(self.cfg.checkpoint.dir) / "hf")
        return path

    def restore(self, ckpt: state.CheckpointPayload | None) -> None:
        if ckpt is None:
            logger.info("no checkpoint in %s: starting from the seeded init", self.cfg.checkpoint.dir)
            return
        t = self.training
        with self.gs.lock:
            self.gs.restore(ckpt, self.model)
            t.prepare_round(self.gs.counters.round)  # block cycling: the optimizer saved holds the round's group
            t.trainer.optimizer.load_state_dict(ckpt.inner)
            t.stream.load_state_dict(ckpt.meta["data_cursor"])
            state.restore_rng(ckpt.rng)
        logger.info("resumed from %s: round %d, global step %d, θ %s", ckpt.path, self.gs.counters.round,
                    self.gs.counters.global_step, self.gs.hash)

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Final checkpoint, summary and 'done' record for a peer that took part; then the network goes
        down whatever happened. A failed final checkpoint is raised last (the earlier ones stay)."""
        if self.view is not None and self.view.is_alive():
            self.view.stop()
        failed = None
        if self.joined:
            # our θ of the last round, at once: mates settling the run's end wait for it (without it, every
            # peer of a bounded run waited for the others' records for a whole averaging attempt)
            self.publish(RoundStats(), "averaging", now=True)
            settle_final_theta(self.cfg, self.tracker, self.stop, self.gs, heal=lambda want: self.sync_from_peers(
                attempts=2, want=want))
            try:
                self.save_checkpoint(final=True)
            except Exception as e:
                failed = e
            self._write_summary()
            self.publish(RoundStats(), "done")
            linger(self.cfg, self.tracker, self.view, self.stop, self.gs.counters.round, self.gs.hash)
        if getattr(self, "spec_server", None) is not None:
            self.spec_server.stop()
        if self.averager is not None:
            self.averager.shutdown()
        shutdown_dht(self.dht)
        self.averager = self.dht = None
        if self._tmp_identity:
            shutil.rmtree(self._tmp_identity, ignore_errors=True)
        if failed is not None:
            if sys.exc_info()[1] is None:  # nothing else is failing: exit non-zero with this message
                raise failed
            logger.error("final checkpoint failed: %s", failed)

    def _write_summary(self) -> None:
        if self.data.local_heldout is not None:  # this peer's own metric, on its private held-out split
            local = evaluate(self.model, self.data.local_heldout, self.cfg.inner, self.device)
            logger.info("local held-out loss %.4f (perplexity %.2f) on this peer's own split", local, math.exp(local))
        opt_bytes = max(self.training.peak_opt_bytes, optimizer_state_bytes(self.training.trainer.optimizer))
        final = self.evaluate()
        if math.isfinite(final):  # the 'done' record that follows carries it to the monitor
            self.reporter.eval_loss, self.reporter.eval_round = final, self.gs.counters.round
        self.reporter.write_summary(self.summary_out, initial_loss=self.initial_loss, final_loss=final,
                                    optimizer_state_bytes=opt_bytes)


def linger(cfg: Config, tracker: RoundTracker, view: SwarmView, stop: threading.Event, my_round: int,
           my_hash: str = "") -> None:
    """After a bounded run, serve the final state while a live peer of the run is still behind us: for at
    most rounds.linger_seconds, but at least one averaging attempt of the straggler's if lingering is on
    (a peer left alone in stage 1 learns it only after the stage-1 timeout and the board's window; seen:
    a straggler whose attempt outlasted a 20 s linger ended on the seeded init); not after an interrupt."""
    seconds = cfg.rounds.linger_seconds
    if seconds > 0:
        seconds = max(seconds, cfg.averaging.attempt_s)
    n, deadline = cfg.rounds.num_rounds, time.monotonic() + seconds
    if not n or my_round < n or stop.is_set():
        return
    said = False
    while time.monotonic() < deadline and not stop.is_set():
        live = [m for m in tracker.mates(view.refresh()) if get_dht_time() - m.time < ALIVE_S]
        # behind us, or at our round on another θ (a fork in the last round: it downloads ours, settle_final_theta)
        behind = [m for m in live if m.round < my_round or (my_hash and m.theta_round == my_round and m.theta_hash != my_hash)]
        if not behind:
            return
        if not said:
            logger.info("serving the final state for up to %gs to %d peer(s) still behind", seconds, len(behind))
            said = True
        stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))


def settle_final_theta(cfg: Config, tracker: RoundTracker, stop: threading.Event, gs, heal: Callable[[str], bool]) -> None:
    """After the last round of a bounded run: no next round will compare θ hashes, so a fork in the last
    round would outlive the run (seen: 8 peers in groups of 2, one ended on another θ). Wait (at most one
    averaging attempt) until every live peer of the run has published its θ of the last round, count
    every record at that round, finished peers' too, and download the swarm's θ if ours is not it
    (finished peers linger while a peer at their round holds another θ). Not after an interrupt."""
    n, c = cfg.rounds.num_rounds, gs.counters
    if not n or c.round < n or stop.is_set():
        return
    deadline = time.monotonic() + cfg.averaging.attempt_s
    while True:
        records = tracker.records(fresh=True)
        waiting = [m for m in tracker.mates(records) if m.theta_round < c.round and get_dht_time() - m.time < ALIVE_S
                   and m.state == "averaging"]
        if not waiting or time.monotonic() > deadline or stop.wait(0.5):
            break
    done = [r.model_copy(update={"state": "final"}) if r.state == "done" else r for r in records]
    best, held = swarm_theta(done, me=tracker.peer_id, fingerprint=tracker.fp, theta_round=c.round,
                             my_hash=gs.hash, my_total=c.total_samples)
    if best != gs.hash:
        logger.warning("θ forked in the last round (%d): %d peer(s) hold %s, %d (this one included) hold ours %s; "
                       "taking the swarm's", c.round, held[best], best[:8], held[gs.hash], gs.hash[:8])
        if not heal(best):
            logger.warning("no peer served the swarm's final θ %s; ours %s stays", best[:8], gs.hash[:8])
