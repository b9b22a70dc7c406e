"""Groups on a journal several replicas share (PostgreSQL), on the controllable
clock: the journal takes its "database clock" from the test's ManualScheduler,
so every timing rule is checked exactly, against a real PostgreSQL server.

The AE Title processor's own unit tests (test_processor_unit.py) run here again
on the shared path: same rules, one replica. Then several replicas in one
process (each its own journal connection pool, Ingest and closer; one clock,
one database, one job sink), as N adapter processes would be.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from clara_dicom.config import resolve
from clara_dicom.synthetic import UID_ROOT

from clara_adapter.ingest import SUCCESS, Ingest
from clara_adapter.journal import Journal
from clara_adapter.journal_pg import PostgresJournal
from clara_adapter.metrics import AdapterMetrics
from clara_adapter.processors.base import ProcessorContext
from clara_adapter.shared_groups import SharedGroupCloser
from clara_adapter.storage import InstanceStore
from clara_adapter.submitter import JobSubmitter
from clara_adapter.timers import ManualScheduler
from peers import wait_for
from postgres_server import postgres_server  # noqa: F401 (fixture)
from test_processor_unit import Harness, MemorySink, manifests

pytestmark = pytest.mark.postgres

# The single-process rules, re-run on the shared path (collected here with this module's `harness`).
from test_processor_unit import (  # noqa: E402,F401
    test_duplicate_is_dropped_and_does_not_extend_the_quiet_period,
    test_instance_after_close_starts_a_new_group_with_a_new_job_name,
    test_open_group_keeps_its_settings_when_the_processor_is_edited,
    test_overwrite_same_instance_replaces_the_file,
    test_quiet_period_resets_with_each_instance_of_the_key,
    test_retry_with_backoff_then_success_releases_instances_once,
    test_separate_keys_close_independently,
    test_several_pipelines_get_one_job_each_with_the_priority,
)


class SharedHarness(Harness):
    """test_processor_unit's harness on a PostgreSQL journal (Harness then runs a
    SharedGroupCloser on its manual clock, which is also the journal's clock)."""

    def __init__(self, tmp, processor, aet=None, sink=None, dsn=""):
        super().__init__(tmp, processor, aet, sink, journal=PostgresJournal(dsn, root=tmp))


@pytest.fixture
def harness(tmp_path, postgres_server):
    made = []

    def make(processor: dict, aet: dict | None = None, sink: MemorySink | None = None) -> Harness:
        dsn = postgres_server.fresh_database(f"unit{len(made)}")
        h = SharedHarness(tmp_path / f"h{len(made)}", processor, aet, sink, dsn=dsn)
        made.append(h)
        return h

    yield make
    for h in made:
        h.closer.stop()
        h.journal.close()


class CountingSink(MemorySink):
    """Counts creations, so a job created twice (by two replicas) shows."""

    def __init__(self):
        super().__init__()
        self.created: list[str] = []

    def create(self, manifest: dict) -> bool:
        created = super().create(manifest)
        if created:
            self.created.append(manifest["metadata"]["name"])
        return created


class Replica:
    def __init__(self, tmp, dsn, clock, sink, processor):
        self.journal = PostgresJournal(dsn, root=tmp, clock=clock.now)
        metrics = AdapterMetrics()
        self.submitter = JobSubmitter(sink, tmp / "payloads", clock, self.journal, metrics, synchronous=True)
        self.ctx = ProcessorContext("default", self.journal, clock, self.submitter, metrics)
        self.ingest = Ingest(self.ctx, InstanceStore(tmp / "incoming"))
        self.ingest.recover()
        self.ingest.apply_config(resolve(manifests(processor)).config)
        self.closer = SharedGroupCloser(self.ingest, clock)
        self.closer.start()
        self.sender = Harness.send.__get__(self)  # Harness.send only needs .ingest

    def send(self, **kw) -> int:
        return self.sender(**kw)

    def die(self) -> None:
        """As SIGKILL: nothing more runs in this process (its connections are dropped)."""
        self.closer.stop()
        self.journal._pool.close()


@pytest.fixture
def replicas(tmp_path, postgres_server):
    """Factory: n replicas on one fresh database, one clock, one sink; a shared storage root."""
    made = []

    def make(n: int, processor: dict, sink: CountingSink | None = None):
        dsn = postgres_server.fresh_database(f"replicas{len(made)}")
        clock, sink = ManualScheduler(), sink or CountingSink()
        group = [Replica(tmp_path, dsn, clock, sink, processor) for _ in range(n)]
        made.extend(group)
        return clock, sink, group

    yield make
    for r in made:
        r.closer.stop()
        if not r.journal._pool.closed:
            r.journal.close()


