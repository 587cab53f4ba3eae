"""What the benchmark and experiment scripts share, and the package does not need.

The machine a result was measured on, the CPU that other programs took meanwhile (a busy machine
makes a slow figure), stopping some peers of a `LocalSwarm`, and the p2pd daemons a run left
behind. The scripts import it as `benchlib` (Python puts scripts/ on the path of a script it runs),
after putting the repository root on the path for `p2p_photon`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from p2p_photon.launch import LocalSwarm, Proc


def machine_info() -> dict:
    """What a benchmark's JSON records about the machine it ran on."""
    import hivemind
    import torch

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cpu_count=os.cpu_count(), memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
                python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
                hivemind=hivemind.__version__)


def cpu_seconds() -> tuple[float, float, float]:
    """(wall, core-seconds busy on the whole machine, core-seconds of this process and its descendants,
    live (DHT and averager processes, p2pd, peers) and reaped (peers that exited: psutil's children_*
    times, or a finished swarm's peers would count as other programs)) so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    me = psutil.Process()
    t = me.cpu_times()
    own = t.children_user + t.children_system
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            own += t.user + t.system
    return time.monotonic(), busy, own


def other_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Average number of cores other programs kept busy between two cpu_seconds() samples."""
    wall, busy, own = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, (busy - own) / wall) if wall > 0 else 0.0


def stop_procs(swarm: LocalSwarm, procs: list[Proc], grace: float = 20.0) -> None:
    """SIGTERM some peers of a swarm (the rest keep running), SIGKILL those still there after `grace`."""
    for p in procs:
        swarm.signal(p)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()


def reap_tagged_p2pd(var: str, tag: str, timeout: float = 15.0) -> list[int]:
    """PIDs of the p2pd daemons started with var=tag still alive `timeout` s after a swarm stopped
    (ended with watchdog.reap, and returned as a finding: a run that leaks p2pd says so in its JSON)."""
    from p2p_photon.network import tagged_processes
    from p2p_photon.watchdog import reap

    deadline = time.monotonic() + timeout
    while (left := tagged_processes(var, tag, "p2pd")) and time.monotonic() < deadline:
        time.sleep(0.5)
    reap(left)
    return [p.pid for p in left]
