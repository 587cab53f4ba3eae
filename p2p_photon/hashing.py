"""Hashes as evidence: the hash of θ that peers publish after every round and verify on download."""

from __future__ import annotations

import hashlib

import torch


def theta_hash(tensors) -> str:
    """sha256 over the raw bytes of a sequence of tensors (or a module's parameters), in order."""
    if isinstance(tensors, torch.nn.Module):
        tensors = [p.detach() for p in tensors.parameters()]
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:16]
