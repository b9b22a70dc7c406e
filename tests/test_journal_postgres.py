"""The adapter's journal on a real PostgreSQL (setting `journal`, `--journal`):
restart recovery, an unreachable database answered with 0xA700 and nothing
acknowledged lost, and `clara-dicom up --journal DSN` end to end with dcmtk."""
from __future__ import annotations

import subprocess
import threading

import pytest

from clara_dicom.config import resolve
from clara_dicom.synthetic import write_study

from clara_adapter.ingest import OUT_OF_RESOURCES, SUCCESS, Ingest
from clara_adapter.journal import open_journal
from clara_adapter.journal_pg import PostgresJournal
from clara_adapter.metrics import AdapterMetrics
from clara_adapter.processors.base import ProcessorContext
from clara_adapter.shared_groups import SharedGroupCloser
from clara_adapter.storage import InstanceStore
from clara_adapter.submitter import JobSubmitter
from local_setup import write_config
from peers import adapter_command, start_together, storescu, wait_for
from postgres_server import own_postgres_server, packets_dropped, postgres_server  # noqa: F401 (fixtures)
from test_processor_unit import manifests
from test_shared_groups import SharedHarness

pytestmark = pytest.mark.postgres


def test_open_groups_resume_from_a_postgres_journal_after_a_crash(tmp_path, postgres_server):
    dsn = postgres_server.fresh_database("resume")
    h = SharedHarness(tmp_path, {"pipelines": {"a": "p1"}, "timeout": 10}, dsn=dsn)
    h.send(study="1.1")
    h.clock.advance(4)
    h.send(study="1.1")
    h.send(study="1.2")
    h.closer.stop()  # the old process is gone: nothing of it runs any more
    h.journal._pool.close()
    journal2 = PostgresJournal(dsn, root=tmp_path, clock=h.clock.now)
    assert journal2.epoch == h.journal.epoch
    sub2 = JobSubmitter(h.sink, tmp_path / "payloads", h.clock, journal2, synchronous=True)
    ingest2 = Ingest(ProcessorContext("default", journal2, h.clock, sub2, AdapterMetrics()),
                     InstanceStore(tmp_path / "incoming"))
    ingest2.recover()
    ingest2.apply_config(resolve(manifests({"pipelines": {"a": "p1"}, "timeout": 10})).config)
    closer2 = SharedGroupCloser(ingest2, h.clock)
    closer2.start()
    assert journal2.count_instances() == 3 and ingest2.open_groups() == 2
    h.clock.advance(9.99)
    assert h.counts() == []
    h.clock.advance(0.02)
    assert h.counts() == [1, 2]
    assert journal2.count_instances() == 0
    closer2.stop()
    journal2.close()


def test_database_unreachable_answers_a700_and_loses_nothing_acknowledged(tmp_path, own_postgres_server):
    pg = own_postgres_server
    h = SharedHarness(tmp_path, {"pipelines": {"a": "p1"}, "timeout": 30}, dsn=pg.dsn)
    acked = [h.send(study="1.1", sop=f"1.2.9.{i}") for i in range(3)]
    assert acked == [SUCCESS] * 3
    h.ingest.reject_unknown_sources = False  # this harness declares no ClaraSource
    assert h.ingest.check_association("CLARA", "STORESCU", "127.0.0.1") is None
    pg.halt()
    try:
        h.journal._probed_at = float("-inf")  # the next association asks the database now
        assert h.ingest.check_association("CLARA", "STORESCU", "127.0.0.1")[0] == (0x02, 0x03, 0x02)  # transient
        refused = [h.send(study="1.1", sop=f"1.2.8.{i}") for i in range(2)]
        assert refused == [OUT_OF_RESOURCES] * 2
        assert len(list((tmp_path / "incoming").glob("*.dcm"))) == 3  # the refused files are gone
    finally:
        pg.launch()
    assert h.journal.count_instances() == 3  # every acknowledged instance, nothing of the refused ones
    h.clock.advance(10)

    def accepted() -> bool:
        h.journal._probed_at = float("-inf")
        return h.ingest.check_association("CLARA", "STORESCU", "127.0.0.1") is None

    wait_for(accepted, 20, interval=0.2, what="associations accepted again")
    assert h.send(study="1.1", sop="1.2.7.0") == SUCCESS  # the pool reconnects
    h.clock.advance(29.99)
    assert h.jobs() == []  # the quiet period runs from the last acknowledged instance
    h.clock.advance(0.02)
    (job,) = h.jobs()
    assert job["spec"]["payload"]["instances"] == 4
    h.closer.stop()
    h.journal.close()


