"""Commit, then publish (issue 15, adapter part) and group commit (issue 14):
the processor's memory and timers change only after the journal commit; a
failed commit fails exactly its instances; journal paths survive a different
spelling of the storage root; payloads that cannot be built are quarantined;
recovery honours the plug-in; timers run on the monotonic clock.

Real SQLite journal, real files, real processor; only time is simulated, and
a commit failure is injected at the one place SQLite would raise it."""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from clara_dicom.config import resolve

from clara_adapter.ingest import OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS, Ingest
from clara_adapter.journal import InstanceRecord, Journal
from clara_adapter.metrics import AdapterMetrics
from clara_adapter.processors.base import JobProcessorBase, Outcome, ProcessorContext
from clara_adapter.storage import InstanceStore
from clara_adapter.submitter import JobSubmitter
from clara_adapter.timers import ThreadScheduler
from postgres_server import postgres_server  # noqa: F401 (fixture)
from test_processor_unit import Harness, manifests

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def journal_on(backend, request, tmp_path):
    """Factory: a journal of the current back-end whose storage root is ``root``;
    for PostgreSQL one fresh database per test, shared by every journal the test opens."""
    opened = []
    dsn = None
    if backend == "postgres":
        server = request.getfixturevalue("postgres_server")
        dsn = server.fresh_database(f"t{abs(hash(request.node.nodeid)) % 10**9}")

    def make(root: Path):
        from clara_adapter.journal import open_journal

        journal = open_journal(dsn, root)
        opened.append(journal)
        return journal

    make.dsn = dsn
    yield make
    for journal in opened:
        try:
            journal.close()
        except Exception:
            pass


def committed(journal_on, tmp: Path, sop: str) -> bool:
    """Is this instance's record committed (seen from another connection)?"""
    if journal_on.dsn:
        import psycopg

        with psycopg.connect(journal_on.dsn, options="-c search_path=clara_adapter") as conn:
            return conn.execute("SELECT count(*) FROM instances WHERE sop_instance_uid=%s", (sop,)).fetchone()[0] == 1
    with sqlite3.connect(str(tmp / "journal.sqlite")) as conn:
        return conn.execute("SELECT count(*) FROM instances WHERE sop_instance_uid=?", (sop,)).fetchone()[0] == 1


def metric(h: Harness, name: str, *labels: str) -> float:
    return getattr(h.ctx.metrics, name).labels(*labels)._value.get()


def incoming(h: Harness) -> list[Path]:
    return sorted((h.tmp / "incoming").glob("*.dcm"))


def in_threads(n: int, fn) -> list:
    results: list = [None] * n

    def run(i: int) -> None:
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def journal_busy(h: Harness):
    """While held, stores queue up for the next batch: the journal's lock (a group
    closing) on SQLite; on a journal with concurrent batches (PostgreSQL) every
    lane busy, which the group commit's pause stands for (real busy lanes:
    tests/test_journal_postgres.py)."""
    group_commit = h.ingest._group_commit
    return h.journal.lock if group_commit.lanes == 1 else group_commit.paused()


def wait_until(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


# -- commit, then publish ----------------------------------------------------

def test_journal_full_leaves_no_ghost_group_and_the_next_store_works(tmp_path):
    """SQLITE_FULL (a real one: the journal may not grow) while an instance opens
    a group: 0xA700, file deleted, no open group, no timer; once there is room the
    same study makes one job with exactly the instance that was acknowledged."""
    h = Harness(tmp_path, {"pipelines": {"seg": "p1"}, "timeout": 5})
    db = h.journal._db
    db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError, match="full"):  # fill the instances table's last page
        for i in range(10_000):
            db.execute("INSERT INTO instances (owner, ae_title, calling_ae, sop_instance_uid, sop_class_uid, "
                       "transfer_syntax, study_uid, series_uid, path, size, acked_at) "
                       "VALUES ('filler', '', '', ?, '', '', '', '', '', 0, 0)", (str(i),))
    # the group row still fits; the instance row does not: the commit cannot happen
    assert h.send(study="1.1") == OUT_OF_RESOURCES
    proc = h.ingest.processors["clara"]
    assert proc.open_groups == {} and incoming(h) == []
    assert h.journal.groups() == [] and h.journal.instances(owner="clara") == []
    db.execute("PRAGMA max_page_count=1073741823")
    h.clock.advance(10)  # a ghost group would close now and fail on its missing file
    assert h.jobs() == [] and h.sink.calls == 0
    assert h.send(study="1.1") == SUCCESS
    h.clock.advance(5.01)
    assert h.counts() == [1]
    assert h.ctx.metrics.job_failures._value.get() == 0 and h.submitter.pending == 0


