"""Overlapped ("eager") rounds: round T's all-reduce runs in a background thread while round T+1
trains, and its update is applied one round late.

Each round's Δ is the local progress during that round (snapshot at its start − local at its
end), so round T+1's all-reduce starts as soon as its training ends, before round T's result is
applied. Landing round T:

    θ ← OuterOpt(θ, Δ̄_T)
    local ← local + (θ_new − θ_old) + Δ_T      (the group's step instead of our own Δ_T)

which keeps local = θ − (progress of the round in flight). When round T cannot land, the round
after it cannot either (it was launched on top of T): it is dropped, and round T is trained
again from θ.

A peer that downloads θ_T from an overlapped swarm (which trains T+1 while T's all-reduce runs)
joins the pipeline where it is: it trains T+1 at once, and lands T by downloading the swarm's
θ_T+1 once the swarm publishes it, keeping its own progress (`carry_progress`). Training T
instead would leave it one round behind the swarm for good.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .training import RoundStats


@dataclass
class InFlight:
    """A round whose all-reduce runs in the background."""

    round: int
    stats: RoundStats
    deltas: list[torch.Tensor]  # the Δ sent (what the local model gives back for the group's step)
    norm: float
    done: threading.Event = field(default_factory=threading.Event)
    result: object | None = None  # averaging.RoundResult
    error: str | None = None
    external: bool = False  # averaged by the swarm without us (we joined while it ran): lands by download

    def wait(self, timeout: float) -> str | None:
        """Why the round cannot land (error or timeout), or None when its result is in."""
        self.done.wait(timeout)
        return self.error if self.done.is_set() else "the all-reduce did not finish"


def progress_since(snapshot: Sequence[torch.Tensor], model: torch.nn.Module) -> list[torch.Tensor]:
    """Δ of the round = snapshot at its start − local at its end."""
    with torch.no_grad():
        return [s - p.detach() for s, p in zip(snapshot, model.parameters())]


def launch(flight: InFlight, average: Callable[[], object], averaging_failed: type[Exception]) -> InFlight:
    """Run `average()` in a daemon thread; its result or error lands in `flight`."""

    def run():
        try:
            flight.result = average()
        except averaging_failed as e:
            flight.error = str(e)
        except Exception as e:  # never let the thread die silently
            flight.error = f"{type(e).__name__}: {e}"
        finally:
            flight.done.set()

    threading.Thread(target=run, name=f"allreduce-{flight.round}", daemon=True).start()
    return flight


def swap_in_group_step(model: torch.nn.Module, new: Sequence[torch.Tensor], old: Sequence[torch.Tensor],
                       flight: InFlight) -> None:
    """local += θ_new − θ_old + Δ_T: the group's step instead of our own."""
    with torch.no_grad():
        for p, n, o, d in zip(model.parameters(), new, old, flight.deltas):
            p.add_(n - o + d)


def carry_progress(model: torch.nn.Module, progress: Sequence[torch.Tensor], theta: Sequence[torch.Tensor]) -> None:
    """local ← θ − progress: the progress of the round in flight, moved onto a newer θ."""
    with torch.no_grad():
        for p, d, t in zip(model.parameters(), progress, theta):
            p.copy_(t - d)
