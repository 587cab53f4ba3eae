"""The only place that talks to hivemind's averager: groups, weights, exact encoding, timeouts, state sharing.

Exact averaging. hivemind's all-reduce gives every peer `x + (avg − x)`, computed with the
peer's own x, so peers end up with results that differ in the last bits and θ drifts apart.
We make every operation exact: each tensor is sent as x = 1 + s·Δ with s a power of two and
s·Δ clamped to ±0.3, so x and the average both lie in [0.7, 1.3]. Subtracting two floats
within a factor of two of each other is exact (Sterbenz), so `x + (avg − x)` is exactly `avg`
on every peer, and so is `(avg − 1) / s`. The price is an absolute resolution of 2^-23/s on
Δ; s follows the previous round's averaged Δ (known identically to all peers). What the
clamp cuts off or the encoding rounds away is returned as a residual (error feedback).

Rounds are matched by group key: the group bits are the round number, so peers only ever
average with peers of the same round and the same run fingerprint (part of the prefix).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind import DecentralizedAverager
from hivemind.utils import get_dht_time

from .config import AveragingConfig
from .model import theta_hash

logger = logging.getLogger(__name__)

OFFSET = 1.0
CLAMP = 0.3
ROUND_BITS = 20  # round number -> group bits (wraps after ~1M rounds)


class AveragingFailed(RuntimeError):
    """A round's all-reduce did not complete (no group, timeout, peer failure, inconsistent group)."""


@dataclass
class RoundResult:
    deltas: list[torch.Tensor]  # the group's weighted-mean pseudo-gradient (bit-identical on all members)
    residuals: list[torch.Tensor]  # what this peer's encoding lost (clamp + resolution)
    group_size: int
    gathered: dict[str, dict[str, Any]]  # peer id -> metadata it sent
    bytes_sent: int
    bytes_received: int
    seconds: float
    clamped_fraction: float = 0.0


def scales_digest(scales: Sequence[float]) -> str:
    return hashlib.sha256(repr([float(x) for x in scales]).encode()).hexdigest()[:16]


def scale_for(reference_maxabs: float) -> float:
    """Power-of-two scale so that a Δ of `reference_maxabs` maps to ~CLAMP/4 (headroom for outliers)."""
    if not math.isfinite(reference_maxabs) or reference_maxabs <= 0:
        return 1.0
    return float(2.0 ** math.floor(math.log2(CLAMP / (4.0 * reference_maxabs))))


