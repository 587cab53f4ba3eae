"""Terminal output for long local work: a rich progress bar, or periodic log lines when not a TTY."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger(__name__)


class _Bar:
    """What `progress_bar` yields: `update` advances a rich bar, or logs a line every `log_every` s."""

    def __init__(self, progress: Progress | None, task, *, total: int | None = None, label: str | None = None,
                 log_every: float | None = 10.0):
        self.progress, self.task, self.total, self.label = progress, task, total, label
        self.n, self.log_every, self.last_log = 0, log_every, time.monotonic()

    def update(self, advance: int = 1, **fields: float) -> None:
        self.n += advance
        text = " ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        if self.progress is not None:
            self.progress.update(self.task, advance=advance, info=text)
        elif self.log_every is not None and time.monotonic() - self.last_log >= self.log_every:
            self.last_log = time.monotonic()
            logger.info(self._line(text))

    def complete(self) -> None:
        """Mark a stage of unknown length as done (its bar stops pulsing and shows n/n)."""
        if self.progress is not None:
            done = max(self.n, 1)
            self.progress.update(self.task, total=done, completed=done)

    def _line(self, text: str) -> str:
        if self.label is None:  # the training loop's line: 'step 120 | loss 3.41 tok_s 1.2e+04 lr 0.0006'
            return f"step {self.n} | {text}"
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        return f"{self.label} {count}" + (f" | {text}" if text else "")


def _fmt(v: float) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"
    return str(v)


@contextmanager
def progress_bar(description: str, total: int | None = None, enabled: bool = True, *,
                 label: str | None = None, log_every: float | None = 10.0) -> Iterator[_Bar]:
    """A rich bar on stderr when it is a TTY; otherwise a log line every `log_every` s (CI logs, background
    peers), none when `log_every` is None. The line is 'step N | fields' unless `label` is given
    ('LABEL N/TOTAL | fields'). `total=None` is a stage of unknown length: call `complete()` at its end."""
    if not (enabled and sys.stderr.isatty()):
        yield _Bar(None, None, total=total, label=label, log_every=log_every)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, info="")
        yield _Bar(progress, task, total=total, label=label, log_every=log_every)


def setup_logging(level: str = "INFO", prefix: str | None = None) -> None:
    if prefix is None:
        prefix = os.environ.get("P2P_PHOTON_LOG_PREFIX", "")
    fmt = f"%(asctime)s {prefix}%(levelname).1s %(name)s: %(message)s" if prefix else \
        "%(asctime)s %(levelname).1s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no kernels package" noise on CPU
    for noisy in ("hivemind", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))
