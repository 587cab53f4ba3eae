"""Orphan reaper: the processes a peer starts die with it, however it dies.

hivemind runs its DHT in a forked child process that starts a `p2pd` daemon, and its
averager is another forked child. When the parent is killed with SIGKILL (or dies by an
unhandled signal), those children are re-parented to PID 1 and keep running. This module
starts a tiny separate process, `python -m p2p_photon.watchdog --parent PID`, that:

* every ~0.5 s remembers the parent's descendants (as psutil handles, which carry the
  process creation time, so a recycled pid is never signalled);
* when the parent is gone (or a zombie), sends SIGTERM to every remembered descendant that
  is still running, plus any process started under the parent's owner tag (see below),
  SIGKILLs the survivors after a grace period, and exits.

Descendants started less than one poll interval before the parent died can escape the
tree snapshot. Children forked from the main thread also end by the kernel's parent-death signal
(`die_with_parent_in_forks`, set up with the reaper). To catch the others, `start_orphan_reaper` puts an owner tag in
`os.environ`; programs exec'd afterwards (p2pd among them) inherit it, and the reaper also
ends those. Forked Python children do not show the tag in /proc, but they are direct
children of the parent and are found by the snapshot. `notify_reaper()` asks the reaper to
take a snapshot right away (call it after starting new child processes).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

OWNER_ENV = "P2P_PHOTON_OWNER"
"""Environment variable holding 'pid:create_time' of the process whose reaper owns a child."""
LOG_ENV = "P2P_PHOTON_REAPER_LOG"
"""If set, the reaper appends its log lines to this file (it has no terminal)."""

POLL_INTERVAL = 0.5
GRACE = 2.0

_reapers: dict[int, subprocess.Popen] = {}


def owner_tag(pid: int | None = None) -> str:
    """The tag identifying processes started under `pid` (default: this process)."""
    proc = psutil.Process(pid or os.getpid())
    return f"{proc.pid}:{proc.create_time():.3f}"


def start_orphan_reaper() -> int:
    """Start the reaper for this process once (idempotent per pid); return the reaper's pid."""
    me = os.getpid()
    running = _reapers.get(me)
    if running is not None and running.poll() is None:
        return running.pid
    tag = owner_tag(me)
    os.environ[OWNER_ENV] = tag
    die_with_parent_in_forks()
    cmd = [sys.executable, "-m", "p2p_photon.watchdog", "--parent", str(me), "--tag", tag]
    if os.environ.get(LOG_ENV):
        cmd += ["--log-file", os.environ[LOG_ENV]]
    # the child inherits this mask: a notify_reaper() sent before it is ready stays pending
    # instead of killing it (SIGUSR1's default action)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=_env_with_package_on_path(),
            cwd="/",
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    _reapers[me] = proc
    logger.debug(f"orphan reaper started (pid {proc.pid}) for pid {me}")
    return proc.pid


_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
_fork = {"parent": 0, "main": False}  # the forking process and whether its main thread forks (set before each fork)
_pdeath_registered = False


def end_with_parent(parent: int | None = None) -> None:
    """In a child (Linux; a no-op elsewhere): SIGTERM from the kernel when its parent dies, even by SIGKILL
    (prctl PR_SET_PDEATHSIG; it follows the thread that forked us). If the parent died before we asked (our
    parent is no longer `parent`, or, without one, we were re-parented to init), SIGTERM now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent if parent else os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent_in_forks() -> None:
    """Processes this one forks from its main thread from now on (hivemind's DHT and averager) end with it
    (end_with_parent). The reaper's snapshot misses a child forked less than a poll before a SIGKILL (soak:
    a peer killed 20 s into its start-up left its DHT process running). Only main-thread forks: the death
    signal follows the forking *thread*."""
    global _pdeath_registered
    if not _pdeath_registered and sys.platform.startswith("linux"):
        os.register_at_fork(before=_note_fork, after_in_child=_die_with_parent)
        _pdeath_registered = True


def _note_fork() -> None:
    _fork.update(parent=os.getpid(), main=threading.current_thread() is threading.main_thread())


def _die_with_parent() -> None:
    if _fork["main"]:
        end_with_parent(_fork["parent"])


def notify_reaper() -> None:
    """Ask this process's reaper to snapshot the descendants now (e.g. right after a fork)."""
    proc = _reapers.get(os.getpid())
    if proc is not None and proc.poll() is None:
        try:
            proc.send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            pass


def _env_with_package_on_path() -> dict[str, str]:
    """The reaper runs `-m p2p_photon.watchdog` from '/': make sure this package is importable."""
    env = os.environ.copy()
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _default_signals_in_child() -> None:
    """After a fork (hivemind's DHT and averager processes): SIGTERM back to its default, SIGINT ignored.
    Without this a child inherited our handler, which only sets an event in the child, so `terminate()`
    of a DHT process whose graceful shutdown failed did nothing, and the peer hung at exit joining it.
    SIGINT stays ignored in children, as hivemind intends: Ctrl-C reaches the whole process group, and
    the parent shuts its children down in order (they still serve the final state while it lingers)."""
    for sig, action in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.SIG_IGN)):
        with contextlib.suppress(ValueError, OSError):  # not the child's main thread: leave it
            signal.signal(sig, action)


_at_fork_registered = False


