"""A manual clock for retry and rate-limit tests: sleeping advances it instead of waiting."""

from __future__ import annotations

import threading


class FakeClock:
    """`now()` is the injected clock, `sleep(s)` the injected sleep; `sleeps` records every wait."""

    def __init__(self, start: float = 1000.0, advance_on_sleep: bool = True) -> None:
        self._now = start
        self._advance = advance_on_sleep
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            if self._advance:
                self._now += seconds
