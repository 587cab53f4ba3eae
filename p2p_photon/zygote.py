"""Start many local p2p-photon processes fast: import once, fork per process.

A peer spends ~9 s of CPU importing torch, hivemind, transformers (its model registry) and
bitsandbytes before it does anything; a local swarm of a bootstrap and three peers on 2 cores
spends ~20 s of wall time on that alone, in every swarm test. With P2P_PHOTON_ZYGOTE=1 (the test
suite sets it), `LocalSwarm` starts one zygote process that imports all of that once, and each
peer, bootstrap or script is a fork of it that then runs exactly what it would have run as
`python -m p2p_photon.cli ARGS` (or `python SCRIPT ARGS`): its own environment, working
directory, log file, thread count and signal handlers, its own hivemind DHT, averager and p2pd.
Only the imported modules are shared (copy-on-write); hivemind forks its own children from an
imported process in the same way.

Protocol (one JSON object per line): the client writes {argv, env, cwd, log, script?}, the zygote
forks and answers {pid}; when a child exits, the zygote writes its exit code (negative: killed by
that signal, as subprocess reports it) to STATUS_DIR/PID. The zygote ends with its client (stdin
closed) once its children have exited; children die with the zygote (PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import watchdog

PRELOAD = ("torch", "hivemind", "transformers", "bitsandbytes", "transformers.models.llama.modeling_llama",
           "p2p_photon.cli", "p2p_photon.peer.loop", "p2p_photon.bootstrap", "p2p_photon.monitor")
ENV = "P2P_PHOTON_ZYGOTE"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


# ----------------------------------------------------------------------------- the zygote process


def _run_child(req: dict) -> int:
    """In the forked child: become the requested process, run it, return its exit code."""
    watchdog.end_with_parent()  # the zygote changes no signal disposition: the child starts with a fresh interpreter's
    from p2p_photon.averaging.hivemind_backend import own_interprocess_locks

    own_interprocess_locks()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if req.get("log") else os.open(
        os.devnull, os.O_WRONLY)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(open(1, "wb", 0, closefd=False), write_through=True)  # noqa: SIM115
    sys.stderr = io.TextIOWrapper(open(2, "wb", 0, closefd=False), write_through=True)  # noqa: SIM115
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:  # OpenMP read the zygote's environment when it loaded
        torch.set_num_threads(threads)
    script = req.get("script")
    sys.argv = [script or "p2p-photon", *req["argv"]]
    try:
        if script:
            import runpy

            sys.path.insert(0, str(Path(script).resolve().parent))
            runpy.run_path(script, run_name="__main__")
            return 0
        from p2p_photon.cli import main

        return main(req["argv"])
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        print(e.code, file=sys.stderr)  # as the interpreter does with sys.exit("message")
        return 1


def _write_status(status_dir: Path, pid: int, code: int) -> None:
    tmp = status_dir / f".{pid}"
    tmp.write_text(str(code))
    os.replace(tmp, status_dir / str(pid))


def _reap(status_dir: Path, children: set[int]) -> None:
    for pid in list(children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            children.discard(pid)
            continue
        if done:
            children.discard(pid)
            _write_status(status_dir, pid, os.waitstatus_to_exitcode(status))


def serve(status_dir: Path) -> int:
    """The zygote's loop: fork a child per request line on stdin, reap children (a child leaves it by
    SystemExit with its exit code, through a normal interpreter exit)."""
    for name in PRELOAD:
        __import__(name)
    children: set[int] = set()
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    stdin_open = True
    while stdin_open or children:
        ready = select.select([sys.stdin] if stdin_open else [], [], [], 0.1)[0]
        _reap(status_dir, children)
        if not ready:
            continue
        line = sys.stdin.readline()
        if not line:
            stdin_open = False
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_child(req)
            except BaseException:  # noqa: BLE001 - the child's own traceback, as `python -m` prints it
                import traceback

                traceback.print_exc()
            finally:
                # a normal interpreter exit (atexit handlers, multiprocessing joins), from the child's code
                raise SystemExit(code)
        children.add(pid)
        (status_dir / str(pid)).unlink(missing_ok=True)
        print(json.dumps({"pid": pid}), file=out, flush=True)
    return 0


# ----------------------------------------------------------------------------- the client side


class ForkedProcess:
    """A zygote's child, with the parts of subprocess.Popen that LocalSwarm and its users need."""

    def __init__(self, pid: int, status: Path):
        self.pid, self._status, self.returncode = pid, status, None

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The client: one zygote per process that asks (started on first use)."""

    _lock = threading.Lock()
    _instance: Zygote | None = None

    def __init__(self, env: dict[str, str]):
        self.status_dir = Path(tempfile.mkdtemp(prefix="p2p-photon-zygote-"))
        self.proc = subprocess.Popen([sys.executable, "-m", "p2p_photon.zygote", str(self.status_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=watchdog.end_with_parent)
        first = self.proc.stdout.readline()
        if not first or not json.loads(first).get("ready"):
            raise RuntimeError("the zygote did not start (run `python -m p2p_photon.zygote DIR` to see why)")

    def close(self, timeout: float = 30.0) -> None:
        """No more children: the zygote exits once the ones it has have exited."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @classmethod
    def get(cls, env: dict[str, str]) -> Zygote:
        with cls._lock:
            if cls._instance is None or cls._instance.proc.poll() is not None:
                cls._instance = cls(env)
            return cls._instance

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, log: str | None,
              script: str | None = None) -> ForkedProcess:
        with self._lock:
            self.proc.stdin.write(json.dumps(dict(argv=argv, env=env, cwd=cwd, log=log, script=script)) + "\n")
            self.proc.stdin.flush()
            pid = int(json.loads(self.proc.stdout.readline())["pid"])
        return ForkedProcess(pid, self.status_dir / str(pid))


def shutdown(timeout: float = 30.0) -> None:
    """End this process's zygote (if it started one) once its children have exited."""
    with Zygote._lock:
        z, Zygote._instance = Zygote._instance, None
    if z is not None:
        z.close(timeout)


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))