@pytest.mark.dcmtk
def test_clara_dicom_up_with_a_postgres_journal(tmp_path, postgres_server, local_adapter):
    dsn = postgres_server.fresh_database("up")
    config = write_config(tmp_path / "cfg", processor="pipelines: {seg: p-seg}\ntimeout: 5")
    state = tmp_path / "state"
    adapter = local_adapter(config, state=state, extra=["--journal", dsn])
    files = write_study(tmp_path / "study", slices=6, rows=32, cols=32)
    storescu(files, adapter.dicom_port)
    adapter.kill()  # acknowledged, group open: the PostgreSQL journal holds it
    assert not (state / "journal.sqlite").exists()
    restarted = local_adapter(config, state=state, extra=["--journal", dsn])
    (job,) = wait_for(lambda: restarted.jobs(), 20, what="job after restart")
    assert job["spec"]["payload"]["instances"] == 6


def test_unreachable_journal_at_start_is_one_line(tmp_path):
    config = write_config(tmp_path / "cfg")
    out = subprocess.run(adapter_command("up", "--config", str(config), "--state", str(tmp_path / "s"),
                                         "--journal", "postgresql://clara:secret@127.0.0.1:1/x", "--http-port", "0",
                                         "--results-port", "0"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("clara-dicom up: error: journal postgresql://clara:***@127.0.0.1:1/x: cannot open")
    assert "refused" in last, last
    assert "Traceback" not in out.stderr and "secret" not in out.stderr


# A password in every place libpq takes one, and schemes that are not PostgreSQL's:
# `up` must answer one line without the password, and never make a SQLite file named
# after the DSN (before: the key=value and foreign-scheme DSNs became SQLite files,
# the password in their names; `?password=` and an empty user were echoed).
@pytest.mark.parametrize("dsn", [
    "postgresql://127.0.0.1:1/x?user=clara&password=secret",
    "postgresql://:secret@127.0.0.1:1/x",
    "host=127.0.0.1 port=1 user=clara password=secret dbname=x",
    "POSTGRESQL://clara:secret@127.0.0.1:1/x",
    "postgresql+psycopg://clara:secret@127.0.0.1:1/x",
])
def test_a_bad_journal_dsn_is_one_line_without_its_password_and_no_sqlite_file(tmp_path, dsn):
    config = write_config(tmp_path / "cfg")
    out = subprocess.run(adapter_command("up", "--config", str(config), "--state", str(tmp_path / "s"),
                                         "--journal", dsn, "--http-port", "0", "--results-port", "0"),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("clara-dicom up: error: journal "), last
    assert "Traceback" not in out.stderr and "secret" not in out.stderr, out.stderr
    assert not [p for p in tmp_path.rglob("*") if "secret" in str(p) or p.suffix == ".sqlite"]


def test_a_key_value_dsn_opens_the_postgres_journal(tmp_path, postgres_server, monkeypatch):
    """libpq's other DSN form, as the Results Service takes it: the shared journal, not a SQLite file."""
    monkeypatch.chdir(tmp_path)  # where a SQLite file named after the DSN would land
    url = postgres_server.fresh_database("keyvalue")
    by_keywords = open_journal(f"user=postgres host=127.0.0.1 port={postgres_server.port} dbname=keyvalue", tmp_path)
    by_url = open_journal(url, tmp_path)
    try:
        assert isinstance(by_keywords, PostgresJournal) and by_keywords.shared
        assert by_url.next_sequence() == by_keywords.next_sequence() - 1  # one database, one sequence
    finally:
        by_keywords.close()
        by_url.close()
    assert list(tmp_path.iterdir()) == []


def test_journals_opening_together_on_an_empty_database_agree(tmp_path, postgres_server):
    """Replicas starting at the same moment: schema creation is serialised, one epoch for all."""
    dsn = postgres_server.fresh_database("together")
    opened, errors = start_together(4, lambda: open_journal(dsn, tmp_path))
    try:
        assert errors == [] and len(opened) == 4
        assert len({j.epoch for j in opened}) == 1
        assert len({j.next_sequence() for j in opened}) == 4  # one sequence, shared
    finally:
        for journal in opened:
            journal.close()


def test_a_replica_starting_while_others_write_neither_waits_nor_deadlocks(tmp_path, postgres_server):
    """Opening a journal on an existing schema takes no table lock: replicas that are
    committing instances (here: a transaction held open) do not stall a new one."""
    import threading

    dsn = postgres_server.fresh_database("late")
    writer = open_journal(dsn, tmp_path)
    opened: list = []
    with writer.atomic():
        writer.open_group("clara", "CLARA", "proc", "1.1", {"spec": {"timeout": 5}}, 0.0)  # locks held till the end
        thread = threading.Thread(target=lambda: opened.append(open_journal(dsn, tmp_path)))
        thread.start()
        thread.join(20)
        assert opened, "a new journal waited for another replica's open transaction"
    opened[0].close()
    writer.close()


def test_a_version_2_database_is_migrated_once_by_replicas_opening_together(tmp_path, postgres_server):
    """Schema 3 adds the journal's join-and-insert function. A database written by
    schema 2 (an open group holding an instance) is migrated by replicas that open
    it together; afterwards every replica joins the same open group."""
    import psycopg

    from clara_adapter.journal import InstanceRecord
    from clara_adapter.journal_pg import SCHEMA_VERSION

    dsn = postgres_server.fresh_database("from_v2")
    old = PostgresJournal(dsn, root=tmp_path)

    def record(sop: str) -> InstanceRecord:
        return InstanceRecord(owner="clara", ae_title="CLARA", calling_ae="SCU", sop_instance_uid=sop,
                              sop_class_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1", study_uid="1.1",
                              series_uid="1.1.1", path=tmp_path / f"{sop}.dcm", size=1, acked_at=0.0,
                              group_value="1.1")

    with old.atomic():
        group_id, opened = old.join_group("clara", "CLARA", "proc", "1.1", {"spec": {"timeout": 60}}, 60)
        assert opened and old.add_to_open_group(record("1.2.0")) is not None
    old.close()
    with psycopg.connect(dsn, autocommit=True) as conn:  # as schema 2 left it
        conn.execute("DROP FUNCTION clara_adapter.add_to_open_group")
        conn.execute("UPDATE clara_adapter.meta SET value = '2' WHERE key = 'schema_version'")

    opened_journals, errors = start_together(3, lambda: PostgresJournal(dsn, root=tmp_path))
    try:
        assert errors == [] and len(opened_journals) == 3
        for i, journal in enumerate(opened_journals):
            with journal.atomic():
                assert journal.add_to_open_group(record(f"1.2.{i + 1}")) is not None
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.execute("SELECT value FROM clara_adapter.meta WHERE key = 'schema_version'").fetchone()
            members = conn.execute("SELECT count(*) FROM clara_adapter.instances WHERE group_id = %s",
                                   (group_id,)).fetchone()
        assert int(version[0]) == SCHEMA_VERSION == 3
        assert members[0] == 4  # the instance from before the migration and one from each replica
    finally:
        for journal in opened_journals:
            journal.close()


def test_concurrent_batches_wait_in_the_database_at_once_and_the_rest_form_one_batch(tmp_path, postgres_server):
    """Concurrent transactions (journal_pg.py): with the study's group row locked by
    another session (as a closer would), as many ingest batches as the journal
    has lanes are inside the database at once, each on its own connection, waiting
    for the row; the stores behind them queue up in the group commit and commit
    together once a lane frees. Every store is acknowledged only after its own
    commit, and the study makes one job with every instance once."""
    import threading

    import psycopg

    dsn = postgres_server.fresh_database("lanes")
    h = SharedHarness(tmp_path, {"pipelines": {"a": "p1"}, "timeout": 10}, dsn=dsn)
    lanes = h.journal.concurrent_transactions
    group_commit = h.ingest._group_commit
    assert lanes > 1 and group_commit.lanes == lanes
    assert h.send(study="1.1", sop="1.2.0") == SUCCESS  # opens the group
    queued_behind = 5
    statuses: dict[str, int] = {}
    acked_before_commit: list[str] = []

    def send(sop: str) -> None:
        statuses[sop] = h.send(study="1.1", sop=sop)
        with psycopg.connect(dsn, options="-c search_path=clara_adapter") as conn:  # committed, seen from outside?
            if not conn.execute("SELECT 1 FROM instances WHERE sop_instance_uid = %s", (sop,)).fetchone():
                acked_before_commit.append(sop)

    def waiting_in_database() -> int:
        return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                             "AND wait_event_type = 'Lock' AND query LIKE '%add_to_open_group%'").fetchone()[0]

    commits_before = h.journal.commits
    with psycopg.connect(dsn, autocommit=True) as admin, psycopg.connect(dsn) as locker:
        locker.execute("SELECT id FROM clara_adapter.groups WHERE state = 'open' FOR UPDATE")  # held till rollback
        first = [threading.Thread(target=send, args=(f"1.2.1.{i}",)) for i in range(lanes)]
        for t in first:
            t.start()
        wait_for(lambda: waiting_in_database() == lanes, 20, interval=0.02, what="every lane in the database")
        behind = [threading.Thread(target=send, args=(f"1.2.2.{i}",)) for i in range(queued_behind)]
        for t in behind:
            t.start()
        wait_for(lambda: group_commit.queued() == queued_behind, 20, interval=0.02, what="stores queued")
        assert statuses == {}  # nothing acknowledged while its record cannot commit
        locker.rollback()
    for t in first + behind:
        t.join(30)
    assert statuses == {sop: SUCCESS for sop in [f"1.2.1.{i}" for i in range(lanes)]
                        + [f"1.2.2.{i}" for i in range(queued_behind)]}
    assert acked_before_commit == []
    assert h.journal.commits - commits_before == lanes + 1  # one per lane, then the queued stores together
    h.clock.advance(10.01)
    (job,) = h.jobs()
    assert job["spec"]["payload"]["instances"] == 1 + lanes + queued_behind
    h.closer.stop()
    h.journal.close()


def test_one_instance_sent_at_once_on_every_lane_is_kept_once(tmp_path, postgres_server):
    """The duplicate rule under concurrent batches of one process: the same SOP
    Instance UID stored from many threads at once joins its group once."""
    dsn = postgres_server.fresh_database("lanes_dup")
    h = SharedHarness(tmp_path, {"pipelines": {"a": "p1"}, "timeout": 10}, dsn=dsn)
    assert h.send(study="1.1", sop="1.2.0") == SUCCESS
    statuses, errors = start_together(12, lambda: h.send(study="1.1", sop="1.2.1"))
    assert errors == [] and statuses == [SUCCESS] * 12
    assert h.journal.count_instances() == 2
    assert h.ctx.metrics.ignored.labels("CLARA", "duplicate")._value.get() == 11
    h.clock.advance(10.01)
    (job,) = h.jobs()
    assert job["spec"]["payload"]["instances"] == 2
    h.closer.stop()
    h.journal.close()


def test_a_transaction_with_a_failed_statement_is_not_reported_committed(tmp_path, postgres_server):
    """PostgreSQL answers COMMIT of a failed transaction with ROLLBACK, not an error: the
    journal must raise, or an instance whose record was rolled back would be acknowledged."""
    import psycopg

    from clara_adapter.journal import TransactionAborted

    journal = PostgresJournal(postgres_server.fresh_database("failed_commit"), root=tmp_path)
    try:
        with pytest.raises(TransactionAborted):
            with journal.atomic():
                journal._execute("INSERT INTO replicas (id, seen_at) VALUES (?, ?)", ("kept?", 1.0))
                with pytest.raises(psycopg.errors.DivisionByZero):
                    journal._execute("SELECT 1 / ?", (0,))  # swallowed: the transaction is failed now
        assert journal._query("SELECT count(*) FROM replicas WHERE id = ?", ("kept?",)) == [(0,)]
        with journal.atomic():  # the connection went back to the pool usable
            journal._execute("INSERT INTO replicas (id, seen_at) VALUES (?, ?)", ("kept", 1.0))
        assert journal._query("SELECT count(*) FROM replicas WHERE id = ?", ("kept",)) == [(1,)]
    finally:
        journal.close()


def test_a_connection_lost_mid_transaction_is_the_database_out_of_reach(tmp_path, postgres_server):
    """A statement whose connection died (the server went away) must raise what the rest of
    the adapter reads as "database out of reach" (answered 0xA700, retried by the modality),
    never a bare DatabaseError (answered as a processing failure): the libpq path gets
    results without SQLSTATE there, which psycopg's error_from_result alone does not map."""
    import psycopg

    from clara_adapter.journal import is_out_of_resources

    dsn = postgres_server.fresh_database("lost_connection")
    journal = PostgresJournal(dsn, root=tmp_path)
    try:
        with pytest.raises(Exception) as raised:
            with journal.atomic():
                ((pid,),) = journal._execute("SELECT pg_backend_pid() + ?", (0,))
                with psycopg.connect(dsn, autocommit=True) as other:
                    other.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    wait_for(lambda: not other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                                       (pid,)).fetchall(), 10, what="backend gone")
                journal._execute("INSERT INTO replicas (id, seen_at) VALUES (?, ?)", ("lost", 1.0))
        assert isinstance(raised.value, psycopg.OperationalError), repr(raised.value)
        assert is_out_of_resources(raised.value)
        assert journal._query("SELECT count(*) FROM replicas WHERE id = ?", ("lost",)) == [(0,)]
    finally:
        journal.close()


def test_arguments_of_every_kind_round_trip_through_a_transaction(tmp_path, postgres_server):
    """The transactions' statements go to the server as one simple query with the arguments
    as literals (journal_pg._simple_query): quotes, backslashes, non-ASCII text, NULL, big and
    negative numbers and non-finite floats come back as they were sent."""
    journal = PostgresJournal(postgres_server.fresh_database("literals"), root=tmp_path)
    texts = ["O'Brien", "back\\slash \\' E'x'", "Müller 山田 ?", "; DROP TABLE groups; --", "", "$1 $$ %s"]
    try:
        with journal.atomic():
            journal._execute("CREATE TEMP TABLE lit (t text, i bigint, f double precision, n text)")
            for k, text in enumerate(texts):
                journal._execute("INSERT INTO lit VALUES (?, ?, ?, ?)", (text, -2**62 + k, [-0.5, float("inf"),
                                 float("-inf"), 1e300, 2.5e-300, 3.0][k], None))
            rows = journal._execute("SELECT t, i, f, n FROM lit ORDER BY i")
        assert [r[0] for r in rows] == texts
        assert [r[1] for r in rows] == [-2**62 + k for k in range(len(texts))]
        assert [r[2] for r in rows] == [-0.5, float("inf"), float("-inf"), 1e300, 2.5e-300, 3.0]
        assert {r[3] for r in rows} == {None}
        assert journal._query("SELECT count(*) FROM groups") == [(0,)]  # the DROP was text, nothing else
    finally:
        journal.close()


def test_one_instance_joining_its_open_group_commits_in_one_round_trip(tmp_path, postgres_server):
    """A transaction ``alone`` (one instance, as the group commit's batch of one): joining
    the open group is its only statement and commits it, one round trip; the record is
    committed when the transaction returns, and nothing may be written after it. Opening
    a group (or a duplicate) still runs as one transaction with BEGIN/COMMIT."""
    from clara_adapter.journal import InstanceRecord

    journal = PostgresJournal(postgres_server.fresh_database("alone"), root=tmp_path)
    other = PostgresJournal(journal.dsn, root=tmp_path)
    settings = {"spec": {"timeout": 60}, "processor": "p", "aeTitle": "CLARA"}
    seen: list[tuple] = []  # per join: (server transaction status after the fast statement, record visible then)

    def record(uid: str) -> InstanceRecord:
        return InstanceRecord(owner="clara", ae_title="CLARA", calling_ae="SCU", sop_instance_uid=uid,
                              sop_class_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1", study_uid="1.9",
                              series_uid="1.9.1", path=tmp_path / f"{uid}.dcm", size=1, acked_at=0.0,
                              group_value="1.9")

    def visible(uid: str) -> int:
        return other._query("SELECT count(*) FROM instances WHERE sop_instance_uid = ?", (uid,))[0][0]

    def join(rec: InstanceRecord, alone: bool = True) -> bool:
        with journal.transaction(0.0, 0.0, concurrent=True, alone=alone):
            joined = journal.add_to_open_group(rec) is not None
            seen.append((journal._tx.conn.pgconn.transaction_status, visible(rec.sop_instance_uid)))
            if joined:
                return True
            rec.group_id, _ = journal.join_group("clara", "CLARA", "p", "1.9", settings, 60)
            return journal.add_member(rec) is not None

    IDLE, INTRANS = 0, 2  # libpq's PQtransactionStatus
    try:
        assert join(record("1")) is True  # no open group: the fast statement journals nothing ...
        assert seen[-1] == (IDLE, 0) and visible("1") == 1  # ... and the group is opened in a transaction
        assert join(record("2")) is True
        assert seen[-1] == (IDLE, 1)  # committed by its one statement: no transaction left open, no COMMIT to send
        assert join(record("2")) is False and visible("2") == 1  # the duplicate: not journaled again
        with pytest.raises(RuntimeError, match="committed"):
            with journal.transaction(0.0, 0.0, concurrent=True, alone=True):
                assert journal.add_to_open_group(record("3")) is not None
                journal.refresh_member(1, 5)  # a write after the commit would be in no transaction
        assert join(record("4"), alone=False) is True  # not alone: BEGIN … COMMIT as before
        assert seen[-1] == (INTRANS, 0) and visible("4") == 1
    finally:
        other.close()
        journal.close()


def test_a_database_cut_off_by_the_network_is_unreachable_within_the_timeout(tmp_path, own_postgres_server):
    """Packets to the database dropped (a partition, not a stopped server): a transaction
    fails as OperationalError (answered 0xA700) and the reachability probe says no, within
    ``network_timeout``, instead of blocking until TCP gives up (about 15 minutes); once the
    network is back the journal works again."""
    import psycopg

    journal = PostgresJournal(own_postgres_server.dsn, root=tmp_path, network_timeout=2.0)
    outcome: dict = {}

    def attempt(name: str, call) -> None:
        try:
            outcome[name] = call()
        except Exception as exc:
            outcome[name] = exc

    try:
        journal.next_sequence()
        with packets_dropped(own_postgres_server.port):
            journal.PROBE_SECONDS = 0.0  # probe now, not within the last second's answer
            calls = [threading.Thread(target=attempt, args=(name, call), daemon=True)
                     for name, call in (("commit", journal.next_sequence), ("available", journal.available))]
            for thread in calls:
                thread.start()
            for thread in calls:
                thread.join(20)
            assert not any(t.is_alive() for t in calls), f"still blocked after 20 s: {outcome}"
        assert isinstance(outcome["commit"], psycopg.OperationalError), outcome
        assert outcome["available"] is False
        wait_for(lambda: journal.available(), 30, what="the journal reachable again")
        assert journal.next_sequence() > 0
    finally:
        journal.close()
