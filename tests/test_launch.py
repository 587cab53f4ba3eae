"""LocalSwarm (launch.py) itself: what the demo, the tests and the benchmarks rely on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import python_env, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("zygote", ["0", "1"])
def test_children_end_when_the_launcher_is_killed_and_a_relative_workdir_works(tmp_path, zygote):
    """Soak finding: a launcher killed with SIGKILL left its peers training on their own; and a relative
    workdir broke the paths handed to the children (they run inside it). Plain children and a zygote's."""
    child = tmp_path / "child.py"
    child.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(300)\n")
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(f"""
        import time
        from p2p_photon.launch import LocalSwarm
        swarm = LocalSwarm("rel-work")
        swarm.spawn("c", [str(swarm.workdir / "pid")], script={str(child)!r})
        time.sleep(300)
    """))
    proc = subprocess.Popen([sys.executable, str(launcher)], cwd=tmp_path, env=dict(python_env(), P2P_PHOTON_ZYGOTE=zygote))
    pid_file = tmp_path / "rel-work" / "pid"
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60, "the child to start")
        pid = int(pid_file.read_text())
        assert _alive(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not _alive(pid), 10, "the child to end with its launcher")
    finally:
        proc.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert (tmp_path / "rel-work" / "c.log").exists() and not (tmp_path / "rel-work" / "rel-work").exists()


