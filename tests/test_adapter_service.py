"""The adapter process around the journal: housekeeping off the timer thread,
configuration applied in order and under the lock, and an appliedVersion that
never goes backwards. A real Adapter (SCP on a free port, real journal)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from clara_dicom.config import resolve

from clara_adapter import service
from clara_adapter.job_sinks import LocalJobSink
from clara_adapter.k8s_status import VersionPublisher
from clara_adapter.settings import AdapterSettings
from peers import free_port
from test_processor_unit import manifests


@pytest.fixture
def make_adapter(tmp_path):
    made = []

    def make() -> service.Adapter:
        settings = AdapterSettings(storageDir=str(tmp_path / "state"), host="127.0.0.1", dicomPort=free_port(),
                                   httpPort=0, reserveSpaceGB=0, watermarkPercent=100)
        adapter = service.Adapter(settings, LocalJobSink(tmp_path / "state" / "jobs"))
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.stop(grace=1)


def config(pipeline: str):
    return resolve(manifests({"pipelines": {"seg": pipeline}})).config


def test_slow_housekeeping_does_not_delay_timers(make_adapter, monkeypatch):
    """Retention deleting a huge payload folder takes its time: group timers fire on time meanwhile."""
    purging, release = threading.Event(), threading.Event()

    def slow_purge(folder, seconds, now=None):
        purging.set()
        release.wait(10)
        return 0

    monkeypatch.setattr(service, "purge_older_than", slow_purge)
    monkeypatch.setattr(service, "HOUSEKEEPING_SECONDS", 0.05)
    adapter = make_adapter()
    adapter.start(config("p1"))
    try:
        assert purging.wait(5)
        fired = threading.Event()
        adapter.scheduler.call_later(0.1, fired.set)
        assert fired.wait(2), "a timer waited for housekeeping"
    finally:
        release.set()


def test_a_configuration_offered_while_starting_wins_over_the_older_initial_one(make_adapter):
    adapter = make_adapter()
    applied: list[str] = []
    adapter.applied_listeners.append(applied.append)
    old, new = config("p-old"), config("p-new")
    adapter.apply_config(new)  # delivered by the watch before start() has recovered the journal
    adapter.start(old)  # `old` was read before the watch started
    assert adapter.config_version == new.version
    assert adapter.ingest.processors["clara"].spec.pipelines == {"seg": "p-new"}
    assert applied == [new.version]
    adapter.apply_config(old)  # a later offer is applied normally, in order
    assert applied == [new.version, old.version]


def test_configuration_is_applied_under_the_processor_lock(make_adapter):
    adapter = make_adapter()
    adapter.start(config("p1"))
    done = threading.Event()
    with adapter.ctx.lock:
        threading.Thread(target=lambda: (adapter.apply_config(config("p2")), done.set()), daemon=True).start()
        assert not done.wait(0.3)  # waits for the lock housekeeping and processors take
    assert done.wait(5)
    assert adapter.ingest.processors["clara"].spec.pipelines == {"seg": "p2"}


def test_applied_version_is_never_published_backwards():
    """v1's write is slow and fails once; v2 is applied meanwhile: the last write is v2,
    and v1 is never written after v2."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    writes: list[str] = []
    first = {"slow": True}
    v2_sent = threading.Event()

    async def write(version: str) -> None:
        if version == "v1" and first.pop("slow", False):
            await asyncio.get_running_loop().run_in_executor(None, v2_sent.wait, 5)
            raise ConnectionError("API timeout")
        writes.append(version)

    publisher = VersionPublisher(loop, write, max_backoff=0.05)
    try:
        publisher.publish("v1")
        time.sleep(0.05)
        publisher.publish("v2")
        v2_sent.set()
        deadline = time.monotonic() + 5
        while publisher.published != "v2" and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a stale retry of v1 would land now
        assert publisher.published == "v2"
        assert writes == ["v2"]
    finally:
        publisher.stopping = True
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
