"""Progress lines for long work: done/total, rate, ETA and failures, at most every few seconds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_PROGRESS_EVERY_SECONDS = 5.0

ProgressCallback = Callable[[int, int, int], None]


class Progress:
    """Counts finished rows; logs done/total, rate, ETA and failures at most every few seconds."""

    def __init__(
        self,
        total: int,
        label: str,
        on_update: ProgressCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "rows",
    ) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.done = 0
        self.failed = 0
        self._on_update = on_update
        self._clock = clock
        self._started = clock()
        self._last_log = self._started
        self._lock = threading.Lock()

    def advance(self, rows: int, failed: int) -> None:
        with self._lock:
            self.done += rows
            self.failed += failed
            now = self._clock()
            if now - self._last_log >= _PROGRESS_EVERY_SECONDS or self.done >= self.total:
                self._last_log = now
                log.info("%s", self.describe(now))
        if self._on_update is not None:
            self._on_update(rows, self.done, self.total)

    def describe(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else self._clock()) - self._started, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = format_seconds(remaining) if remaining != float("inf") else "unknown"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.1f} {self.unit}/s, "
            f"ETA {eta}, {self.failed} failed"
        )


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