class StartupInterrupted(Exception):
    """SIGINT/SIGTERM arrived while the process was still starting (see stop_on_signals)."""


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, what: str = "shutting down",
                    starting: threading.Event | None = None) -> Iterator[None]:
    """In the main thread, SIGINT/SIGTERM set `stop` (the caller finishes its work and leaves cleanly);
    the previous handlers come back afterwards. Install it after forking DHT/averager children. While
    `starting` is set, a signal also raises StartupInterrupted in the main thread: start-up (data
    preparation, a DHT that takes minutes to come up, the state download) has no step to finish, and
    a peer must not ignore a stop request for that long."""
    global _at_fork_registered
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _at_fork_registered:
        os.register_at_fork(after_in_child=_default_signals_in_child)
        _at_fork_registered = True

    def handler(signum: int, _frame: object) -> None:
        stop.set()
        if starting is not None and starting.is_set():
            starting.clear()  # once: the clean-up that follows must not be interrupted again
            logger.info(f"received {signal.Signals(signum).name} during start-up: leaving")
            raise StartupInterrupted(signal.Signals(signum).name)
        logger.info(f"received {signal.Signals(signum).name}: {what}")
        _dump_if_stuck()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        for sig, old in previous.items():
            signal.signal(sig, old)


STUCK_AFTER_STOP_S = 60.0
"""A process still running this long after a stop request writes the stacks of all its threads to stderr
(the peer's log): where it is stuck, for the bug report. It keeps running; a second signal re-arms it."""


def _dump_if_stuck() -> None:
    with contextlib.suppress(Exception):  # no usable stderr (closed, or not a file): nothing to diagnose with
        sys.stderr.flush()
        faulthandler.dump_traceback_later(STUCK_AFTER_STOP_S, exit=False, file=sys.stderr)


# ----------------------------------------------------------------------------- the reaper process


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _snapshot(parent: psutil.Process, exclude: int) -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in parent.children(recursive=True) if p.pid != exclude}
    except psutil.NoSuchProcess:
        return {}


def _still_running(known: dict[int, psutil.Process]) -> dict[int, psutil.Process]:
    # is_running() compares creation times, so a recycled pid is dropped here
    return {pid: p for pid, p in known.items() if p.is_running()}


def _tagged(tag: str, exclude: int) -> dict[int, psutil.Process]:
    """Processes whose (exec-time) environment carries the owner tag."""
    found = {}
    for p in psutil.process_iter():
        if p.pid == exclude:
            continue
        try:
            if p.environ().get(OWNER_ENV) == tag:
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    return found


def _targets(known: dict[int, psutil.Process], tag: str | None, me: int) -> list[psutil.Process]:
    targets = _still_running(known)
    for p in list(targets.values()):  # children started since the last snapshot
        try:
            targets.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    if tag:
        targets.update(_tagged(tag, me))
    targets.pop(me, None)
    return list(targets.values())


def reap(procs: list[psutil.Process], grace: float = GRACE) -> int:
    """SIGTERM `procs`, SIGKILL whatever is still running after `grace` seconds; return how many."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=1.0)
    return len(procs)


def watch(
    parent_pid: int, tag: str | None = None, interval: float = POLL_INTERVAL, grace: float = GRACE
) -> int:
    """Follow `parent_pid` until it is gone, then end its leftover descendants."""
    me = os.getpid()
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return 0
    if tag and f"{parent.pid}:{parent.create_time():.3f}" != tag:
        return 0  # the pid was recycled before we started
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # consumed by sigtimedwait below
    known: dict[int, psutil.Process] = {}
    while _is_alive(parent):
        fresh = _snapshot(parent, me)
        if fresh.keys() - known.keys():  # in the --log-file: shows what a kill from now on is covered for
            logger.info(f"following pid {parent_pid}: descendants {sorted(fresh)}")
        known = {**_still_running(known), **fresh}
        signal.sigtimedwait([signal.SIGUSR1], interval)
    leftovers = _targets(known, tag, me)
    if leftovers:
        names = ", ".join(f"{_name(p)}[{p.pid}]" for p in leftovers)
        logger.warning(f"parent {parent_pid} is gone; ending its leftover processes: {names}")
        reap(leftovers, grace)
    removed = remove_shared_memory({parent_pid, *known, *(p.pid for p in leftovers)})
    if removed:
        logger.info(f"removed {removed} shared-memory segment(s) the tree of {parent_pid} left in {SHM_DIR}")
    return 0


SHM_DIR = Path("/dev/shm")


def remove_shared_memory(pids: set[int]) -> int:
    """Remove the /dev/shm/torch_<pid>_* segments of these ended processes; return how many. hivemind sets
    torch's `file_system` sharing strategy, whose segments outlive a process that dies without cleaning up
    (soak: about 20 per peer; 98 000 files, 3.3 GB of RAM-backed /dev/shm, after a day of soaks). A pid
    that is running again (recycled) is skipped (a zombie is not running); a mapping another process still
    holds stays valid."""
    removed = 0
    for pid in pids:
        try:
            if _is_alive(psutil.Process(pid)):
                continue
        except psutil.Error:
            pass  # gone
        for f in SHM_DIR.glob(f"torch_{pid}_*"):
            with contextlib.suppress(OSError):
                f.unlink()
                removed += 1
    return removed


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2p_photon.watchdog", description=__doc__.splitlines()[0])
    ap.add_argument("--parent", type=int, required=True, help="pid to follow")
    ap.add_argument("--tag", default=None, help="owner tag 'pid:create_time' (guards against pid reuse)")
    ap.add_argument("--log-file", default=None, help="append log lines here")
    ap.add_argument("--interval", type=float, default=POLL_INTERVAL)
    args = ap.parse_args(argv)
    if args.log_file:
        logging.basicConfig(
            filename=args.log_file,
            level=logging.INFO,
            format=f"%(asctime)s reaper[{os.getpid()}] %(message)s",
        )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the parent must not stop us
    return watch(args.parent, args.tag, args.interval)


if __name__ == "__main__":
    sys.exit(main())
