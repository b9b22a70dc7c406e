"""The export agent's lease keeper on a controllable clock (the real-peer tests of the agent's
lease behaviour, on SQLite and PostgreSQL, are in tests/results/test_results_agent_lease.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from clara_adapter.export.lease import MAX_RETRY_INTERVAL, MIN_INTERVAL, LeaseKeeper, next_wait, report_kwargs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Refused(Exception):
    def __init__(self, status_code: int | None) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class FakeResults:
    """``renew`` answers from a script: a number of seconds (renewed for that long), or an exception."""

    def __init__(self, clock: Clock, script: list) -> None:
        self.clock, self.script, self.calls = clock, list(script), []

    def renew(self, task_id: str, lease_id: str) -> float:
        self.calls.append((round(self.clock.now - 1000.0, 3), task_id, lease_id))
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return self.clock.now + answer


def run_keeper(script: list, lease_seconds: float = 30.0, max_waits: int = 50):
    clock = Clock()
    client = FakeResults(clock, script)
    task = SimpleNamespace(id="task-1", lease_id="L1", lease_expires_at=clock.now + lease_seconds)
    waits: list[float] = []
    lost_calls: list[bool] = []

    def wait(seconds: float) -> bool:  # advance the clock instead of sleeping; stop when the script ends
        waits.append(round(seconds, 3))
        clock.now += seconds
        return not client.script or len(waits) > max_waits

    keeper = LeaseKeeper(client, task, clock=clock, wait=wait, on_lost=lambda: lost_calls.append(True))
    keeper.run()
    return keeper, client, waits, lost_calls


def test_renews_at_a_third_of_the_remaining_lease():
    keeper, client, waits, _ = run_keeper([30, 30, 30])
    assert [c[0] for c in client.calls] == [10.0, 20.0, 30.0]  # every 10 s of a 30 s lease
    assert all(c[1:] == ("task-1", "L1") for c in client.calls)
    assert keeper.renewals == 3 and not keeper.lost


def test_unreachable_service_is_retried_sooner_and_the_lease_kept():
    down = Refused(None)  # no answer (ResultsUnavailable has no status code)
    keeper, client, waits, _ = run_keeper([down, Refused(503), 30, 30], lease_seconds=300)
    # 300 s lease: the first renewal after 100 s; failures retry within MAX_RETRY_INTERVAL
    assert waits[:3] == [100.0, MAX_RETRY_INTERVAL, MAX_RETRY_INTERVAL]
    assert keeper.renewals == 2 and not keeper.lost


@pytest.mark.parametrize("status", [409, 404])
def test_a_superseded_lease_is_lost_and_renewal_stops(status):
    keeper, client, waits, lost_calls = run_keeper([30, Refused(status), 30, 30])
    assert keeper.lost and lost_calls == [True]
    assert len(client.calls) == 2  # nothing after the 409


def test_waits_never_drop_below_the_minimum():
    assert next_wait(expires_at=100.0, now=200.0, failed=False) == MIN_INTERVAL  # clock ahead of the server's
    assert next_wait(expires_at=100.0, now=100.1, failed=True) == MIN_INTERVAL
    assert next_wait(expires_at=400.0, now=100.0, failed=True) == MAX_RETRY_INTERVAL
    assert next_wait(expires_at=400.0, now=100.0, failed=False) == pytest.approx(100.0)


def test_tasks_without_a_lease_are_neither_renewed_nor_fenced():
    clara_style = SimpleNamespace(id="t", lease_id=None, lease_expires_at=None)
    client = FakeResults(Clock(), [])
    with LeaseKeeper(client, clara_style) as keeper:
        pass
    assert client.calls == [] and not keeper.lost and keeper._thread is None
    assert report_kwargs(clara_style) == {}
    assert report_kwargs(SimpleNamespace(lease_id="L9")) == {"lease_id": "L9"}
