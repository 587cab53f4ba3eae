#!/usr/bin/env python
"""Tokens/s and peak memory of the inner training step on a GPU: presets x optimizers, bf16, 1 process and ranks.

The peer's own training step (InnerTrainer: autocast, clipping, the optimizer of `inner.optimizer`) on
random tokens of the preset's vocabulary (throughput does not depend on the text), after --warmup untimed
steps. Each run is its own process, so peak memory is that run's alone. Ranks: the same step under
torchrun with the peer's DDP or FSDP2 wrapping (p2p_photon.distributed; NCCL on CUDA, gloo on CPU) on
--nproc ranks, one device each: on a machine with one GPU that is 1 rank, which checks the CUDA path of
the wrappers and their overhead, not a speed-up. A combination that fails (e.g. FSDP2 with AdamW8bit) is
recorded with its one-line error instead of failing the whole benchmark.

    python scripts/bench_gpu.py                                  # CUDA: 125m and 350m, bf16, both optimizers
    python scripts/bench_gpu.py --device cpu --presets nano --seq-len 32 --batch 2 --steps 2   # a smoke run

Prints a table and writes bench/results/gpu.json (device name, versions, one row per run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from p2p_photon.config import InnerConfig  # noqa: E402
from p2p_photon.model import PRESETS, build_model, count_params  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to train (default cuda)")
    p.add_argument("--presets", default="125m,350m", help="model presets, comma-separated (default 125m,350m)")
    p.add_argument("--optimizers", default="adamw8bit,adamw", help="inner optimizers (default both)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast precision (bf16)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step and rank (default 16)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--ranks", default="ddp,fsdp2", help="wrappings also run under torchrun ('' = none)")
    p.add_argument("--nproc", type=int, default=0, help="ranks under torchrun (default: one per GPU, 1 on CPU)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"), help="JSON output path")
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)  # internal: one measured run
    args = p.parse_args(argv)
    for name in args.presets.split(","):
        if name not in PRESETS:
            p.error(f"unknown preset {name!r} in --presets; choose from {', '.join(PRESETS)}")
    for name in args.optimizers.split(","):
        if name not in ("adamw8bit", "adamw"):
            p.error(f"unknown optimizer {name!r} in --optimizers; choose adamw8bit or adamw")
    if args.device == "cuda" and not args.worker and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; run on a GPU machine or pass --device cpu")
    return args


# ----------------------------------------------------------------------------- one run (1 process, or each rank)


def worker(args, spec: dict) -> dict:
    from p2p_photon.inner import InnerTrainer, optimizer_state_bytes

    group = None
    device = torch.device(args.device)
    if spec["parallel"] != "none":
        from p2p_photon.distributed import RankGroup, wrap_ddp, wrap_fsdp2

        group = RankGroup(device)
        device = group.device
    elif device.type == "cuda":
        torch.cuda.set_device(0)
    vocab = PRESETS[spec["preset"]].reference_vocab
    model = build_model(spec["preset"], vocab, args.seq_len, seed=0, device=device)
    params = count_params(model)
    if spec["parallel"] == "ddp":
        model = wrap_ddp(model, group)
    elif spec["parallel"] == "fsdp2":
        model = wrap_fsdp2(model, group)
    cfg = InnerConfig(optimizer=spec["optimizer"], precision=args.precision, batch_size=args.batch,
                      warmup_steps=0, device=device.type)
    trainer = InnerTrainer(model, cfg, device)
    gen = torch.Generator(device=device).manual_seed(1 + (group.rank if group else 0))

    def batch():
        return torch.randint(0, vocab, (args.batch, args.seq_len + 1), device=device, generator=gen)

    for i in range(args.warmup):
        trainer.step(batch, i)
    sync(device)
    tokens, losses, t0 = 0, [], time.perf_counter()
    for i in range(args.steps):
        s = trainer.step(batch, args.warmup + i)
        tokens, losses = tokens + s.tokens, losses + [s.loss]
    sync(device)
    seconds = time.perf_counter() - t0
    world = group.world if group else 1
    out = dict(spec, params=params, tokens_per_s=tokens * world / seconds, step_s=seconds / args.steps,
               loss_first=losses[0], loss_last=losses[-1], optimizer_state_mb=optimizer_state_bytes(
                   trainer.optimizer) / 2**20, peak_mb=peak_mb(device), ranks=world)
    out["model_tflops"] = 6 * params * out["tokens_per_s"] / 1e12  # dense 6·N·tokens, attention left out
    if group is not None:
        del trainer, model
        group.close()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS


# ----------------------------------------------------------------------------- the parent


def measure(args, spec: dict, tmp: Path) -> dict:
    out = tmp / f"{spec['preset']}-{spec['optimizer']}-{spec['parallel']}.json"
    fwd = [f"--device={args.device}", f"--precision={args.precision}", f"--seq-len={args.seq_len}",
           f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    launcher = [sys.executable]
    if spec["parallel"] != "none":
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1"]
    env = dict(os.environ, BENCH_GPU_SPEC=json.dumps(spec),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([*launcher, __file__, *fwd, "--worker", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        text = re.sub(r"(?m)^\[rank\d+\]:\s*", "", proc.stderr + proc.stdout)
        lines = [ln for ln in text.splitlines() if re.match(r"[\w.]*(Error|Exception)\b", ln)
                 and "ChildFailedError" not in ln]
        return dict(spec, error=(lines[-1] if lines else f"exit code {proc.returncode}").strip()[:300])
    return json.loads(out.read_text())


def versions() -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    for name in ("bitsandbytes", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 (recorded, not fatal: the runs say what failed)
            info[name] = f"not importable: {e}"
    return info


def device_name(args) -> str:
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s))"
    return platform.processor() or platform.machine()


def specs(args) -> list[dict]:
    runs = [dict(preset=p, optimizer=o, parallel="none")
            for p in args.presets.split(",") for o in args.optimizers.split(",")]
    biggest = args.presets.split(",")[-1]
    for wrap in filter(None, args.ranks.split(",")):
        runs += [dict(preset=biggest, optimizer=o, parallel=wrap) for o in args.optimizers.split(",")]
    return runs


def print_table(rows: list[dict]) -> None:
    print(f"{'preset':>6} {'optimizer':>9} {'ranks':>9} {'tokens/s':>10} {'model TFLOP/s':>13} "
          f"{'peak MB':>9} {'opt state MB':>12}  loss first→last")
    for r in rows:
        where = "1 proc" if r["parallel"] == "none" else f"{r['parallel']}×{r.get('ranks', '?')}"
        if "error" in r:
            print(f"{r['preset']:>6} {r['optimizer']:>9} {where:>9}  failed: {r['error']}")
            continue
        print(f"{r['preset']:>6} {r['optimizer']:>9} {where:>9} {r['tokens_per_s']:>10.0f} "
              f"{r['model_tflops']:>13.1f} {r['peak_mb']:>9.0f} {r['optimizer_state_mb']:>12.1f}  "
              f"{r['loss_first']:.3f}→{r['loss_last']:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(args, json.loads(os.environ["BENCH_GPU_SPEC"]))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.worker).write_text(json.dumps(result))
        return 0
    args.nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for spec in specs(args):
            print(f"[bench_gpu] {spec['preset']} {spec['optimizer']} {spec['parallel']} ...", flush=True)
            rows.append(measure(args, spec, Path(tmp)))
    print_table(rows)
    result = dict(device=device_name(args), precision=args.precision, seq_len=args.seq_len,
                  batch_per_rank=args.batch, steps=args.steps, warmup=args.warmup, data="random tokens",
                  versions=versions(), runs=rows,
                  command="python scripts/bench_gpu.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in rows if r["parallel"] == "none") else 1


if __name__ == "__main__":
    sys.exit(main())
