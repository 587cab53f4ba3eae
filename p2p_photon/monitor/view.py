"""How the monitor's state reads as text: the swarm line, the peer table and the terminal view.

The swarm line and the cell formatting are shared by the terminal and the web dashboard, so a
number reads the same everywhere. Everything here takes `Monitor.state()` (plain dicts) and
knows nothing of the DHT.
"""

from __future__ import annotations

import logging
import sys

from rich import box
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

logger = logging.getLogger(__name__)

PEER_COLUMNS = (("peer", "peer"), ("round", "round"), ("steps", "steps"), ("samples", "samples"),
                ("loss", "loss"), ("ppl", "eval_ppl"), ("tok/s", "tokens_per_s"), ("seen", "last_seen_s"),
                ("failed", "failed_rounds"), ("sent", "bytes_sent"), ("state", "state"))
"""(header, row key) of the per-peer table, shared by the terminal and the web page."""


def summary_line(state: dict) -> str:
    """round 12 | samples 180/256 | eta 14s | peers 2/3 | tok/s 1.2e4 | θ same | invalid 0

    The target reads `?` while no peer of the swarm has said it (records with target_samples 0).
    """
    s = state["swarm"]
    theta = {True: "θ same", False: f"θ DIFFERS ({len(s['theta_hashes'])})", None: "θ -"}[s["theta_same"]]
    rnd = "-" if s["round"] is None else s["round"]
    target = "?" if s["target_samples"] is None else s["target_samples"]
    bans = s.get("bans") or []
    ban_text = "".join(f" | BANNED {b['who']} by {b['by']}: {b['why']}" for b in bans[:3])
    return (f"round {rnd} | samples {s['samples']}/{target} | eta {fmt_eta(s['eta_s'])} | "
            f"peers {s['alive_peers']}/{s['known_peers']} | tok/s {fmt_num(s['tokens_per_s'])} | {theta} | "
            f"invalid {s['invalid_records']}" + heldout_text(s) + (f" | bans {len(bans)}" if bans else "")
            + ban_text)


def heldout_text(s: dict) -> str:
    """' | held-out ppl 812.4 (θ 7)': the swarm's comparable number (see monitor.state.heldout)."""
    if s.get("eval_ppl") is None:
        return ""
    return f" | held-out ppl {fmt_num(s['eval_ppl'])} (θ {s['eval_round']})"


def format_cell(key: str, row: dict) -> str:
    """One table cell as text (the web page's JavaScript mirrors these rules)."""
    value = row[key]
    if key == "loss":
        return f"{value:.3f}" if value > 0 else "-"
    if key == "eval_ppl":
        return "-" if value is None else fmt_num(value)
    if key == "tokens_per_s":
        return fmt_num(value)
    if key == "last_seen_s":
        return f"{value:.0f}s ago"
    if key == "bytes_sent":
        return fmt_bytes(value)
    return str(value)


def peer_table(state: dict) -> Table:
    """The per-peer table for the terminal; gone and finished peers are dimmed, never dropped."""
    table = Table(title=f"run {state['run_id']}", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for header, _ in PEER_COLUMNS:
        left = header in ("peer", "state")
        table.add_column(header, justify="left" if left else "right", no_wrap=True,
                         min_width=8 if left else None)
    for row in state["peers"]:
        style = None if row["alive"] else "dim"
        table.add_row(*(format_cell(key, row) for _, key in PEER_COLUMNS), style=style)
    return table


def fmt_num(x: float) -> str:
    """0.512, 2,300, 1.23e+06"""
    if abs(x) >= 1e6:
        return f"{x:.2e}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_eta(seconds: float | None) -> str:
    """14s, 3m05s; '-' when unknown."""
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_bytes(n: float) -> str:
    """512B, 2.5MB (powers of 1000)."""
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
