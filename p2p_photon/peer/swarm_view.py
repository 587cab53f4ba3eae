"""The swarm view: this peer's progress record goes out, the swarm's records come in, in a
background thread, so the training loop never blocks on the DHT (it reads the cached view).

A record published for a state change ('averaging', 'syncing', ...) is re-published with a fresh time
every HEARTBEAT_S while nothing newer comes: others count a peer as present only while its newest
record is younger than tracker.ALIVE_S, and one round's averaging can outlast that (soak: peers waiting
50 s on the stages looked gone, and a joiner concluded every live peer had averaged its round without it).
Training records need no heartbeat: they come every progress interval, and their time dates the samples
they claim (others extrapolate from it).
"""

from __future__ import annotations

import logging
import threading
import time

from hivemind.utils import get_dht_time

from ..progress import ProgressPublisher, ProgressRecord, fetch_progress

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0  # well under tracker.ALIVE_S (30 s)


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
        self._publishing = threading.Lock()  # one store at a time: a heartbeat never overtakes a newer record
        self._last: ProgressRecord | None = None  # the newest record published
        self._last_pub = 0.0

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

    def publish(self, record: ProgressRecord) -> bool:
        """Publish `record` now (a state change), from any thread; a training record still waiting to go out
        is older, and is dropped."""
        with self._publishing:
            with self._lock:
                self._pending = None
            return self._publish(record)

    def _publish(self, record: ProgressRecord) -> bool:
        ok = self.publisher.publish(record)
        self._last, self._last_pub = record, time.monotonic()
        return ok

    def _due(self) -> ProgressRecord | None:
        """The record to publish now, if any: the newest offered one once the interval passed, else a
        heartbeat of the last state-change record."""
        since = time.monotonic() - self._last_pub
        if since >= self.interval:
            with self._lock:  # take the newest record only when it is due
                pending, self._pending = self._pending, None
            if pending is not None:
                return pending
        last = self._last
        if last is not None and last.state != "training" and since >= HEARTBEAT_S:
            return last.model_copy(update=dict(time=get_dht_time()))
        return None

    def run(self) -> None:
        while not self.stopped.wait(min(0.5, self.interval / 2)):
            try:
                with self._publishing:
                    record = self._due()
                    if record is not None:
                        self._publish(record)
                self.refresh()
            except Exception as e:  # the DHT may be shutting down; the loop reads the last good view
                logger.debug("swarm view: %s", e)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
