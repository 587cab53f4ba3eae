"""Local training steps: inner optimizer, LR schedule on the global step, clipping, precision, evaluation."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .config import InnerConfig
from .model import lm_loss

logger = logging.getLogger(__name__)


def lr_at(step: int, cfg: InnerConfig) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr, indexed by the *global* step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def resolve_device(cfg: InnerConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("inner.device = 'cuda' but no CUDA device is available; use inner.device=\"cpu\"")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast_for(cfg: InnerConfig, device: torch.device):
    """bf16 autocast on CUDA (precision auto/bf16), bf16 on CPU only when asked; fp32 otherwise."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: InnerConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        # min_8bit_size=0: small tensors get 8-bit state too (bnb's default keeps < 4096 in fp32)
        return bnb.optim.AdamW8bit(params, eps=1e-8, min_8bit_size=0, **kwargs)
    return torch.optim.AdamW(params, eps=1e-8, **kwargs)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


@dataclass
class StepStats:
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    samples: int
    seconds: float


class InnerTrainer:
    """One optimizer step = grad_accum micro-batches; the LR is set from the global step given by the caller."""

    def __init__(self, model: torch.nn.Module, cfg: InnerConfig, device: torch.device | None = None):
        self.model, self.cfg = model, cfg
        self.device = device or resolve_device(cfg)
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        """New optimizer over the parameters that currently require grad (block cycling changes them)."""
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, self.cfg)

    def begin_round(self) -> None:
        """A round's training starts (a multi-rank peer's trainer sends θ to its ranks here: peer/ranks.py)."""

    def end_round(self) -> None:
        """A round's training ended (a multi-rank peer gathers its shards here)."""

    def step(self, next_batch: Callable[[], torch.Tensor], global_step: int) -> StepStats:
        t0 = time.perf_counter()
        lr = lr_at(global_step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.model.training:
            self.model.train()
        accum = self.cfg.grad_accum
        total_loss, tokens, samples = torch.zeros((), device=self.device), 0, 0
        for _ in range(accum):
            batch = next_batch().to(self.device, non_blocking=True)
            with autocast_for(self.cfg, self.device):
                loss = lm_loss(self.model, batch)
            (loss / accum if accum > 1 else loss).backward()
            total_loss += loss.detach()
            tokens += batch.shape[0] * (batch.shape[1] - 1)
            samples += batch.shape[0]
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, norm = torch.stack([total_loss, grad_norm.float()]).tolist()  # one host sync per step
        return StepStats(loss_sum / accum, lr, norm, tokens, samples, time.perf_counter() - t0)

    def _clip(self) -> torch.Tensor:
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor (peer/ranks.py)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], cfg: InnerConfig,
             device: torch.device | None = None) -> float:
    """Mean held-out cross-entropy (nats/token) over fixed batches; perplexity = exp of it."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    for batch in batches:
        with autocast_for(cfg, device):
            losses.append(lm_loss(model, batch.to(device)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
