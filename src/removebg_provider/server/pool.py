"""The engine pool: N worker threads that run matting off the event loop, behind a bounded queue.

Why threads and not processes: the expensive parts all release the GIL. OpenCV does its work in C++
without the GIL, numpy releases it in its inner loops, onnxruntime releases it for the whole `run`,
and Pillow releases it while decoding and encoding. Threads therefore use every core while sharing
one engine: an ONNX model is loaded once instead of once per process. Processes would also clash with
OpenCV's and onnxruntime's thread pools, which do not survive `fork`, so a process pool would need
`spawn`, paying a full import and model load per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from removebg_provider.server.errors import RequestRejected

T = TypeVar("T")


class EnginePool:
    """Runs engine calls on `workers` threads and admits at most `capacity` records at a time.

    Admission is counted in records, not requests, because a record is the unit of engine work.
    A request that does not fit is refused whole with 429 and `Retry-After`, so an overloaded server
    sheds load instead of queueing without bound. Admission is only touched from the event loop
    thread, so the counter needs no lock.
    """

    def __init__(self, workers: int, capacity: int, retry_after_seconds: int) -> None:
        self.workers = workers
        self.capacity = capacity
        self.retry_after_seconds = retry_after_seconds
        self.admitted = 0
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="removebg-engine")

    def admit(self, records: int) -> None:
        """Reserve room for `records` records or raise a 429 `RequestRejected`."""
        if self.admitted + records > self.capacity:
            raise RequestRejected(
                429,
                f"the server is busy ({self.admitted} of {self.capacity} record slots in use); "
                f"retry after {self.retry_after_seconds} s",
            )
        self.admitted += records

    def release(self, records: int) -> None:
        """Give back the room reserved by `admit`."""
        self.admitted -= records

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """Run `function(*args)` on a worker thread and wait for it without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def shutdown(self) -> None:
        """Stop the worker threads after the work already queued."""
        self._executor.shutdown(wait=True, cancel_futures=True)


class PixelBudget:
    """Caps the decoded pixels in flight: an image is decoded only once its pixels fit the budget.

    Admission bounds records, but a record's memory is its decoded size, which a 19 KB PNG can
    declare to be 49 MP (150 MB of RGB, several times that in the engine). Each record therefore
    reserves its declared pixel count before it is decoded and keeps it until its outputs are
    written. Waiters are served first come, first served, so a big image is not starved by a stream
    of small ones. Like admission, it is only touched from the event loop thread.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` (at most `capacity`) of the budget for the `async with` block, waiting for room."""
        pixels = min(pixels, self.capacity)
        await self._acquire(pixels)
        try:
            yield
        finally:
            self.in_use -= pixels
            self._grant()

    async def _acquire(self, pixels: int) -> None:
        if not self._waiters and self.in_use + pixels <= self.capacity:
            self.in_use += pixels
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((pixels, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.in_use -= pixels  # granted just as it was cancelled: give it back
            self._grant()
            raise

    def _grant(self) -> None:
        while self._waiters:
            pixels, granted = self._waiters[0]
            if granted.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if self.in_use + pixels > self.capacity:
                return
            self._waiters.popleft()
            self.in_use += pixels
            granted.set_result(None)
