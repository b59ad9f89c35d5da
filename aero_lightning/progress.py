"""Progress a person can see, on a terminal and in log files alike.

On a terminal a job shows a tqdm bar. When the output is not a terminal (a log file, ``nohup``, a SLURM job) a bar
is useless, so the job logs one line at a steady interval instead: ``desc: done/total (pct), rate, elapsed, ETA``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

__all__ = ["Progress", "format_duration"]

logger = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``"1h02m05s"``, ``65`` -> ``"1m05s"``, ``4.2`` -> ``"4s"``; ``"?"`` for a negative or unknown time."""
    if seconds is None or seconds < 0 or seconds != seconds:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


class Progress:
    """Progress of a job of ``total`` items: a tqdm bar on a terminal, else a log line every ``interval_s``.

    Args:
        total: items to do (None when unknown: no percentage and no ETA).
        desc: what is being done, e.g. ``"demo_espeak/train"``.
        unit: the item's name in the rate, e.g. ``"utt"``.
        interval_s: seconds between log lines when the output is not a terminal.
        log: where lines go (default: this module's logger at INFO).
        terminal: force the bar (True) or the log lines (False); None: a bar when stderr is a terminal.
        enabled: False shows nothing.
        clock: time source (seconds), for tests.

    Use as a context manager, or call :meth:`close`; the last line (log mode) reports the total time.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "item",
        interval_s: float = 30.0,
        log: Callable[[str], None] | None = None,
        terminal: bool | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval_s = float(interval_s)
        self.log = log or logger.info
        self.enabled = bool(enabled)
        self.clock = clock
        self.done = 0
        self.postfix = ""
        self._start = clock()
        self._last = self._start
        self._closed = False
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar = tqdm(total=total, desc=desc, unit=unit) if self.enabled and terminal else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        """The progress line as it would be logged now."""
        elapsed = self.clock() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            head = f"{self.done}/{self.total} ({100.0 * self.done / self.total:.0f} %)"
            tail = f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}"
        else:
            head, tail = f"{self.done}", f"elapsed {format_duration(elapsed)}"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {head}, {rate:.1f} {self.unit}/s, {tail}{extra}"

    def update(self, n: int = 1, postfix: str = "") -> None:
        """Count ``n`` more items done; ``postfix`` is appended to the line (e.g. a running WER)."""
        if not self.enabled:
            return
        self.done += n
        if postfix:
            self.postfix = postfix
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            return
        now = self.clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self.log(self.line())

    def close(self) -> None:
        """End the bar, or log the final line (log mode). Idempotent."""
        if self._closed or not self.enabled:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self.log(self.line() + " (done)")