def test_concurrent_commits_share_one_transaction_and_each_returns_after_its_own_commit(tmp_path, journal_on):
    h = Harness(tmp_path, {"pipelines": {"seg": "p1"}, "timeout": 5}, journal=journal_on(tmp_path))
    n = 8
    seen_committed: list[bool] = [False] * n
    commits_before = h.journal.commits

    def send(i: int) -> int:
        status = h.send(study=f"1.{i % 2}", sop=f"1.2.9.{i}")
        seen_committed[i] = committed(journal_on, tmp_path, f"1.2.9.{i}")
        return status

    with journal_busy(h):  # stores queue up
        threads, results = in_threads(n, send)
        wait_until(lambda: h.ingest._group_commit.queued() == n)
    for t in threads:
        t.join(10)
    assert results == [SUCCESS] * n
    assert all(seen_committed)
    assert h.journal.commits - commits_before == 1  # one transaction for all eight
    h.clock.advance(5.01)
    assert h.counts() == [4, 4]  # two studies; the second instance of each joined the group opened in the batch


def test_a_failed_group_commit_fails_exactly_its_instances_and_leaves_memory_untouched(tmp_path, monkeypatch, journal_on):
    h = Harness(tmp_path, {"pipelines": {"seg": "p1"}, "timeout": 5}, journal=journal_on(tmp_path))
    assert h.send(study="1.0", sop="1.2.8.0") == SUCCESS  # committed before: must survive untouched
    proc = h.ingest.processors["clara"]
    in_memory = not h.journal.shared  # a shared journal's groups live in the database alone
    group_before = proc.open_groups["1.0"] if in_memory else None
    members_before = dict(group_before.members) if in_memory else {}
    last_ack_before = group_before.last_ack_mono if in_memory else None
    kept_before = [p.name for p in incoming(h)]
    real_commit = h.journal._commit
    fail = {"armed": True}

    def commit() -> None:
        if fail.pop("armed", False):
            raise sqlite3.OperationalError("database or disk is full")
        real_commit()

    h.clock.advance(2)  # first: on a shared journal the group closer's polls commit too
    monkeypatch.setattr(h.journal, "_commit", commit)
    n = 6
    with journal_busy(h):
        threads, results = in_threads(n, lambda i: h.send(study=f"1.{i % 2}", sop=f"1.2.9.{i}"))
        wait_until(lambda: h.ingest._group_commit.queued() == n)
    for t in threads:
        t.join(10)
    assert results == [OUT_OF_RESOURCES] * n
    assert [p.name for p in incoming(h)] == kept_before  # theirs deleted
    if in_memory:
        assert kept_before == [m.path.name for m in members_before.values()]
        assert list(proc.open_groups) == ["1.0"] and proc.open_groups["1.0"] is group_before
        assert group_before.members == members_before and group_before.last_ack_mono == last_ack_before
    assert h.journal.count_instances() == 1 and len(h.journal.groups()) == 1
    # the quiet period was not extended by the failed instances: closes 5 s after the first
    h.clock.advance(3.01)
    assert h.counts() == [1]


def test_a_processor_error_fails_only_that_instance_of_the_batch(tmp_path, journal_on):
    h = Harness(tmp_path, {"pipelines": {"seg": "p1"}, "timeout": 5}, journal=journal_on(tmp_path))
    proc = h.ingest.processors["clara"]
    real = proc.handle_instance

    def handle(inst, tx):
        if inst.sop_instance_uid == "1.2.9.3":
            tx.journal.touch_group(-1, 0)  # a write that must be undone with the instance
            raise RuntimeError("plug-in bug")
        return real(inst, tx)

    proc.handle_instance = handle
    with journal_busy(h):
        threads, results = in_threads(6, lambda i: h.send(study="1.1", sop=f"1.2.9.{i}"))
        wait_until(lambda: h.ingest._group_commit.queued() == 6)
    for t in threads:
        t.join(10)
    assert results == [SUCCESS, SUCCESS, SUCCESS, PROCESSING_FAILURE, SUCCESS, SUCCESS]
    assert len(incoming(h)) == 5 and h.journal.count_instances() == 5
    h.clock.advance(5.01)
    assert h.counts() == [5]


