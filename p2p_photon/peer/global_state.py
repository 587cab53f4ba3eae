"""The global state: θ, the outer optimizer's state, the run's counters and the hash of θ.

Every member of a round's group holds this bit-identically after the round. It changes in
exactly three ways: an outer step (`apply`), a download from another peer (`load`) and a
resume from a checkpoint (`restore`); each re-hashes θ once, everything else reads the hash.
A lock guards it against the averager's state-sharing thread, which calls `share`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import state
from ..config import Config, OuterConfig
from ..hashing import theta_hash
from ..outer import OuterOptimizer, load_into_model, pseudo_gradient


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


class GlobalState:
    def __init__(self, model: torch.nn.Module, outer_cfg: OuterConfig, fingerprint: str):
        self.names = [n for n, _ in model.named_parameters()]
        self.theta = [p.detach().clone() for p in model.parameters()]
        self.outer = OuterOptimizer(self.theta, outer_cfg)
        self.counters = Counters()
        self.fp = fingerprint
        self.lock = threading.RLock()
        self.hash = ""
        self.rehash()

    def rehash(self) -> str:
        """Hash θ (after every change; everything else reads `self.hash`)."""
        with self.lock:
            self.hash = theta_hash(self.theta)
            return self.hash

    # -- the local model relative to θ
    def pseudo_gradient(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """Δ = θ − θ_local."""
        with self.lock:
            return pseudo_gradient(self.theta, model)

    def reset_local(self, model: torch.nn.Module) -> None:
        """θ_local ← θ (local work is dropped)."""
        with self.lock:
            load_into_model(self.theta, model)

    # -- the three ways θ changes
    def apply(self, res, model: torch.nn.Module | None) -> None:
        """θ ← OuterOpt(θ, Δ̄) for the group's result `res` (an averaging.RoundResult); the local model is
        reset to the new θ unless `model` is None. Tensors not averaged this round (None) stay."""
        c = self.counters
        with self.lock:
            self.outer.step(res.deltas)
            if model is not None:
                load_into_model(self.theta, model)
            c.round += 1
            c.global_step += res.totals["steps"]
            c.total_samples += res.totals["samples"]
            self.rehash()
        c.bytes_sent += res.bytes_sent
        c.bytes_received += res.bytes_received

    def load(self, meta: dict, tensors: list[torch.Tensor], model: torch.nn.Module) -> None:
        """Take a downloaded state (checked by `problem_with` first)."""
        n = len(self.theta)
        with self.lock:
            for dst, src in zip(self.theta, tensors[:n]):
                dst.copy_(src)
            self.outer.load_state_tensors(tensors[n:])
            load_into_model(self.theta, model)
            self.counters.round = int(meta["round"])
            self.counters.global_step = int(meta["global_step"])
            self.counters.total_samples = int(meta.get("total_samples", 0))
            self.rehash()

    def restore(self, ckpt: state.CheckpointPayload, model: torch.nn.Module) -> None:
        """θ, outer state and counters from one of this peer's checkpoints (the caller restores the
        inner optimizer, the data cursor and the RNG, which are local)."""
        m = ckpt.meta
        with self.lock:
            for name, dst in zip(self.names, self.theta):
                dst.copy_(ckpt.theta[name])
            self.outer.load_state_tensors(ckpt.outer)
            load_into_model(self.theta, model)
            self.counters.round, self.counters.global_step = int(m["round"]), int(m["global_step"])
            self.counters.failed_rounds, self.counters.total_samples = int(m["failed_rounds"]), int(m["total_samples"])
            self.rehash()

    # -- what leaves this peer
    def share(self) -> tuple[dict, list[torch.Tensor]]:
        """What a late joiner downloads: θ, the outer optimizer's momentum, round and global step."""
        with self.lock:
            tensors = [t.detach().clone() for t in self.theta] + [b.clone() for b in self.outer.state_tensors()]
            meta = dict(round=self.counters.round, global_step=self.counters.global_step, fingerprint=self.fp,
                        theta=self.hash, names=self.names, total_samples=self.counters.total_samples)
        return meta, tensors

    def checkpoint(self, inner_state: dict, data_cursor: dict, cfg: Config) -> state.CheckpointPayload:
        """What state.save_checkpoint writes. It references θ itself (no copy of the model): hold
        `self.lock` until the write is done, so θ and the counters are from one moment."""
        c = self.counters
        with self.lock:
            return state.CheckpointPayload(
                theta=dict(zip(self.names, self.theta)), outer=self.outer.state_tensors(), inner=inner_state,
                meta=dict(round=c.round, global_step=c.global_step, failed_rounds=c.failed_rounds,
                          total_samples=c.total_samples, fingerprint=self.fp, theta=self.hash,
                          data_cursor=data_cursor),
                rng=state.capture_rng(), config=cfg)

    def problem_with(self, meta: Any, tensors: list[torch.Tensor]) -> str | None:
        """Why a state served by another peer is wrong in itself (its donor is refused), or None."""
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
