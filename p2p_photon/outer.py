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

from .config import ConfigError, OuterConfig


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
    def step(self, deltas: Sequence[torch.Tensor | None]) -> None:
        """Apply the averaged pseudo-gradient; a None leaves that tensor (and its momentum) untouched
        (FedCyBGD: the groups not trained this round)."""
        for i, (p, d) in enumerate(zip(self.params, deltas)):
            if d is None:
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


# ----------------------------------------------------------------------------- FedCyBGD block cycling


def block_groups(names: Sequence[str], num_groups: int) -> list[int]:
    """Group index of every parameter for FedCyBGD with `num_groups` >= 3 groups: group 0 is
    everything before the first transformer block (token embeddings), the last group everything
    after the last block (final norm, LM head), and the blocks (`...layers.<i>....`) are split into
    num_groups - 2 contiguous groups in between. Embeddings and head are large in small models,
    so they get their own rounds rather than riding along with a block."""
    layer_of = []
    for n in names:
        parts = n.split(".")
        idx = next((int(parts[k + 1]) for k in range(len(parts) - 1)
                    if parts[k] == "layers" and parts[k + 1].isdigit()), None)
        layer_of.append(idx)
    layers = sorted({i for i in layer_of if i is not None})
    if not layers:
        raise ConfigError("config: outer.block_cycle: block cycling needs a model with transformer blocks named '...layers.<i>...'")
    inner = num_groups - 2
    if inner < 1 or inner > len(layers):
        raise ConfigError(f"config: outer.block_cycle = {num_groups}: this model has {len(layers)} transformer blocks, "
                         f"so use 3..{len(layers) + 2} (embeddings, blocks split into groups, head)")
    group_of_layer = {layer: 1 + (k * inner) // len(layers) for k, layer in enumerate(layers)}
    groups, seen_block = [], False
    for idx in layer_of:
        if idx is None:
            groups.append(num_groups - 1 if seen_block else 0)
        else:
            seen_block = True
            groups.append(group_of_layer[idx])
    return groups


def active_group(round_no: int, num_groups: int, order: str, seed: int) -> int:
    """The group trained in `round_no`; the same on every peer (a function of the round only)."""
    pos = round_no % num_groups
    if order == "cyclic":
        return pos
    if order == "descending":
        return num_groups - 1 - pos
    import random

    perm = list(range(num_groups))
    random.Random(f"{seed}-{round_no // num_groups}").shuffle(perm)
    return perm[pos]
