"""`Monitor`: polls a run's progress records from the DHT and keeps the swarm model up to date.

It joins the DHT as a client (or borrows a running DHT, e.g. the bootstrap's), calls
`fetch_progress` every `interval` seconds, feeds `state.Swarm`, appends new observations to the
JSONL log and keeps an in-memory history for plots. Records that fail the schema are skipped by
`fetch_progress` and counted; a failed poll is logged and counted, never fatal.

The monitor's own DHT checks signatures but not the record schema (`monitor_validators`):
hivemind drops a whole dictionary from a node when one entry fails a validator, so a
schema-checking monitor would silently lose what a hostile node serves instead of counting
its bad entries. `fetch_progress` parses every entry strictly, so nothing invalid is shown.

hivemind (3-4 s to import) is imported lazily, so `p2p-photon monitor plot` does not pay for it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .metrics_log import MetricsLog
from .options import MonitorOptions
from .state import Swarm, swarm_summary

if TYPE_CHECKING:
    import hivemind

    from p2p_photon.config import DHTConfig
    from p2p_photon.progress import ProgressRecord

logger = logging.getLogger(__name__)

MAX_HISTORY = 100_000
"""Observations kept in memory for /plot.png (the JSONL log keeps everything)."""


def monitor_validators(run_id: str) -> list:
    """Signature checks only (see the module docstring): fetch_progress counts the schema errors."""
    from hivemind.dht.crypto import RSASignatureValidator

    return [RSASignatureValidator()]


class Monitor:
    """Polls a run's progress records; `state()` is what every view shows.

    Give `dht` to borrow a running DHT (it is not shut down by `stop`), or `dht_cfg` to start
    a client-mode DHT of its own in `start()` (shut down by `stop`).
    """

    def __init__(self, options: MonitorOptions, *, dht: hivemind.DHT | None = None,
                 dht_cfg: DHTConfig | None = None, record_validators: Sequence | None = None):
        if (dht is None) == (dht_cfg is None):
            raise TypeError("Monitor needs exactly one of dht= or dht_cfg=")
        self.options, self.dht, self.dht_cfg = options, dht, dht_cfg
        self._validators = record_validators
        self.swarm = Swarm()
        self.history: deque[dict] = deque(maxlen=MAX_HISTORY)
        self.invalid_records = 0
        """Entries fetch_progress skipped in the latest poll (schema failures, superseded records)."""
        self.polls = self.poll_errors = 0
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._log: MetricsLog | None = None
        self._thread: threading.Thread | None = None

    def start(self, *, reaper: bool = True) -> Monitor:
        """Open the log, then start the client-mode DHT unless one was given (main thread).

        A borrowed DHT gets the signature validator added (idempotent): without it, hivemind
        cannot strip the signatures off progress records, and `dht.get` of the progress key
        never returns (msgpack ExtraData inside the DHT process).
        """
        if self.options.log_path:
            self._log = MetricsLog(self.options.log_path)
        validators = self._validators or monitor_validators(self.options.run_id)
        if self.dht is not None:
            self.dht.add_validators(validators)
            return self
        from p2p_photon.network import start_dht

        try:
            self.dht = start_dht(self.dht_cfg, record_validators=validators, client_mode=True, reaper=reaper)
        except BaseException:
            self.stop()
            raise
        return self

    def poll_once(self) -> dict[str, Any]:
        """Fetch the records once, update the swarm, history and log; return the new state."""
        from p2p_photon.progress import fetch_progress

        try:
            if not self.dht.is_alive():
                raise RuntimeError("the DHT process is not running")
            records, skipped = fetch_progress(self.dht, self.options.run_id)
        except Exception as e:
            self.poll_errors += 1
            logger.warning(f"poll failed: {e!r}")
            return self.state()
        self._observe(records, skipped, time.time())
        return self.state()

    def _observe(self, records: Sequence[ProgressRecord], skipped: int, now: float) -> None:
        if skipped > self.invalid_records:
            logger.warning(f"skipped {skipped} invalid or superseded progress record(s)")
        with self._lock:
            self.polls += 1
            self.invalid_records = skipped
            new = [dict(rec.model_dump(), observed_at=now) for rec in self.swarm.observe(records, now)]
            self.history.extend(new)
        if self._log is not None:
            for obs in new:
                self._log.write(obs)

    def state(self) -> dict[str, Any]:
        """JSON-ready: {'run_id', 'time', 'swarm', 'peers', 'invalid_records', 'polls', 'poll_errors'}."""
        now = time.time()
        with self._lock:
            rows = self.swarm.rows(now, self.options.gone_after)
            counts = dict(invalid_records=self.invalid_records, polls=self.polls,
                          poll_errors=self.poll_errors)
        swarm = dict(swarm_summary(rows), invalid_records=counts["invalid_records"])
        return dict(run_id=self.options.run_id, time=now, swarm=swarm, peers=rows, **counts)

    def observations(self) -> list[dict]:
        """A copy of the in-memory history (for plots)."""
        with self._lock:
            return list(self.history)

    def run(self, duration: float = 0.0, on_poll: Callable[[dict], None] | None = None) -> None:
        """Poll every `interval` s until `stop()` (or for `duration` s when > 0)."""
        deadline = time.monotonic() + duration if duration > 0 else math.inf
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            state = self.poll_once()
            if on_poll is not None:
                on_poll(state)
            pause = min(self.options.interval - (time.monotonic() - started), deadline - time.monotonic())
            self.stop_event.wait(max(0.0, pause))

    def start_background(self) -> threading.Thread:
        """Poll in a daemon thread (the bootstrap hosts the monitor this way)."""
        self._thread = threading.Thread(target=self._run_logged, name="p2p-photon-monitor", daemon=True)
        self._thread.start()
        return self._thread

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:
            logger.exception("the monitor stopped on an unexpected error")

    @property
    def polling(self) -> bool:
        """True while the background thread of `start_background` runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and close the log; shut down the DHT if this monitor started it."""
        self.stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._log is not None:
            self._log.close()
        if self.dht_cfg is not None and self.dht is not None:
            from p2p_photon.network import shutdown_dht

            shutdown_dht(self.dht)
            self.dht = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
