"""The per-namespace reconcile loop: serialised, coalesced, retried (plain asyncio)."""
from __future__ import annotations

import asyncio

import pytest

from clara_dicom.retrying import NAMESPACE_RECONCILE
from clara_operator.conditions import Cond, merge, transitions
from clara_operator.reconciler import NamespaceReconciler


async def test_bursts_coalesce_and_runs_never_overlap():
    active = 0
    overlaps = 0
    calls = 0

    async def run():
        nonlocal active, overlaps, calls
        active += 1
        overlaps += active > 1
        calls += 1
        await asyncio.sleep(0.02)
        active -= 1

    r = NamespaceReconciler("ns", run, debounce=0.01)
    for _ in range(20):
        r.request()
    await r.request_and_wait(timeout=2)
    assert overlaps == 0
    assert 1 <= calls <= 2
    await r.stop()


async def test_request_and_wait_covers_a_run_started_after_the_request():
    seen = []
    gate = asyncio.Event()

    async def run():
        seen.append(len(seen))
        if len(seen) == 1:
            await gate.wait()

    r = NamespaceReconciler("ns", run, debounce=0)
    r.request()
    await asyncio.sleep(0.01)  # first run is in progress, blocked
    waiter = asyncio.create_task(r.request_and_wait(timeout=2))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    gate.set()
    await waiter
    assert len(seen) == 2  # the waiter needed the second run
    await r.stop()


async def test_failures_are_retried():
    attempts = 0

    async def run():
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RuntimeError("API briefly unavailable")

    r = NamespaceReconciler("ns", run, debounce=0, retry=NAMESPACE_RECONCILE.with_(initial=0.01, cap=0.01))
    await r.request_and_wait(timeout=2)
    assert attempts == 3 and r.runs == 1
    await r.stop()


async def test_wait_times_out_when_it_never_succeeds():
    async def run():
        raise RuntimeError("down")

    r = NamespaceReconciler("ns", run, debounce=0, retry=NAMESPACE_RECONCILE.with_(initial=0.01, cap=0.01))
    with pytest.raises(asyncio.TimeoutError):
        await r.request_and_wait(timeout=0.1)
    await r.stop()


def test_conditions_merge_and_transitions():
    first = merge([Cond("Ready", False, "Pending", "wait")], None, 1, now="T1")
    assert first[0]["lastTransitionTime"] == "T1" and first[0]["observedGeneration"] == 1
    same = merge([Cond("Ready", False, "ProcessorNotFound", "x")], first, 2, now="T2")
    assert same[0]["lastTransitionTime"] == "T1"
    flipped = merge([Cond("Ready", True, "Valid", "ok")], same, 2, now="T3")
    assert flipped[0]["lastTransitionTime"] == "T3"
    assert transitions([Cond("Ready", False, "Pending", "w")], None) == [("Normal", "Pending", "Ready=False: w")]
    assert transitions([Cond("Ready", True, "Valid", "ok")], first) == [("Normal", "Ready", "Ready=True: ok")]
    assert transitions([Cond("Ready", False, "Conflict", "c")], flipped)[0][:2] == ("Warning", "Conflict")
    assert transitions([Cond("Ready", True, "Valid", "ok")], flipped) == []
    # Secondary conditions: news only when something is wrong, or recovers.
    assert transitions([Cond("SourcesResolved", True, "Resolved", "ok")], None) == []
    bad = merge([Cond("SourcesResolved", False, "SourceNotFound", "x")], None, 1)
    assert transitions([Cond("SourcesResolved", True, "Resolved", "ok")], bad)[0][:2] == ("Normal", "SourcesResolved")
