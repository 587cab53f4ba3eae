"""Local training: inner steps from θ until the swarm's round ends (Photon: small batches, high LR).

Progress-based rounds: fast peers do more steps, slow peers fewer; nobody waits for a fixed H.
With FedCyBGD block cycling only the round's active group of tensors requires grad, and the
inner optimizer holds state for that group alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import Config
from ..inner import InnerTrainer, optimizer_state_bytes
from ..outer import active_group, block_groups
from .contribution import group_key
from .global_state import Counters

CHECK_EVERY_S = 0.2  # how often the loop asks the (cached) swarm view whether the round is over


@dataclass
class RoundStats:
    """This peer's local work in one round (carried into the retry when an attempt fails)."""

    samples: int = 0
    steps: int = 0
    tokens: int = 0
    loss: float = float("nan")
    train_s: float = 0.0
    wall_s: float = 0.0
    stopped: bool = False


class LocalTraining:
    def __init__(self, cfg: Config, model: torch.nn.Module, trainer: InnerTrainer, stream, counters: Counters):
        self.cfg, self.model, self.trainer, self.stream, self.counters = cfg, model, trainer, stream, counters
        names = [n for n, _ in model.named_parameters()]
        self.groups = block_groups(names, cfg.outer.block_cycle) if cfg.outer.block_cycle else None
        self._trained_group: int | None = None  # the group the inner optimizer currently holds
        self.peak_opt_bytes = 0

    def active_indices(self, round_no: int) -> list[int] | None:
        """Tensors trained and averaged in this round: all (None), or FedCyBGD's active group."""
        if self.groups is None:
            return None
        c = self.cfg
        g = active_group(round_no, c.outer.block_cycle, c.outer.block_order, c.seed)
        return [i for i, x in enumerate(self.groups) if x == g]

    def prepare_round(self, round_no: int) -> None:
        """FedCyBGD: only the round's group requires grad; a new inner optimizer whenever it changes."""
        active = self.active_indices(round_no)
        if active is None or group_key(active) == self._trained_group:
            return
        on = set(active)
        for i, p in enumerate(self.model.parameters()):
            p.requires_grad_(i in on)
            p.grad = None
        self.trainer.reset_optimizer()
        self._trained_group = group_key(active)

    def train(self, st: RoundStats, round_over: Callable[[RoundStats], bool],
              publish: Callable[[RoundStats], None], stop: threading.Event) -> RoundStats:
        """Inner steps until `round_over(st)` (asked every CHECK_EVERY_S) or a local cap; `st` is the work
        already done in this round (a failed attempt's), continued. `publish` is handed the progress
        about once a second (it must not block: the swarm view's thread does the DHT call)."""
        cfg, c = self.cfg, self.counters
        self.prepare_round(c.round)
        self.trainer.begin_round()
        t0 = last_pub = last_check = time.perf_counter()
        wall0, loss_sum = st.wall_s, st.loss * st.steps if st.steps else 0.0
        while not stop.is_set():
            step = self.trainer.step(self.stream.next_batch, c.global_step + st.steps)
            if cfg.inner.simulate_slowdown:  # counts as compute: a slower machine
                time.sleep(cfg.inner.simulate_slowdown)
            if cfg.logging.record_steps:
                c.steps_log.append([c.round, c.global_step + st.steps, step.loss, step.lr])
            st.steps, st.samples, st.tokens = st.steps + 1, st.samples + step.samples, st.tokens + step.tokens
            st.train_s += step.seconds + cfg.inner.simulate_slowdown
            loss_sum += step.loss
            st.loss = loss_sum / st.steps
            now = time.perf_counter()
            st.wall_s = wall0 + now - t0
            if now - last_pub >= min(1.0, cfg.logging.progress_interval / 2):
                publish(st)
                last_pub = now
            if self._local_cap_reached(st) or (now - last_check >= CHECK_EVERY_S and round_over(st)):
                self.peak_opt_bytes = max(self.peak_opt_bytes, optimizer_state_bytes(self.trainer.optimizer))
                self.trainer.end_round()
                return st
            if now - last_check >= CHECK_EVERY_S:
                last_check = now
        st.stopped = True
        self.trainer.end_round()
        return st

    def _local_cap_reached(self, st: RoundStats) -> bool:
        r = self.cfg.rounds
        return bool((r.max_local_steps and st.steps >= r.max_local_steps)
                    or (r.max_round_seconds and st.wall_s >= r.max_round_seconds))
