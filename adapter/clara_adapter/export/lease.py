"""Keep a Results Service lease alive while its task is exported (SPEC §9 "Results Service leases").

The Results Service hands a task out with a lease (``task.lease_id``, ``task.lease_expires_at``);
an export that outlived it would be leased to another worker and sent twice. While the export
runs, :class:`LeaseKeeper` renews the lease from a thread of its own, each time a third of the
remaining time has passed. When the service answers 409 or 404 the lease is *lost* (it expired
and the task was leased again, or the task finished or vanished): the keeper stops and the
holder must report nothing for the task. Failures to reach the service are retried until the
lease is renewed or lost: an expired lease stays renewable until someone else leases the task.

Tasks from a service without leases (written for Clara: no ``leaseId``) are not renewed, and
their reports carry no lease.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Renew when this fraction of the remaining lease has passed.
RENEW_FRACTION = 1 / 3
#: Never renew more often than this (seconds), even when the lease is nearly over.
MIN_INTERVAL = 0.25
#: After a failed renewal, try again within this many seconds.
MAX_RETRY_INTERVAL = 5.0
#: HTTP statuses meaning the lease is gone for good.
LOST_STATUSES = (404, 409)


def report_kwargs(task: Any) -> dict[str, Any]:
    """The keyword arguments fencing a report with the task's lease (none without a lease)."""
    lease_id = getattr(task, "lease_id", None)
    return {"lease_id": lease_id} if lease_id else {}


def next_wait(expires_at: float, now: float, failed: bool) -> float:
    """Seconds until the next renewal of a lease ending at ``expires_at``."""
    wait = max(MIN_INTERVAL, (expires_at - now) * RENEW_FRACTION)
    return min(wait, MAX_RETRY_INTERVAL) if failed else wait


class LeaseKeeper:
    """``with LeaseKeeper(client, task) as lease: export(task)``; then ``lease.lost`` says whether
    the lease was lost meanwhile (report nothing then).

    ``client`` needs ``renew(task_id, lease_id) -> new expiry (epoch seconds)``, raising an
    exception with ``status_code`` 409/404 once the lease is superseded or the task finished.
    ``clock`` and ``wait`` (``wait(seconds) -> True when stopped``) are for tests.
    """

    def __init__(self, client: Any, task: Any, *, on_lost: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 wait: Callable[[float], bool] | None = None) -> None:
        self.client = client
        self.task = task
        self.on_lost = on_lost
        self.clock = clock
        self._stopped = threading.Event()
        self._wait = wait or self._stopped.wait
        self._lost = threading.Event()
        self.renewals = 0
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def __enter__(self) -> "LeaseKeeper":
        if getattr(self.task, "lease_id", None) and getattr(self.task, "lease_expires_at", None):
            self._thread = threading.Thread(target=self.run, name=f"clara-lease-{self.task.id[:8]}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(10)

    def run(self) -> None:
        """Renew until stopped or lost (the keeper's thread)."""
        task = self.task
        expires, failed, reported_failure = float(task.lease_expires_at), False, False
        while not self._wait(next_wait(expires, self.clock(), failed)):
            try:
                expires = self.client.renew(task.id, task.lease_id)
            except Exception as exc:  # noqa: BLE001 - any failure but "lost" is retried
                if getattr(exc, "status_code", None) in LOST_STATUSES:
                    self._lost.set()
                    log.warning("export task %s: lease lost (%s); stopping without reporting", task.id,
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                    if self.on_lost is not None:
                        self.on_lost()
                    return
                failed = True
                if not reported_failure:
                    log.warning("export task %s: cannot renew its lease yet: %s (retrying)", task.id, exc)
                    reported_failure = True
                continue
            self.renewals += 1
            if failed:
                log.info("export task %s: lease renewed again", task.id)
            failed = reported_failure = False
