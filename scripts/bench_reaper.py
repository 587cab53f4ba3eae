#!/usr/bin/env python
"""CPU and memory of the orphan reaper (p2p_photon.watchdog) while it follows a live process.

Every peer, bootstrap and monitor runs one reaper beside it for its whole life, so what it costs
while it only waits matters: it should be mostly asleep (it snapshots the process tree every
POLL_INTERVAL s). This script starts a reaper for itself, gives it a few children to follow, lets
it settle, then samples its CPU share over a window.

    python scripts/bench_reaper.py                      # 10 s window; bench/results/reaper.json
    python scripts/bench_reaper.py --seconds 2 --out /tmp/reaper.json

cpu_percent = the reaper's CPU time over the window / the window (100 = one core busy).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402
import psutil  # noqa: E402

from p2p_photon.files import write_json_atomic  # noqa: E402
from p2p_photon.watchdog import POLL_INTERVAL, start_orphan_reaper  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the measured window")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds left to the reaper's start-up first")
    ap.add_argument("--children", type=int, default=4, help="idle child processes for it to follow")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reaper.json"))
    return ap.parse_args(argv)


def measure(args) -> dict:
    """Start the reaper and the children, let it settle, sample its CPU time and memory over the window."""
    lifetime = str(args.settle + args.seconds + 30)
    children = [subprocess.Popen(["sleep", lifetime]) for _ in range(args.children)]
    try:
        reaper = psutil.Process(start_orphan_reaper())
        time.sleep(args.settle)  # past its interpreter start-up, which is not what we measure
        before, t0 = reaper.cpu_times(), time.monotonic()
        time.sleep(args.seconds)  # the window itself
        after, wall = reaper.cpu_times(), time.monotonic() - t0
        cpu_s = (after.user + after.system) - (before.user + before.system)
        return dict(cpu_percent=100 * cpu_s / wall, cpu_s=cpu_s, window_s=wall,
                    rss_mb=reaper.memory_info().rss / 2**20, followed=len(children))
    finally:
        for c in children:
            c.kill()
            c.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = psutil.getloadavg()
    r = measure(args)
    print(f"{'reaper cpu %':>14} {'cpu s':>8} {'window s':>9} {'rss MB':>7} {'followed':>9}")
    print(f"{r['cpu_percent']:>14.2f} {r['cpu_s']:>8.3f} {r['window_s']:>9.1f} {r['rss_mb']:>7.1f} "
          f"{r['followed']:>9d}")
    result = dict(r, poll_interval_s=POLL_INTERVAL, settle_s=args.settle,
                  command=shlex.join([sys.executable, *sys.argv]),
                  machine=dict(benchlib.machine_info(), loadavg_before=list(load_before),
                               loadavg_after=list(psutil.getloadavg())))
    write_json_atomic(args.out, result)
    print(f"[reaper] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
