"""The batch workers' queue: each caller's batches together, and word once the last of them starts."""

from __future__ import annotations

import threading

from removebg_provider.pipeline.workers import BatchWorkers


def test_all_started_is_called_when_the_last_batch_starts_not_when_it_ends() -> None:
    last_may_end = threading.Event()
    all_started = threading.Event()
    workers = BatchWorkers(2)

    futures = workers.queue(
        [lambda: None, lambda: last_may_end.wait(timeout=30)], all_started=all_started.set
    )
    called = all_started.wait(timeout=30)
    last_still_running = not futures[1].done()
    last_may_end.set()
    workers.close()

    assert called
    assert last_still_running


def test_all_started_is_called_at_once_when_nothing_is_queued() -> None:
    called: list[bool] = []
    workers = BatchWorkers(1)

    workers.queue([], all_started=lambda: called.append(True))
    workers.close()

    assert called == [True]


def test_one_callers_batches_start_together_before_the_next_callers() -> None:
    gate = threading.Event()
    order: list[str] = []
    workers = BatchWorkers(1)
    workers.queue([lambda: gate.wait(timeout=30)])

    workers.queue([lambda: order.append("a1"), lambda: order.append("a2")])
    workers.queue([lambda: order.append("b1")])
    gate.set()
    workers.close()

    assert order == ["a1", "a2", "b1"]
