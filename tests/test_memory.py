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
