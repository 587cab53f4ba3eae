"""Start a local swarm on 127.0.0.1: a bootstrap node and N peers as real processes.

Used by the demo, the swarm tests, the benchmarks and the experiments (what only the benchmarks
need is in scripts/benchlib.py). Every process is ended on exit (SIGTERM, then SIGKILL after a
grace period); each has the orphan reaper, so no DHT child or p2pd outlives it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import watchdog, zygote

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the directory holding this p2p_photon package
logger = logging.getLogger(__name__)


def quiet_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range (32768-60999 by default), so that
    no connection or port-0 bind takes it between now and when the process we give it to binds it."""
    for port in random.sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high} on 127.0.0.1")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen | zygote.ForkedProcess
    log: Path | None

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class LocalSwarm:
    workdir: Path
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    threads_per_peer: int = 1
    capture: bool = True  # peers log to files in workdir (tests); False: to this terminal (demo)
    procs: list[Proc] = field(default_factory=list)
    maddrs: list[str] = field(default_factory=list)
    boot: Proc | None = None

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()  # the children run in it: paths given to them must be absolute
        self.workdir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ processes

    def _env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", P2P_PHOTON_LOG_PREFIX=f"{name} ", **(extra or {}))
        env.update(OMP_NUM_THREADS=str(self.threads_per_peer), MKL_NUM_THREADS=str(self.threads_per_peer))
        # the children run this very package, not whichever one an editable install points at (a second
        # checkout's tests and benchmarks ran the first checkout's peers)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def spawn(self, name: str, args: list[str], script: str | None = None,
              extra_env: dict[str, str] | None = None, wrap: Sequence[str] = ()) -> Proc:
        """Run `p2p-photon ARGS` (or `python SCRIPT ARGS`, e.g. a test's hostile peer) as a child
        process; `wrap` goes before it (e.g. `ip netns exec NS`: a command that execs what follows)."""
        cmd = [*wrap, sys.executable, *([script] if script else ["-m", "p2p_photon.cli"]), *args]
        log = self.workdir / f"{name}.log" if self.capture else None
        if zygote.enabled() and not wrap and log is not None:  # the test suite: fork a pre-imported process
            popen = zygote.Zygote.get(self._env("zygote")).spawn(
                list(args), self._env(name, extra_env), str(self.workdir), str(log),
                script=str(Path(script).resolve()) if script else None)
        else:
            out = open(log, "w") if log else None
            popen = subprocess.Popen(cmd, stdout=out or None, stderr=subprocess.STDOUT if out else None,
                                     env=self._env(name, extra_env), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     preexec_fn=watchdog.end_with_parent)
            if out:
                out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_bootstrap(self, timeout: float = 90.0, extra: list[str] = (), wrap: Sequence[str] = ()) -> list[str]:
        """Start the bootstrap node; its --initial-peers multiaddrs. A plain bootstrap on 127.0.0.1 gets its
        identity and port from us, so its address is known at once and the peers start up alongside it
        (they retry an initial peer that is not up yet); with `extra` or `wrap` (a run to host, a network
        namespace) we wait for the address it writes."""
        maddrs_file = self.workdir / "bootstrap.json"
        maddrs_file.unlink(missing_ok=True)
        args = ["bootstrap", "--maddrs-file", str(maddrs_file), *extra]
        if self.config:
            args += ["--config", self.config]
        if not extra and not wrap:
            from .network import prepare_identity

            key, peer_id = prepare_identity(str(self.workdir / "bootstrap.key"))
            port = quiet_port()
            args += ["--identity-path", key, "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"]
            self.boot = self.spawn("bootstrap", args)
            self.maddrs = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}"]
            return self.maddrs
        proc = self.boot = self.spawn("bootstrap", args, wrap=wrap)
        deadline = time.monotonic() + timeout
        while not maddrs_file.exists():
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"bootstrap did not start: {self.tail(proc)}")
            time.sleep(0.2)
        self.maddrs = json.loads(maddrs_file.read_text())["maddrs"]
        return self.maddrs

    def start_peer(self, index: int, overrides: list[str] = (), extra_args: list[str] = (),
                   name: str | None = None, script: str | None = None,
                   env: dict[str, str] | None = None, data: str | None = None, wrap: Sequence[str] = ()) -> Proc:
        """A peer on silo `index` of the shared corpus, or (`data`) on that private corpus, joining the run
        the bootstrap hosts (`start_bootstrap(extra=["--run", RUN_DIR])`)."""
        name = name or f"peer{index}"
        if self.boot is not None and not self.boot.alive():
            raise RuntimeError(f"the bootstrap node exited: {self.tail(self.boot)}")
        args = ["peer", "--initial-peers", *self.maddrs, "--summary-out", str(self.summary_path(name))]
        if self.config:
            args += ["--config", self.config]
        if data:
            args += ["--data", str(data)]
        silo = [] if data else [f"data.silo={index}"]
        sets = [*silo, f"checkpoint.dir={self.workdir / ('ckpt-' + name)}", *self.overrides, *overrides]
        for s in sets:
            args += ["--set", s]
        return self.spawn(name, [*args, *extra_args], script=script, extra_env=env, wrap=wrap)

    def summary_path(self, name: str) -> Path:
        return self.workdir / f"{name}.summary.json"

    def summary(self, name: str) -> dict:
        return json.loads(self.summary_path(name).read_text())

    # ------------------------------------------------------------------ waiting and stopping

    def wait(self, procs: list[Proc], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in procs:
            left = max(0.1, deadline - time.monotonic())
            try:
                p.popen.wait(timeout=left)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{p.name} still running after {timeout:.0f}s: {self.tail(p)}") from None
        return [p.popen.returncode for p in procs]

    def signal(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        if proc.alive():
            proc.popen.send_signal(sig)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM everything (peers first, bootstrap last), SIGKILL what is left after `grace`."""
        ordered = sorted(self.procs, key=lambda p: p.name == "bootstrap")  # stable: peers first, in order
        for p in ordered:
            self.signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in ordered:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0fs: killing it", p.name, grace)
                p.popen.kill()
                p.popen.wait()

    def tail(self, proc: Proc, n: int = 30) -> str:
        if proc.log is None or not proc.log.exists():
            return "(no log)"
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

