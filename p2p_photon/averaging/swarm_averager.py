"""What the peer uses: one round of averaging in, the group's average (or AveragingFailed) out.

The hivemind averager process does the all-reduce (`hivemind_backend.py`); this class loads the
round's Δ (plus the error carried from earlier rounds) into its shared buffers, runs one step, bans
peers whose data was refused, checks the group and the consensus on the average, and carries the
new quantization error to the next round.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hivemind.averaging.control import AveragingStage
from hivemind.utils import get_dht_time

from ..codecs import make_codec
from ..config import AveragingConfig
from ..hashing import theta_hash
from . import consensus
from .hivemind_backend import start_averager
from .protocol import (
    AveragedWithoutUs,
    AveragingFailed,
    RoundResult,
    banned_message,
    check_group,
    gather_metadata,
    totals_of,
)
from .stages import POLL_S, Spanner, StageRun, stage_bits, stage_codec

logger = logging.getLogger(__name__)


def _always() -> bool:
    return True


def _never(*_) -> str | None:
    return None


def group_expectation(peers: Mapping[str, Mapping[str, Any]]) -> int:
    """How many peers the stage-1 group `peers` expects to average the round: the largest count any member
    sent (each counts the peers at the round in its own view of the records). Every member computes the
    same number from the same metadata, so the whole group spans the round across groups or the whole group
    applies its own average. (Each member used its own count: in a 3-peer swarm a member that saw 2 peers
    applied the group's average of 2 while the other member, which saw 3, went on to stage 2 with the
    third peer: two θ after round 0, kept for 4 rounds.) A member that inflates its count only makes the
    group wait for its wave (`board_wait`), then apply what the wave holds."""
    counts = [m.get("expect") for m in peers.values() if isinstance(m, Mapping)]
    return max((c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c >= 0), default=0)


class SwarmAverager:
    """Averages pseudo-gradients of one run in round-matched groups, weighted by samples."""

    def __init__(self, dht, shapes: Sequence[torch.Size], *, prefix: str, cfg: AveragingConfig,
                 state_fn: Callable[[], tuple[dict, list[torch.Tensor]]] | None = None,
                 client_mode: bool | None = None, members: frozenset[str] | None = None):
        self.cfg = cfg
        self.codec = make_codec(cfg.compression)
        self.shapes = [torch.Size(s) for s in shapes]
        self.buffers = [torch.zeros(s, dtype=torch.float32) for s in self.shapes]
        self.numel = sum(b.numel() for b in self.buffers)
        self.error_feedback = cfg.error_feedback and self.codec.lossy
        # what this round's encoding lost (written by the averager process) and what we carry to the next
        self._sent_residuals = ([torch.zeros(s.numel()).share_memory_() for s in self.shapes]
                                if self.error_feedback else None)
        self.carried = [torch.zeros(s) for s in self.shapes] if self.error_feedback else None
        self._wire = torch.zeros(2, dtype=torch.int64).share_memory_()  # bytes sent, received
        self._averager = start_averager(
            self.buffers, dht, prefix=prefix, state_fn=state_fn, codec_name=cfg.compression,
            aggregator=cfg.aggregator, clip_factor=cfg.clip_factor, error_feedback=cfg.error_feedback,
            members=members, residuals=self._sent_residuals, wire=self._wire,
            min_group_size=cfg.min_group_size, target_group_size=cfg.target_group_size,
            min_matchmaking_time=cfg.matchmaking_time, request_timeout=cfg.request_timeout,
            allreduce_timeout=cfg.allreduce_timeout, next_chunk_timeout=cfg.next_chunk_timeout,
            client_mode=client_mode, declare_state_period=10.0, shutdown_timeout=5.0,
        )
        self.peer_id = str(self._averager.peer_id)
        # a client-mode peer (behind NAT, no relay) accepts no connections: it sends its parts and receives
        # the averages but owns no slice (hivemind gives it none), and it never leads or represents a group
        self.client_mode = bool(self._averager.client_mode)
        self.dht, self.prefix = dht, prefix
        self.banned: dict[str, str] = {}
        # one round at a time: the group bits, the policy and the shared buffers belong to the round in
        # progress (overlapped mode calls average() for round T+1 while round T may still run; without
        # this, T+1's Δ could overwrite T's average before T reads it, and T+1's group bits could move
        # T's matchmaking to the wrong round)
        self._one_round = threading.Lock()
        self._missed: Callable[[int], str | None] = _never  # the round's (average); called with the stage
        self._stage = 1  # the stage whose all-reduce runs (_run_stage)
        self.spanner = Spanner(dht, prefix, self.peer_id, self._run_stage,
                               codec=stage_codec(self.codec.lossy),
                               board_wait=cfg.step_timeout + 2 * cfg.matchmaking_time, gather_s=cfg.step_timeout,
                               stage_timeout=2 * cfg.step_timeout + cfg.allreduce_timeout, client=self.client_mode)

    def average(self, deltas: Sequence[torch.Tensor | None], *, round_no: int, weight: float,
                meta: dict[str, Any], active: Sequence[int] | None = None,
                weight_caps: dict[str, float] | None = None, timeout: float | None = None,
                swarm_size: int | None = None, moved_on: Callable[[], str | None] | None = None,
                ahead: Callable[[], bool] | None = None, missed: Callable[[int], str | None] | None = None
                ) -> RoundResult:
        """One round: matchmaking in the round's group (`round_no` picks the group bits), then our
        all-reduce of the active tensors (all by default; Δ of the others is ignored), weighted by
        `weight` and with the other members' weights bounded by `weight_caps`; if the group has fewer
        than `swarm_size` peers (those averaging this round), the groups' results are combined into
        the swarm's (stages.py). `moved_on`, polled while we wait (for a group, a stage, a representative):
        a reason when the swarm has averaged past this round without us, which ends the round at once
        with AveragedWithoutUs (the peer then downloads the newer state) instead of at its timeouts.
        `ahead`: does a live peer hold θ of a later round? (proof that a group on the board applied it).
        `missed(stage)`, polled while hivemind looks for a group of that stage: a reason when nobody is left to
        average this round with (AveragedWithoutUs too). Raises AveragingFailed. Concurrent calls run one after the other."""
        with self._one_round:
            self.spanner.moved_on = moved_on or _never
            self._missed = missed or _never
            self.spanner.ahead = ahead or _always
            return self._average(deltas, round_no, weight, meta, active, weight_caps, timeout, swarm_size)

    def _average(self, deltas, round_no, weight, meta, active, weight_caps, timeout, swarm_size) -> RoundResult:
        t0 = time.perf_counter()
        active = list(range(len(self.shapes))) if active is None else sorted(int(i) for i in active)
        self._bytes = [0, 0]
        self._meta, self._active, self._round = meta, active, round_no
        self._timeout = timeout or self.cfg.step_timeout
        # a peer left without a stage-1 group learns it only when its stage-1 step times out: the board's
        # window outlasts that, so the lone peer's post still joins its round's wave
        self.spanner.board_wait = self._timeout + 2 * self.cfg.matchmaking_time
        try:
            averaged, peers = self._run_stage(StageRun(list(deltas), 1, stage_bits(round_no, 1), weight,
                                                       dict(weight_caps=dict(weight_caps or {})),
                                                       dict(expect=int(swarm_size or 0))))
        except AveragingFailed as e:
            if swarm_size is None or swarm_size <= 1 or isinstance(e, AveragedWithoutUs):
                raise
            mine = totals_of({self.peer_id: meta})
            averaged, size, totals = self.spanner.alone(list(deltas), weight, round_no, weight_caps or {}, e, mine,
                                                        expected=swarm_size)
            return RoundResult(averaged, size, {self.peer_id: meta}, self._bytes[0], self._bytes[1],
                               time.perf_counter() - t0, totals=totals)
        residual_norm = self._carry_residuals(active)
        size, totals = len(peers), None
        expected = group_expectation(peers) if swarm_size is not None else None
        if expected is not None and size < expected:
            averaged, size, totals = self.spanner.span(averaged, peers, round_no, weight_caps or {},
                                                       expected=expected)
        elif expected is not None and expected > 1:
            self.spanner.announce(peers, round_no)
        return RoundResult(averaged, size, peers, self._bytes[0], self._bytes[1], time.perf_counter() - t0,
                           residual_norm=residual_norm, totals=totals)

    def _run_stage(self, run: StageRun) -> tuple[list[torch.Tensor | None], dict[str, dict]]:
        """One all-reduce of a round's stage: (the average per tensor, peer id -> metadata of the group)."""
        round_no, self._stage = self._round, run.stage
        self._prepare(run)
        meta = dict(self._meta, weight=float(run.weight), stage=run.stage, client=self.client_mode, **run.extra_meta)
        gathered_meta = gather_metadata(meta, round_no, self._active, run.policy.get("codec") or self.codec.name)
        peers = self._step(gathered_meta, run.weight, self._timeout + run.gather_s, run.gather_s)
        self._bytes[0] += int(self._wire[0])
        self._bytes[1] += int(self._wire[1])
        refused = self._ban_rejected()
        if refused:  # our owner role left them out; tell the group, whose consensus then ignores them
            consensus.publish_refused(self.dht, consensus.group_key(self.prefix, round_no, peers), self.peer_id,
                                      list(refused))
        members = {p: m for p, m in peers.items() if p not in self.banned}
        check_group(members, round_no, gathered_meta)
        averaged = self._read_average(self._active)
        self._verify_consensus([averaged[i] for i in self._active], members, round_no)
        return averaged, members

    def _prepare(self, run: StageRun) -> None:
        """The stage's settings to the averager process, its tensors into the shared buffers (stage 1:
        Δ plus the error carried from earlier rounds)."""
        self._averager.set_group_bits(run.bits)
        policy = dict(codec=None, aggregator=None, error_feedback=True, target_group_size=None, weight_caps={},
                      leader=None)
        self._averager.set_policy(active=self._active, **dict(policy, **run.policy))
        with self._averager.get_tensors() as tensors:
            for i in self._active:
                tensors[i].copy_(run.tensors[i])
                if self.carried is not None and run.stage == 1:
                    tensors[i].add_(self.carried[i])  # error feedback: what earlier rounds' encoding lost
        self._wire.zero_()

    def _step(self, gathered_meta: dict[str, Any], weight: float, timeout: float, gather_s: float = 0.0
              ) -> dict[str, dict]:
        """hivemind's step: peer id -> the metadata it sent, for every member of the group. With `gather_s`,
        a leader waits up to that long for its group to fill (hivemind's scheduled_time) instead of
        matchmaking_time: a stage whose members are known waits for all of them."""
        try:
            scheduled = get_dht_time() + gather_s if gather_s else None
            control = self._averager.step(gather=gathered_meta, weight=float(weight), allow_retries=True,
                                          timeout=timeout, scheduled_time=scheduled, wait=False)
            while True:
                try:
                    gathered = control.result(timeout=POLL_S)
                    break
                except concurrent.futures.TimeoutError:
                    if (why := self._why_stop(control)) is not None:
                        control.cancel()
                        raise AveragedWithoutUs(why) from None
        except AveragedWithoutUs:
            raise
        except Exception as e:  # hivemind raises several types; the caller only needs "it failed, why"
            self._ban_rejected()
            raise AveragingFailed(f"all-reduce failed: {type(e).__name__}: {e}") from None
        if not gathered:
            raise AveragingFailed("no group found for this round")
        return {str(k): v for k, v in gathered.items()}

    def _why_stop(self, control) -> str | None:
        """Why to stop waiting: the round's check or a stage's watch; while matchmaking, nobody left."""
        why = self.spanner.moved_on()
        if why is None and control.stage == AveragingStage.LOOKING_FOR_GROUP:
            why = self._missed(self._stage)
        return why

    def _read_average(self, active: list[int]) -> list[torch.Tensor | None]:
        averaged: list[torch.Tensor | None] = [None] * len(self.shapes)
        with self._averager.get_tensors() as tensors:
            for i in active:
                averaged[i] = tensors[i].clone()
        if any(not bool(torch.isfinite(averaged[i]).all()) for i in active):
            raise AveragingFailed("the group's average is not finite")
        return averaged

    def _carry_residuals(self, active: list[int]) -> float:
        """Keep what this round's encoding lost for the next round; its norm (0 without error feedback)."""
        if self.carried is None:
            return 0.0
        for i in active:
            self.carried[i] = self._sent_residuals[i].view(self.shapes[i]).clone()
        return math.sqrt(sum(float(self.carried[i].pow(2).sum()) for i in active))

    def _ban_rejected(self) -> dict[str, str]:
        """Peers whose data our reducer refused this round are left out of our all-reduces from now on."""
        try:
            rejected = {p: why for p, why in self._averager.pop_rejected().items() if p != self.peer_id}
        except Exception as e:
            logger.debug("could not read rejections: %s", e)
            return {}
        if rejected:
            self.banned.update(rejected)
            self._averager.set_policy(banned=frozenset(self.banned))
            logger.warning(banned_message(rejected))
        return rejected

    def _verify_consensus(self, averaged: list[torch.Tensor], peers: dict[str, dict], round_no: int) -> None:
        """Every member publishes the hash of its average and checks the others' before anything is
        applied: a member whose slice owner died (or lied to some members) must not apply it."""
        mine = theta_hash(averaged)
        key = consensus.group_key(self.prefix, round_no, peers)
        consensus.publish(self.dht, key, self.peer_id, mine)
        consensus.verify(self.dht, key, peers, self.peer_id, mine, self.cfg.consensus_timeout)

    def set_priority(self, round_no: int) -> None:
        """Late joiners try the most advanced peers first (hivemind's state-sharing priority; a claim
        anyone can make, so joiners verify what they download). A client-mode peer serves no state."""
        if not self.client_mode:
            self._averager.state_sharing_priority = float(round_no)

    def load_state_from_peers(self, timeout: float, exclude: Sequence[str] = ()
                              ) -> tuple[str, dict, list[torch.Tensor]] | None:
        """(donor peer ID, metadata, tensors) from the highest-priority donor not in `exclude`; None if
        nobody answered."""
        try:
            return self._averager.load_state_from(exclude, timeout)
        except Exception as e:
            logger.warning("state download failed: %s: %s", type(e).__name__, e)
            return None

    def shutdown(self) -> None:
        try:
            self._averager.shutdown()
        except Exception as e:  # shutting down must never raise
            logger.debug("averager shutdown: %s", e)
        with contextlib.suppress(Exception):  # never leave a live child: the interpreter would wait for it at exit
            if self._averager.pid is not None and self._averager.is_alive():
                self._averager.kill()
                self._averager.join(timeout=2)
