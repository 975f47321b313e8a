"""The threads that run shards' batches: each shard's batches queue together, one shard after another."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# A worker releases its request slot before copying outputs; twice as many workers as slots keep
# every slot busy while the other half copies.
WORKERS_PER_SLOT = 2


class BatchWorkers:
    """Worker threads for the batches of one or more shards: each shard's batches queue together, in order.

    Shared by the shards a run processes side by side, the next shard's batches wait behind the
    current one's instead of competing with them, so no request slot idles between shards.
    """

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="removebg")
        self._queueing = threading.Lock()

    def queue(
        self, calls: Sequence[Callable[[], T]], *, all_started: Callable[[], None] | None = None
    ) -> list[Future[T]]:
        """Queue `calls` one after another, none of another shard's between them.

        `all_started`, if given, is called once the last of them starts (at once if there are none):
        from then on nothing of theirs waits in the queue, and what is queued next runs right after.
        """
        if all_started is not None:
            countdown = _Countdown(len(calls), all_started)
            calls = [countdown.ticking_first(call) for call in calls]
        with self._queueing:
            return [self._pool.submit(call) for call in calls]

    def close(self) -> None:
        """Wait for every queued batch, then stop the threads."""
        self._pool.shutdown(wait=True)


class _Countdown:
    """Calls `then` when the last of `count` calls has started (at once for none)."""

    def __init__(self, count: int, then: Callable[[], None]) -> None:
        self._left = count
        self._then = then
        self._lock = threading.Lock()
        if count == 0:
            then()

    def ticking_first(self, call: Callable[[], T]) -> Callable[[], T]:
        def started() -> T:
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                self._then()
            return call()

        return started
