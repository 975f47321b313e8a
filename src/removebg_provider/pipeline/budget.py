"""The cap on the records one process may send to the API, shared by its shards and their threads."""

from __future__ import annotations

import threading


class Budget:
    """A thread-safe cap on the records one process may send to the API."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, count: int) -> bool:
        """Take `count` records from the budget; False (and nothing taken) when they do not fit."""
        with self._lock:
            if self.limit is not None and self.used + count > self.limit:
                return False
            self.used += count
            return True