def test_duplicates_inside_one_batch_are_dropped(tmp_path, journal_on):
    h = Harness(tmp_path, {"pipelines": {"seg": "p1"}, "timeout": 5}, journal=journal_on(tmp_path))
    with journal_busy(h):
        threads, results = in_threads(4, lambda i: h.send(study="1.1", sop="1.2.9.1"))
        wait_until(lambda: h.ingest._group_commit.queued() == 4)
    for t in threads:
        t.join(10)
    assert results == [SUCCESS] * 4
    assert len(incoming(h)) == 1 and metric(h, "ignored", "CLARA", "duplicate") == 3
    h.clock.advance(5.01)
    assert h.counts() == [1]


# -- fsyncFiles ---------------------------------------------------------------

@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_files_syncs_files_the_directory_once_per_batch_and_the_journal(tmp_path, monkeypatch, fsync):
    import stat

    h = Harness(tmp_path, {"pipelines": {"seg": "p1"}}, fsync=fsync)
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    assert h.journal._db.execute("PRAGMA synchronous").fetchone()[0] == (2 if fsync else 1)  # FULL / NORMAL
    with journal_busy(h):
        threads, results = in_threads(4, lambda i: h.send(study="1.1", sop=f"1.2.9.{i}"))
        wait_until(lambda: h.ingest._group_commit.queued() == 4)
    for t in threads:
        t.join(10)
    assert results == [SUCCESS] * 4
    assert sorted(synced) == (["dir"] + ["file"] * 4 if fsync else [])


# -- paths relative to the storage root ----------------------------------------

def _adapter_on(root: Path, clock, sink) -> Ingest:
    """The pieces Adapter.start wires, on a storage root spelled as given."""
    journal = Journal(root / "journal.sqlite", root=root)
    store = InstanceStore(root / "incoming")
    swept = store.sweep(journal.instance_paths())
    submitter = JobSubmitter(sink, root / "payloads", clock, journal, synchronous=True)
    ingest = Ingest(ProcessorContext("default", journal, clock, submitter, AdapterMetrics()), store)
    ingest.swept = swept
    ingest.recover()
    ingest.apply_config(resolve(manifests({"pipelines": {"a": "p1"}, "timeout": 10})).config)
    return ingest


@pytest.mark.parametrize("spelling", ["relative", "symlink", "dotted"])
def test_restart_with_the_storage_root_spelled_differently_loses_nothing(tmp_path, monkeypatch, spelling):
    h = Harness(tmp_path / "real", {"pipelines": {"a": "p1"}, "timeout": 10})
    h.send(study="1.1")
    h.send(study="1.1")
    held = incoming(h)
    assert len(held) == 2
    for proc in h.ingest.processors.values():  # the old process is gone
        proc.open_groups.clear()
    h.journal.close()
    if spelling == "relative":
        monkeypatch.chdir(tmp_path)
        root = Path("real")
    elif spelling == "symlink":
        os.symlink(tmp_path / "real", tmp_path / "link")
        root = tmp_path / "link"
    else:
        root = tmp_path / "real" / ".." / "real"
    ingest = _adapter_on(root, h.clock, h.sink)
    assert ingest.swept == 0
    assert incoming(h) == held
    h.clock.advance(10.01)
    assert h.counts() == [2]


def test_a_journal_with_absolute_paths_is_migrated(tmp_path):
    old_root = tmp_path / "old"
    h = Harness(old_root, {"pipelines": {"a": "p1"}, "timeout": 10})
    h.send(study="1.1")
    (inst,) = h.journal.instances()
    # as journals before relative paths were written: the absolute path of the time
    h.journal._db.execute("UPDATE instances SET path=?", (str(Path("/somewhere/else/incoming") / inst.path.name),))
    h.journal.close()
    for proc in h.ingest.processors.values():
        proc.open_groups.clear()
    ingest = _adapter_on(old_root, h.clock, h.sink)
    assert ingest.swept == 0 and len(incoming(h)) == 1
    assert ingest.journal._query("SELECT path FROM instances") == [(f"incoming/{inst.path.name}",)]
    h.clock.advance(10.01)
    assert h.counts() == [1]


