#!/usr/bin/env python
"""Overhead of our local-training path (InnerTrainer.step) vs a bare PyTorch training loop.

Same model class and init, same pre-generated batches, same optimizer (bitsandbytes AdamW8bit by
default) and the same warmup + cosine LR schedule; the two variants are timed alternately in one
process (ours, bare | bare, ours | ..., every step on CPU) after a warmup of each, and the medians
of the repeats are compared. Also records the optimizer-state bytes of AdamW8bit vs torch AdamW
for the same model.

    python scripts/bench_overhead.py                      # nano, vocab 8192, seq 128, batch 8, 7 x 20 steps
    python scripts/bench_overhead.py --optimizer adamw --repeats 9 --steps 30

Prints a table and writes bench/results/overhead.json (`ratio` = ours / bare, in steps/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402
import torch  # noqa: E402

from p2p_photon.config import InnerConfig  # noqa: E402
from p2p_photon.inner import InnerTrainer, make_optimizer, optimizer_state_bytes, resolve_device  # noqa: E402
from p2p_photon.model import PRESETS, build_model, count_params, lm_loss  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano", choices=list(PRESETS), help="model preset (default nano)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default 20)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of each variant (default 7)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each variant first (default 5)")
    p.add_argument("--optimizer", default="adamw8bit", choices=["adamw8bit", "adamw"], help="inner optimizer")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (default: all cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--interleave", default="auto", choices=["auto", "step", "repeat"],
                   help="alternate every step or every repeat (auto: step on CPU, repeat on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="model init and batch seed")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of each variant")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.json"),
                   help="JSON output path")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the two loops


def run_ours(trainer: InnerTrainer, batches: list[torch.Tensor], start_step: int) -> None:
    """Our path exactly as peer.py drives it: one InnerTrainer.step per global step."""
    it = iter(batches)
    for i in range(len(batches)):
        trainer.step(lambda: next(it), start_step + i)


def bare_lr(step: int, cfg: InnerConfig) -> float:
    """nanoGPT's get_lr: linear warmup, then cosine down to min_lr (same numbers as ours)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    ratio = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)


def run_bare(model, opt, batches: list[torch.Tensor], start_step: int, cfg: InnerConfig, device) -> None:
    """A minimal nanoGPT-style loop: set lr, forward, cross-entropy, backward, clip, step, zero_grad.
    (model.train() is called once at setup, as nanoGPT does outside its loop.)"""
    cuda = device.type == "cuda"
    ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    for i, batch in enumerate(batches):
        lr = bare_lr(start_step + i, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = batch.to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with ctx:  # bf16 autocast on CUDA, as ours does with precision 'auto'
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def bare_optimizer(model, cfg: InnerConfig) -> torch.optim.Optimizer:
    """The same optimizer and hyper-parameters as make_optimizer, constructed inline."""
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, eps=1e-8)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), min_8bit_size=0, **kw)
    return torch.optim.AdamW(model.parameters(), **kw)


# ----------------------------------------------------------------------------- measurement


def make_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """n random (B, T+1) token windows from a fixed generator, generated before any timing."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=g) for _ in range(n)]


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of fn(), synchronized on CUDA so queued kernels are counted."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def alternate(variants: dict[str, Callable[[list, int], None]], batches, args,
              device) -> dict[str, list[float]]:
    """Warm up each variant, then time them alternately; steps/s of each variant per repeat.

    interleave 'step': ours and bare take turns every step (ours, bare | bare, ours | ...) and each
    variant's step times are summed per repeat, so both see the same machine load even when other
    programs come and go within seconds. 'repeat': whole repeats take turns (same ABBA order);
    use it on CUDA, where a synchronize after every step would hide ours' per-step syncs."""
    names, step = list(variants), 0
    for fn in variants.values():
        fn(batches[: args.warmup], step)
    step += args.warmup
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats):
        if args.interleave == "step":
            spent = dict.fromkeys(names, 0.0)
            for i, b in enumerate(batches):
                for name in names if i % 2 == 0 else names[::-1]:
                    spent[name] += timed(lambda name=name, b=b, s=step + i: variants[name]([b], s), device)
        else:
            spent = {name: timed(lambda name=name, s=step: variants[name](batches, s), device)
                     for name in (names if r % 2 == 0 else names[::-1])}
        step += len(batches)
        for name in names:
            rates[name].append(len(batches) / spent[name])
        now = "  ".join(f"{n} {v[-1]:.2f} steps/s" for n, v in rates.items())
        print(f"  repeat {r + 1}/{args.repeats}: {now}", flush=True)
    return rates


def state_bytes(args, cfg: InnerConfig, device) -> dict[str, int]:
    """Optimizer-state bytes after one step of AdamW8bit and of torch AdamW on fresh copies of the model."""
    batch = make_batches(1, args.batch, args.seq_len, args.vocab, args.seed + 1)[0].to(device)
    out = {}
    for name in ("adamw8bit", "adamw"):
        model = build_model(args.preset, args.vocab, args.seq_len, args.seed, device)
        opt = make_optimizer(model.parameters(), replace(cfg, optimizer=name))
        lm_loss(model, batch).backward()
        opt.step()
        out[name] = optimizer_state_bytes(opt)
        del model, opt
    return out


