"""A keyed work queue with per-key exponential backoff (client-go's workqueue, in asyncio).

The PipelineJob, Job and RegisterResults controllers are level-triggered: kopf's watch
events and a periodic resync only *add keys* here; workers call ``reconcile(key)``,
which reads the world and converges it. A reconcile that raises is retried after a
backoff (1 s, 2 s, 4 s … capped) until it succeeds; success forgets the failures.
A key is never reconciled twice at once, and a key added while it is being
reconciled runs once more afterwards, so no change is lost.

Own code rather than a library because kopf has no keyed queue: its timers and
daemons put a finalizer on every object, and its change handlers persist progress
annotations on every object, neither of which resyncs.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable

log = logging.getLogger("clara_operator.workqueue")

Key = Hashable


class Retry(Exception):
    """Not converged yet (e.g. the API refused a create): try again after the backoff,
    or after ``delay`` seconds if given. The message says why."""

    def __init__(self, message: str = "", delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


@dataclass(frozen=True)
class Backoff:
    base: float = 1.0
    factor: float = 2.0
    cap: float = 15.0

    def delay(self, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` consecutive failures (≥ 1)."""
        return min(self.cap, self.base * self.factor ** max(0, failures - 1))


class Schedule:
    """The bookkeeping of the queue, without asyncio (so tests drive its clock):
    when each key is due, how often it failed in a row, which keys are being
    reconciled (and were added again meanwhile)."""

    def __init__(self, backoff: Backoff = Backoff()) -> None:
        self.backoff = backoff
        self._heaps: dict[bool, list[tuple[float, int, Key]]] = {True: [], False: []}  # lane "first" → heap
        self._due: dict[Key, tuple[float, bool]] = {}  # key → (due, in the first lane)
        self._seq = itertools.count()
        self._active: set[Key] = set()
        self._active_first: set[Key] = set()  # the active keys popped from the first lane
        self._again: dict[Key, float] = {}  # added while active: due then
        self._again_first: set[Key] = set()
        self.failures: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: Key, now: float, delay: float = 0.0, first: bool = False) -> None:
        """Due after ``delay``; ``first``: ahead of every ordinary key that is due too (a new
        PipelineJob waiting for its Job goes before status updates of running ones)."""
        due = now + max(0.0, delay)
        if key in self._active:
            self._again[key] = min(due, self._again.get(key, due))
            if first:
                self._again_first.add(key)
            return
        current = self._due.get(key)
        if current is not None and current[0] <= due and (current[1] or not first):
            return  # already due as early (and in a lane as fast)
        entry = (min(due, current[0]) if current is not None else due, first or bool(current and current[1]))
        self._due[key] = entry
        heapq.heappush(self._heaps[entry[1]], (entry[0], next(self._seq), key))

    def _head(self, lane: bool) -> float | None:
        heap = self._heaps[lane]
        while heap:
            due, _, key = heap[0]
            if self._due.get(key) == (due, lane):
                return due
            heapq.heappop(heap)  # superseded by an earlier add or another lane
        return None

    def next_due(self, ordinary: bool = True) -> float | None:
        """When the next key is due (``ordinary`` False: the next first-lane key)."""
        dues = [d for d in (self._head(True), self._head(False) if ordinary else None) if d is not None]
        return min(dues) if dues else None

    def first_pending(self) -> bool:
        """Is a first-lane key waiting or being reconciled (during a burst: Job creates pending)?"""
        return bool(self._active_first) or self._head(True) is not None

    def ordinary_active(self) -> int:
        return len(self._active) - len(self._active_first)

    def pop(self, now: float, ordinary: bool = True) -> Key | None:
        """A key due by ``now`` (now being reconciled), the first lane's before the other's,
        each lane earliest first; or None. ``ordinary`` False: first-lane keys only."""
        for lane in (True, False) if ordinary else (True,):
            due = self._head(lane)
            if due is not None and due <= now:
                _, _, key = heapq.heappop(self._heaps[lane])
                del self._due[key]
                self._active.add(key)
                if lane:
                    self._active_first.add(key)
                return key
        return None

    def done(self, key: Key, now: float, failed: bool, delay: float | None = None) -> float | None:
        """A reconcile of ``key`` ended; returns the delay of its retry, if it failed."""
        self._active.discard(key)
        self._active_first.discard(key)
        retry = None
        if failed:
            n = self.failures[key] = self.failures.get(key, 0) + 1
            retry = self.backoff.delay(n) if delay is None else delay
            self.add(key, now, retry)
        else:
            self.failures.pop(key, None)
        again = self._again.pop(key, None)
        first = key in self._again_first
        self._again_first.discard(key)
        if again is not None:
            self.add(key, now, max(0.0, again - now), first=first)
        return retry


