"""What the peer uses: one round of averaging in, the group's average (or AveragingFailed) out.

The hivemind averager process does the all-reduce (`hivemind_backend.py`); this class loads the
round's Δ (plus the error carried from earlier rounds) into its shared buffers, runs one step, bans
peers whose data was refused, checks the group and the consensus on the average, and carries the
new quantization error to the next round.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..codecs import make_codec
from ..config import AveragingConfig
from ..hashing import theta_hash
from . import consensus
from .hivemind_backend import start_averager
from .protocol import AveragingFailed, RoundResult, banned_message, check_group, gather_metadata, group_bits

logger = logging.getLogger(__name__)


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
        self.dht, self.prefix = dht, prefix
        self.banned: dict[str, str] = {}
        # one round at a time: the group bits, the policy and the shared buffers belong to the round in
        # progress (overlapped mode calls average() for round T+1 while round T may still run; without
        # this, T+1's Δ could overwrite T's average before T reads it, and T+1's group bits could move
        # T's matchmaking to the wrong round)
        self._one_round = threading.Lock()

    def average(self, deltas: Sequence[torch.Tensor | None], *, round_no: int, weight: float,
                meta: dict[str, Any], active: Sequence[int] | None = None,
                weight_caps: dict[str, float] | None = None, timeout: float | None = None) -> RoundResult:
        """One round: matchmaking in the round's group (`round_no` picks the group bits), then our
        all-reduce of the active tensors (all by default; Δ of the others is ignored), weighted by
        `weight` and with the other members' weights bounded by `weight_caps`; raises AveragingFailed.
        Concurrent calls run one after the other."""
        with self._one_round:
            return self._average(deltas, round_no, weight, meta, active, weight_caps, timeout)

    def _average(self, deltas, round_no, weight, meta, active, weight_caps, timeout) -> RoundResult:
        t0 = time.perf_counter()
        active = list(range(len(self.shapes))) if active is None else sorted(int(i) for i in active)
        self._prepare(deltas, round_no, active, weight_caps)
        gathered_meta = gather_metadata(meta, round_no, active, self.codec.name)
        peers = self._step(gathered_meta, weight, timeout or self.cfg.step_timeout)
        banned = self._ban_rejected()
        if banned:  # tell the group (a differing hash fails the round for everyone), then fail it here
            key = consensus.group_key(self.prefix, round_no, peers)
            consensus.publish(self.dht, key, self.peer_id, "rejected:" + ",".join(sorted(banned)))
            raise AveragingFailed(banned_message(banned))
        check_group(peers, round_no, gathered_meta)
        averaged = self._read_average(active)
        self._verify_consensus([averaged[i] for i in active], peers, round_no)
        residual_norm = self._carry_residuals(active)
        return RoundResult(averaged, len(peers), peers, int(self._wire[0]), int(self._wire[1]),
                           time.perf_counter() - t0, residual_norm=residual_norm)

    def _prepare(self, deltas: Sequence[torch.Tensor | None], round_no: int, active: list[int],
                 weight_caps: dict[str, float] | None) -> None:
        """Round settings to the averager process, Δ + carried error into the shared buffers."""
        self._averager.set_group_bits(group_bits(round_no))
        self._averager.set_policy(active=active, weight_caps=dict(weight_caps or {}))
        with self._averager.get_tensors() as tensors:
            for i in active:
                tensors[i].copy_(deltas[i])
                if self.carried is not None:
                    tensors[i].add_(self.carried[i])  # error feedback: what earlier rounds' encoding lost
        self._wire.zero_()

    def _step(self, gathered_meta: dict[str, Any], weight: float, timeout: float) -> dict[str, dict]:
        """hivemind's step: peer id -> the metadata it sent, for every member of the group."""
        try:
            gathered = self._averager.step(gather=gathered_meta, weight=float(weight), allow_retries=True,
                                           timeout=timeout)
        except Exception as e:  # hivemind raises several types; the caller only needs "it failed, why"
            self._ban_rejected()
            raise AveragingFailed(f"all-reduce failed: {type(e).__name__}: {e}") from None
        if not gathered:
            raise AveragingFailed("no group found for this round")
        return {str(k): v for k, v in gathered.items()}

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
        anyone can make, so joiners verify what they download)."""
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
