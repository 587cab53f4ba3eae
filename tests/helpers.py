"""Shared test utilities: waiting, process trees, the check that no p2pd outlives its test, and the
factories several test modules use (a small corpus config, a progress record, a checkpoint payload).

Importing this module puts a session tag (one per xdist worker) in os.environ. Every p2pd started by the tests
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
from types import SimpleNamespace
from typing import Any

import psutil

TAG_VAR = "P2P_PHOTON_TEST_TAG"
os.environ.setdefault(TAG_VAR, uuid.uuid4().hex)
if (_worker := os.environ.get("PYTEST_XDIST_WORKER")) and not os.environ[TAG_VAR].endswith("-" + _worker):
    os.environ[TAG_VAR] = f"{uuid.uuid4().hex}-{_worker}"  # each xdist worker checks only its own p2pd
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_DATA = ["data.max_corpus_mb=1", "data.vocab_size=1024", "data.num_silos=3"]
"""Overrides for the small stdlib corpus that the session's `data_cache` fixture prepares once."""


def wait_until(pred: Callable[[], object], timeout: float, what: str | Callable[[], str] | None = None,
               interval: float = 0.1) -> bool:
    """Poll `pred` until it is truthy, instead of sleeping for a guessed time.

    Returns True when it is; after `timeout` seconds, fails the test with "timed out after Ns waiting
    for WHAT" when `what` is given (a string, or a function called then, e.g. for a log's tail), or
    returns False when it is not (the caller asserts with its own message)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            if what is None:
                return False
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
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


# ----------------------------------------------------------------------------- factories


def make_record(peer_id: str = "12D3KooWpeer", **changes: Any) -> dict:
    """A valid progress record (the fields progress.ProgressRecord accepts), with `changes` applied."""
    from hivemind.utils import get_dht_time

    record = dict(
        peer_id=peer_id,
        round=3,
        samples=64,
        steps=8,
        total_samples=512,
        loss=3.25,
        tokens_per_s=1.5e4,
        fingerprint="ab12" * 4,
        theta_hash="9f3a" * 16,
        failed_rounds=0,
        bytes_sent=1 << 20,
        bytes_received=1 << 20,
        utilization=0.75,
        time=get_dht_time(),
        state="training",
    )
    record.update(changes)
    return record


def checkpoint_payload(round_no: int, opt: str = "adamw8bit", seed: int = 0):
    """A complete state.CheckpointPayload of a nano model after one inner step (θ, outer and inner
    optimizer state, RNG, config), with meta round `round_no` and fingerprint "fp"."""
    import torch

    from p2p_photon import state
    from p2p_photon.config import Config, InnerConfig
    from p2p_photon.hashing import theta_hash
    from p2p_photon.inner import InnerTrainer
    from p2p_photon.model import build_model

    model = build_model("nano", 256, 32, seed=seed)
    trainer = InnerTrainer(model, InnerConfig(optimizer=opt, warmup_steps=0), torch.device("cpu"))

    def batch() -> torch.Tensor:
        return torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(round_no))

    trainer.step(batch, 0)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta = dict(round=round_no, global_step=10 * round_no, fingerprint="fp",
                theta=theta_hash(list(theta.values())), data_cursor=dict(epoch=1, position=7))
    return state.CheckpointPayload(theta=theta, outer=[torch.randn(3, 3)],
                                   inner=trainer.optimizer.state_dict(), meta=meta, rng=state.capture_rng(),
                                   config=Config())


class FakeDHT:
    """dht.store/get with subkeys, as the consensus check uses them."""

    def __init__(self):
        self.data: dict[str, dict[str, object]] = {}

    def is_alive(self):
        return True

    def store(self, key, *, subkey, value, expiration_time, return_future=False):
        self.data.setdefault(key, {})[subkey] = SimpleNamespace(value=value)
        return _done(True) if return_future else True

    def get(self, key, latest=True, return_future=False):
        found = SimpleNamespace(value=dict(self.data[key])) if key in self.data else None
        return _done(found) if return_future else found


def _done(value):
    """A future that already holds `value` (what hivemind's DHT returns with return_future=True)."""
    import concurrent.futures

    future = concurrent.futures.Future()
    future.set_result(value)
    return future


def round_story(swarm, names: list[str], n: int = 40) -> str:
    """Each peer's round lines (applied, failed, re-synced, forks) from its log: what a failed swarm
    assertion needs to be read from CI output alone."""
    keys = ("round ", "FAILED", "forked", "download", "re-sync", "took the state", "caught up", "joined")
    out = []
    for name in names:
        path = swarm.workdir / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else ["(no log)"]
        out += [f"--- {name}", *[ln[:220] for ln in lines if any(k in ln for k in keys)][-n:]]
    return "\n".join(out)
