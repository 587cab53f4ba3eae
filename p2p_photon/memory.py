"""Keep a long-running peer's resident memory flat (glibc only; a no-op elsewhere).

A peer runs many threads (hivemind's, the swarm view, torch's), and its forked DHT and averager
children copy its allocator settings. glibc gives each contending thread its own malloc arena (up to
8 per core) and returns freed memory to the system only from the top of each heap, so the resident
size creeps up round after round although nothing is leaked (soak: 2.7–7.6 MB/min over 3 minutes).
`limit_arenas` caps the arenas before the threads and children start; `start_trimmer` returns freed
pages to the system every `interval` seconds from a daemon thread, in this process and (`in_children`)
in every process it forks afterwards (hivemind's DHT and averager: a thread does not survive a fork).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


@functools.cache  # find_library runs `ldconfig -p`: once per process, not on every trim
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def limit_arenas(arenas: int = 2) -> bool:
    """At most `arenas` malloc arenas for this process and the children it forks; True if glibc took it."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, arenas) == 1)


def trim() -> bool:
    """Return freed heap memory to the system now; True if some was released."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0) == 1)


_forks_trimmed = False


def start_trimmer(stop: threading.Event, interval: float = 30.0, in_children: bool = False
                  ) -> threading.Thread | None:
    """A daemon thread calling trim() every `interval` seconds until `stop` is set (None without glibc);
    `in_children`: also one in each child this process forks from now on (it runs until the child exits)."""
    global _forks_trimmed
    if _libc() is None:
        return None
    if in_children and not _forks_trimmed:
        _forks_trimmed = True
        os.register_at_fork(after_in_child=lambda: start_trimmer(threading.Event(), interval))

    def run():
        while not stop.wait(interval):
            trim()

    thread = threading.Thread(target=run, name="malloc-trim", daemon=True)
    thread.start()
    return thread