# -- quarantine ---------------------------------------------------------------

def test_a_group_whose_payload_cannot_be_built_is_quarantined_not_retried_forever(tmp_path, caplog, journal_on):
    h = Harness(tmp_path, {"pipelines": {"a": "p1", "b": "p2"}, "timeout": 5}, journal=journal_on(tmp_path))
    for i in range(3):
        h.send(study="1.1", sop=f"1.2.9.{i}")
    lost = incoming(h)[0]
    lost.unlink()  # e.g. removed by hand, or a broken volume
    h.clock.advance(5.01)
    h.clock.advance(3600)  # an hour later: nothing keeps retrying
    assert h.jobs() == [] and h.sink.calls == 0
    assert h.submitter.pending == 0
    assert metric(h, "groups_quarantined", "CLARA") == 1
    assert h.journal.count_instances() == 0 and h.journal.groups() == []
    (folder,) = (tmp_path / "quarantine").iterdir()
    kept = sorted(p.name for p in folder.glob("*.dcm"))
    assert len(kept) == 2 and lost.name not in kept
    reason = (folder / "reason.txt").read_text()
    assert "FileNotFoundError" in reason and "1.1" not in reason.split("hash")[0]
    assert any(r.levelname == "WARNING" and "quarantined" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "payloads").glob("*/input/*/*/*.dcm"))  # no half-built payload left
    # the adapter goes on: the next study makes its jobs
    h.send(study="1.2")
    h.clock.advance(5.01)
    assert h.counts() == [1, 1]


# -- recovery honours the plug-in ---------------------------------------------

class Picky(JobProcessorBase):
    """Keeps instances whose SOP Instance UID ends in an even digit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: list[InstanceRecord] = []

    def handle_instance(self, instance, tx):
        if int(instance.sop_instance_uid[-1]) % 2:
            return Outcome.IGNORE
        tx.after_commit(lambda: self.held.append(instance))
        return Outcome.KEEP


def test_recovery_releases_what_the_plugin_no_longer_keeps(tmp_path):
    h = Harness(tmp_path, {"pipelines": {"a": "p1"}})
    store = InstanceStore(tmp_path / "files")
    recs = []
    for i in range(4):
        path, size = store.write(b"x", memoryview(b"y"))
        rec = InstanceRecord("o", "AE", "SCU", f"1.2.{i}", "1.2.840", "1.2.840.10008.1.2.1", "1", "1", path, size, 0.0)
        h.journal.add_instance(rec)
        recs.append(rec)
    proc = Picky(h.ctx, "o", "AE", "proc", h.ingest.processors["clara"].spec)
    proc.recover([], h.journal.instances(owner="o"))
    assert [i.sop_instance_uid for i in proc.held] == ["1.2.0", "1.2.2"]
    assert [i.sop_instance_uid for i in h.journal.instances(owner="o")] == ["1.2.0", "1.2.2"]
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == sorted(r.path.name for r in recs[::2])


# -- timers on the monotonic clock --------------------------------------------

def test_thread_scheduler_ignores_wall_clock_steps():
    offset = [0.0]
    sched = ThreadScheduler(clock=lambda: time.time() + offset[0])
    fired = threading.Event()
    try:
        sched.call_later(0.3, fired.set)
        offset[0] = -3600  # NTP steps the wall clock back an hour
        assert fired.wait(5), "timer waited on the wall clock"
    finally:
        sched.stop()


def test_group_closes_on_time_when_the_wall_clock_steps(tmp_path):
    h = Harness(tmp_path, {"pipelines": {"a": "p1"}, "timeout": 5})
    h.send(study="1.1")
    h.clock.jump_wall(-3600)
    h.send(study="1.2")
    h.clock.jump_wall(+7200)  # and forward: nothing may close early
    h.clock.advance(4.9)
    assert h.jobs() == []
    h.clock.advance(0.11)
    assert h.counts() == [1, 1]
