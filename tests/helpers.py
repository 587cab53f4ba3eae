"""Shared test utilities: waiting, process trees, and the check that no p2pd outlives its test.

Importing this module puts a session tag in os.environ. Every p2pd started by the tests
(in-process or from a subprocess) inherits it at exec, so a p2pd that leaked and was
re-parented to PID 1 is still found — and only ours, never another worker's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import psutil

TAG_VAR = "P2P_PHOTON_TEST_TAG"
os.environ.setdefault(TAG_VAR, uuid.uuid4().hex)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll `pred` until it is truthy (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def is_alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie runs nothing; it only waits to be reaped)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if is_alive(p)]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def p2pd_descendants(pid: int) -> list[psutil.Process]:
    """The p2pd processes below `pid` in the process tree."""
    return [p for p in descendants(pid) if _name(p) == "p2pd"]


def tagged_p2pd() -> list[psutil.Process]:
    """Live p2pd processes started by this test session (wherever they were re-parented)."""
    tag = os.environ[TAG_VAR]
    found = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] != "p2pd" or not is_alive(p):
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if p.environ().get(TAG_VAR) == tag:
                found.append(p)
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=3)


@contextlib.contextmanager
def no_leaked_p2pd(timeout: float = 10.0) -> Iterator[None]:
    """Fail if a p2pd started inside the block is still alive `timeout` s after it (and kill it)."""
    before = {p.pid for p in tagged_p2pd()}
    yield
    new = lambda: [p for p in tagged_p2pd() if p.pid not in before]  # noqa: E731
    if not wait_until(lambda: not new(), timeout):
        leaked = new()
        kill_all(leaked)
        raise AssertionError(f"leaked p2pd processes: {[p.pid for p in leaked]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_peer_id() -> str:
    """A well-formed peer ID nobody uses."""
    from hivemind.p2p import PeerID

    return PeerID(b"\x00\x24\x08\x01\x12\x20" + os.urandom(32)).to_base58()


def python_env() -> dict[str, str]:
    """Environment for `sys.executable -c ...` subprocesses that import p2p_photon."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""
