"""The monitor's web dashboard: a self-refreshing page, a JSON API and Prometheus metrics.

Routes of the stdlib `ThreadingHTTPServer` (served from a daemon thread):

* `/` — the swarm line and the peer table, rendered on the server (so the page is complete
  without JavaScript), then refreshed every 2 s from `/api/state` by a few lines of JS;
* `/api/state` — `Monitor.state()` as JSON, plus the swarm line as text (`summary`);
* `/plot.png` — the monitor's in-memory history drawn by `render_plot`, cached a few seconds;
* `/metrics` — Prometheus text format from a dedicated `CollectorRegistry` whose collector
  reads `Monitor.state()` at scrape time (no stale label sets to clean up).

Peer IDs, fingerprints and hashes are whatever a peer chose to publish: the page escapes
them (html.escape on the server, textContent in the browser). The dashboard binds to
127.0.0.1 unless told otherwise; any other host is logged as a warning.
"""

from __future__ import annotations

import errno
import html
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .options import MonitorError
from .plots import render_plot
from .view import PEER_COLUMNS, format_cell, summary_line

if TYPE_CHECKING:
    from .poller import Monitor

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
PLOT_TTL = 5.0
"""Seconds a rendered /plot.png is reused."""
PEER_GAUGES = (("round", "round", "Round the peer is in"), ("loss", "loss", "Latest training loss"),
               ("tokens_per_s", "tokens_per_s", "Training throughput in tokens/s"),
               ("failed_rounds", "failed_rounds", "Rounds that could not be averaged"),
               ("bytes_sent", "bytes_sent", "Bytes sent by averaging"),
               ("samples", "samples", "Samples trained in the current round"),
               ("last_seen_seconds", "last_seen_s", "Seconds since the peer's latest record"),
               ("alive", "alive", "1 if the peer is alive"))
SWARM_GAUGES = (("round", "round", "Global round"), ("alive_peers", "alive_peers", "Alive peers"),
                ("known_peers", "known_peers", "Peers ever seen"),
                ("tokens_per_s", "tokens_per_s", "Swarm throughput in tokens/s"),
                ("samples", "samples", "Samples of the global round so far"),
                ("target_samples", "target_samples", "Samples per round"),
                ("eta_seconds", "eta_s", "Estimated seconds until the round ends"),
                ("theta_same", "theta_same", "1 if the peers agree on the hash of the newest global model"),
                ("distinct_theta", "distinct_theta", "Distinct hashes of the newest global model (>1: a fork)"),
                ("invalid_records", "invalid_records", "Progress records skipped in the latest poll"),
                ("heldout_perplexity", "eval_ppl", "Median held-out perplexity of the newest evaluated global model "
                 "on the run's public eval set"))