def counts(sink: MemorySink) -> list[int]:
    return sorted(j["spec"]["payload"]["instances"] for j in sink.jobs.values())


def test_one_study_over_three_replicas_makes_one_job_per_pipeline_with_everything(replicas):
    clock, sink, (a, b, c) = replicas(3, {"pipelines": {"seg": "p1", "qa": "p2"}, "timeout": 5})
    sops = [generate_uid(prefix=UID_ROOT) for _ in range(12)]
    for i, sop in enumerate(sops):
        assert (a, b, c)[i % 3].send(study="1.1", sop=sop) == SUCCESS
        clock.advance(0.4)  # 4.4 s in all: each instance restarts the quiet period for every replica
    clock.advance(5 - 0.4 - 0.01)
    assert sink.jobs == {}
    clock.advance(0.02)
    assert counts(sink) == [12, 12]
    assert len(sink.created) == 2  # created once, by one replica
    assert sum(r.closer.closed for r in (a, b, c)) == 1
    assert a.journal.count_instances() == 0  # released after both jobs exist
    clock.advance(30)
    assert len(sink.created) == 2


def test_a_duplicate_sent_to_another_replica_is_dropped_and_does_not_extend(replicas):
    clock, sink, (a, b) = replicas(2, {"pipelines": {"seg": "p1"}, "timeout": 5})
    sop = generate_uid(prefix=UID_ROOT)
    a.send(study="1.1", sop=sop)
    clock.advance(4)
    b.send(study="1.1", sop=sop)
    assert b.ctx.metrics.ignored.labels("CLARA", "duplicate")._value.get() == 1
    clock.advance(1.01)
    assert counts(sink) == [1]


def test_the_group_of_a_replica_that_died_is_closed_on_time_by_another(replicas):
    clock, sink, (a, b) = replicas(2, {"pipelines": {"seg": "p1"}, "timeout": 5})
    b.send(study="1.1")
    clock.advance(2)
    a.send(study="1.1")  # the last instance reaches a, which then dies
    a.die()
    clock.advance(4.99)
    assert sink.jobs == {}
    clock.advance(0.02)
    assert counts(sink) == [2]
    assert b.closer.closed == 1


def test_next_poll_is_at_the_database_due_time_not_a_scan(replicas):
    """A long poll interval does not delay a close: the closer wakes at the earliest due time."""
    clock, sink, (a,) = replicas(1, {"pipelines": {"seg": "p1"}, "timeout": 5})
    a.closer.poll = 60.0
    a.closer.stop()
    a.closer._stopped = False
    a.send(study="1.1")
    a.closer.start()  # sees the group due in 5 s
    clock.advance(4.99)
    assert sink.jobs == {}
    clock.advance(0.02)
    assert counts(sink) == [1]


def test_closed_group_of_a_dead_closer_is_taken_over_after_its_heartbeat_stops(replicas):
    """a closes the group, then dies before any job exists: b creates the jobs once a's
    heartbeat is dead_after old, never while a is alive."""

    class Down(CountingSink):
        def __init__(self):
            super().__init__()
            self.refuse = True

        def create(self, manifest):
            if self.refuse:
                raise ConnectionError("API unreachable")
            return super().create(manifest)

    sink = Down()
    clock, _, (a,) = replicas(1, {"pipelines": {"seg": "p1"}, "timeout": 5}, sink=sink)
    a.send(study="1.1")
    clock.advance(5.01)
    assert a.closer.closed == 1 and sink.jobs == {}  # closed by a; its job creation keeps failing
    dsn = a.journal.dsn
    b = Replica(a.journal.root, dsn, clock, sink, {"pipelines": {"seg": "p1"}, "timeout": 5})
    try:
        clock.advance(30)
        assert b.closer.closed == 0  # a is alive (heartbeating): its submission is its own
        a.die()
        sink.refuse = False
        clock.advance(b.closer.dead_after - 0.5)
        assert sink.jobs == {}
        clock.advance(1.5)
        assert counts(sink) == [1] and b.closer.closed == 1
        assert b.journal.count_instances() == 0
    finally:
        b.closer.stop()
        b.journal.close()