def test_a_forked_child_of_a_process_that_handles_sigterm_still_ends_on_sigterm(tmp_path):
    """hivemind's DHT and averager processes are forked children of the peer; they inherited the peer's
    SIGTERM handler (which only sets an event), so terminate() of a DHT whose graceful shutdown failed did
    nothing and the peer hung at exit joining it (seen: peers of killed test runs alive an hour later)."""
    script = tmp_path / "fork.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing as mp, threading, time
        from p2p_photon.watchdog import stop_on_signals

        def child():
            time.sleep(60)

        if __name__ == "__main__":
            with stop_on_signals(threading.Event()):
                p = mp.get_context("fork").Process(target=child)
                p.start()
                time.sleep(0.5)
                t0 = time.monotonic()
                p.terminate()
                p.join(10)
                print("ended" if not p.is_alive() else "alive", round(time.monotonic() - t0, 1))
                if p.is_alive():
                    p.kill()
    """))
    out = subprocess.run([sys.executable, str(script)], env=python_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ended"), (out.stdout, out.stderr[-2000:])


def test_a_process_stuck_after_a_stop_request_writes_where_it_is_stuck(tmp_path):
    """Soak smoke: three peers answered SIGTERM ('finishing the current step') and never left, with nothing in
    their logs to say where they were. Now a process still running STUCK_AFTER_STOP_S after the signal
    writes every thread's stack to stderr (the peer's log), and goes on; leaving in time writes nothing."""
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, threading, time
        from p2p_photon import watchdog
        watchdog.STUCK_AFTER_STOP_S = 0.5

        def stuck_in_a_step():
            time.sleep(2.0)

        with watchdog.stop_on_signals(threading.Event()):
            os.kill(os.getpid(), signal.SIGTERM)
            if sys.argv[1] == "stuck":
                stuck_in_a_step()
        time.sleep(1.0)  # the context is left: the dump is cancelled
        print("left")
    """))
    out = subprocess.run([sys.executable, str(script), "stuck"], env=python_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "left", out.stderr[-2000:]
    assert "stuck_in_a_step" in out.stderr and "most recent call first" in out.stderr, out.stderr[-2000:]
    out = subprocess.run([sys.executable, str(script), "quick"], env=python_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "most recent call first" not in out.stderr, out.stderr[-2000:]


def test_a_zygote_child_killed_inside_a_dht_call_freezes_no_other_child(tmp_path, monkeypatch):
    """hivemind takes a multiprocessing lock (SharedBytes._lock) for every MPFuture, i.e. every DHT call; it
    is created at import, so every child forked from the zygote shared the zygote's one. A child SIGKILLed
    while it held it froze every other child at its next DHT call (soak smoke: the survivors in their stage
    waits and a new peer in its DHT start-up). Now each child has its own: the second child, started after
    the first was killed holding its lock, creates futures at once."""
    from p2p_photon.launch import LocalSwarm

    monkeypatch.setenv("P2P_PHOTON_ZYGOTE", "1")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from hivemind.utils.mpfuture import MPFuture, SharedBytes
        if sys.argv[1] == "hold":
            SharedBytes._lock.acquire()  # as a child killed inside SharedBytes.next() leaves it
            MPFuture._update_lock.acquire()
            print("held", flush=True)
            time.sleep(120)
        t0 = time.monotonic()
        futures = [MPFuture() for _ in range(40)]  # more than one shared buffer's worth (16 by default)
        futures[0].set_result(7)
        print("futures", len(futures), futures[0].result(timeout=5), round(time.monotonic() - t0, 1), flush=True)
    """))
    swarm = LocalSwarm(tmp_path / "work")
    try:
        holder = swarm.spawn("holder", ["hold"], script=str(script))
        assert type(holder.popen).__name__ == "ForkedProcess"
        wait_until(lambda: holder.log.exists() and "held" in holder.log.read_text(), 60, "the first child to take the locks")
        holder.popen.kill()
        assert holder.popen.wait(30) == -signal.SIGKILL
        other = swarm.spawn("other", ["use"], script=str(script))
        assert swarm.wait([other], timeout=60) == [0], other.log.read_text()[-2000:]
        assert "futures 40 7" in other.log.read_text()
    finally:
        swarm.stop(grace=5)
        from p2p_photon import zygote

        zygote.shutdown()


def test_children_run_the_package_of_the_parent_not_an_editable_installs(tmp_path, monkeypatch):
    """A second checkout's tests and benchmarks started the first checkout's peers (the editable install
    points there): a child's PYTHONPATH leads with the directory holding the parent's p2p_photon."""
    import p2p_photon
    from p2p_photon.launch import LocalSwarm

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = LocalSwarm(str(tmp_path))._env("peer0")
    here = os.path.dirname(os.path.dirname(os.path.abspath(p2p_photon.__file__)))
    assert env["PYTHONPATH"].split(os.pathsep) == [here, "/elsewhere"]
    code = "import p2p_photon, os; print(os.path.dirname(os.path.dirname(p2p_photon.__file__)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == here, out.stderr


def test_a_zygote_child_runs_like_a_process_of_its_own(tmp_path, monkeypatch):
    """LocalSwarm with P2P_PHOTON_ZYGOTE=1 (the suite) forks its children from one pre-imported process: each
    has its own arguments, environment, working directory, log and thread count, its exit code comes back
    (a signal's as -N, like subprocess), and `python SCRIPT` children run as __main__."""
    from p2p_photon.launch import LocalSwarm

    monkeypatch.setenv("P2P_PHOTON_ZYGOTE", "1")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time, torch
        print("argv", sys.argv[1:], "cwd", os.getcwd(), "var", os.environ.get("ZVAR"), "threads",
              torch.get_num_threads(), "main", __name__)
        sys.stderr.write("to stderr\\n")
        if sys.argv[1] == "sleep":
            time.sleep(120)
        sys.exit(int(sys.argv[2]))
    """))
    swarm = LocalSwarm(tmp_path / "work")
    a = swarm.spawn("a", ["exit", "3"], script=str(script), extra_env={"ZVAR": "x1"})
    b = swarm.spawn("b", ["sleep", "0"], script=str(script), extra_env={"ZVAR": "x2"})
    c = swarm.spawn("c", ["--help"])  # the CLI itself
    try:
        assert type(a.popen).__name__ == "ForkedProcess"
        assert swarm.wait([a, c], timeout=120) == [3, 0]
        log = a.log.read_text()
        assert f"argv ['exit', '3'] cwd {swarm.workdir} var x1 threads 1 main __main__" in log, log
        assert "to stderr" in log
        assert "federated" in c.log.read_text().lower() or "usage" in c.log.read_text().lower()
        wait_until(lambda: "var x2" in b.log.read_text(), 60, "the sleeping child to start")
        assert b.alive() and a.popen.pid != b.popen.pid
        b.popen.kill()
        assert b.popen.wait(30) == -signal.SIGKILL
    finally:
        swarm.stop(grace=5)
        from p2p_photon import zygote

        t0 = time.monotonic()
        zygote.shutdown()
        assert time.monotonic() - t0 < 30
