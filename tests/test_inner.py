import math

import pytest
import torch

from p2p_photon.config import InnerConfig
from p2p_photon.inner import InnerTrainer, evaluate, lr_at, optimizer_state_bytes
from p2p_photon.model import build_model


def test_lr_schedule_matches_hand_computed_values():
    cfg = InnerConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(10_000, cfg) == pytest.approx(0.1)


def _batch(seed, vocab=256, b=4, t=33):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


@pytest.mark.parametrize("opt", ["adamw8bit", "adamw"])
def test_inner_steps_reduce_loss_on_a_fixed_batch(opt):
    model = build_model("nano", 256, 32, seed=0)
    cfg = InnerConfig(optimizer=opt, lr=3e-3, warmup_steps=0, total_steps=100)
    trainer = InnerTrainer(model, cfg, torch.device("cpu"))
    batch = _batch(0)
    before = evaluate(model, [batch], cfg)
    for step in range(30):
        st = trainer.step(lambda: batch, step)
        assert math.isfinite(st.loss) and st.tokens == 4 * 32 and st.samples == 4
    assert evaluate(model, [batch], cfg) < before - 0.5


def test_eight_bit_state_is_about_a_quarter_of_fp32():
    sizes = {}
    for opt in ("adamw8bit", "adamw"):
        model = build_model("nano", 512, 32, seed=0)
        trainer = InnerTrainer(model, InnerConfig(optimizer=opt, warmup_steps=0), torch.device("cpu"))
        trainer.step(lambda: _batch(1, vocab=512), 0)
        sizes[opt] = optimizer_state_bytes(trainer.optimizer)
    ratio = sizes["adamw8bit"] / sizes["adamw"]
    assert 0.2 < ratio < 0.3, sizes


def test_grad_accumulation_matches_one_big_batch():
    big = _batch(2, b=8)
    halves = iter([big[:4], big[4:]])
    grads = []
    for accum, source in ((1, lambda: big), (2, lambda: next(halves))):
        model = build_model("nano", 256, 32, seed=0)
        cfg = InnerConfig(optimizer="adamw", lr=1e-3, warmup_steps=0, grad_accum=accum, grad_clip=0.0)
        trainer = InnerTrainer(model, cfg, torch.device("cpu"))
        trainer.optimizer.step = lambda: None  # keep the gradients: compare them before the update
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        trainer.step(source, 0)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_gradient_clipping_bounds_the_update_norm():
    model = build_model("nano", 256, 32, seed=0)
    cfg = InnerConfig(optimizer="adamw", grad_clip=1e-3, warmup_steps=0)
    trainer = InnerTrainer(model, cfg, torch.device("cpu"))
    trainer.optimizer.step = lambda: None
    trainer.optimizer.zero_grad = lambda set_to_none=True: None
    st = trainer.step(lambda: _batch(3), 0)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert st.grad_norm > 1e-3 and clipped == pytest.approx(1e-3, rel=1e-3)
