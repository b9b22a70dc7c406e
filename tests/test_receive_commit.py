"""Where the receive path commits (a real Adapter: SCP on a free port, real
SQLite journal, raw-socket peers): on the event loop itself when the journal
is quick, one transaction for every instance finished in a loop iteration; to
the thread pool when the journal is busy, without stalling other
associations; and never an answer before the instance's own record is
committed."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from clara_adapter import service
from clara_adapter.job_sinks import LocalJobSink
from clara_adapter.settings import AdapterSettings
from peers import free_port, wait_for
from raw_dicom import CT, associate, c_store_bytes, encode, read_status, release
from test_adapter_service import config


@pytest.fixture
def adapter(tmp_path):
    settings = AdapterSettings(storageDir=str(tmp_path / "state"), host="127.0.0.1", dicomPort=free_port(),
                               httpPort=0, reserveSpaceGB=0, watermarkPercent=100, rejectUnknownSources=False)
    made = service.Adapter(settings, LocalJobSink(tmp_path / "state" / "jobs"))
    made.start(config("p1"))
    yield made
    made.stop(grace=1)


def dataset(sop: str) -> bytes:
    from clara_dicom.synthetic import ct_slice

    ds = ct_slice("PAT-C", "1.2.3", "1.2.3.1", 0, rows=16, cols=16)
    ds.SOPInstanceUID = sop
    return encode(ds)


def journaled(adapter, sop: str) -> bool:
    """Read through a connection of our own: only committed rows are visible."""
    db = sqlite3.connect(str(adapter.settings.journal_path))
    try:
        return bool(db.execute("SELECT count(*) FROM instances WHERE sop_instance_uid=?", (sop,)).fetchone()[0])
    finally:
        db.close()


def test_the_journal_is_committed_before_each_answer_of_concurrent_instances(adapter):
    assert adapter.ingest.quick_commits  # SQLite, no fsync: commits run on the receive loop
    socks = [associate(adapter.settings.dicomPort) for _ in range(4)]
    commits_before = adapter.journal.commits
    try:
        for round_ in range(5):
            sops = [f"1.2.9.{round_}.{i}" for i in range(len(socks))]
            for sock, sop in zip(socks, sops):  # four instances in flight at once
                sock.sendall(c_store_bytes(CT, sop, dataset(sop)))
            for sock, sop in zip(socks, sops):
                assert read_status(sock) == 0x0000
                assert journaled(adapter, sop)  # answered only once its own record was committed
    finally:
        for sock in socks:
            release(sock)
    assert adapter.journal.count_instances() == 20
    assert adapter.journal.commits - commits_before <= 20  # never more than one commit per instance


def test_a_busy_journal_delays_only_the_answer_not_other_associations(adapter):
    """A group closing holds the journal: the finished instance waits in a pool
    thread, the loop keeps serving (another association's C-ECHO is answered)."""
    from raw_dicom import p_data

    verification = "1.2.840.10008.1.1"
    store = associate(adapter.settings.dicomPort)
    echo = associate(adapter.settings.dicomPort, contexts=[(verification, ["1.2.840.10008.1.2"])])
    answered: list[int | None] = []
    try:
        with adapter.journal.lock:  # held by this thread, as the timer thread would while closing a group
            store.sendall(c_store_bytes(CT, "1.2.9.77", dataset("1.2.9.77")))
            reader = threading.Thread(target=lambda: answered.append(read_status(store)), daemon=True)
            reader.start()
            echo_rq = (b"\x00\x00\x00\x00\x04\x00\x00\x00" + (56).to_bytes(4, "little")
                       + b"\x00\x00\x02\x00\x12\x00\x00\x00" + verification.encode() + b"\x00"
                       + b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00"
                       + b"\x00\x00\x10\x01\x02\x00\x00\x00\x07\x00"
                       + b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01")
            echo.sendall(p_data(1, echo_rq, True))
            assert read_status(echo) == 0x0000  # the loop was not blocked by the journal
            reader.join(0.5)
            assert answered == []  # no answer before the commit
            assert not journaled(adapter, "1.2.9.77")
        reader.join(10)
        assert answered == [0x0000]
        assert journaled(adapter, "1.2.9.77")
    finally:
        release(store)
        release(echo)
    wait_for(lambda: not list((adapter.settings.incoming_dir).glob(".tmp-*")), 5, what="no temporary files")


def test_commit_prepared_commits_the_ready_ones_together_and_keeps_the_order():
    from clara_adapter.ingest import commit_prepared

    calls = []

    def commit(batch):
        calls.append(list(batch))
        return [0x0000 + i for i in range(len(batch))]

    assert commit_prepared([("r", "a"), 0xA700, ("r", "b"), 0xC000], commit) == [0x0000, 0xA700, 0x0001, 0xC000]
    assert calls == [[("r", "a"), ("r", "b")]]  # one commit, only the instances in place
    assert commit_prepared([0xA700], commit) == [0xA700] and len(calls) == 1  # nothing to commit: no transaction
