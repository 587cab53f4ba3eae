"""`host_monitor`: the monitor (and its dashboard) running inside another process's DHT node.

`p2p-photon bootstrap --monitor` calls it from its on_ready hook, so a small swarm needs no
separate monitor process. The monitor borrows the node's DHT and never shuts it down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .dashboard import Dashboard, serve_dashboard
from .options import DEFAULT_GONE_AFTER, DEFAULT_INTERVAL, MonitorOptions
from .poller import Monitor

if TYPE_CHECKING:
    import hivemind

logger = logging.getLogger(__name__)


@dataclass
class HostedMonitor:
    """A monitor polling from a daemon thread, and its dashboard if one was asked for."""

    monitor: Monitor
    dashboard: Dashboard | None = None

    def stop(self) -> None:
        """Stop the dashboard, then the monitor; the borrowed DHT keeps running."""
        if self.dashboard is not None:
            self.dashboard.stop()
        self.monitor.stop()


def host_monitor(dht: hivemind.DHT, *, run_id: str, http: str | None = None, log: str | None = None,
                 interval: float = DEFAULT_INTERVAL, gone_after: float = DEFAULT_GONE_AFTER) -> HostedMonitor:
    """Monitor `dht` (e.g. the bootstrap's) from a daemon thread; call `.stop()` before shutting it down.

    The round target and seq_len come from the swarm's progress records, not from the host's config.
    """
    opts = MonitorOptions(run_id=run_id, interval=interval, gone_after=gone_after, log_path=log)
    hosted = HostedMonitor(Monitor(opts, dht=dht).start())
    try:
        if http:
            hosted.dashboard = serve_dashboard(hosted.monitor, http)
    except BaseException:
        hosted.stop()
        raise
    hosted.monitor.start_background()
    where = f", dashboard at {hosted.dashboard.url}" if hosted.dashboard else ""
    logger.info(f"monitor of run {run_id} running{where}")
    return hosted
