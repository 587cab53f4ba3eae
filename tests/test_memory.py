"""p2p_photon.memory: glibc's freed heap goes back to the system (the soak's RSS creep)."""

from __future__ import annotations

import sys
import threading
import time

import psutil
import pytest

from p2p_photon import memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or memory._libc() is None, reason="glibc only")


@glibc
def test_trim_returns_freed_heap_pages_that_free_alone_keeps():
    """100 MB of 1 kB blocks (glibc's heap, not Python's small-object arenas), all freed but the last: free()
    cannot shrink the heap past the block still in use at its top, malloc_trim releases the pages below."""
    rss = psutil.Process().memory_info
    blocks = [bytearray(1000) for _ in range(100_000)]
    keep = bytearray(1000)  # noqa: F841 - pins the top of the heap
    before = rss().rss
    del blocks
    freed = rss().rss
    assert memory.trim()
    after = rss().rss
    assert before - freed < 20 * 2**20, (before, freed)  # free() alone gave (almost) nothing back
    assert freed - after > 50 * 2**20, (freed, after)


@glibc
def test_the_trimmer_thread_runs_until_stopped(monkeypatch):
    stop = threading.Event()
    calls = []
    real = memory.trim
    monkeypatch.setattr(memory, "trim", lambda: calls.append(time.monotonic()) or real())
    thread = memory.start_trimmer(stop, interval=0.05)
    time.sleep(0.3)
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive() and len(calls) >= 3
    assert memory.limit_arenas(2)


@glibc
def test_a_forked_child_trims_too(monkeypatch):
    """hivemind's DHT and averager are forked children: a thread does not survive the fork, so each child
    starts its own trimmer."""
    import os

    monkeypatch.setattr(memory, "_forks_trimmed", False)
    stop = threading.Event()
    memory.start_trimmer(stop, interval=0.05, in_children=True)
    stop.set()
    pid = os.fork()
    if pid == 0:  # the child: its trimmer thread is there
        ok = any(t.name == "malloc-trim" and t.is_alive() for t in threading.enumerate())
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
