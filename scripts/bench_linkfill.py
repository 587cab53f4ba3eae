#!/usr/bin/env python
"""How much of a link a round's all-reduce fills (needs root): N averagers, each in its own network
namespace with a tbf-shaped symmetric link of R Mbit/s (scripts/netemu.py), average a vector of P
parameters; fill = bytes the peer sent ÷ all-reduce time (matchmaking excluded, as in
scripts/bench_allreduce.py) ÷ link rate. Target: >= 70 % (issue 15).

    python scripts/bench_linkfill.py                                  # 10, 100 and 1000 Mbit, 2 peers, none and int8
    python scripts/bench_linkfill.py --quick                          # 100 Mbit, 1M params, 1 round (smoke)
    python scripts/bench_linkfill.py --rates 100 --params 2e7 --peers 3 --codecs none

Each averager runs in a worker process (this script with --worker) inside its namespace: real DHTs,
real SwarmAverager, real p2pd, over veths shaped by tbf. Prints a table and writes
bench/results/linkfill.json (a --quick run: its --out, default in /tmp).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import netemu  # noqa: E402
from benchlib import machine_info  # noqa: E402

from p2p_photon.files import write_json_atomic  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=None, help="link rates, Mbit/s (default 10 100 1000)")
    p.add_argument("--params", type=float, default=None,
                   help="parameters averaged (default: 2M up to 10 Mbit, 5M up to 100 Mbit, 25M above: 1-6 s of fp32 per round)")
    p.add_argument("--peers", type=int, default=2, help="averagers, one per namespace (default 2)")
    p.add_argument("--codecs", nargs="+", default=["none", "int8"], help="averaging.compression values")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--quick", action="store_true", help="smoke: 100 Mbit, 1M params, none, 1 round")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/linkfill.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.params, args.codecs, args.rounds = args.rates or [100.0], args.params or 1e6, ["none"], 1
        args.out = args.out or str(Path(tempfile.gettempdir()) / "linkfill-quick.json")
    args.rates = args.rates or [10.0, 100.0, 1000.0]
    args.out = args.out or str(ROOT / "bench" / "results" / "linkfill.json")
    if args.peers < 2 or args.rounds < 1:
        p.error("--peers must be >= 2 and --rounds >= 1")
    return args


# ----------------------------------------------------------------------------- one averager (in a namespace)


def worker(spec: dict) -> None:
    """One peer: DHT (the first one hosts it), SwarmAverager, warm-up + timed rounds; writes its timings."""
    import torch
    from bench_allreduce import StageClock, make_deltas

    from p2p_photon.averaging import SwarmAverager
    from p2p_photon.config import AveragingConfig, DHTConfig
    from p2p_photon.network import shutdown_dht, start_dht, visible_maddrs

    torch.set_num_threads(1)
    work, i = Path(spec["dir"]), spec["index"]
    boot = work / "boot.json"
    initial = ()
    if i > 0:
        while not boot.exists():
            time.sleep(0.1)
        initial = tuple(json.loads(boot.read_text()))
    dht = start_dht(DHTConfig(host_maddrs=(f"/ip4/{spec['addr']}/tcp/0",), initial_peers=initial,
                              startup_timeout=60.0), reaper=False)
    try:
        if i == 0:
            write_json_atomic(boot, [m for m in visible_maddrs(dht) if "127.0.0.1" not in m])
        shapes, deltas = make_deltas(spec["params"], spec["peers"], seed=7)
        cfg = AveragingConfig(matchmaking_time=2.0, allreduce_timeout=300.0, min_group_size=spec["peers"],
                              target_group_size=spec["peers"], compression=spec["codec"])
        avg = SwarmAverager(dht, shapes, prefix=spec["prefix"], cfg=cfg)
        clock = StageClock(avg._averager)
        rows = []
        try:
            for r in range(1 + spec["rounds"]):
                t0 = time.perf_counter()
                res = avg.average(deltas[i], round_no=r, weight=1.0, meta=dict(fingerprint="fill"), timeout=60)
                rows.append(dict(round=r, total_s=time.perf_counter() - t0,
                                 matchmaking_s=clock.t_allreduce - clock.t_call,
                                 allreduce_s=clock.t_done - clock.t_allreduce, bytes_sent=res.bytes_sent,
                                 bytes_received=res.bytes_received, group=res.group_size))
        finally:
            avg.shutdown()
        write_json_atomic(work / f"worker{i}.json", rows[1:])
    finally:
        shutdown_dht(dht)


# ----------------------------------------------------------------------------- the cases


def run_case(rate: float, params: int, codec: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="linkfill-") as tmp, netemu.Internet() as net:
        hosts = [net.public(f"n{i}", up_mbit=rate) for i in range(args.peers)]
        prefix = f"fill-{uuid.uuid4().hex[:8]}"
        procs = []
        for i, h in enumerate(hosts):
            spec = dict(dir=tmp, index=i, addr=h.addr, peers=args.peers, params=params, codec=codec,
                        rounds=args.rounds, prefix=prefix)
            procs.append(h.popen([sys.executable, __file__, "--worker", "--spec", json.dumps(spec)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + 120 + args.rounds * (30 + params * 8 * 4 / (rate * 1e6) * 4)
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate()[0])
        failed = [(i, o[-2000:]) for i, (p, o) in enumerate(zip(procs, outs)) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"worker {failed[0][0]} failed: {failed[0][1]}")
        rows = [json.loads((Path(tmp) / f"worker{i}.json").read_text()) for i in range(args.peers)]
    flat = [r for peer in rows for r in peer]
    bytes_sent = statistics.median(r["bytes_sent"] for r in flat)
    allreduce = statistics.median(r["allreduce_s"] for r in flat)
    link = rate * 1e6 / 8
    return dict(rate_mbit=rate, params=params, codec=codec, peers=args.peers, rounds=args.rounds,
                bytes_sent_per_peer=bytes_sent, allreduce_s=allreduce,
                matchmaking_s=statistics.median(r["matchmaking_s"] for r in flat),
                ideal_s=bytes_sent / link, fill=bytes_sent / allreduce / link,
                goodput_mbit=bytes_sent * 8 / allreduce / 1e6, per_peer=rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.spec))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: workers stopped, namespaces deleted
    why = netemu.why_unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    netemu.cleanup_stale()
    cases = []
    for rate in args.rates:
        params = int(args.params or (2e6 if rate <= 10 else 5e6 if rate <= 100 else 25e6))
        for codec in args.codecs:
            print(f"[linkfill] {args.peers} peers on {rate:g} Mbit/s links, {params / 1e6:g}M params, {codec} ...",
                  flush=True)
            cases.append(run_case(rate, params, codec, args))
    print(f"{'Mbit/s':>7} {'params':>7} {'codec':>6} {'MB sent':>8} {'ideal s':>8} {'allred s':>9} "
          f"{'Mbit/s got':>10} {'fill':>6}")
    for c in cases:
        print(f"{c['rate_mbit']:>7g} {c['params'] / 1e6:>6g}M {c['codec']:>6} {c['bytes_sent_per_peer'] / 1e6:>8.1f} "
              f"{c['ideal_s']:>8.2f} {c['allreduce_s']:>9.2f} {c['goodput_mbit']:>10.1f} {c['fill']:>6.1%}")
    result = dict(command="python scripts/bench_linkfill.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                  machine=machine_info(), cases=cases, target_fill=0.7,
                  note="symmetric tbf links (burst 10 ms of traffic, 200 ms queue), no added latency; fill = bytes the "
                       "peer sent in the all-reduce / all-reduce time (matchmaking excluded) / link rate",
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"[linkfill] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
