"""The swarm monitor: a read-only view of a run's signed progress records in the DHT.

One concern per module; a module imports only modules above it in this list (no import circle):

* `options`     — `MonitorOptions` (what a watcher chooses) and `MonitorError`;
* `state`       — the swarm model from progress records (pure: peers, global round, round target, ETA);
* `metrics_log` — the JSONL observation log: `MetricsLog` writes it, `read_log` reads it back;
* `view`        — the swarm line, table cells and the terminal view (text only);
* `plots`       — loss vs tokens, tokens/s and peers alive as one PNG (`render_plot`, `plot_log`);
* `poller`      — `Monitor`, the thread that reads the DHT and feeds `state`, the log and the history;
* `dashboard`   — the HTTP dashboard of a `Monitor` (page, JSON API, Prometheus metrics, plot);
* `hosted`      — `host_monitor`, the monitor running inside the bootstrap's process.

The command line (`p2p-photon monitor`, `monitor plot`) lives in `p2p_photon.cli`.
"""

from .dashboard import Dashboard, parse_http_address, serve_dashboard
from .hosted import HostedMonitor, host_monitor
from .metrics_log import MetricsLog, read_log
from .options import DEFAULT_GONE_AFTER, DEFAULT_INTERVAL, MonitorError, MonitorOptions
from .plots import plot_log, render_plot
from .poller import Monitor, monitor_validators
from .state import PeerView, Swarm, peer_row, run_setting, swarm_summary
from .view import PEER_COLUMNS, TerminalView, format_cell, peer_table, summary_line

__all__ = [
    "DEFAULT_GONE_AFTER", "DEFAULT_INTERVAL", "PEER_COLUMNS", "Dashboard", "HostedMonitor", "MetricsLog",
    "Monitor", "MonitorError", "MonitorOptions", "PeerView", "Swarm", "TerminalView", "format_cell",
    "host_monitor", "monitor_validators", "parse_http_address", "peer_row", "peer_table", "plot_log",
    "read_log", "render_plot", "run_setting", "serve_dashboard", "summary_line", "swarm_summary",
]
