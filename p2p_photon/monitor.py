"""`p2p-photon monitor`: a read-only view of a run's signed progress records in the DHT.

The parts, top to bottom:

* `Monitor` joins the DHT as a client (or borrows a running DHT, e.g. the bootstrap's), polls
  `fetch_progress` every `interval` seconds and keeps one `PeerView` per peer. Peers not
  seen for `gone_after` seconds are shown as gone, never deleted. Records that fail the
  schema are skipped by `fetch_progress` and counted; a failed poll is logged and counted.
* `peer_row` / `swarm_summary` turn that into the state every view shows (pure functions):
  the per-peer table and the swarm line (global round, samples toward the round's target,
  ETA, tokens/s, alive peers, whether the peers of the global round agree on θ).
* `MetricsLog` appends one JSON object per peer per *new* record (deduplicated by the
  record's `time`) with `observed_at` added, flushed at once.
* `TerminalView` is a rich live table on a TTY, and one log line per change otherwise.
* `read_log` / `render_plot` / `plot_log` draw a log (or the in-memory history): loss vs
  tokens, tokens/s over time, peers alive over time.
* `add_monitor_commands`, `host_monitor`: the command line and the bootstrap's hook.

The monitor's own DHT checks signatures but not the record schema (`monitor_validators`):
hivemind drops a whole dictionary from a node when one entry fails a validator, so a
schema-checking monitor would silently lose what a hostile node serves instead of counting
its bad entries. `fetch_progress` parses every entry strictly, so nothing invalid is shown.

hivemind (3-4 s to import) and matplotlib are imported lazily: `p2p-photon --help` and
`monitor plot` do not pay for the DHT.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rich import box
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import hivemind

    from p2p_photon.config import DHTConfig
    from p2p_photon.dashboard import Dashboard
    from p2p_photon.progress import ProgressRecord

from .watchdog import stop_on_signals

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 2.0
DEFAULT_GONE_AFTER = 30.0
DEFAULT_TARGET_SAMPLES = 256
DEFAULT_SEQ_LEN = 128
MAX_HISTORY = 100_000
"""Observations kept in memory for /plot.png (the JSONL log keeps everything)."""
PLOT_SIZE_IN = (12.0, 4.0)
PLOT_DPI = 100
"""The plot is always PLOT_SIZE_IN * PLOT_DPI pixels (1200x400)."""


class MonitorError(Exception):
    """A one-line, user-facing monitor error (missing --run-id, bad log file, busy port, ...)."""


@dataclass(frozen=True, kw_only=True)
class MonitorOptions:
    run_id: str
    """The run whose progress records are shown."""
    interval: float = DEFAULT_INTERVAL
    """Seconds between polls of the DHT."""
    gone_after: float = DEFAULT_GONE_AFTER
    """A peer not seen for this many seconds is shown as gone (kept in the table and history)."""
    target_samples: int = DEFAULT_TARGET_SAMPLES
    """The swarm's samples per round (rounds.target_samples_per_round of the run)."""
    seq_len: int = DEFAULT_SEQ_LEN
    """Tokens per sample (model.seq_len of the run): samples/s = tokens/s / seq_len."""
    log_path: str | None = None
    """Append every new observation to this JSONL file."""

    def __post_init__(self) -> None:
        if not self.run_id:
            raise MonitorError("monitor: the run ID is empty; pass --run-id ID")
        for name in ("interval", "gone_after"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise MonitorError(f"monitor: --{name.replace('_', '-')} must be a positive number of seconds")
        if self.target_samples < 1 or self.seq_len < 1:
            raise MonitorError("monitor: --target-samples and --seq-len must be >= 1")


def monitor_validators(run_id: str) -> list:
    """Signature checks only (see the module docstring): schema errors reach fetch_progress and are counted."""
    from hivemind.dht.crypto import RSASignatureValidator

    return [RSASignatureValidator()]


# ----------------------------------------------------------------------------- swarm state (pure)


@dataclass
class PeerView:
    """The newest record of one peer and when it was seen."""

    record: ProgressRecord
    seen_at: float
    """min(observed_at, record.time): a record stamped in the future cannot keep a peer alive."""
    observations: int = 1


def peer_row(view: PeerView, now: float, gone_after: float) -> dict[str, Any]:
    """One table row: every record field plus the short ID, seconds since seen and liveness."""
    rec = view.record
    last_seen = max(0.0, now - view.seen_at)
    gone = last_seen > gone_after
    row = rec.model_dump()
    row.update(peer=rec.peer_id[-8:], last_seen_s=round(last_seen, 1), gone=gone,
               alive=not gone and rec.state != "done", state="gone" if gone else rec.state,
               observations=view.observations)
    return row


def swarm_summary(rows: Sequence[dict], *, target_samples: int, seq_len: int) -> dict[str, Any]:
    """The swarm line: global round among alive peers of the majority fingerprint, and its progress."""
    alive = [r for r in rows if r["alive"]]
    fingerprint = _majority([r["fingerprint"] for r in alive])
    members = [r for r in alive if r["fingerprint"] == fingerprint]
    rnd = max((r["round"] for r in members), default=None)
    current = [r for r in members if r["round"] == rnd]
    samples = sum(r["samples"] for r in current)
    samples_per_s = sum(r["tokens_per_s"] for r in current) / seq_len
    left = max(0, target_samples - samples)
    hashes = {r["theta_hash"] for r in current}
    return dict(
        round=rnd, samples=samples, target_samples=target_samples,
        eta_s=(left / samples_per_s if samples_per_s > 0 else None) if current else None,
        tokens_per_s=sum(r["tokens_per_s"] for r in alive), alive_peers=len(alive), known_peers=len(rows),
        fingerprint=fingerprint, other_fingerprint_peers=len(alive) - len(members),
        theta_same=(len(hashes) == 1) if current else None, theta_hashes=sorted(hashes),
    )


def _majority(values: Sequence[str]) -> str | None:
    """Most common value; ties go to the smallest, so every monitor picks the same one."""
    if not values:
        return None
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


# ----------------------------------------------------------------------------- JSONL log


class MetricsLog:
    """Append-only JSONL file, one observation per line, flushed after every write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] | None = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise MonitorError(f"--log {self.path}: cannot open for appending ({e.strerror})") from None

    def write(self, observation: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(observation, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ----------------------------------------------------------------------------- the monitor


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
        self.peers: dict[str, PeerView] = {}
        self.history: deque[dict] = deque(maxlen=MAX_HISTORY)
        self.invalid_records = 0
        """Entries fetch_progress skipped in the latest poll (schema failures, superseded records)."""
        self.polls = self.poll_errors = 0
        self.stop_event = threading.Event()
        self.dashboard: Dashboard | None = None
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
        if self.dht is not None:
            self.dht.add_validators(self._validators or monitor_validators(self.options.run_id))
        else:
            from p2p_photon.network import start_dht

            validators = self._validators or monitor_validators(self.options.run_id)
            try:
                self.dht = start_dht(self.dht_cfg, record_validators=validators, client_mode=True, reaper=reaper)
            except BaseException:
                self.stop()
                raise
        return self

    def poll_once(self) -> dict[str, Any]:
        """Fetch the records once, update peers, history and log; return the new state."""
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
        new = []
        with self._lock:
            self.polls += 1
            self.invalid_records = skipped
            for rec in records:
                view = self.peers.get(rec.peer_id)
                if view is not None and rec.time <= view.record.time:
                    continue  # seen already (dedupe by (peer_id, time))
                self.peers[rec.peer_id] = PeerView(rec, min(now, rec.time), 1 + (view.observations if view else 0))
                new.append(dict(rec.model_dump(), observed_at=now, seq_len=self.options.seq_len))
            self.history.extend(new)
        for obs in new:
            if self._log is not None:
                self._log.write(obs)

    def state(self) -> dict[str, Any]:
        """JSON-ready state: {'run_id', 'time', 'swarm', 'peers', 'invalid_records', 'polls', 'poll_errors'}."""
        now, opts = time.time(), self.options
        with self._lock:
            rows = [peer_row(v, now, opts.gone_after) for v in self.peers.values()]
            counts = dict(invalid_records=self.invalid_records, polls=self.polls, poll_errors=self.poll_errors)
        rows.sort(key=lambda r: (not r["alive"], r["peer_id"]))
        swarm = swarm_summary(rows, target_samples=opts.target_samples, seq_len=opts.seq_len)
        swarm["invalid_records"] = counts["invalid_records"]
        return dict(run_id=opts.run_id, time=now, swarm=swarm, peers=rows, **counts)

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

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling, the dashboard and the log; shut down the DHT if this monitor started it."""
        self.stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self.dashboard is not None:
            self.dashboard.stop()
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


# ----------------------------------------------------------------------------- terminal view


def summary_line(state: dict) -> str:
    """round 12 | samples 180/256 | eta 14s | peers 2/3 | tok/s 1.2e4 | θ same | invalid 0"""
    s = state["swarm"]
    theta = {True: "θ same", False: f"θ DIFFERS ({len(s['theta_hashes'])})", None: "θ -"}[s["theta_same"]]
    rnd = "-" if s["round"] is None else s["round"]
    return (f"round {rnd} | samples {s['samples']}/{s['target_samples']} | eta {_fmt_eta(s['eta_s'])} | "
            f"peers {s['alive_peers']}/{s['known_peers']} | tok/s {_fmt_num(s['tokens_per_s'])} | {theta} | "
            f"invalid {s['invalid_records']}")


PEER_COLUMNS = (("peer", "peer"), ("round", "round"), ("steps", "steps"), ("samples", "samples"),
                ("loss", "loss"), ("tok/s", "tokens_per_s"), ("seen", "last_seen_s"),
                ("failed", "failed_rounds"), ("sent", "bytes_sent"), ("state", "state"))
"""(header, row key) of the per-peer table, shared by the terminal and the web page."""


def format_cell(key: str, row: dict) -> str:
    value = row[key]
    if key == "loss":
        return f"{value:.3f}" if value > 0 else "-"
    if key == "tokens_per_s":
        return _fmt_num(value)
    if key == "last_seen_s":
        return f"{value:.0f}s ago"
    if key == "bytes_sent":
        return _fmt_bytes(value)
    return str(value)


def peer_table(state: dict) -> Table:
    table = Table(title=f"run {state['run_id']}", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for header, _ in PEER_COLUMNS:
        left = header in ("peer", "state")
        table.add_column(header, justify="left" if left else "right", no_wrap=True, min_width=8 if left else None)
    for row in state["peers"]:
        style = None if row["alive"] else "dim"
        table.add_row(*(format_cell(key, row) for _, key in PEER_COLUMNS), style=style)
    return table


def _fmt_num(x: float) -> str:
    """0.512, 2,300, 1.23e+06"""
    if abs(x) >= 1e6:
        return f"{x:.2e}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


class TerminalView:
    """A rich live table when stdout is a TTY (and live=True); otherwise a log line per change."""

    def __init__(self, live: bool = True):
        self._live = Live(refresh_per_second=2, transient=False) if live and sys.stdout.isatty() else None
        self._last_line = ""

    def __enter__(self) -> TerminalView:
        if self._live is not None:
            self._live.start()
        return self

    def update(self, state: dict) -> None:
        line = summary_line(state)
        if self._live is not None:
            self._live.update(Group(Text(line), peer_table(state)))
        elif line != self._last_line:
            logger.info(line)
        self._last_line = line

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()


# ----------------------------------------------------------------------------- plots


_NUMBER_FIELDS = ("observed_at", "loss", "tokens_per_s", "total_samples", "round")


def read_log(path: str | Path) -> tuple[list[dict], int]:
    """(observations, number of bad lines skipped); MonitorError for a missing, empty or useless log."""
    p = Path(path)
    if not p.is_file():
        raise MonitorError(f"{p}: no such log file (record one with `p2p-photon monitor --log {p}`)")
    rows, bad = [], 0
    with p.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            row = _parse_line(line)
            if row is None:
                bad += 1
            else:
                rows.append(row)
    if not rows:
        detail = f"all {bad} lines are corrupt" if bad else "it is empty"
        raise MonitorError(f"{p}: no observations to plot ({detail})")
    if bad:
        logger.warning(f"{p}: skipped {bad} corrupt line(s)")
    return rows, bad


def _parse_line(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("peer_id"), str):
        return None
    for key in _NUMBER_FIELDS:
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
    return row


def swarm_series(rows: Sequence[dict], window: float) -> tuple[list[float], list[int], list[float]]:
    """(times, peers alive, total tokens/s): a peer counts while its last observation is < window s old."""
    latest: dict[str, dict] = {}
    times, alive, tok_s = [], [], []
    for t, group in groupby(sorted(rows, key=lambda r: r["observed_at"]), key=lambda r: r["observed_at"]):
        latest.update((r["peer_id"], r) for r in group)
        live = [r for r in latest.values() if t - r["observed_at"] <= window and r.get("state") != "done"]
        times.append(t)
        alive.append(len(live))
        tok_s.append(sum(r["tokens_per_s"] for r in live))
    return times, alive, tok_s


def _binned_mean(points: Sequence[tuple[float, float]], bins: int = 40) -> tuple[list[float], list[float]]:
    """Mean y per equal-width x bin (bins without points are left out)."""
    if not points:
        return [], []
    lo, hi = min(x for x, _ in points), max(x for x, _ in points)
    width = (hi - lo) / bins or 1.0
    sums: dict[int, list[float]] = {}
    for x, y in points:
        acc = sums.setdefault(min(int((x - lo) / width), bins - 1), [0.0, 0.0, 0])
        acc[0], acc[1], acc[2] = acc[0] + x, acc[1] + y, acc[2] + 1
    ordered = [sums[k] for k in sorted(sums)]
    return [a[0] / a[2] for a in ordered], [a[1] / a[2] for a in ordered]


def render_plot(rows: Sequence[dict], out: str | Path | IO[bytes], *, seq_len: int | None = None,
                window: float = DEFAULT_GONE_AFTER) -> None:
    """Draw the 3-panel PNG (1200x400 px). `seq_len` overrides the one stored in each row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_speed, ax_alive = fig.subplots(1, 3)
    times, alive, tok_s = swarm_series(rows, window)
    clock = _Clock(times)
    by_peer = {pid: list(g) for pid, g in groupby(sorted(rows, key=lambda r: r["peer_id"]), key=lambda r: r["peer_id"])}
    _plot_loss(ax_loss, by_peer, seq_len)
    _plot_speed(ax_speed, by_peer, clock)
    ax_speed.plot(clock(times), tok_s, color="black", lw=1.5, label="swarm")
    ax_speed.set_ylim(bottom=0)  # after the last line: set_ylim freezes autoscaling
    ax_alive.step(clock(times), alive, where="post", color="tab:green")
    ax_alive.set(title="peers alive", xlabel=clock.label, ylabel="peers", ylim=(0, max(alive, default=0) + 1))
    ax_alive.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not rows:
        for ax in (ax_loss, ax_speed, ax_alive):
            ax.text(0.5, 0.5, "no observations yet", ha="center", va="center", transform=ax.transAxes)
    if 0 < len(by_peer) <= 10:
        ax_speed.legend(fontsize=7, loc="best")
        ax_loss.legend(fontsize=7, loc="best")
    fig.savefig(out, format="png", dpi=PLOT_DPI)


def _plot_loss(ax: Any, by_peer: dict[str, list[dict]], seq_len: int | None) -> None:
    from matplotlib.ticker import EngFormatter

    points = []
    for pid, obs in by_peer.items():
        pts = sorted((r["total_samples"] * (seq_len or r.get("seq_len") or DEFAULT_SEQ_LEN), r["loss"])
                     for r in obs if r["loss"] > 0)
        points += pts
        ax.plot([x for x, _ in pts], [y for _, y in pts], lw=0.8, alpha=0.7, label=pid[-8:])
    xs, ys = _binned_mean(points)
    ax.plot(xs, ys, color="black", lw=2.0, label="swarm mean")
    ax.set(title="loss vs tokens", xlabel="swarm tokens (total samples x seq_len)", ylabel="training loss")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, 1.5M: no overlapping tick labels


class _Clock:
    """Time axis: seconds since the first observation, or minutes / hours for long runs."""

    def __init__(self, times: Sequence[float]):
        self.t0 = min(times, default=0.0)
        span = max(times, default=0.0) - self.t0
        self.unit, self.scale = ("hours", 3600.0) if span > 3 * 3600 else ("minutes", 60.0) if span > 600 else (
            "seconds", 1.0)
        self.label = f"{self.unit} since the first observation"

    def __call__(self, times: Sequence[float]) -> list[float]:
        return [(t - self.t0) / self.scale for t in times]


def _plot_speed(ax: Any, by_peer: dict[str, list[dict]], clock: _Clock) -> None:
    for pid, obs in by_peer.items():
        obs = sorted(obs, key=lambda r: r["observed_at"])
        ax.plot(clock([r["observed_at"] for r in obs]), [r["tokens_per_s"] for r in obs], lw=0.8, label=pid[-8:])
    ax.set(title="tokens/s", xlabel=clock.label, ylabel="tokens/s")


def plot_log(log: str | Path, out: str | Path, *, seq_len: int | None = None,
             window: float = DEFAULT_GONE_AFTER) -> tuple[Path, int, int]:
    """Plot a JSONL log to a PNG; return (png path, observations, bad lines skipped)."""
    rows, bad = read_log(log)
    target = Path(out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        render_plot(rows, target, seq_len=seq_len, window=window)
    except OSError as e:
        raise MonitorError(f"-o {target}: cannot write the plot ({e.strerror or e})") from None
    return target, len(rows), bad


# ----------------------------------------------------------------------------- entry points


def host_monitor(dht: hivemind.DHT, *, run_id: str, http: str | None = None, log: str | None = None,
                 interval: float = DEFAULT_INTERVAL, gone_after: float = DEFAULT_GONE_AFTER,
                 target_samples: int = DEFAULT_TARGET_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN) -> Monitor:
    """Monitor `dht` (e.g. the bootstrap's) from a daemon thread; call `.stop()` before shutting it down."""
    opts = MonitorOptions(run_id=run_id, interval=interval, gone_after=gone_after,
                          target_samples=target_samples, seq_len=seq_len, log_path=log)
    monitor = Monitor(opts, dht=dht).start()
    try:
        if http:
            from p2p_photon.dashboard import serve_dashboard

            serve_dashboard(monitor, http)
    except BaseException:
        monitor.stop()
        raise
    monitor.start_background()
    logger.info(f"monitor of run {run_id} running" + (f", dashboard at {monitor.dashboard.url}" if http else ""))
    return monitor


def add_monitor_commands(subparsers: argparse._SubParsersAction,
                         add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `monitor` (runs the monitor) and its optional sub-action `monitor plot LOG -o PNG`."""
    mon = subparsers.add_parser(
        "monitor", help="read-only DHT client: live table, metrics log, plots, HTTP dashboard",
        description="Watch a run's progress records. `p2p-photon monitor plot LOG -o PNG` draws a recorded log.")
    add_config_args(mon)
    mon.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="multiaddrs of known peers (/ip4/../p2p/..)")
    mon.add_argument("--initial-peers-file", metavar="JSON", help="the bootstrap's --maddrs-file")
    mon.add_argument("--run-id", help="the run to watch (required unless --config/--set gives dht.run_id)")
    mon.add_argument("--log", metavar="FILE", help="append every new observation to this JSONL file")
    mon.add_argument("--http", metavar="HOST:PORT", help="serve the web dashboard (default host 127.0.0.1)")
    mon.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between polls")
    mon.add_argument("--gone-after", type=float, default=DEFAULT_GONE_AFTER, help="seconds until a silent peer is gone")
    mon.add_argument("--target-samples", type=int, help="samples per round (default: the config's, else 256)")
    mon.add_argument("--seq-len", type=int, help="tokens per sample (default: the config's model.seq_len, else 128)")
    mon.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = until Ctrl-C)")
    mon.add_argument("--no-live", action="store_true", help="log a summary line instead of the live table")
    mon.set_defaults(func=cmd_monitor)
    actions = mon.add_subparsers(dest="monitor_action", metavar="{plot}", required=False)
    plot = actions.add_parser("plot", help="draw a recorded JSONL log to a PNG (1200x400 px)")
    plot.add_argument("plot_log", metavar="LOG.jsonl")
    plot.add_argument("-o", "--out", required=True, metavar="PNG")
    plot.add_argument("--seq-len", type=int, help="tokens per sample (default: the one stored in the log)")
    plot.add_argument("--gone-after", type=float, default=DEFAULT_GONE_AFTER, help="window for 'peers alive'")
    plot.set_defaults(func=cmd_monitor_plot)


def cmd_monitor_plot(args: argparse.Namespace) -> int:
    out, n, bad = plot_log(args.plot_log, args.out, seq_len=args.seq_len, window=args.gone_after)
    skipped = f", skipped {bad} corrupt line(s)" if bad else ""
    print(f"wrote {out} ({n} observations{skipped})")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    opts, dht_cfg = monitor_config(args)
    monitor = Monitor(opts, dht_cfg=dht_cfg).start()
    try:
        if args.http:
            from p2p_photon.dashboard import serve_dashboard

            print(f"dashboard: {serve_dashboard(monitor, args.http).url}", flush=True)
        with stop_on_signals(monitor.stop_event), TerminalView(live=not args.no_live) as view:
            monitor.run(duration=args.duration, on_poll=view.update)
        print(summary_line(monitor.state()), flush=True)
    finally:
        monitor.stop()
    return 0


def monitor_config(args: argparse.Namespace) -> tuple[MonitorOptions, DHTConfig]:
    """MonitorOptions and the DHT config from the command line (flags first, then --set overrides)."""
    from p2p_photon.config import load_config

    peers = [*(args.initial_peers or []), *read_maddrs_file(args.initial_peers_file)]
    if not peers:
        raise MonitorError("monitor: give --initial-peers MADDR... or --initial-peers-file JSON "
                           "(the file written by `p2p-photon bootstrap --maddrs-file`)")
    overrides = list(getattr(args, "overrides", None) or [])
    if not (args.run_id or args.config or any(o.strip().startswith("dht.run_id") for o in overrides)):
        raise MonitorError("monitor: --run-id ID is required (or a --config that sets dht.run_id)")
    flags = [f"dht.initial_peers={json.dumps(peers)}", "dht.client_mode=true"]
    if args.run_id:
        flags.append(f"dht.run_id={json.dumps(args.run_id)}")
    cfg = load_config(args.config, [*flags, *overrides])
    opts = MonitorOptions(run_id=cfg.dht.run_id, interval=args.interval, gone_after=args.gone_after,
                          target_samples=args.target_samples or cfg.rounds.target_samples_per_round,
                          seq_len=args.seq_len or cfg.model.seq_len, log_path=args.log)
    return opts, cfg.dht


def read_maddrs_file(path: str | None) -> list[str]:
    """Initial peers from a bootstrap's --maddrs-file ([] when no file is given)."""
    if not path:
        return []
    from .bootstrap import read_maddrs_file as read  # imports hivemind: only when a file is given

    return read(path)