def parse_http_address(text: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT', 'PORT' or '[v6]:PORT' -> (host, port); the host defaults to 127.0.0.1."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = "", text.strip()
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MonitorError(f"--http {text}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# ----------------------------------------------------------------------------- metrics


class _StateCollector:
    """Prometheus collector: gauges per peer (label: short peer ID) and for the swarm, read at scrape time."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self.monitor.state()
        for name, key, doc in PEER_GAUGES:
            family = GaugeMetricFamily(f"p2p_photon_peer_{name}", doc, labels=["peer"])
            for row in state["peers"]:
                family.add_metric([row["peer"]], float(row[key]))
            yield family
        for name, key, doc in SWARM_GAUGES:
            value = state["swarm"][key]
            if value is not None:
                yield GaugeMetricFamily(f"p2p_photon_swarm_{name}", doc, value=float(value))


# ----------------------------------------------------------------------------- page


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>p2p-photon · {run_id}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
#swarm {{ font-family: ui-monospace, monospace; background: #f3f5f7; padding: .6em .8em;
  border-radius: 4px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: right;
  font-family: ui-monospace, monospace; }}
th {{ background: #eef; }}
th:first-child, th:last-child, td:first-child, td:last-child {{ text-align: left; }}
tr.gone {{ color: #999; }} #updated {{ color: #777; font-size: .85em; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head>
<body>
<h1>p2p-photon run <code>{run_id}</code></h1>
<p id="swarm">{summary}</p>
<table><thead><tr>{headers}</tr></thead><tbody id="peers">{rows}</tbody></table>
<p id="updated">updated {updated}</p>
<img id="plot" src="/plot.png" alt="loss vs tokens, tokens/s and peers alive over time"
  width="1200" height="400">
<script>
const COLS = {columns};
function fmt(key, row) {{
  const v = row[key];
  if (key === "loss") return v > 0 ? v.toFixed(3) : "-";
  if (key === "eval_ppl" && v === null) return "-";
  if (key === "tokens_per_s" || key === "eval_ppl") return Math.abs(v) >= 1e6 ? v.toExponential(2).replace(/e\+(\d)$/, "e+0$1")
    : Math.abs(v) >= 100 ? Math.round(v).toLocaleString("en-US") : String(Number(v.toPrecision(3)));
  if (key === "last_seen_s") return Math.round(v) + "s ago";
  if (key === "bytes_sent") {{ let n = v, u = ["B", "KB", "MB", "GB", "TB"], i = 0;
    while (n >= 1000 && i < 4) {{ n /= 1000; i++; }} return i ? n.toFixed(1) + u[i] : n + "B"; }}
  return String(v);
}}
function render(state) {{
  document.getElementById("swarm").textContent = state.summary;
  const body = document.getElementById("peers");
  body.replaceChildren(...state.peers.map(row => {{
    const tr = document.createElement("tr");
    tr.className = "peer-row" + (row.alive ? "" : " gone");
    tr.dataset.peer = row.peer;
    for (const key of COLS) {{
      const td = document.createElement("td");
      td.textContent = fmt(key, row);
      tr.appendChild(td);
    }}
    return tr;
  }}));
  const updated = new Date(state.time * 1000).toLocaleTimeString();
  document.getElementById("updated").textContent = "updated " + updated;
}}
async function refresh() {{
  try {{ render(await (await fetch("/api/state", {{cache: "no-store"}})).json()); }}
  catch (e) {{ document.getElementById("updated").textContent = "monitor unreachable: " + e; }}
}}
setInterval(refresh, 2000);
setInterval(() => {{ document.getElementById("plot").src = "/plot.png?t=" + Date.now(); }}, 10000);
</script>
</body></html>
"""


def render_page(state: dict) -> str:
    """The dashboard HTML with the current rows already in it (every peer-provided string escaped)."""
    esc = html.escape
    headers = "".join(f"<th>{esc(h)}</th>" for h, _ in PEER_COLUMNS)
    rows = "".join(_row_html(row) for row in state["peers"])
    return _PAGE.format(run_id=esc(state["run_id"]), summary=esc(summary_line(state)), headers=headers,
                        rows=rows, updated=time.strftime("%H:%M:%S", time.localtime(state["time"])),
                        columns=json.dumps([key for _, key in PEER_COLUMNS]))


def _row_html(row: dict) -> str:
    cells = "".join(f"<td>{html.escape(format_cell(key, row))}</td>" for _, key in PEER_COLUMNS)
    cls = "peer-row" if row["alive"] else "peer-row gone"
    return f'<tr class="{cls}" data-peer="{html.escape(row["peer"], quote=True)}">{cells}</tr>'


# ----------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        route = {"/": self._page, "/api/state": self._state, "/metrics": self._metrics,
                 "/plot.png": self._plot}.get(urlsplit(self.path).path)
        if route is None:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")
            return
        try:
            route()
        except Exception:
            logger.exception(f"dashboard: {self.path} failed")
            self._send(500, "text/plain; charset=utf-8", b"internal error (see the monitor's log)\n")

    def _page(self) -> None:
        page = render_page(self.server.dashboard.monitor.state())
        self._send(200, "text/html; charset=utf-8", page.encode())

    def _state(self) -> None:
        state = self.server.dashboard.monitor.state()
        state["summary"] = summary_line(state)
        self._send(200, "application/json", json.dumps(state).encode())

    def _metrics(self) -> None:
        self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.dashboard.registry))

    def _plot(self) -> None:
        self._send(200, "image/png", self.server.dashboard.plot_png())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("dashboard: " + format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard


class _Server6(_Server):
    address_family = socket.AF_INET6


class Dashboard:
    """The HTTP server of one Monitor; `start()` binds (MonitorError if it cannot) and serves in a thread."""

    def __init__(self, monitor: Monitor, host: str = DEFAULT_HOST, port: int = 0):
        self.monitor, self.host, self.port = monitor, host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StateCollector(monitor))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._plot_lock = threading.Lock()
        self._plot: tuple[float, bytes] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> Dashboard:
        self._server = _bind(self.host, self.port)
        self._server.dashboard = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="p2p-photon-dashboard",
                                        daemon=True)
        self._thread.start()
        logger.info(f"dashboard at {self.url}")
        return self

    def plot_png(self) -> bytes:
        """The history plot, re-rendered at most every PLOT_TTL seconds."""
        with self._plot_lock:
            if self._plot is None or time.monotonic() - self._plot[0] > PLOT_TTL:
                buf = io.BytesIO()
                render_plot(self.monitor.observations(), buf, window=self.monitor.options.gone_after)
                self._plot = (time.monotonic(), buf.getvalue())
            return self._plot[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)


def _bind(host: str, port: int) -> _Server:
    cls = _Server6 if ":" in host else _Server
    try:
        return cls((host, port), _Handler)
    except OSError as e:
        where = f"--http {host}:{port}"
        if e.errno == errno.EADDRINUSE:
            busy = "the port is already in use: pick another port (or 0 for any)"
            raise MonitorError(f"{where}: {busy}") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise MonitorError(f"{where}: not an address of this machine: use 127.0.0.1") from None
        raise MonitorError(f"{where}: cannot listen ({e.strerror or e})") from None


def serve_dashboard(monitor: Monitor, address: str) -> Dashboard:
    """Parse HOST:PORT, warn about non-loopback hosts and start a dashboard of `monitor`.

    The caller owns the returned dashboard and stops it (before or after the monitor: the
    dashboard only reads the monitor's in-memory state).
    """
    host, port = parse_http_address(address)
    if not _is_loopback(host):
        logger.warning(f"the dashboard listens on {host}: anyone who can reach this address can read the "
                       "swarm's state (use 127.0.0.1 to keep it local)")
    return Dashboard(monitor, host, port).start()
