"""Retry policies, named and defined once, built on tenacity.

Every part that retries something transient (a Kubernetes API call, the Results
Service, a job sink) takes its policy from here: exponential backoff from
``initial`` seconds, doubling up to ``cap``, with a random ``jitter`` of up to
that many seconds so that many clients failing together do not retry together,
and either a number of attempts or "for as long as it takes".

Two ways to use a policy:

- :meth:`Policy.retrying`: a tenacity retrier for
  one call that is retried until it succeeds or gives up;
- :meth:`Policy.backoff`: the delays alone, for a loop that does more than one
  call per round (a watch, a poller, a writer) and starts again from ``initial``
  after a success. Such loops sleep on their own event (so stopping interrupts
  the wait) or their own scheduler (so no thread blocks).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import tenacity
from tenacity import wait as tenacity_wait

__all__ = [
    "Policy", "Backoff", "wait_retry_after", "retry_after_seconds",
    "JOB_CREATION", "RESULTS_POLL", "RESULTS_REPORT", "RESULTS_REGISTER", "KUBE_WATCH", "KUBE_WRITE",
    "NAMESPACE_RECONCILE", "JOB_WATCH",
]


@dataclass(frozen=True)
class Policy:
    """Exponential backoff with jitter: the n-th wait (n ≥ 1) is
    ``min(initial * 2**(n-1), cap - j) + uniform(0, j)`` seconds with
    ``j = min(jitter, initial, cap - initial)``, so no wait is ever longer than
    ``cap``, the jitter stays when the waits have reached it, and a policy of no
    waiting (``initial=0``) does not wait."""

    name: str
    initial: float
    cap: float
    jitter: float = 0.0
    attempts: int | None = None  # None: retry for as long as it takes

    def __post_init__(self) -> None:
        if self.initial < 0 or self.cap < self.initial or self.jitter < 0:
            raise ValueError(f"retry policy {self.name}: need 0 <= initial <= cap and jitter >= 0")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"retry policy {self.name}: attempts must be at least 1")

    def with_(self, **changes: Any) -> "Policy":
        """This policy with some fields changed (e.g. a cap taken from settings)."""
        return dataclasses.replace(self, **changes)

    def wait(self) -> tenacity_wait.wait_base:
        jitter = min(self.jitter, self.initial, self.cap - self.initial)
        exponential = tenacity.wait_exponential(multiplier=self.initial, exp_base=2, max=self.cap - jitter,
                                                min=self.initial)
        return exponential + tenacity.wait_random(0, jitter) if jitter else exponential

    def stop(self) -> Any:
        return tenacity.stop_never if self.attempts is None else tenacity.stop_after_attempt(self.attempts)

    def retrying(self, *, retry: Any, sleep: Callable[[float], None] | None = None, wait: Any = None,
                 before_sleep: Callable[[tenacity.RetryCallState], None] | None = None) -> tenacity.Retrying:
        """A tenacity ``Retrying`` for this policy that re-raises the last error when it gives up.
        ``retry`` says which failures are transient (e.g. ``retry_if_exception_type(X)``)."""
        kwargs: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
        return tenacity.Retrying(stop=self.stop(), wait=wait or self.wait(), retry=retry, reraise=True,
                                 before_sleep=before_sleep, **kwargs)

    def backoff(self) -> "Backoff":
        return Backoff(self)


class Backoff:
    """The successive delays of a policy for a loop that retries by itself.

    ``next()`` after each failure gives the seconds to wait; ``reset()`` after a
    success starts again from ``initial``.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._wait = policy.wait()
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = self.failures
        return float(self._wait(state))

    def reset(self) -> None:
        self.failures = 0


def retry_after_seconds(exc: BaseException | None, limit: float) -> float | None:
    """The ``Retry-After`` delay (in seconds, at most ``limit``) an error carries as
    ``exc.retry_after``, if any."""
    value = getattr(exc, "retry_after", None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return min(max(seconds, 0.0), limit) if seconds == seconds else None


class wait_retry_after(tenacity_wait.wait_base):  # noqa: N801 - named like tenacity's waits
    """Wait as long as the server asked (``Retry-After``, up to ``limit`` seconds) when
    it said so, and never less than ``fallback`` (the policy's backoff) would wait."""

    def __init__(self, fallback: tenacity_wait.wait_base, limit: float) -> None:
        self.fallback = fallback
        self.limit = limit

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        backoff = float(self.fallback(retry_state))
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        asked = retry_after_seconds(exc, self.limit)
        return backoff if asked is None else max(backoff, asked)


# ---------------------------------------------------------------- the policies
#: Creating the PipelineJobs of a closed group (adapter): forever; the cap is the
#: ``jobRetryMaxSeconds`` setting (``JOB_CREATION.with_(cap=...)``).
JOB_CREATION = Policy("job-creation", initial=0.5, cap=30.0, jitter=0.5)
#: The export agent leasing tasks while the Results Service is away: forever, from
#: ``exportPollSeconds`` (``RESULTS_POLL.with_(initial=...)``).
RESULTS_POLL = Policy("results-poll", initial=1.0, cap=30.0, jitter=1.0)
#: Reporting an export's outcome: 4 tries (0.5 s, 1 s, 2 s apart); after that the
#: lease expires and the task is exported again.
RESULTS_REPORT = Policy("results-report", initial=0.5, cap=2.0, attempts=4)
#: register-results creating its tasks: 6 tries from 1 s, doubling up to 30 s
#: (``--attempts`` / ``--retry-wait`` change attempts and initial).
RESULTS_REGISTER = Policy("results-register", initial=1.0, cap=30.0, jitter=0.5, attempts=6)
#: The adapter's watch of its rendered ConfigMap.
KUBE_WATCH = Policy("kube-watch", initial=0.5, cap=10.0, jitter=0.5)
#: The adapter's writes of its status ConfigMap.
KUBE_WRITE = Policy("kube-write", initial=0.5, cap=10.0, jitter=0.5)
#: The operator's reconcile of one namespace's configuration objects.
NAMESPACE_RECONCILE = Policy("namespace-reconcile", initial=0.5, cap=10.0, jitter=0.5)
#: The operator's watch of pipeline Jobs (a short cap: Job completions wait on it).
JOB_WATCH = Policy("job-watch", initial=0.5, cap=5.0, jitter=0.5)
