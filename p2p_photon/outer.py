"""Pseudo-gradients and the outer optimizer.

    Δ = θ_global − θ_local                     (per peer, after its local round)
    photon:  θ ← θ − lr·Δ̄                      (FedAvg: lr 1.0, no momentum)
    diloco:  m ← μ·m + Δ̄;  θ ← θ − lr·(Δ̄ + μ·m)  (Nesterov, lr 0.7, μ 0.9)

Written out by hand (not torch.optim) so every peer performs the same float operations in
the same order: identical inputs give bit-identical θ and momentum on every peer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import OuterConfig


@torch.no_grad()
def pseudo_gradient(global_params: Sequence[torch.Tensor], model: torch.nn.Module) -> list[torch.Tensor]:
    return [g - p.detach().to(g.device, g.dtype) for g, p in zip(global_params, model.parameters())]


@torch.no_grad()
def load_into_model(global_params: Sequence[torch.Tensor], model: torch.nn.Module) -> None:
    """θ_local ← θ_global (start of every round)."""
    for g, p in zip(global_params, model.parameters()):
        p.copy_(g)


class OuterOptimizer:
    def __init__(self, params: Sequence[torch.Tensor], cfg: OuterConfig):
        hp = cfg.resolved()
        self.params = list(params)
        self.lr, self.momentum, self.nesterov = float(hp["lr"]), float(hp["momentum"]), bool(hp["nesterov"])
        self.buffers = [torch.zeros_like(p) for p in self.params] if self.momentum > 0 else []

    @torch.no_grad()
    def step(self, deltas: Sequence[torch.Tensor], mask: Sequence[bool] | None = None) -> None:
        """Apply the averaged pseudo-gradient; mask[i] False leaves tensor i (and its momentum) untouched."""
        for i, (p, d) in enumerate(zip(self.params, deltas)):
            if mask is not None and not mask[i]:
                continue
            update = d
            if self.momentum > 0:
                m = self.buffers[i]
                m.mul_(self.momentum).add_(d)
                update = d + self.momentum * m if self.nesterov else m
            p.sub_(update, alpha=self.lr) if self.lr != 1.0 else p.sub_(update)

    def state_tensors(self) -> list[torch.Tensor]:
        return list(self.buffers)

    @torch.no_grad()
    def load_state_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.buffers):
            raise ValueError(f"outer optimizer state has {len(tensors)} tensors, expected {len(self.buffers)}")
        for b, t in zip(self.buffers, tensors):
            b.copy_(t)