def test_a_stalled_closer_taken_over_can_neither_release_nor_quarantine_the_group(replicas):
    """a closes the group and stalls (its closer stops heartbeating; its job submission
    is still retrying). b takes the group over after dead_after, creates the job and
    releases the group. When a's late retry runs, its writes are fenced: it does not
    quarantine the group, delete b's payload, or record anything; one job in all."""

    class Flaky(CountingSink):
        def __init__(self, inner: CountingSink):
            self.inner, self.refuse, self.refused = inner, True, 0

        def create(self, manifest):
            if self.refuse:
                self.refused += 1
                raise ConnectionError("API unreachable")
            return self.inner.create(manifest)

    processor = {"pipelines": {"seg": "p1"}, "timeout": 5}
    clock, sink, replicas_ = replicas(2, processor)
    for r in replicas_:
        r.submitter.sink = Flaky(sink)
    replicas_[0].send(study="1.1")
    replicas_[1].send(study="1.1")
    clock.advance(5.01)
    (a,) = [r for r in replicas_ if r.closer.closed]  # the closer, whichever won
    (b,) = [r for r in replicas_ if r is not a]
    a_sink, b.submitter.sink.refuse = a.submitter.sink, False
    assert a_sink.refused >= 1 and sink.jobs == {}
    a.closer.stop()  # a stalls: alive (its submission retries on the clock) but no heartbeat any more
    clock.advance(b.closer.dead_after + 1)
    assert b.closer.closed == 1  # taken over
    (name,) = sink.jobs
    payload = a.journal.root / "payloads" / name
    assert sorted(p.name for p in payload.rglob("*.dcm")) and sink.created == [name]
    assert b.journal.count_instances() == 0 and b.journal.groups() == []  # b released the group
    refused = a_sink.refused
    a_sink.refuse = False
    clock.advance(120)  # a's submission retries (backoff) and finds the group is not its own any more
    assert a_sink.refused == refused and a.submitter.pending == 0
    assert sink.created == [name] and len(list(payload.rglob("*.dcm"))) == 2  # b's job payload intact
    assert not (a.journal.root / "quarantine").exists()
    assert a.journal.count_instances() == 0 and a.journal.jobs_of_group(1) == set()


def test_sqlite_journal_is_not_shared():
    assert Journal.shared is False and PostgresJournal.shared is True


def test_concurrent_joins_duplicates_and_closes_lose_and_repeat_nothing(tmp_path, postgres_server):
    """Real threads, real races: three replicas receive one study's instances (with
    duplicates sent to other replicas, and pauses about as long as the quiet period so
    groups close just as instances join them) while their closers poll. The journal runs on a
    clock 10x faster than real time, so the 5 s minimum quiet period is 0.5 s here."""
    import random
    import threading
    import time

    from clara_adapter.timers import ThreadScheduler

    dsn = postgres_server.fresh_database("races")
    t0 = time.time()
    fast = lambda: t0 + (time.time() - t0) * 10  # noqa: E731
    sink = CountingSink()
    processor = {"pipelines": {"seg": "p1"}, "timeout": 5}
    group = []
    for _ in range(3):
        sched = ThreadScheduler(name="test-closer")
        journal = PostgresJournal(dsn, root=tmp_path, clock=fast)
        metrics = AdapterMetrics()
        sub = JobSubmitter(sink, tmp_path / "payloads", sched, journal, metrics, synchronous=True)
        ingest = Ingest(ProcessorContext("default", journal, sched, sub, metrics), InstanceStore(tmp_path / "incoming"))
        ingest.apply_config(resolve(manifests(processor)).config)
        closer = SharedGroupCloser(ingest, sched, poll=0.02)
        closer.start()
        group.append((ingest, closer, sched, journal, metrics))
    rng = random.Random(16)
    phases = []  # per phase: a pause first (about the quiet period), then (replica, sop) to send at once
    sent: list[str] = []
    for phase in range(9):
        items = []
        for i in range(9):
            if sent and rng.random() < 0.2:
                sop = rng.choice(sent[-10:])  # a duplicate, most likely in the open group
            else:
                sop = generate_uid(prefix=UID_ROOT)
                sent.append(sop)
            items.append((i % 3, sop))
        pause = rng.uniform(0.48, 0.52)  # the group falls due just as the next phase joins
        if phase in (3, 6):
            pause = 0.8  # clearly past the quiet period: these groups close whoever wins the races
        phases.append((pause, items))
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def sender(lane: int) -> None:
        h = Harness.__new__(Harness)
        for pause, items in phases:
            barrier.wait()
            time.sleep(pause)
            for replica, sop in items[lane::3]:
                h.ingest = group[(replica + lane) % 3][0]
                try:
                    assert h.send(study="1.1", sop=sop) == SUCCESS
                except BaseException as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=sender, args=(lane,)) for lane in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    plan = [item for _, items in phases for item in items]
    try:
        assert errors == []
        wait_for(lambda: group[0][3].count_instances() == 0, 30, what="every group closed and released")
        kept = sum(m.instances.labels("CLARA")._value.get() for *_, m in group)
        dropped = sum(m.ignored.labels("CLARA", "duplicate")._value.get() for *_, m in group)
        assert kept + dropped == len(plan)
        assert len(sink.created) == len(set(sink.created)) == len(sink.jobs)  # each job created once
        assert sum(r.closed for _, r, *_ in group) == len(sink.jobs)  # each group closed once
        per_job = {name: [p.stem for p in Path(j["spec"]["payload"]["path"], "input").rglob("*.dcm")]
                   for name, j in sink.jobs.items()}
        assert sum(len(sops) for sops in per_job.values()) == kept  # every kept instance in exactly one job
        for name, sops in per_job.items():  # a job never holds a SOP Instance UID twice
            assert len(sops) == len(set(sops)) == sink.jobs[name]["spec"]["payload"]["instances"]
        assert len(sink.jobs) >= 3  # the two long pauses closed groups while the study went on, then the end
    finally:
        for _, closer, sched, journal, _ in group:
            closer.stop()
            sched.stop()
            journal.close()


