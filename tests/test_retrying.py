"""The shared retry policies (clara_dicom.retrying) on a controllable sleep: delays,
caps, jitter, give-up rules and Retry-After. Every site that uses them also has a
real-peer test (Results Service, kube-apiserver, job sinks)."""
from __future__ import annotations


import pytest
from tenacity import retry_if_exception_type

from clara_dicom import retrying as r
from clara_dicom.retrying import Policy, wait_retry_after


class Transient(Exception):
    def __init__(self, retry_after: str | None = None) -> None:
        super().__init__("down")
        self.retry_after = retry_after


class Flaky:
    """Fails ``failures`` times with ``exc``, then answers "ok"."""

    def __init__(self, failures: int, exc: Exception | None = None) -> None:
        self.failures, self.exc, self.calls = failures, exc or Transient(), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def run(policy: Policy, fn: Flaky, **kwargs) -> tuple[object, list[float]]:
    slept: list[float] = []
    retrying = policy.retrying(retry=retry_if_exception_type(Transient), sleep=slept.append, **kwargs)
    try:
        result: object = retrying(fn)
    except Exception as exc:  # noqa: BLE001 - the test looks at what was raised
        result = exc
    return result, slept


def test_without_jitter_waits_double_from_initial_up_to_the_cap():
    policy = Policy("t", initial=0.5, cap=3.0)
    backoff = policy.backoff()
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5  # a success starts again from the first wait


def test_jitter_spreads_waits_but_never_beyond_the_cap_or_below_initial():
    policy = Policy("t", initial=0.5, cap=30.0, jitter=0.5)
    seen: dict[int, list[float]] = {}
    for _ in range(200):
        backoff = policy.backoff()
        for n in range(1, 10):
            seen.setdefault(n, []).append(backoff.next())
    for n, delays in seen.items():
        base = min(0.5 * 2 ** (n - 1), 29.5)
        assert all(base <= d <= base + 0.5 for d in delays), (n, min(delays), max(delays))
        assert max(delays) - min(delays) > 0.1  # really spread, also once capped
    assert max(max(d) for d in seen.values()) <= 30.0


def test_a_policy_of_no_waiting_does_not_wait():
    policy = r.RESULTS_REGISTER.with_(initial=0.0)
    result, slept = run(policy, Flaky(3))
    assert result == "ok" and slept == [0.0, 0.0, 0.0]


def test_gives_up_after_its_attempts_with_the_last_error():
    fn = Flaky(10)
    result, slept = run(Policy("t", initial=1.0, cap=30.0, attempts=4), fn)
    assert isinstance(result, Transient) and fn.calls == 4
    assert slept == [1.0, 2.0, 4.0]  # three waits between four tries


def test_a_failure_that_is_not_transient_is_not_retried():
    fn = Flaky(10, ValueError("bad request"))
    result, slept = run(Policy("t", initial=1.0, cap=30.0, attempts=4), fn)
    assert isinstance(result, ValueError) and fn.calls == 1 and slept == []


def test_forever_policies_keep_trying():
    fn = Flaky(50)
    result, slept = run(r.JOB_CREATION.with_(jitter=0.0), fn)
    assert result == "ok" and fn.calls == 51 and max(slept) == r.JOB_CREATION.cap


def test_retry_after_is_honoured_within_its_limit():
    policy = Policy("t", initial=1.0, cap=30.0, attempts=5)
    fn = Flaky(4)
    answers = iter(["7", None, "600", "soon"])

    def failing() -> str:
        try:
            return fn()
        except Transient as exc:
            exc.retry_after = next(answers)
            raise Transient(exc.retry_after) from None

    slept: list[float] = []
    retrying = policy.retrying(retry=retry_if_exception_type(Transient), sleep=slept.append,
                               wait=wait_retry_after(policy.wait(), limit=60.0))
    assert retrying(failing) == "ok"
    # 7 s asked (more than the 1 s backoff); none asked: 2 s; 600 s asked: capped to 60;
    # an unparseable header: the backoff (8 s).
    assert slept == [7.0, 2.0, 60.0, 8.0]


def test_retry_after_shorter_than_the_backoff_does_not_shorten_it():
    policy = Policy("t", initial=4.0, cap=30.0, attempts=2)
    fn = Flaky(1, Transient(retry_after="1"))
    result, slept = run(policy, fn, wait=wait_retry_after(policy.wait(), limit=60.0))
    assert result == "ok" and slept == [4.0]


@pytest.mark.parametrize("kwargs", [dict(initial=-1, cap=1), dict(initial=2, cap=1), dict(initial=1, cap=2, jitter=-1),
                                    dict(initial=1, cap=2, attempts=0)])
def test_nonsense_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        Policy("t", **kwargs)


def test_named_policies_keep_the_caps_the_hand_written_loops_had():
    # (initial, cap, attempts) as before tenacity: job creation 0.5 s → jobRetryMaxSeconds (30),
    # lease polling exportPollSeconds → 30 s, reports 4 tries 0.5/1/2 s apart, register-results
    # 6 tries from 1 s up to 30 s, ConfigMap watch/status writes and namespace reconciles 0.5 → 10 s.
    assert (r.JOB_CREATION.initial, r.JOB_CREATION.cap, r.JOB_CREATION.attempts) == (0.5, 30.0, None)
    assert (r.RESULTS_POLL.cap, r.RESULTS_POLL.attempts) == (30.0, None)
    report = r.RESULTS_REPORT.backoff()
    assert [report.next() for _ in range(3)] == [0.5, 1.0, 2.0] and r.RESULTS_REPORT.attempts == 4
    assert (r.RESULTS_REGISTER.initial, r.RESULTS_REGISTER.cap, r.RESULTS_REGISTER.attempts) == (1.0, 30.0, 6)
    for policy in (r.KUBE_WATCH, r.KUBE_WRITE, r.NAMESPACE_RECONCILE):
        assert (policy.initial, policy.cap, policy.attempts) == (0.5, 10.0, None)
