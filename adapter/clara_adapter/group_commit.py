"""Group commit: concurrent callers share one journal transaction.

Each caller queues its item and waits. One of them, the leader, takes the
lock that serialises journal writers, drains the queue and runs every queued
item as one batch (one commit); each caller then gets its own result. While a
batch commits, new callers queue up and form the next batch, so the number of
commits per second stays bounded while throughput grows with concurrency. After
its batch, the leader hands leadership to the first queued caller, so no
thread serves others for longer than one batch.

``lanes`` > 1 lets that many batches run at once (a journal whose transactions
may overlap, each on its own connection: PostgreSQL, whose own group commit
then flushes their WAL together); callers beyond the busy lanes still queue
and form the next batch. With one lane (SQLite) it is the plain group commit.

Written here rather than taken from a library: it is a few dozen lines around a
lock and a condition, and the batch must run under the journal's own lock.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Waiter:
    __slots__ = ("items", "result", "error", "lead", "done", "event")

    def __init__(self, items: list[Any]):
        self.items = items
        self.result: list[Any] = []
        self.error: BaseException | None = None
        self.lead = False  # runs a batch (its own items, unless another lane's leader took them first)
        self.done = False  # result or error set
        self.event = threading.Event()  # set when done, or when handed the lead


class GroupCommit(Generic[T, R]):
    def __init__(self, run_batch: Callable[[list[T]], list[R]], lock: Any = None, lanes: int = 1):
        """``run_batch(items) -> results`` (same length, never raises) runs under ``lock``
        (None: no lock; with ``lanes`` > 1 ``run_batch`` serialises what it must itself)."""
        if lanes < 1:
            raise ValueError("lanes must be at least 1")
        self._run_batch = run_batch
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self.lanes = lanes
        self._mutex = threading.Lock()
        self._queue: list[_Waiter] = []
        self._running = 0  # lanes with a leader
        self._paused = 0
        self.batches = 0  # for tests and benchmarks

    def submit(self, item: T) -> R:
        """Run ``item`` in the next batch; return its result once that batch is committed."""
        return self.submit_many([item])[0]

    def submit_many(self, items: list[T]) -> list[R]:
        """Run ``items`` in the next batch; their results once that batch is committed."""
        me = _Waiter(items)
        with self._mutex:
            self._queue.append(me)
            if self._running < self.lanes and not self._paused:
                self._running += 1
                me.lead = True
        if not me.lead:
            me.event.wait()
        if me.lead:
            me.event.clear()  # from here on it only means "done" (set after ``done``)
            self._lead(me)
            while not me.done:  # another lane's leader took my items: wait for its commit
                me.event.wait()
        if me.error is not None:
            raise me.error
        return me.result

    def queued(self) -> int:
        """Items waiting for the next batch."""
        with self._mutex:
            return sum(len(w.items) for w in self._queue)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No batch starts meanwhile (batches running go on): callers queue up and
        form one batch afterwards (tests: a busy journal, whatever the lanes)."""
        with self._mutex:
            self._paused += 1
        try:
            yield
        finally:
            with self._mutex:
                self._paused -= 1
                starting = self._hand_over_locked(self.lanes - self._running)
            for waiter in starting:
                waiter.event.set()

    def _hand_over_locked(self, free: int) -> list[_Waiter]:
        """Give up to ``free`` lanes to the first queued callers that do not lead yet."""
        starting = []
        if not self._paused:
            for waiter in self._queue:
                if len(starting) >= free:
                    break
                if not waiter.lead:
                    waiter.lead = True
                    starting.append(waiter)
        self._running += len(starting)
        return starting

    def _lead(self, me: _Waiter) -> None:
        with self._lock:
            with self._mutex:
                batch, self._queue = self._queue, []
            if batch:
                try:
                    results = self._run_batch([item for w in batch for item in w.items])
                except BaseException as exc:  # a bug in run_batch must not leave the others waiting forever
                    results = [None] * sum(len(w.items) for w in batch)
                    for waiter in batch:
                        waiter.error = exc
                start = 0
                for waiter in batch:
                    waiter.result = results[start:start + len(waiter.items)]
                    start += len(waiter.items)
                    waiter.done = True
        with self._mutex:
            self.batches += bool(batch)
            self._running -= 1
            starting = self._hand_over_locked(1)
        for waiter in batch:
            if waiter is not me:
                waiter.event.set()  # done (a leader among them that is not running yet finds done set)
        for waiter in starting:
            waiter.event.set()
