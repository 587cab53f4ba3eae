"""The monitor's JSONL metrics log: one observation (a progress record plus `observed_at`) a line.

Written and read here only, so the format has one owner. Writing flushes every line (a crash
loses nothing already seen); reading skips corrupt lines and counts them, because a log is often
read while it is still being written, or after a crash mid-line.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import IO

from .options import MonitorError

logger = logging.getLogger(__name__)

NUMBER_FIELDS = ("observed_at", "loss", "tokens_per_s", "total_samples", "round")
"""Fields every usable line has as finite numbers (what the plots draw)."""


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
            row = parse_line(line)
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


def parse_line(line: str) -> dict | None:
    """One observation, or None for a line that is not JSON, has no peer ID or lacks a plotted number."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("peer_id"), str):
        return None
    for key in NUMBER_FIELDS:
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
    return row
