"""The monitor's settings and its one user-facing error type.

Only what a person watching chooses lives here (which run, how often, how long until a peer
counts as gone, where to log). Run-wide constants such as the round target and seq_len are
not settings: the swarm's own progress records say them (see `state.run_setting`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from p2p_photon.errors import UserError

DEFAULT_INTERVAL = 2.0
DEFAULT_GONE_AFTER = 30.0


class MonitorError(UserError):
    """A one-line, user-facing monitor error (missing --run-id, bad log file, busy port, ...)."""


@dataclass(frozen=True, kw_only=True)
class MonitorOptions:
    run_id: str
    """The run whose progress records are shown."""
    interval: float = DEFAULT_INTERVAL
    """Seconds between polls of the DHT."""
    gone_after: float = DEFAULT_GONE_AFTER
    """A peer not seen for this many seconds is shown as gone (kept in the table and history)."""
    log_path: str | None = None
    """Append every new observation to this JSONL file."""

    def __post_init__(self) -> None:
        if not self.run_id:
            raise MonitorError("monitor: the run ID is empty; pass --run-id ID")
        for name in ("interval", "gone_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                flag = "--" + name.replace("_", "-")
                raise MonitorError(f"monitor: {flag} must be a positive number of seconds")
