"""network.py, watchdog.py and bootstrap.py against real hivemind DHTs on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from p2p_photon import bootstrap
from p2p_photon.bootstrap import count_peers, run_bootstrap
from p2p_photon.config import DHTConfig
from p2p_photon.network import (
    NetworkError,
    prepare_identity,
    shutdown_dht,
    start_dht,
    validate_maddrs,
    visible_maddrs,
)
from p2p_photon.watchdog import LOG_ENV, owner_tag, start_orphan_reaper
from tests.helpers import (
    PYTHON,
    alive,
    descendants,
    free_port,
    is_alive,
    kill_all,
    no_leaked_p2pd,
    p2pd_descendants,
    python_env,
    random_peer_id,
    wait_until,
)

LOCAL = ("/ip4/127.0.0.1/tcp/0",)


@pytest.fixture(autouse=True)
def _no_leaked_p2pd():
    with no_leaked_p2pd():
        yield


# ----------------------------------------------------------------------------- addresses (no DHT)


@pytest.mark.timeout(10)
def test_malformed_multiaddr_is_a_one_line_error():
    with pytest.raises(NetworkError) as e:
        validate_maddrs(["/ip4/1.2.3/tcp/x"], "--initial-peers", require_peer_id=True)
    assert str(e.value) == (
        "--initial-peers: '/ip4/1.2.3/tcp/x' is not a valid multiaddr "
        "(expected e.g. /ip4/127.0.0.1/tcp/31337/p2p/12D3Koo...)"
    )
    for bad in ["", "127.0.0.1:4000", "/ip4/127.0.0.1/tcp/99999", "/ip4/127.0.0.1/tcp/1/p2p/notapeer"]:
        with pytest.raises(NetworkError, match="is not a valid multiaddr"):
            validate_maddrs([bad], "--initial-peers", require_peer_id=True)


@pytest.mark.timeout(10)
def test_initial_peer_needs_a_peer_id():
    with pytest.raises(NetworkError, match=r"has no /p2p/<peer id> part") as e:
        validate_maddrs(["/ip4/127.0.0.1/tcp/31337"], "--initial-peers", require_peer_id=True)
    assert "\n" not in str(e.value)
    with pytest.raises(NetworkError, match="has no /p2p/"):  # start_dht validates before starting anything
        start_dht(DHTConfig(initial_peers=("/ip4/127.0.0.1/tcp/31337",)), reaper=False)
    peer = f"/ip4/127.0.0.1/tcp/31337/p2p/{random_peer_id()}"
    assert validate_maddrs([peer], "--initial-peers", require_peer_id=True) == (peer,)
    with pytest.raises(NetworkError, match="must not contain a /p2p/"):
        validate_maddrs([peer], "--host-maddrs")


@pytest.mark.timeout(10)
def test_identity_file_is_private_and_validated(tmp_path, caplog):
    path = tmp_path / "keys" / "identity.key"
    resolved, peer_id = prepare_identity(str(path))
    assert stat.S_IMODE(os.stat(resolved).st_mode) == 0o600
    assert prepare_identity(str(path))[1] == peer_id  # reused, not regenerated
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="p2p_photon.network"):
        assert prepare_identity(str(path))[1] == peer_id
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "readable by others" in caplog.text
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    with pytest.raises(NetworkError, match="not a valid libp2p private key"):
        prepare_identity(str(bad))


# ----------------------------------------------------------------------------- starting DHTs


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_two_dhts_meet_and_shutdown_is_idempotent():
    a = b = None
    try:
        a = start_dht(DHTConfig(host_maddrs=LOCAL), reaper=False)
        maddrs = visible_maddrs(a)
        assert maddrs[0].startswith("/ip4/127.0.0.1/tcp/") and f"/p2p/{a.peer_id}" in maddrs[0]
        b = start_dht(DHTConfig(host_maddrs=LOCAL, initial_peers=tuple(maddrs)), reaper=False)
        assert b.store("k", 1, expiration_time=time.time() + 60)
        assert wait_until(lambda: (a.get("k", latest=True) or [None])[0] == 1, 10)
        assert count_peers(a) == count_peers(b) == 1
    finally:
        shutdown_dht(b)
        shutdown_dht(a)
    shutdown_dht(a)  # second call: no-op, no exception
    shutdown_dht(None)


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_unreachable_initial_peer_fails_within_bootstrap_timeout(caplog):
    peer = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{random_peer_id()}"
    cfg = DHTConfig(host_maddrs=LOCAL, initial_peers=(peer,), bootstrap_timeout=5.0)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="p2p_photon.network"), pytest.raises(NetworkError) as e:
        start_dht(cfg, reaper=False)
    elapsed = time.monotonic() - t0
    assert str(e.value) == (
        "could not reach any of --initial-peers within 5s: check the address and that "
        "the bootstrap node is running"
    )
    assert "initial peers not reachable yet, retrying in" in caplog.text
    assert elapsed >= 5.0  # it kept retrying until bootstrap_timeout (the test's timeout bounds the rest)
    assert not p2pd_descendants(os.getpid())


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_port_in_use_is_a_network_error():
    with socket.socket() as s:  # a plain listener (no SO_REUSEPORT)
        s.bind(("127.0.0.1", 0))
        s.listen()
        addr = f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}"
        with pytest.raises(NetworkError, match="already in use") as e:
            start_dht(DHTConfig(host_maddrs=(addr,)), reaper=False)
        assert addr in str(e.value) and "port 0" in str(e.value)
    # p2pd listens with SO_REUSEPORT, so a second p2pd on the same port would start: we refuse
    first = None
    try:
        first = start_dht(DHTConfig(host_maddrs=LOCAL), reaper=False)
        taken = visible_maddrs(first)[0].split("/p2p/")[0]
        with pytest.raises(NetworkError, match="already in use"):
            start_dht(DHTConfig(host_maddrs=(taken,)), reaper=False)
    finally:
        shutdown_dht(first)


# ----------------------------------------------------------------------------- bootstrap


def _bootstrap_cmd(identity: str, maddrs_file: str) -> list[str]:
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from p2p_photon.bootstrap import run_bootstrap\n"
        "from p2p_photon.config import DHTConfig\n"
        f"cfg = DHTConfig(run_id='boot-test', identity_path={identity!r}, host_maddrs={LOCAL!r})\n"
        f"sys.exit(run_bootstrap(cfg, maddrs_file={maddrs_file!r}))\n"
    )
    return [PYTHON, "-c", code]


def _run_bootstrap_once(identity: str, maddrs_file: str, log_path: str) -> tuple[dict, str]:
    """Start a bootstrap subprocess, read its JSON, SIGTERM it, check it exits 0; return (info, stdout)."""
    if os.path.exists(maddrs_file):
        os.unlink(maddrs_file)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _bootstrap_cmd(identity, maddrs_file), stdout=log, stderr=subprocess.STDOUT, env=python_env()
        )
        try:
            assert wait_until(lambda: os.path.exists(maddrs_file) or proc.poll() is not None, 90), (
                "no maddrs file"
            )
            assert proc.poll() is None, open(log_path).read()
            with open(maddrs_file) as f:
                info = json.load(f)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(log_path) as f:
        return info, f.read()


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_bootstrap_keeps_peer_id_across_restarts(tmp_path):
    identity, maddrs_file = str(tmp_path / "id" / "bootstrap.key"), str(tmp_path / "out" / "maddrs.json")
    first, out1 = _run_bootstrap_once(identity, maddrs_file, str(tmp_path / "log1.txt"))
    assert set(first) >= {"peer_id", "maddrs", "initial_peers_arg", "run_id"}
    assert first["run_id"] == "boot-test"
    assert first["maddrs"] and all(m.endswith(f"/p2p/{first['peer_id']}") for m in first["maddrs"])
    assert first["initial_peers_arg"] == "--initial-peers " + " ".join(first["maddrs"])
    assert first["initial_peers_arg"] in out1  # printed for the operator
    assert stat.S_IMODE(os.stat(identity).st_mode) == 0o600
    second, _ = _run_bootstrap_once(identity, maddrs_file, str(tmp_path / "log2.txt"))
    assert second["peer_id"] == first["peer_id"]
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


class _StopAtHeartbeat(logging.Handler):
    """Sets `stop` at the bootstrap's first heartbeat line (so the test waits for it, not for a guess)."""

    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop = stop

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("bootstrap alive"):
            self.stop.set()


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_bootstrap_in_process_stop_event_on_ready_and_heartbeat(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(bootstrap, "HEARTBEAT_SECONDS", 0.5)
    stop, seen = threading.Event(), {}
    give_up = threading.Timer(60, stop.set)  # only if no heartbeat ever comes: the asserts below then fail

    def on_ready(dht):
        seen["maddrs"] = visible_maddrs(dht)
        give_up.start()

    cfg = DHTConfig(host_maddrs=LOCAL, identity_path=str(tmp_path / "id.key"))
    handler = _StopAtHeartbeat(stop)
    logging.getLogger("p2p_photon.bootstrap").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="p2p_photon.bootstrap"):
            assert run_bootstrap(cfg, maddrs_file=None, stop_event=stop, on_ready=on_ready) == 0
    finally:
        logging.getLogger("p2p_photon.bootstrap").removeHandler(handler)
        give_up.cancel()
    assert seen["maddrs"][0].startswith("/ip4/127.0.0.1/")
    assert "bootstrap alive | peers 0 | up 0h00m0" in caplog.text


