"""The contribution policy: what this peer puts into the swarm, and the checks it makes on itself.

An honest peer sends its pseudo-gradient Δ weighted by the samples it trained, after a
self-check (a non-finite Δ, or one far larger than its own recent rounds, is not sent), and
publishes its progress records and state as they are. The peer calls nothing else to decide
what leaves it, so a test plays a hostile peer by swapping in a subclass of this policy
(tests/attacker.py) instead of subclassing the peer.
"""

from __future__ import annotations

import math
import statistics

import torch

from ..progress import ProgressRecord


def group_key(active: list[int] | None) -> int:
    """The key of the tensors trained this round: -1 for all, else FedCyBGD's group (its first index)."""
    return -1 if active is None else active[0]


def delta_norm(deltas: list[torch.Tensor], active: list[int] | None) -> float:
    """‖Δ‖ over the tensors that are sent this round."""
    idx = range(len(deltas)) if active is None else active
    return math.sqrt(sum(float(torch.linalg.vector_norm(deltas[i])) ** 2 for i in idx))


class ContributionPolicy:
    def __init__(self, max_delta_norm_ratio: float, history: int = 8):
        self.max_ratio, self.history = max_delta_norm_ratio, history
        self.norms: dict[int, list[float]] = {}  # group key -> this peer's recent ‖Δ‖

    def contribution(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        """The Δ this peer sends (an honest peer: its own)."""
        return deltas

    def weight(self, samples: int) -> float:
        """The weight of this peer's Δ in the group's mean: the samples it trained this round."""
        return float(max(samples, 1))

    def self_check(self, deltas: list[torch.Tensor], active: list[int] | None) -> tuple[float, str | None]:
        """(‖Δ‖ of the tensors sent, why it must not be sent or None)."""
        norm = delta_norm(deltas, active)
        if not math.isfinite(norm):
            return norm, "the pseudo-gradient has non-finite values"
        recent = self.norms.get(group_key(active), [])
        if len(recent) >= 3 and norm > self.max_ratio * statistics.median(recent):
            return norm, (f"the pseudo-gradient norm {norm:.3g} is more than {self.max_ratio:g}x the median of "
                          f"this peer's recent rounds ({statistics.median(recent):.3g})")
        return norm, None

    def remember(self, norm: float, active: list[int] | None) -> None:
        """A Δ the group accepted joins the self-check's history."""
        recent = self.norms.setdefault(group_key(active), [])
        recent.append(norm)
        del recent[:-self.history]

    def record(self, rec: ProgressRecord) -> ProgressRecord:
        """The progress record this peer publishes."""
        return rec

    def served_state(self, meta: dict, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        """The state this peer serves to a joiner."""
        return meta, tensors

    def sharing_priority(self, round_no: int) -> float:
        """The state-sharing priority this peer claims (joiners try the most advanced peers first)."""
        return float(round_no)
