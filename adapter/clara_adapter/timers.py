"""Event-driven timers on a replaceable clock.

Two clocks: ``now()`` is the wall clock, written into the journal so deadlines
survive a restart; ``mono()`` is the monotonic clock that timers run on, so a
wall-clock step (NTP, a VM resumed) neither fires a group early nor holds it
for an hour. ``mono_of(wall)`` maps a journaled time onto the monotonic clock
(at the moment of the call: a restart re-maps from the journal).

`ThreadScheduler` runs callbacks on one thread at their deadline.
`ManualScheduler` is the controllable clock for unit tests: time moves only
when the test calls ``advance`` (both clocks) or ``jump_wall`` (the wall clock
alone), and due callbacks run in the caller's thread.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Timer:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]):
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Heap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def push(self, timer: Timer) -> None:
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))

    def pop_due(self, now: float) -> list[Timer]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            timer = heapq.heappop(self._heap)[2]
            if not timer.cancelled:
                due.append(timer)
        return due

    def next_deadline(self) -> float | None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None


def _run(timer: Timer) -> None:
    try:
        timer.fn()
    except Exception:  # a failing callback must not stop the other timers
        log.exception("timer callback failed")


class ThreadScheduler:
    def __init__(self, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 name: str = "clara-timers"):
        self.now = clock
        self.mono = monotonic
        self._heap = _Heap()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def mono_of(self, wall: float) -> float:
        return self.mono() + (wall - self.now())

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` at monotonic time ``when``."""
        timer = Timer(when, fn)
        with self._cond:
            self._heap.push(timer)
            self._cond.notify()
        return timer

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(self.mono() + delay, fn)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                nxt = self._heap.next_deadline()
                now = self.mono()
                if nxt is None or nxt > now:
                    self._cond.wait(timeout=None if nxt is None else nxt - now)
                    continue
                due = self._heap.pop_due(now)
            for timer in due:
                _run(timer)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)


class ManualScheduler:
    """A controllable clock and scheduler for tests."""

    def __init__(self, start: float = 1_000_000.0):
        self._now = start  # monotonic
        self._wall_offset = 0.0
        self._heap = _Heap()
        self._lock = threading.RLock()

    def now(self) -> float:
        return self._now + self._wall_offset

    def mono(self) -> float:
        return self._now

    def mono_of(self, wall: float) -> float:
        return self.mono() + (wall - self.now())

    def jump_wall(self, seconds: float) -> None:
        """Step the wall clock alone (as NTP may); timers must not notice."""
        self._wall_offset += seconds

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(when, fn)
        with self._lock:
            self._heap.push(timer)
        return timer

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(self._now + delay, fn)

    def advance(self, seconds: float) -> None:
        """Move both clocks forward, running every callback that falls due, in order."""
        target = self._now + seconds
        while True:
            with self._lock:
                nxt = self._heap.next_deadline()
                if nxt is None or nxt > target:
                    break
                self._now = max(self._now, nxt)
                due = self._heap.pop_due(self._now)
            for timer in due:
                _run(timer)
        self._now = target

    def stop(self) -> None:
        pass
