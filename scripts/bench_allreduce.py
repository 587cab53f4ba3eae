#!/usr/bin/env python
"""All-reduce throughput of our averaging path (SwarmAverager.average) on 127.0.0.1 vs raw loopback TCP.

Real hivemind DHTs and averagers in this process (built from the main thread, one thread per
peer for the concurrent `average` calls, like tests/test_averaging.py), for several parameter
counts and group sizes. Each round is split into matchmaking and all-reduce by watching the
stage of hivemind's StepControl (its public `step(wait=False)` API), so the all-reduce time
excludes matchmaking. Raw TCP throughput (a socket server/client pair on 127.0.0.1) is measured
in the same run, before and after the all-reduces.

    python scripts/bench_allreduce.py                         # 1M, 5M, 20M, 50M params x 2, 3, 4 peers
    python scripts/bench_allreduce.py --quick                 # 1M, 5M x 2, 3 peers (smoke test)
    python scripts/bench_allreduce.py --sizes 1e6 2e7 --peers 2 4 --rounds 5

Prints a table and writes bench/results/allreduce.json. MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from benchlib import cpu_seconds, machine_info, other_cores, reap_tagged_p2pd  # noqa: E402
from hivemind.averaging.control import AveragingStage  # noqa: E402

from p2p_photon.averaging import SwarmAverager  # noqa: E402
from p2p_photon.config import AveragingConfig, DHTConfig  # noqa: E402
from p2p_photon.network import shutdown_dht, start_dht, visible_maddrs  # noqa: E402
from p2p_photon.watchdog import OWNER_ENV, owner_tag  # noqa: E402

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
TENSOR_NUMEL = 1 << 20  # the averaged vector is split into tensors of up to 1M elements, like a model's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=None,
                   help="parameter counts (default 1e6 5e6 2e7 5e7; --quick: 1e6 5e6)")
    p.add_argument("--peers", type=int, nargs="+", default=None,
                   help="group sizes (default 2 3 4; --quick: 2 3)")
    p.add_argument("--quick", action="store_true", help="smoke-test mode: small sizes, 2-3 peers, 2 rounds")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds per (size, peers) (default 3; --quick 2)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--matchmaking-time", type=float, default=2.0,
                   help="averaging.matchmaking_time (default 2 s)")
    p.add_argument("--allreduce-timeout", type=float, default=180.0, help="averaging.allreduce_timeout (s)")
    p.add_argument("--tcp-mb", type=int, default=256, help="MB sent per raw TCP trial (default 256)")
    p.add_argument("--tcp-chunk-mb", type=float, default=1.0, help="send() chunk size in MB (default 1)")
    p.add_argument("--tcp-trials", type=int, default=3, help="raw TCP trials before and after (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all)")
    p.add_argument("--compression", choices=["none", "fp16", "int8", "int4"], default="none",
                   help="averaging.compression (default none: fp32 on the wire, the raw throughput)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "allreduce.json"),
                   help="JSON output path")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ([1e6, 5e6] if args.quick else [1e6, 5e6, 2e7, 5e7]))]
    args.peers = args.peers or ([2, 3] if args.quick else [2, 3, 4])
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.quick:
        args.tcp_mb, args.tcp_trials = min(args.tcp_mb, 64), min(args.tcp_trials, 2)
    if min(args.peers) < 2 or min(args.sizes) < 1 or args.rounds < 1:
        p.error("--peers must be >= 2, --sizes >= 1 and --rounds >= 1")
    return args


# ----------------------------------------------------------------------------- raw TCP


def tcp_throughput(total_mb: int, chunk_mb: float) -> float:
    """MB/s of one client sending total_mb to a server thread over 127.0.0.1 (until the server's ack)."""
    chunk = bytes(int(chunk_mb * 1e6))
    n_chunks = max(1, int(total_mb / chunk_mb))
    total = n_chunks * len(chunk)
    with socket.create_server(("127.0.0.1", 0)) as server:
        receiver = threading.Thread(target=_receive, args=(server, total), daemon=True)
        receiver.start()
        with socket.create_connection(server.getsockname()) as client:
            t0 = time.perf_counter()
            for _ in range(n_chunks):
                client.sendall(chunk)
            ack = client.recv(1)
            seconds = time.perf_counter() - t0
        receiver.join(timeout=10)
    if ack != b"k":
        raise RuntimeError("raw TCP trial: the server did not acknowledge")
    return total / seconds / 1e6


def _receive(server: socket.socket, total: int) -> None:
    conn, _ = server.accept()
    with conn:
        buf = bytearray(1 << 20)
        view, got = memoryview(buf), 0
        while got < total:
            n = conn.recv_into(view)
            if n == 0:
                return
            got += n
        conn.sendall(b"k")


# ----------------------------------------------------------------------------- timing one averager


class StageClock:
    """Stands in for one hivemind averager's step(): runs it with wait=False and watches the
    StepControl stage, so matchmaking and all-reduce are timed separately (poll every 2 ms)."""

    def __init__(self, averager):
        self._step = averager.step
        averager.step = self  # instance attribute: only this averager, only in this benchmark
        self.t_call = self.t_allreduce = self.t_done = 0.0

    def __call__(self, **kwargs):
        wait = kwargs.pop("wait", True)  # SwarmAverager asks for the StepControl (it polls it): hand it back done
        self.t_call, self.t_allreduce = time.perf_counter(), 0.0
        control = self._step(**kwargs, wait=False)
        while not control.done():
            running = control.stage == AveragingStage.RUNNING_ALLREDUCE
            if running and not self.t_allreduce:
                self.t_allreduce = time.perf_counter()
            elif not running and control.stage == AveragingStage.LOOKING_FOR_GROUP:
                self.t_allreduce = 0.0  # a retry: matchmaking again
            time.sleep(0.002)
        self.t_done = time.perf_counter()
        if not self.t_allreduce:  # finished between two polls
            self.t_allreduce = self.t_done
        return control.result() if wait else control


@dataclass
class PeerRound:
    total_s: float
    matchmaking_s: float
    allreduce_s: float
    bytes_sent: int
    group_size: int
    t_allreduce: float = field(repr=False, default=0.0)
    t_done: float = field(repr=False, default=0.0)


# ----------------------------------------------------------------------------- the swarm


def start_dhts(n: int) -> list:
    """n DHT nodes on 127.0.0.1, all bootstrapped from the first (built in the main thread)."""
    first = start_dht(DHTConfig(host_maddrs=(LOOPBACK,), startup_timeout=60.0))
    dhts = [first]
    try:
        for _ in range(n - 1):
            cfg = DHTConfig(host_maddrs=(LOOPBACK,), initial_peers=tuple(visible_maddrs(first)),
                            startup_timeout=60.0)
            dhts.append(start_dht(cfg))
    except BaseException:
        for d in dhts:
            shutdown_dht(d)
        raise
    return dhts


def make_deltas(size: int, n: int, seed: int) -> tuple[list[torch.Size], list[list[torch.Tensor]]]:
    """Shapes of `size` elements in tensors of up to 1M, and one random pseudo-gradient per peer."""
    shapes = [torch.Size([min(TENSOR_NUMEL, size - i)]) for i in range(0, size, TENSOR_NUMEL)]
    g = torch.Generator().manual_seed(seed)
    deltas = [[torch.randn(s, generator=g) * 1e-3 for s in shapes] for _ in range(n)]
    return shapes, deltas


def bench_case(dhts: list, size: int, n: int, args) -> tuple[list[list[PeerRound]], float]:
    """Rounds of n averagers on `size` parameters: per-round, per-peer timings of the timed rounds, and
    the cores that other programs kept busy meanwhile."""
    shapes, deltas = make_deltas(size, n, seed=size + n)
    cfg = AveragingConfig(matchmaking_time=args.matchmaking_time, allreduce_timeout=args.allreduce_timeout,
                          min_group_size=n, target_group_size=n, compression=args.compression)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"  # fresh key space: no stale averagers of earlier cases
    avgs = []
    try:
        for d in dhts[:n]:
            avgs.append(SwarmAverager(d, shapes, prefix=prefix, cfg=cfg))
        clocks = [StageClock(a._averager) for a in avgs]
        rounds, cpu0 = [], cpu_seconds()
        with cf.ThreadPoolExecutor(n) as ex:
            for r in range(args.warmup_rounds + args.rounds):
                res = run_round(ex, avgs, clocks, deltas, r, args)
                if r >= args.warmup_rounds:
                    rounds.append(res)
        return rounds, other_cores(cpu0, cpu_seconds())
    finally:
        for a in avgs:
            a.shutdown()


def run_round(ex, avgs, clocks, deltas, round_no: int, args) -> list[PeerRound]:
    def one(i: int) -> PeerRound:
        t0 = time.perf_counter()
        res = avgs[i].average(deltas[i], round_no=round_no, weight=1.0 + i, meta=dict(fingerprint="bench"),
                              timeout=args.matchmaking_time * 5)
        total = time.perf_counter() - t0
        c = clocks[i]
        return PeerRound(total, c.t_allreduce - c.t_call, c.t_done - c.t_allreduce, res.bytes_sent,
                         res.group_size, c.t_allreduce, c.t_done)

    futures = [ex.submit(one, i) for i in range(len(avgs))]
    return [f.result(timeout=args.matchmaking_time * 5 + args.allreduce_timeout + 60) for f in futures]


def summarize_case(size: int, n: int, rounds: list[list[PeerRound]], tcp_mbps: float) -> dict:
    flat = [p for r in rounds for p in r]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    allreduce = med([p.allreduce_s for p in flat])
    group_allreduce = med([max(p.t_done for p in r) - min(p.t_allreduce for p in r) for r in rounds])
    sent = flat[0].bytes_sent
    per_peer = sent / allreduce / 1e6
    return dict(
        params=size, peers=n, rounds=len(rounds), bytes_sent_per_peer=sent,
        total_s=med([p.total_s for p in flat]), matchmaking_s=med([p.matchmaking_s for p in flat]),
        allreduce_s=allreduce, group_allreduce_s=group_allreduce,
        encode_decode_s=med([p.total_s - p.matchmaking_s - p.allreduce_s for p in flat]),
        throughput_MBps=per_peer, ratio_to_tcp=per_peer / tcp_mbps,
        aggregate_MBps=n * sent / group_allreduce / 1e6,
        throughput_incl_matchmaking_MBps=sent / med([p.total_s for p in flat]) / 1e6,
        per_round=[[dict(total_s=p.total_s, matchmaking_s=p.matchmaking_s, allreduce_s=p.allreduce_s)
                    for p in r] for r in rounds],
    )


# ----------------------------------------------------------------------------- report


def p2pd_pids() -> set[int]:
    """`pgrep -x p2pd`: every p2pd on the machine (other programs' too)."""
    out = subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def print_table(runs: list[dict], tcp: float) -> None:
    print(f"\nraw loopback TCP: {tcp:.0f} MB/s (median)")
    head = (f"{'params':>8} {'peers':>5} {'sent/peer MB':>12} {'total s':>8} {'match s':>8} {'allred s':>8} "
            f"{'enc/dec s':>9} {'MB/s/peer':>9} {'aggr MB/s':>9} {'vs TCP':>7} {'others':>6}")
    print(head)
    for r in runs:
        print(f"{r['params'] / 1e6:>7.1f}M {r['peers']:>5} {r['bytes_sent_per_peer'] / 1e6:>12.1f} "
              f"{r['total_s']:>8.2f} {r['matchmaking_s']:>8.2f} {r['allreduce_s']:>8.2f} "
              f"{r['encode_decode_s']:>9.2f} {r['throughput_MBps']:>9.1f} {r['aggregate_MBps']:>9.1f} "
              f"{r['ratio_to_tcp']:>7.3f} {r['other_busy_cores']:>6.2f}")


def tcp_trials(args, label: str) -> list[float]:
    vals = [tcp_throughput(args.tcp_mb, args.tcp_chunk_mb) for _ in range(args.tcp_trials)]
    print(f"[allreduce] raw TCP ({label}): " + ", ".join(f"{v:.0f}" for v in vals) + " MB/s", flush=True)
    return vals


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # hivemind warns on every averager that target_group_size (= peers) is not a power of 2: expected here
    logging.getLogger("hivemind.averaging.key_manager").setLevel(logging.ERROR)
    before_pids, load_before, t_start = p2pd_pids(), os.getloadavg(), time.perf_counter()
    print(f"[allreduce] sizes {args.sizes}, peers {args.peers}, {args.rounds} rounds (+{args.warmup_rounds} "
          f"warmup) each, load avg {load_before[0]:.2f}", flush=True)
    tcp_before = tcp_trials(args, "before")
    runs = measure(args, statistics.median(tcp_before))
    tcp_after = tcp_trials(args, "after")
    tcp = statistics.median(tcp_before + tcp_after)
    for r in runs:  # ratios against the run's median TCP figure
        r["ratio_to_tcp"] = r["throughput_MBps"] / tcp
    # p2pd of this run still alive 15 s after shutdown (should be none; killed and reported)
    leaked = reap_tagged_p2pd(OWNER_ENV, os.environ.get(OWNER_ENV) or owner_tag())
    after_pids = p2pd_pids()
    print_table(runs, tcp)
    result = dict(
        tcp_MBps=tcp, tcp_trials_MBps=dict(before=tcp_before, after=tcp_after),
        tcp=dict(total_mb=args.tcp_mb, chunk_mb=args.tcp_chunk_mb, trials=args.tcp_trials),
        runs=runs,
        config=dict(sizes=args.sizes, peers=args.peers, rounds=args.rounds, warmup_rounds=args.warmup_rounds,
                    matchmaking_time=args.matchmaking_time, allreduce_timeout=args.allreduce_timeout,
                    tensor_numel=TENSOR_NUMEL, quick=args.quick,
                    encoding=f"{args.compression} on the wire "
                             "(our all-reduce: each owner sends one encoded result)"),
        notes=("allreduce_s: from the StepControl stage RUNNING_ALLREDUCE to the step's result, per peer "
               "(median over peers and rounds); matchmaking_s: from step() to RUNNING_ALLREDUCE; "
               "total_s: SwarmAverager.average wall time, incl. encode/decode; throughput_MBps = "
               "bytes_sent_per_peer / allreduce_s (bytes_sent measured on the wire by the averager, "
               "~2(n-1)/n x 4 B x params); "
               "aggregate_MBps = n x bytes_sent_per_peer / group all-reduce time "
               "(first start to last finish); "
               "all peers, their p2pd daemons and the TCP pair share this machine's cores; other_busy_cores: "
               "average cores other programs on the machine used during the case (noise indicator)."),
        machine=dict(machine_info(), threads=args.threads, loadavg_before=list(load_before),
                     loadavg_after=list(os.getloadavg())),
        p2pd_leaked=sorted(leaked), pgrep_p2pd=dict(before=len(before_pids), after=len(after_pids)),
        wall_s=time.perf_counter() - t_start,
        command=shlex.join([Path(sys.executable).name, *sys.argv]),
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[allreduce] wrote {out} in {result['wall_s']:.0f}s")
    if leaked:
        print(f"[allreduce] WARNING: p2pd still running after shutdown: {sorted(leaked)}", file=sys.stderr)
    return 1 if leaked else 0


def measure(args, tcp: float) -> list[dict]:
    runs = []
    dhts = start_dhts(max(args.peers))
    try:
        for n in args.peers:
            for size in args.sizes:
                t0 = time.perf_counter()
                rounds, others = bench_case(dhts, size, n, args)
                r = summarize_case(size, n, rounds, tcp)
                r["other_busy_cores"] = others
                runs.append(r)
                print(f"[allreduce] {size / 1e6:g}M x {n} peers: all-reduce {r['allreduce_s']:.2f}s "
                      f"({r['throughput_MBps']:.1f} MB/s per peer), matchmaking {r['matchmaking_s']:.2f}s, "
                      f"total {r['total_s']:.2f}s; others busy {others:.2f} cores  "
                      f"[{time.perf_counter() - t0:.0f}s]",
                      flush=True)
    finally:
        for d in dhts:
            shutdown_dht(d)
    return runs


if __name__ == "__main__":
    sys.exit(main())