@pytest.mark.timeout(10)
def test_bootstrap_refuses_client_mode():
    with pytest.raises(NetworkError, match="client mode"):
        run_bootstrap(DHTConfig(client_mode=True), maddrs_file=None)


# ----------------------------------------------------------------------------- orphans


VICTIM = (
    "import json, os, sys, time\n"
    "from p2p_photon.config import DHTConfig\n"
    "from p2p_photon.network import start_dht\n"
    "dht = start_dht(DHTConfig(host_maddrs=('/ip4/127.0.0.1/tcp/0',)), reaper={reaper})\n"
    "print(json.dumps(dict(pid=os.getpid(), dht_pid=dht.pid)), flush=True)\n"
    "time.sleep(600)\n"
)


def _start_victim(reaper: bool, reaper_log: str | None = None) -> tuple[subprocess.Popen, dict]:
    env = python_env()
    if reaper_log:
        env[LOG_ENV] = reaper_log
    proc = subprocess.Popen(
        [PYTHON, "-c", VICTIM.format(reaper=reaper)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    assert line, "victim did not start"
    return proc, json.loads(line)


def _children_of_victim(info: dict) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(DHT child + p2pd, reaper) below the victim."""
    procs = descendants(info["pid"])
    reapers = [p for p in procs if "p2p_photon.watchdog" in " ".join(p.cmdline())]
    workers = [p for p in procs if p not in reapers]
    assert any(p.pid == info["dht_pid"] for p in workers)
    assert p2pd_descendants(info["dht_pid"])
    return workers, reapers


def _followed(reaper_log: str) -> set[int]:
    """The pids the reaper has taken into its snapshot so far (from its --log-file lines)."""
    try:
        text = open(reaper_log).read()
    except FileNotFoundError:
        return set()
    snapshots = re.findall(r"descendants \[([\d, ]*)\]", text)
    return {int(pid) for pids in snapshots for pid in pids.split(", ") if pid}


@pytest.mark.swarm
@pytest.mark.timeout(150)
def test_sigkill_leaves_no_orphans_thanks_to_the_reaper(tmp_path):
    reaper_log = str(tmp_path / "reaper.log")
    proc, info = _start_victim(reaper=True, reaper_log=reaper_log)
    try:
        workers, reapers = _children_of_victim(info)
        assert len(reapers) == 1
        # the guarantee covers the processes in the reaper's snapshot: kill once they are all in it
        wait_until(lambda: {p.pid for p in workers} <= _followed(reaper_log), 30,
                   lambda: f"the reaper to follow {[p.pid for p in workers]}: {_followed(reaper_log)}")
        tree = {info["pid"], *(p.pid for p in workers)}
        segments = lambda: [f.name for pid in tree for f in Path("/dev/shm").glob(f"torch_{pid}_*")]  # noqa: E731
        assert segments(), "the victim's hivemind made no shared-memory segments (file_system strategy)"
        proc.kill()  # SIGKILL; the victim stays a zombie until we wait() for it below
        assert wait_until(lambda: not alive(workers), 10), f"survivors: {alive(workers)}"
        assert wait_until(lambda: not is_alive(reapers[0]), 10), "the reaper did not exit"
        assert segments() == [], "the reaper left the tree's /dev/shm segments behind"
    finally:
        proc.kill()
        proc.wait()
        kill_all(descendants(info["pid"]))


@pytest.mark.swarm
@pytest.mark.timeout(150)
def test_sigkill_without_reaper_leaves_orphans_control():
    proc, info = _start_victim(reaper=False)
    workers = []
    try:
        workers, reapers = _children_of_victim(info)
        assert not reapers
        proc.kill()
        proc.wait()  # the kernel re-parents the victim's children as it dies: they are orphans now
        dht_child = next(p for p in workers if p.pid == info["dht_pid"])
        assert dht_child.ppid() != info["pid"]
        assert is_alive(dht_child), "stock hivemind orphans the DHT child"
        assert any(p.name() == "p2pd" for p in alive(workers)), "... and its p2pd"
    finally:
        proc.kill()
        proc.wait()
        kill_all(workers)


FORKER = (
    "import multiprocessing as mp, os, threading, time\n"
    "from p2p_photon import watchdog\n"
    "{call}"
    "ctx = mp.get_context('fork')\n"
    "main = ctx.Process(target=time.sleep, args=(600,)); main.start()\n"
    "box = []\n"
    "t = threading.Thread(target=lambda: box.append(ctx.Process(target=time.sleep, args=(600,))) or box[0].start())\n"
    "t.start(); t.join()\n"
    "print(main.pid, box[0].pid, flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.mark.timeout(60)
def test_a_child_forked_from_the_main_thread_dies_with_its_sigkilled_parent():
    """die_with_parent_in_forks (start_orphan_reaper calls it): a child forked from the main thread gets SIGTERM
    from the kernel when the parent is SIGKILLed, with no reaper at all (the reaper's snapshot misses a child
    forked just before the kill). A child forked from another thread is not tied to that thread's life (the
    death signal follows the forking thread): it is the reaper's. Without the call both survive."""
    children = []
    try:
        for call, main_dies in (("watchdog.die_with_parent_in_forks()\n", True), ("", False)):
            proc = subprocess.Popen([PYTHON, "-c", FORKER.format(call=call)], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, env=python_env())
            main, other = (psutil.Process(int(x)) for x in proc.stdout.readline().split())
            children += [main, other]
            proc.kill()
            proc.wait()
            if main_dies:
                assert wait_until(lambda m=main: not is_alive(m), 10), "the main-thread child outlived its parent"
            else:
                time.sleep(2)
                assert is_alive(main), "without the call the child is an orphan (control)"
            assert is_alive(other), "a child forked from another thread must not be tied to it"
    finally:
        kill_all(children)


@pytest.mark.timeout(30)
def test_reaper_is_started_once_per_process():
    """One reaper per process, following this process under its owner tag. (Its CPU use while it waits
    is a figure, not a test: scripts/bench_reaper.py prints it.)"""
    pid = start_orphan_reaper()
    assert start_orphan_reaper() == pid
    reaper = psutil.Process(pid)
    assert reaper.ppid() == os.getpid() and is_alive(reaper)
    cmd = reaper.cmdline()
    assert cmd[cmd.index("--parent") + 1] == str(os.getpid()) and cmd[cmd.index("--tag") + 1] == owner_tag()