class WorkQueue:
    """Workers reconciling the keys of a :class:`Schedule`.

    While first-lane keys wait or run (a burst of new PipelineJobs: Job creates pending), at
    most ``ordinary_share`` of the workers reconcile ordinary keys (status writes of running
    PipelineJobs): the rest stay free for the creates the moment they arrive, and the status
    writes, which would compete with the creates at the API server, go on at a bounded rate
    instead of stopping."""

    def __init__(self, reconcile: Callable[[Key], Awaitable[None]], workers: int = 8,
                 backoff: Backoff = Backoff(), clock: Callable[[], float] = time.monotonic,
                 ordinary_share: float = 1.0) -> None:
        self.schedule = Schedule(backoff)
        self._reconcile = reconcile
        self._workers = workers
        self._ordinary_cap = max(1, int(workers * ordinary_share))
        self._clock = clock
        self._wake = asyncio.Event()
        self._ready: asyncio.Queue[Key] = asyncio.Queue()
        self._free = asyncio.Semaphore(workers)  # workers not reconciling (nor handed a key)
        self._tasks: list[asyncio.Task] = []
        self.reconciles = 0
        self.retries = 0

    def add(self, key: Key, delay: float = 0.0, first: bool = False) -> None:
        self.schedule.add(key, self._clock(), delay, first=first)
        self._wake.set()

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._dispatch(), name="workqueue-dispatch")]
            self._tasks += [asyncio.create_task(self._work(), name=f"workqueue-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _dispatch(self) -> None:
        """Hands a key to a worker only when one is free, so the lanes order what runs next: a
        key popped at once into an unbounded hand-off queue would run in the order it became
        due, and during a burst the status updates of running PipelineJobs would go before the
        creates the first lane exists for (and compete with them at the API server)."""
        while True:
            await self._free.acquire()
            try:
                key = await self._next_due()
            except BaseException:
                self._free.release()
                raise
            self._ready.put_nowait(key)

    def creating(self) -> bool:
        """First-lane keys wait or run (others may hold back what competes with them)."""
        return self.schedule.first_pending()

    async def _next_due(self) -> Key:
        while True:
            ordinary = self.schedule.ordinary_active() < self._ordinary_cap or not self.schedule.first_pending()
            key = self.schedule.pop(self._clock(), ordinary=ordinary)
            if key is not None:
                return key
            due = self.schedule.next_due(ordinary=ordinary)
            timeout = None if due is None else max(0.0, due - self._clock())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _work(self) -> None:
        while True:
            key = await self._ready.get()
            failed, delay = False, None
            try:
                await self._reconcile(key)
            except asyncio.CancelledError:
                raise
            except Retry as exc:
                failed, delay = True, exc.delay
                why = str(exc)
            except Exception as exc:  # noqa: BLE001 - every failure is retried
                failed = True
                why = f"{type(exc).__name__}: {_first_line(exc)}"
            self.reconciles += 1
            retry = self.schedule.done(key, self._clock(), failed, delay)
            self._free.release()
            if failed:
                self.retries += 1
                n = self.schedule.failures.get(key, 0)
                level = logging.WARNING if n in (1, 3) or n % 20 == 0 else logging.DEBUG
                log.log(level, "%s: not converged (%s); retry %d in %.1fs", _show(key), why, n, retry or 0.0)
            self._wake.set()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    reason = getattr(exc, "reason", None)
    status = getattr(exc, "status", None)
    if status is not None and reason:
        return f"{status} {reason}"
    return text.splitlines()[0][:300] if text else ""


def _show(key: Key) -> str:
    return "/".join(str(k) for k in key) if isinstance(key, tuple) else str(key)


__all__ = ["Backoff", "Retry", "Schedule", "WorkQueue"]