class FlakyJournal:
    """Logic-only stand-in for the closer's journal calls (the real ones are tested above)."""

    def __init__(self):
        self.down = False
        self.takeover_asked_at: list[float] = []
        self.clock = None

    def _check(self):
        if self.down:
            raise ConnectionError("database unreachable")

    def heartbeat(self):
        self._check()

    def close_due_groups(self):
        self._check()
        return []

    def take_orphaned_groups(self, dead_after):
        self._check()
        self.takeover_asked_at.append(self.clock.mono())
        return []

    def next_due_in(self):
        self._check()
        return None


def test_no_takeover_until_this_replica_has_heartbeaten_for_dead_after_since_an_outage():
    """After a database outage every replica's heartbeat is stale: the live ones must
    renew theirs before anyone takes their groups over."""
    clock = ManualScheduler()
    journal = FlakyJournal()
    journal.clock = clock
    ingest = type("FakeIngest", (), {"journal": journal})()
    closer = SharedGroupCloser(ingest, clock, poll=0.25, dead_after=10)
    start = clock.mono()
    closer.start()
    clock.advance(9.9)
    assert journal.takeover_asked_at == []  # not heartbeating for 10 s yet
    clock.advance(0.2)
    assert journal.takeover_asked_at and journal.takeover_asked_at[0] - start == pytest.approx(10, abs=0.26)
    journal.down = True
    clock.advance(20)
    outage_end = clock.mono()
    journal.down = False
    journal.takeover_asked_at.clear()
    clock.advance(9.7)
    assert journal.takeover_asked_at == []
    clock.advance(0.6)
    assert journal.takeover_asked_at and journal.takeover_asked_at[0] - outage_end >= 10
    closer.stop()


def test_a_replica_stalled_inside_a_transaction_is_cut_off_and_the_others_go_on(tmp_path, postgres_server):
    """A replica frozen (SIGSTOP, a paused node) while its closer holds a group row
    FOR UPDATE: the other replicas' instances of that group wait only until the
    server ends the stalled session (``idle_in_transaction``), not until it resumes;
    the group is then closed by another replica, and the stalled one's transaction,
    when it resumes, fails instead of being reported committed. Real time, real server."""
    import threading

    import psycopg

    dsn = postgres_server.fresh_database("stalled")
    stalled = PostgresJournal(dsn, root=tmp_path, idle_in_transaction=1.0)
    other = PostgresJournal(dsn, root=tmp_path, idle_in_transaction=1.0)
    settings, holding, resume, outcome = {"spec": {"timeout": 0.2}}, threading.Event(), threading.Event(), {}

    def join() -> int:
        with other.atomic():
            return other.join_group("proc", "AE", "aetitle", "study", settings, 0.2)[0]

    group_id = join()

    def stalled_closer() -> None:
        try:
            with stalled.atomic():  # what close_due_groups holds between its SELECT and its COMMIT
                stalled._execute("SELECT id FROM groups WHERE id = ? FOR UPDATE", (group_id,))
                holding.set()
                resume.wait(60)  # frozen
            outcome["committed"] = True
        except Exception as exc:
            outcome["error"] = exc

    closer = threading.Thread(target=stalled_closer)
    closer.start()
    joined: dict = {}
    joiner = threading.Thread(target=lambda: joined.update(id=join()))
    try:
        assert holding.wait(10)
        joiner.start()
        joiner.join(15)
        assert not joiner.is_alive(), "an instance of the group waits for the stalled replica to resume"
        assert joined["id"] == group_id
        closed = wait_for(lambda: other.close_due_groups(), 10, what="the group closed by the live replica")
        assert [g.id for g in closed] == [group_id]
    finally:
        resume.set()
        closer.join(30)
        if joiner.ident:
            joiner.join(30)
        stalled.close()
        other.close()
    assert "committed" not in outcome and isinstance(outcome["error"], psycopg.OperationalError), outcome
