"""How a reducer combines the group's contributions to one part of the pseudo-gradient.

Every contribution is a flat float32 tensor with a weight (the sender's samples this round).
Non-finite contributions are dropped before anything else. Then:

* ``mean``: the weighted mean Σ wᵢxᵢ / Σ wᵢ.
* ``clip``: each xᵢ is scaled down to norm ≤ τ = clip_factor × (lower) median of the norms, then
  the weighted mean. One peer sending 10⁶·Δ moves the result by at most τ·wᵢ/Σw.
* ``centered_clip``: CenteredClip (Karimireddy et al. 2021; BTARD, Gorbunov et al. 2022):
  v ← v + Σ wᵢ (xᵢ − v) min(1, τ/‖xᵢ − v‖) / Σ wᵢ, started at the clipped mean, τ from the median
  distance to it; a fixed number of iterations, so every reducer does the same float ops.

The lower median (torch.median) is used so that with two contributions the smaller norm sets τ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CENTERED_CLIP_ITERS = 10


def _clip_factors(norms: torch.Tensor, tau: float) -> torch.Tensor:
    if tau <= 0:  # most contributions are exactly zero: nothing sensible to clip to
        return torch.ones_like(norms)
    return torch.clamp(tau / norms.clamp_min(1e-30), max=1.0)


@torch.no_grad()
def aggregate(contributions: Sequence[tuple[torch.Tensor, float]], mode: str = "mean",
              clip_factor: float = 2.0) -> tuple[torch.Tensor | None, list[int]]:
    """(aggregate, positions of the contributions dropped as non-finite); None if nothing usable was sent."""
    finite = [bool(torch.isfinite(x).all()) for x, _ in contributions]
    usable = [(x.float(), float(w)) for (x, w), ok in zip(contributions, finite) if ok]
    dropped = [i for i, ok in enumerate(finite) if not ok]
    if not usable:
        return None, dropped
    xs = torch.stack([x for x, _ in usable])
    ws = torch.tensor([w for _, w in usable], dtype=torch.float32)
    wn = ws / ws.sum()
    if mode == "mean" or len(usable) == 1:
        return (wn[:, None] * xs).sum(0), dropped
    norms = xs.norm(dim=1)
    tau = clip_factor * float(norms.median())
    clipped = xs * _clip_factors(norms, tau)[:, None]
    v = (wn[:, None] * clipped).sum(0)
    if mode == "clip":
        return v, dropped
    if mode != "centered_clip":
        raise ValueError(f"unknown aggregator {mode!r}")
    tau = clip_factor * float((xs - v).norm(dim=1).median())
    for _ in range(CENTERED_CLIP_ITERS):
        diff = xs - v
        v = v + (wn[:, None] * diff * _clip_factors(diff.norm(dim=1), tau)[:, None]).sum(0)
    return v, dropped
