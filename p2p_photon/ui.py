"""Terminal output for long local work: a rich progress bar, or periodic log lines when not a TTY."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger(__name__)


class _Bar:
    def __init__(self, progress: Progress | None, task, log_every: float = 10.0):
        self.progress, self.task = progress, task
        self.n, self.log_every, self.last_log = 0, log_every, time.monotonic()

    def update(self, advance: int = 1, **fields: float) -> None:
        self.n += advance
        text = " ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        if self.progress is not None:
            self.progress.update(self.task, advance=advance, info=text)
        elif time.monotonic() - self.last_log >= self.log_every:
            self.last_log = time.monotonic()
            logger.info("step %d | %s", self.n, text)


def _fmt(v: float) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"
    return str(v)


@contextmanager
def progress_bar(description: str, total: int | None = None, enabled: bool = True):
    """A rich bar on a TTY; otherwise a log line every 10 s (CI logs, background peers)."""
    if not (enabled and sys.stderr.isatty()):
        yield _Bar(None, None)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")
        yield _Bar(progress, task)


def setup_logging(level: str = "INFO", prefix: str | None = None) -> None:
    if prefix is None:
        prefix = os.environ.get("P2P_PHOTON_LOG_PREFIX", "")
    fmt = f"%(asctime)s {prefix}%(levelname).1s %(name)s: %(message)s" if prefix else \
        "%(asctime)s %(levelname).1s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no kernels package" noise on CPU
    for noisy in ("hivemind", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))
