"""The monitor's 3-panel plot: loss vs tokens, tokens/s over time, peers alive over time.

Drawn from observations (JSONL log lines or the monitor's in-memory history, same shape), by
`p2p-photon monitor plot` and by the dashboard's /plot.png. matplotlib is imported inside the
functions that draw, so importing the monitor does not pay for it.

Tokens are total samples x seq_len, with seq_len read from the observations themselves (the
value most of them carry); when none says, the loss is drawn against samples instead and the
axis says so, rather than guessing a seq_len.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import IO, Any

from .metrics_log import read_log
from .options import DEFAULT_GONE_AFTER, MonitorError
from .state import run_setting

PLOT_SIZE_IN = (12.0, 4.0)
PLOT_DPI = 100
"""The plot is always PLOT_SIZE_IN * PLOT_DPI pixels (1200x400)."""


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


def binned_mean(points: Sequence[tuple[float, float]], bins: int = 40) -> tuple[list[float], list[float]]:
    """Mean (x, y) per equal-width x bin (bins without points are left out): the swarm's mean curve."""
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


def render_plot(rows: Sequence[dict], out: str | Path | IO[bytes], *,
                window: float = DEFAULT_GONE_AFTER) -> None:
    """Draw the 3-panel PNG (1200x400 px); `window` is how long a silent peer still counts as alive."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = ax_loss, ax_speed, ax_alive = fig.subplots(1, 3)
    times, alive, tok_s = swarm_series(rows, window)
    clock = _Clock(times)
    by_peer = {pid: list(g) for pid, g in groupby(sorted(rows, key=_peer_id), key=_peer_id)}
    _plot_loss(ax_loss, by_peer, run_setting(r.get("seq_len") for r in rows))
    _plot_speed(ax_speed, by_peer, clock)
    ax_speed.plot(clock(times), tok_s, color="black", lw=1.5, label="swarm")
    ax_speed.set_ylim(bottom=0)  # after the last line: set_ylim freezes autoscaling
    _plot_alive(ax_alive, clock, times, alive)
    if not rows:
        for ax in axes:
            ax.text(0.5, 0.5, "no observations yet", ha="center", va="center", transform=ax.transAxes)
    if 0 < len(by_peer) <= 10:
        ax_speed.legend(fontsize=7, loc="best")
        ax_loss.legend(fontsize=7, loc="best")
    fig.savefig(out, format="png", dpi=PLOT_DPI)


def _peer_id(row: dict) -> str:
    return row["peer_id"]


def _plot_loss(ax: Any, by_peer: dict[str, list[dict]], seq_len: int | None) -> None:
    from matplotlib.ticker import EngFormatter

    points = []
    for pid, obs in by_peer.items():
        pts = sorted((r["total_samples"] * (seq_len or 1), r["loss"]) for r in obs if r["loss"] > 0)
        points += pts
        ax.plot([x for x, _ in pts], [y for _, y in pts], lw=0.8, alpha=0.7, label=pid[-8:])
    xs, ys = binned_mean(points)
    ax.plot(xs, ys, color="black", lw=2.0, label="swarm mean")
    xlabel = ("swarm tokens (total samples x seq_len)" if seq_len
              else "swarm samples (seq_len unknown: no record says it)")
    ax.set(title="loss vs tokens" if seq_len else "loss vs samples", xlabel=xlabel, ylabel="training loss")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, 1.5M: no overlapping tick labels


class _Clock:
    """Time axis: seconds since the first observation, or minutes / hours for long runs."""

    def __init__(self, times: Sequence[float]):
        self.t0 = min(times, default=0.0)
        span = max(times, default=0.0) - self.t0
        if span > 3 * 3600:
            self.unit, self.scale = "hours", 3600.0
        else:
            self.unit, self.scale = ("minutes", 60.0) if span > 600 else ("seconds", 1.0)
        self.label = f"{self.unit} since the first observation"

    def __call__(self, times: Sequence[float]) -> list[float]:
        return [(t - self.t0) / self.scale for t in times]


def _plot_speed(ax: Any, by_peer: dict[str, list[dict]], clock: _Clock) -> None:
    for pid, obs in by_peer.items():
        obs = sorted(obs, key=lambda r: r["observed_at"])
        times, speeds = [r["observed_at"] for r in obs], [r["tokens_per_s"] for r in obs]
        ax.plot(clock(times), speeds, lw=0.8, label=pid[-8:])
    ax.set(title="tokens/s", xlabel=clock.label, ylabel="tokens/s")


def _plot_alive(ax: Any, clock: _Clock, times: list[float], alive: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.step(clock(times), alive, where="post", color="tab:green")
    ax.set(title="peers alive", xlabel=clock.label, ylabel="peers", ylim=(0, max(alive, default=0) + 1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def plot_log(log: str | Path, out: str | Path, *,
             window: float = DEFAULT_GONE_AFTER) -> tuple[Path, int, int]:
    """Plot a JSONL log to a PNG; return (png path, observations, bad lines skipped)."""
    rows, bad = read_log(log)
    target = Path(out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        render_plot(rows, target, window=window)
    except OSError as e:
        raise MonitorError(f"-o {target}: cannot write the plot ({e.strerror or e})") from None
    return target, len(rows), bad
