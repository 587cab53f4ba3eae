#!/usr/bin/env python
"""Tokens/s of a peer on 2 ranks (torchrun, gloo, DDP) vs the same peer on 1 rank, on this machine.

Both run the peer's own training path: 1 rank is InnerTrainer on the peer's stream; 2 ranks are
rank 0's RankTrainer driving rank 1 (peer/ranks.py: command, step, gradient all-reduce, loss mean),
each rank on its rows of an N·B batch. Same model, data, optimizer and per-rank batch; --threads cores
are shared out evenly (1 rank: all of them; N ranks: threads / N each). No swarm: training only. On a
machine that other programs keep busy (see other_cores_busy, load_average_1min in the JSON) use
--threads 1: OpenMP threads that wait on each other on oversubscribed cores make any figure meaningless.

    python scripts/bench_multiproc.py                       # nano, seq 128, batch 8 per rank, 30 steps
    python scripts/bench_multiproc.py --preset tiny --steps 20 --optimizer adamw

Prints a table and writes bench/results/multiproc.json (`speedup` = median tokens/s of 2 ranks / of 1 rank).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402
import torch  # noqa: E402

from p2p_photon import data  # noqa: E402
from p2p_photon.config import load_config  # noqa: E402
from p2p_photon.distributed import RankGroup, world_from_env  # noqa: E402
from p2p_photon.inner import InnerTrainer  # noqa: E402
from p2p_photon.model import PRESETS, build_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano", choices=list(PRESETS), help="model preset (default nano)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step and rank (default 8)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--optimizer", default="adamw8bit", choices=["adamw8bit", "adamw"], help="inner optimizer")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, in ABBA order; medians (default 3)")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the multi-rank peer (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores shared out among the ranks")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "p2p_photon"), help="prepared data cache")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "multiproc.json"), help="JSON output path")
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)  # internal: one measured run
    return p.parse_args(argv)


def config(args):
    return load_config(None, [f"model.preset={json.dumps(args.preset)}", f"model.seq_len={args.seq_len}",
                              f"inner.batch_size={args.batch}", f"inner.optimizer={json.dumps(args.optimizer)}",
                              "data.max_corpus_mb=1", "data.vocab_size=1024", "data.num_silos=3",
                              f"data.cache_dir={json.dumps(args.cache_dir)}", "logging.progress_bar=false"])


# ----------------------------------------------------------------------------- one run (1 process, or each rank)


def worker(args) -> None:
    from p2p_photon.peer.ranks import PeerRanks, follow

    cfg = config(args)
    group = RankGroup(torch.device("cpu")) if world_from_env() > 1 else None
    if group is not None and not group.leader:
        follow(cfg, group)
        group.close()
        return
    prep = data.load_prepared(data.prepare(cfg.data, cfg.seed, progress=False))
    model = build_model(cfg.model.preset, prep.vocab_size, cfg.model.seq_len, cfg.seed)
    if group is None:
        stream = data.open_silo_stream(prep, [0], seq_len=cfg.model.seq_len, batch_size=args.batch, seed=0,
                                       stream_id=0)
        trainer = InnerTrainer(model, cfg.inner, torch.device("cpu"))
    else:
        stream, trainer = PeerRanks(group).parts(cfg, prep, model, group.device)
    trainer.begin_round()
    for i in range(args.warmup):
        trainer.step(stream.next_batch, i)
    tokens, t0 = 0, time.perf_counter()
    for i in range(args.steps):
        tokens += trainer.step(stream.next_batch, args.warmup + i).tokens
    seconds = time.perf_counter() - t0
    trainer.end_round()
    if group is not None:
        trainer.stop()
        group.close()
    Path(args.worker).write_text(json.dumps(dict(tokens=tokens, seconds=seconds, steps=args.steps)))


def measure(args, nproc: int, tmp: Path) -> dict:
    out = tmp / f"run-{nproc}.json"
    threads = max(1, args.threads // nproc)
    fwd = [a for a in sys.argv[1:] if not a.startswith("--out")]
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    before, load = benchlib.cpu_seconds(), os.getloadavg()[0]
    subprocess.run([*launcher, __file__, *fwd, "--worker", str(out)], env=env, check=True, cwd=ROOT)
    r = json.loads(out.read_text())
    r.update(nproc=nproc, threads_per_rank=threads, tokens_per_s=r["tokens"] / r["seconds"],
             other_cores_busy=round(benchlib.other_cores(before, benchlib.cpu_seconds()), 2),
             load_average_1min=[round(load, 1), round(os.getloadavg()[0], 1)])  # before, after
    return r


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    config(args)  # bad arguments fail before anything runs
    data.prepare(config(args).data, 0, progress=False)
    order = [(1, args.nproc) if r % 2 == 0 else (args.nproc, 1) for r in range(args.repeats)]  # ABBA: same load
    with tempfile.TemporaryDirectory(prefix="bench-multiproc-") as tmp:
        runs = [measure(args, n, Path(tmp)) for pair in order for n in pair]
    median = {n: statistics.median(r["tokens_per_s"] for r in runs if r["nproc"] == n) for n in (1, args.nproc)}
    result = dict(speedup=round(median[args.nproc] / median[1], 3),
                  median_tokens_per_s={str(n): round(v, 1) for n, v in median.items()}, runs=runs,
                  config=dict(preset=args.preset, seq_len=args.seq_len, batch_per_rank=args.batch,
                              steps=args.steps, warmup=args.warmup, optimizer=args.optimizer, parallel="ddp",
                              backend="gloo"),
                  machine=benchlib.machine_info(),
                  command="python scripts/bench_multiproc.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    print(f"{'ranks':>5} {'threads/rank':>12} {'tokens/s':>10} {'other cores busy':>17}")
    for r in runs:
        print(f"{r['nproc']:>5} {r['threads_per_rank']:>12} {r['tokens_per_s']:>10.0f} {r['other_cores_busy']:>17}")
    print(f"median tokens/s: 1 rank {median[1]:.0f}, {args.nproc} ranks {median[args.nproc]:.0f}; "
          f"speedup {result['speedup']}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
