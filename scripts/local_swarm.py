#!/usr/bin/env python
"""The main job: a local swarm on 127.0.0.1 — a bootstrap node hosting a run, N peers (each joining it
with its own non-IID silo of the embedded corpus as its private data directory) and the monitor —
training one global model for a few rounds.

    python scripts/local_swarm.py --peers 3 --rounds 8

Prints one line per round per peer, then the held-out perplexity of the final global model vs
the initial one, and stops everything cleanly (no orphan p2pd).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2p_photon import data  # noqa: E402
from p2p_photon.config import load_config  # noqa: E402
from p2p_photon.launch import LocalSwarm  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=3, help="number of peers (default 3)")
    p.add_argument("--rounds", type=int, default=8, help="federated rounds to run (default 8)")
    p.add_argument("--config", default=str(ROOT / "peers" / "cpu_peer.toml"), help="peer config (TOML)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "demo"), help="logs, checkpoints, summaries")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every peer (repeatable)")
    p.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # on loopback every peer reaches matchmaking within a second: a 2 s window is plenty
    overrides = [f"rounds.num_rounds={args.rounds}", f"data.num_silos={args.peers}", "logging.progress_bar=false",
                 "averaging.matchmaking_time=2.0", "logging.progress_interval=1.0", *args.overrides]
    cfg = load_config(args.config, overrides)
    workdir = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    silos, spec = create_demo_run(cfg, args.config, overrides, workdir)
    print(f"[demo] starting a bootstrap node hosting run {spec.run_id} and {args.peers} peers on 127.0.0.1, each "
          f"with its silo as its private data; logs in {workdir}", flush=True)
    port, log = free_port(), workdir / "monitor.jsonl"
    monitor = ["--run", str(spec.dir), "--monitor", "--monitor-http", f"127.0.0.1:{port}", "--monitor-log", str(log)]
    with LocalSwarm(workdir, config=args.config, overrides=overrides, capture=False) as swarm:
        maddrs = swarm.start_bootstrap(extra=monitor)
        print(f"[demo] bootstrap: --initial-peers {' '.join(maddrs)}", flush=True)
        print(f"[demo] live dashboard: http://127.0.0.1:{port}/  (metrics log {log})", flush=True)
        peers = [swarm.start_peer(i, data=str(silos[i])) for i in range(args.peers)]
        codes = swarm.wait(peers, timeout=args.timeout)
    plot_swarm(log, workdir / "swarm.png")
    return report(swarm, [p.name for p in peers], codes)


def create_demo_run(cfg, config: str, overrides: list[str], workdir: Path):
    """Whoever creates the run splits the embedded corpus into non-IID silos (each demo peer's stand-in for
    private data) and writes the run's spec: tokenizer trained on the silos, held-out documents as the
    public eval set (what `p2p-photon run new --train-tokenizer-on SILOS --eval HELDOUT` does)."""
    from p2p_photon.runspec import create_run

    print(f"[demo] splitting the default corpus ({cfg.data.corpus}) into {cfg.data.num_silos} non-IID silos",
          flush=True)
    silos, heldout = data.write_silo_dirs(cfg.data, cfg.seed, workdir / "corpus")
    print("[demo] creating the run: tokenizer trained on the silos, held-out documents as the eval set", flush=True)
    spec = create_run(load_config(config, overrides), workdir / "run", train_on=str(workdir / "corpus" / "silos"),
                      eval_path=str(heldout))
    return silos, spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot_swarm(log: Path, out: Path) -> None:
    from p2p_photon.monitor import MonitorError, plot_log

    try:
        plot_log(str(log), str(out))
        print(f"[demo] swarm plot (loss vs tokens, tokens/s, peers alive): {out}")
    except MonitorError as e:
        print(f"[demo] no plot: {e}")


def report(swarm: LocalSwarm, names: list[str], codes: list[int]) -> int:
    if any(codes):
        print(f"[demo] some peers failed: exit codes {codes}", file=sys.stderr)
        return 1
    sums = [swarm.summary(n) for n in names]
    hashes = {s["theta"] for s in sums}
    s = sums[0]
    print(f"[demo] {s['rounds']} rounds, global step {s['global_step']}, θ identical on all peers: "
          f"{'yes' if len(hashes) == 1 else 'NO'} ({', '.join(sorted(hashes))})")
    print(f"[demo] held-out perplexity of the global model: {s['initial_ppl']:.1f} -> {s['final_ppl']:.1f}")
    print(f"[demo] bytes sent per peer for averaging: {s['bytes_sent'] / 1e6:.1f} MB; summaries: "
          f"{json.dumps([str(swarm.summary_path(n)) for n in names])}")
    return 0 if s["final_ppl"] < s["initial_ppl"] and len(hashes) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