@torch.no_grad()
def encode(delta: torch.Tensor, scale: float, out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """out ← 1 + clamp(s·Δ); returns (residual Δ − decode(out), number of clamped elements). In place:
    a 50M-parameter Δ is encoded without full-size temporaries beyond the residual."""
    if delta.numel() == 0:
        return delta.float().clone(), 0
    torch.mul(delta.float(), scale, out=out)
    lo, hi = torch.aminmax(out)
    clamped = 0
    if -float(lo) > CLAMP or float(hi) > CLAMP:
        clamped = int((out.abs() > CLAMP).sum())
        out.clamp_(-CLAMP, CLAMP)
    out.add_(OFFSET)
    residual = torch.sub(out, OFFSET).div_(scale)  # == decode(out, scale)
    return torch.sub(delta.float(), residual, out=residual), clamped


@torch.no_grad()
def decode(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x - OFFSET) / scale


class _Averager(DecentralizedAverager):
    """DecentralizedAverager whose state for late joiners comes from the peer (get_current_state is
    hivemind's documented extension point)."""

    def __init__(self, *args, state_fn: Callable[[], tuple[dict, list[torch.Tensor]]] | None = None, **kwargs):
        self._state_fn = state_fn
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        if self._state_fn is None:
            return dict(), [], None
        metadata, tensors = self._state_fn()
        return metadata, tensors, None


@contextlib.contextmanager
def _keep_sigint():
    """hivemind's averager sets SIGINT to SIG_IGN in the *calling* process before it forks, which would
    make Ctrl-C do nothing; put the caller's handler back."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        yield
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGINT, previous)


class SwarmAverager:
    """Averages pseudo-gradients of one run in round-matched groups, weighted by samples."""

    def __init__(self, dht, shapes: Sequence[torch.Size], *, prefix: str, cfg: AveragingConfig,
                 state_fn: Callable[[], tuple[dict, list[torch.Tensor]]] | None = None,
                 client_mode: bool | None = None):
        self.cfg = cfg
        self.buffers = [torch.zeros(s, dtype=torch.float32) for s in shapes]
        self.numel = sum(b.numel() for b in self.buffers)
        with _keep_sigint():
            self._averager = self._start(dht, prefix, cfg, state_fn, client_mode)
        self.peer_id = str(self._averager.peer_id)
        self.dht, self.prefix = dht, prefix

    def _start(self, dht, prefix, cfg, state_fn, client_mode) -> _Averager:
        return _Averager(
            self.buffers, dht, start=True, prefix=prefix, state_fn=state_fn,
            min_group_size=cfg.min_group_size, target_group_size=cfg.target_group_size,
            min_matchmaking_time=cfg.matchmaking_time, request_timeout=min(10.0, cfg.matchmaking_time / 2),
            allreduce_timeout=cfg.allreduce_timeout, next_chunk_timeout=min(30.0, cfg.allreduce_timeout / 2),
            client_mode=client_mode, declare_state_period=10.0, shutdown_timeout=5.0,
        )

    def average(self, deltas: Sequence[torch.Tensor], *, round_no: int, weight: float, meta: dict[str, Any],
                scales: Sequence[float], timeout: float | None = None) -> RoundResult:
        """One round: matchmaking in the round's group, then a weighted all-reduce; raises AveragingFailed."""
        t0 = time.perf_counter()
        self._averager.set_group_bits(format(round_no % (1 << ROUND_BITS), f"0{ROUND_BITS}b"))
        residuals, clamped = self._encode(deltas, scales)
        gathered_meta = dict(meta, round=round_no, scales=scales_digest(scales), nonce=os.urandom(8).hex())
        try:
            gathered = self._averager.step(gather=gathered_meta, weight=float(weight), allow_retries=True,
                                           timeout=timeout or self.cfg.matchmaking_time * 3)
        except Exception as e:  # hivemind raises several types; the caller only needs "it failed, why"
            raise AveragingFailed(f"all-reduce failed: {type(e).__name__}: {e}") from None
        if not gathered:
            raise AveragingFailed("no group found for this round")
        peers = {str(k): v for k, v in gathered.items()}
        self._check_group(peers, round_no, gathered_meta)
        with self._averager.get_tensors() as tensors:
            averaged = [decode(t, s) for t, s in zip(tensors, scales)]
        self._verify_consensus(averaged, peers, round_no)
        n = len(peers)
        wire = self.numel * 4
        sent = int(2 * (n - 1) / n * wire)  # butterfly: own parts to reducers + reduced part to the others
        return RoundResult(averaged, residuals, n, peers, sent, sent, time.perf_counter() - t0,
                           clamped_fraction=clamped / max(1, self.numel))

    def _encode(self, deltas, scales) -> tuple[list[torch.Tensor], int]:
        residuals, clamped = [], 0
        with self._averager.get_tensors() as tensors:
            for d, s, buf in zip(deltas, scales, tensors):
                r, c = encode(d, s, buf)
                residuals.append(r)
                clamped += c
        return residuals, clamped

    def _verify_consensus(self, averaged: list[torch.Tensor], peers: dict[str, dict], round_no: int) -> None:
        """hivemind keeps a peer's own values for the parts whose reducer died mid-all-reduce (it only logs
        a warning), so members could silently diverge. Every member publishes the hash of its average
        and checks the others' before anything is applied."""
        mine = theta_hash(averaged)
        group_id = hashlib.sha256("".join(sorted(str(m.get("nonce")) for m in peers.values())).encode()).hexdigest()
        key = f"{self.prefix}_consensus_{round_no}_{group_id[:16]}"  # one key per group formed, not per round
        self.dht.store(key, subkey=self.peer_id, value=mine, expiration_time=get_dht_time() + 120)
        deadline = time.monotonic() + self.cfg.consensus_timeout
        while True:
            found = self.dht.get(key, latest=True)
            seen = {k: v.value for k, v in found.value.items()} if found is not None and isinstance(found.value, dict) else {}
            theirs = {p: seen.get(p) for p in peers if p != self.peer_id}
            if any(h is not None and h != mine for h in theirs.values()):
                raise AveragingFailed("group members hold different averages (a peer dropped out mid-all-reduce)")
            if all(h is not None for h in theirs.values()):
                return
            if time.monotonic() > deadline:
                missing = [p[-8:] for p, h in theirs.items() if h is None]
                logger.info("no average hash from %s (left the group?); the others agree", ", ".join(missing))
                return
            time.sleep(0.1)

    @staticmethod
    def _check_group(peers: dict[str, dict], round_no: int, meta: dict) -> None:
        for pid, m in peers.items():
            if not isinstance(m, dict):
                raise AveragingFailed(f"peer {pid[-8:]} sent malformed metadata")
            if m.get("round") != round_no:
                raise AveragingFailed(f"peer {pid[-8:]} averaged for round {m.get('round')}, we are in {round_no}")
            if m.get("fingerprint") != meta.get("fingerprint"):
                raise AveragingFailed(f"peer {pid[-8:]} has run fingerprint {m.get('fingerprint')}, "
                                      f"ours is {meta.get('fingerprint')}")
            if m.get("scales") != meta.get("scales"):
                raise AveragingFailed(f"peer {pid[-8:]} encoded with other scales (out of sync): round discarded")

    def set_priority(self, round_no: int) -> None:
        """Late joiners download from the most advanced peer (hivemind's state-sharing priority)."""
        self._averager.state_sharing_priority = float(round_no)

    def load_state_from_peers(self, timeout: float) -> tuple[dict, list[torch.Tensor]] | None:
        """Download (metadata, tensors) from a peer that shares state; None if nobody answered."""
        try:
            return self._averager.load_state_from_peers(timeout=timeout)
        except Exception as e:
            logger.warning("state download failed: %s: %s", type(e).__name__, e)
            return None

    def shutdown(self) -> None:
        try:
            self._averager.shutdown()
        except Exception as e:  # shutting down must never raise
            logger.debug("averager shutdown: %s", e)
