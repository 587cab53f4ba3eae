"""The swarm view: this peer's progress record goes out, the swarm's records come in, in a
background thread, so the training loop never blocks on the DHT (it reads the cached view)."""

from __future__ import annotations

import logging
import threading
import time

from ..progress import ProgressPublisher, ProgressRecord, fetch_progress

logger = logging.getLogger(__name__)


class SwarmView(threading.Thread):
    """Publishes this peer's latest progress record and fetches the swarm's records in the background,
    so the training loop never blocks on the DHT (it reads the cached view)."""

    def __init__(self, dht, run_id: str, publisher: ProgressPublisher, interval: float,
                 members: frozenset[str] | None = None):
        super().__init__(name="swarm-view", daemon=True)
        self.dht, self.run_id, self.publisher, self.interval = dht, run_id, publisher, interval
        self.members = members
        self.stopped = threading.Event()
        self._pending: ProgressRecord | None = None
        self._records: list[ProgressRecord] = []
        self.invalid = 0
        self._lock = threading.Lock()

    def offer(self, record: ProgressRecord) -> None:
        with self._lock:
            self._pending = record

    def records(self) -> list[ProgressRecord]:
        with self._lock:
            return list(self._records)

    def refresh(self) -> list[ProgressRecord]:
        """Fetch now (for decisions that must not use a stale view)."""
        records, invalid = fetch_progress(self.dht, self.run_id, members=self.members, bind_peer_id=True)
        with self._lock:
            self._records, self.invalid = records, invalid
        return records

    def run(self) -> None:
        last_pub = 0.0
        while not self.stopped.wait(min(0.5, self.interval / 2)):
            try:
                pending = None
                if time.monotonic() - last_pub >= self.interval:
                    with self._lock:  # take the newest record only when it is due
                        pending, self._pending = self._pending, None
                if pending is not None:
                    self.publisher.publish(pending)
                    last_pub = time.monotonic()
                self.refresh()
            except Exception as e:  # the DHT may be shutting down; the loop reads the last good view
                logger.debug("swarm view: %s", e)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
