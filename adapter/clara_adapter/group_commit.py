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
    __slots__ = ("item", "result", "error", "lead", "event")

    def __init__(self, item: Any):
        self.item = item
        self.result: Any = None
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
        me = _Waiter(item)
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
        with self._mutex:
            return len(self._queue)

    def _lead(self) -> None:
        with self._lock:
            with self._mutex:
                batch, self._queue = self._queue, []
            try:
                results = self._run_batch([w.item for w in batch])
                self.batches += 1
            except BaseException as exc:  # a bug in run_batch must not leave the others waiting forever
                results = [None] * len(batch)
                for waiter in batch:
                    waiter.error = exc
        for waiter, result in zip(batch, results):
            waiter.result = result
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