def profile(variants, batches, device) -> None:
    """torch.profiler table (top ops by self CPU time) for a few steps of each variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in variants.items():
        with tprofile(activities=acts) as prof:
            fn(batches[:5], 10_000)
        print(f"\n--- profile: {name} (5 steps) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ----------------------------------------------------------------------------- report


def machine_info(threads: int, device: torch.device) -> dict:
    import bitsandbytes as bnb

    info = dict(benchlib.machine_info(), bitsandbytes=bnb.__version__, threads=threads, device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(rates: dict[str, list[float]], tokens_per_step: int, states: dict[str, int],
                ratio: float) -> None:
    print(f"\n{'variant':<8} {'median steps/s':>15} {'min':>8} {'max':>8} {'tokens/s':>10}")
    for name, v in rates.items():
        med = statistics.median(v)
        print(f"{name:<8} {med:>15.3f} {min(v):>8.3f} {max(v):>8.3f} {med * tokens_per_step:>10.0f}")
    print(f"ratio ours/bare (steps/s, medians): {ratio:.3f}   (target >= 0.97)")
    print(f"optimizer state: AdamW8bit {states['adamw8bit'] / 2**20:.2f} MiB, torch AdamW "
          f"{states['adamw'] / 2**20:.2f} MiB, ratio {states['adamw8bit'] / states['adamw']:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = InnerConfig(optimizer=args.optimizer, batch_size=args.batch, device=args.device)
    device = resolve_device(cfg)
    load_before = os.getloadavg()
    cpu_batches = make_batches(args.steps, args.batch, args.seq_len, args.vocab, args.seed)
    batches = [b.to(device) for b in cpu_batches]
    ours = InnerTrainer(build_model(args.preset, args.vocab, args.seq_len, args.seed, device), cfg, device)
    bare_model = build_model(args.preset, args.vocab, args.seq_len, args.seed, device).train()
    if args.interleave == "auto":
        args.interleave = "repeat" if device.type == "cuda" else "step"
    bare_opt = bare_optimizer(bare_model, cfg)
    variants = {
        "ours": lambda b, s: run_ours(ours, b, s),
        "bare": lambda b, s: run_bare(bare_model, bare_opt, b, s, cfg, device),
    }
    n_params = count_params(bare_model)
    print(f"[overhead] {args.preset} ({n_params / 1e6:.2f}M params), "
          f"batch {args.batch} x seq {args.seq_len}, "
          f"{args.optimizer}, {args.threads} threads on {device}; {args.repeats} x {args.steps} steps, "
          f"load avg {load_before[0]:.2f}", flush=True)
    cpu0 = benchlib.cpu_seconds()
    rates = alternate(variants, batches, args, device)
    others = benchlib.other_cores(cpu0, benchlib.cpu_seconds())
    if args.profile:
        profile(variants, batches, device)
    states = state_bytes(args, cfg, device)
    result = summarize(args, rates, states, n_params, device, load_before)
    result["machine"]["other_busy_cores_during_timing"] = others
    print_table(rates, args.batch * args.seq_len, states, result["ratio"])
    print(f"other programs kept {others:.2f} of {os.cpu_count()} cores busy while timing"
          + ("; the figures are noisy: rerun on a quieter machine (or with --threads 1)"
             if others > 0.25 else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[overhead] wrote {out}")
    return 0


def summarize(args, rates, states, n_params, device, load_before) -> dict:
    ours, bare = statistics.median(rates["ours"]), statistics.median(rates["bare"])
    pairwise = [o / b for o, b in zip(rates["ours"], rates["bare"], strict=True)]
    return dict(
        ratio=ours / bare,
        ours_steps_per_s=ours,
        bare_steps_per_s=bare,
        ratio_pairwise_median=statistics.median(pairwise),
        ours_tokens_per_s=ours * args.batch * args.seq_len,
        bare_tokens_per_s=bare * args.batch * args.seq_len,
        optimizer_state_bytes_8bit=states["adamw8bit"],
        optimizer_state_bytes_fp32=states["adamw"],
        optimizer_state_ratio=states["adamw8bit"] / states["adamw"],
        repeats=dict(ours_steps_per_s=rates["ours"], bare_steps_per_s=rates["bare"], ratio=pairwise),
        config=dict(preset=args.preset, params=n_params, vocab=args.vocab, seq_len=args.seq_len,
                    batch=args.batch, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                    optimizer=args.optimizer,
                    seed=args.seed, interleave=args.interleave,
                    order="alternated ABBA (ours, bare | bare, ours | ...); medians of repeats"),
        machine=dict(machine_info(args.threads, device), loadavg_before=list(load_before),
                     loadavg_after=list(os.getloadavg())),
        command=shlex.join([Path(sys.executable).name, *sys.argv]),
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


if __name__ == "__main__":
    sys.exit(main())
