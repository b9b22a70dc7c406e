"""Group commit: concurrent callers share one journal transaction.

Each caller queues its item and waits. One of them, the leader, takes the
lock that serialises journal writers, drains the queue and runs every queued
item as one batch (one commit); each caller then gets its own result. While a
batch commits, new callers queue up and form the next batch, so the number of
commits per second stays bounded while throughput grows with concurrency. After
its batch, the leader hands leadership to the first queued caller, so no
thread serves others for longer than one batch.

Written here rather than taken from a library: it is twenty lines around a
lock and a condition, and the batch must run under the journal's own lock.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Waiter:
    __slots__ = ("items", "result", "error", "lead", "event")

    def __init__(self, items: list[Any]):
        self.items = items
        self.result: list[Any] = []
        self.error: BaseException | None = None
        self.lead = False
        self.event = threading.Event()


class GroupCommit(Generic[T, R]):
    def __init__(self, run_batch: Callable[[list[T]], list[R]], lock: Any):
        """``run_batch(items) -> results`` (same length, never raises) runs under ``lock``."""
        self._run_batch = run_batch
        self._lock = lock
        self._mutex = threading.Lock()
        self._queue: list[_Waiter] = []
        self._leading = False
        self.batches = 0  # for tests and benchmarks

    def submit(self, item: T) -> R:
        """Run ``item`` in the next batch; return its result once that batch is committed."""
        return self.submit_many([item])[0]

    def submit_many(self, items: list[T]) -> list[R]:
        """Run ``items`` in the next batch; their results once that batch is committed."""
        me = _Waiter(items)
        with self._mutex:
            self._queue.append(me)
            if not self._leading:
                self._leading = me.lead = True
        if not me.lead:
            me.event.wait()
        if me.lead:
            self._lead()
        if me.error is not None:
            raise me.error
        return me.result

    def queued(self) -> int:
        """Items waiting for the next batch."""
        with self._mutex:
            return sum(len(w.items) for w in self._queue)

    def _lead(self) -> None:
        with self._lock:
            with self._mutex:
                batch, self._queue = self._queue, []
            try:
                results = self._run_batch([item for w in batch for item in w.items])
                self.batches += 1
            except BaseException as exc:  # a bug in run_batch must not leave the others waiting forever
                results = [None] * sum(len(w.items) for w in batch)
                for waiter in batch:
                    waiter.error = exc
        start = 0
        for waiter in batch:
            waiter.result = results[start:start + len(waiter.items)]
            start += len(waiter.items)
        with self._mutex:
            nxt = self._queue[0] if self._queue else None
            if nxt is not None:
                nxt.lead = True
            else:
                self._leading = False
        for waiter in batch:
            if not waiter.lead:
                waiter.event.set()
        if nxt is not None:
            nxt.event.set()
