"""Temporary files created ahead by a thread (storage.SpareFiles) and the
header written with the first dataset bytes: the receive loop neither creates
files nor writes headers on its own, and nothing of either is left behind."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pydicom
import pytest

from clara_adapter import service, storage
from clara_adapter.job_sinks import LocalJobSink
from clara_adapter.settings import AdapterSettings
from clara_adapter.storage import SPARE_FOLDER, InstanceStore, SpareFiles, file_header
from peers import dcmtk, dcmtk_env, free_port, wait_for
from test_adapter_service import config

HEADER = file_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", "SCU")


def spares_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("spare-*")) if folder.exists() else []


def test_an_instance_goes_into_a_file_created_ahead_and_lands_in_the_incoming_folder(tmp_path):
    store = InstanceStore(tmp_path / "incoming")
    store.start_spares(4)
    try:
        wait_for(lambda: len(spares_in(tmp_path / SPARE_FOLDER)) == 4, 5, what="4 spare files")
        writer = store.open(HEADER)
        assert writer.tmp.parent == tmp_path / SPARE_FOLDER  # not created by the caller
        writer.write(b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00")
        path, size = writer.finalize()
        assert path.parent == tmp_path / "incoming" and path.read_bytes().startswith(HEADER)
        assert size == path.stat().st_size
        assert not list((tmp_path / "incoming").glob(".tmp-*"))
        for _ in range(2):  # half of them used: the thread refills (in batches, one wake-up per half)
            store.open(HEADER).discard()
        wait_for(lambda: len(spares_in(tmp_path / SPARE_FOLDER)) == 4, 5, what="refilled")
    finally:
        store.stop_spares()
    assert spares_in(tmp_path / SPARE_FOLDER) == []  # stopping deletes what was not used


def test_a_spare_kept_too_long_is_not_used_and_old_leftovers_are_deleted(tmp_path):
    folder = tmp_path / SPARE_FOLDER
    folder.mkdir()
    crashed = folder / "spare-fromacrash"
    crashed.write_bytes(b"")
    os.utime(crashed, (time.time() - 2 * storage.SPARE_MAX_AGE - 5,) * 2)
    recent = folder / "spare-anotherreplica"
    recent.write_bytes(b"")
    now = [1000.0]
    spares = SpareFiles(folder, 2, max_age=10, clock=lambda: now[0])
    try:
        assert not crashed.exists() and recent.exists()  # a live replica's may be in use
        wait_for(lambda: len(spares._ready) == 2, 5, what="2 spares")
        made = {p for p in spares_in(folder) if p != recent}
        assert len(made) == 2
        now[0] += 11  # both are now older than max_age
        got = spares.take()
        if got is not None:  # one the thread made after the clock moved on
            os.close(got[1] and got[0])
            assert Path(got[1]) not in made
        assert not (made & set(spares_in(folder)))  # deleted, not handed out
    finally:
        spares.close()
    assert spares_in(folder) == [recent]


def test_the_header_goes_out_with_the_first_dataset_bytes_in_one_system_call(tmp_path, monkeypatch):
    store = InstanceStore(tmp_path)
    writer = store.open(HEADER)
    calls = []
    real_write, real_writev = os.write, os.writev
    monkeypatch.setattr(os, "write", lambda fd, data: calls.append("write") or real_write(fd, data))
    monkeypatch.setattr(os, "writev", lambda fd, bufs: calls.append("writev") or real_writev(fd, bufs))
    writer.write(memoryview(bytearray(b"\x08\x00\x18\x00UI\x02\x001\x00")))
    writer.write(b"\x10\x00\x10\x00PN\x02\x00AB")
    monkeypatch.undo()
    path, size = writer.finalize()
    assert calls == ["writev", "write"]
    assert path.read_bytes() == HEADER + b"\x08\x00\x18\x00UI\x02\x001\x00\x10\x00\x10\x00PN\x02\x00AB"
    assert size == len(path.read_bytes())


def test_a_header_without_dataset_bytes_is_still_written(tmp_path):
    path, size = InstanceStore(tmp_path).open(HEADER).finalize()
    assert path.read_bytes() == HEADER and size == len(HEADER)


def test_partial_writev_is_completed(tmp_path, monkeypatch):
    """A short writev (disk nearly full, signals) goes on where it stopped."""
    writer = InstanceStore(tmp_path).open(HEADER)
    real_writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real_writev(fd, [bytes(bufs[0])[:7]]))
    writer.write(b"0123456789" * 3)
    monkeypatch.undo()
    path, _ = writer.finalize()
    assert path.read_bytes() == HEADER + b"0123456789" * 3


@pytest.fixture
def adapter(tmp_path):
    settings = AdapterSettings(storageDir=str(tmp_path / "state"), host="127.0.0.1", dicomPort=free_port(),
                               httpPort=0, reserveSpaceGB=0, watermarkPercent=100, rejectUnknownSources=False)
    made = service.Adapter(settings, LocalJobSink(tmp_path / "state" / "jobs"))
    made.start(config("p1"))
    yield made
    made.stop(grace=1)


def test_storescu_study_is_received_into_spares_and_nothing_is_left_after_stop(adapter, tmp_path):
    import subprocess

    from clara_dicom.synthetic import write_study

    files = write_study(tmp_path / "study", slices=6, patient_id="SPARE-1", rows=16, cols=16)
    spare_folder = Path(adapter.settings.storageDir) / SPARE_FOLDER
    wait_for(lambda: len(spares_in(spare_folder)) > 0, 5, what="spare files")
    made = set(spares_in(spare_folder))
    done = subprocess.run([dcmtk("storescu"), "-aec", "CLARA", "127.0.0.1", str(adapter.settings.dicomPort),
                           *map(str, files)], env=dcmtk_env(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-500:]
    incoming = adapter.settings.incoming_dir
    stored = sorted(incoming.glob("*.dcm"))
    assert len(stored) == 6 and not list(incoming.glob(".tmp-*"))
    sent = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in stored} == sent
    assert made - set(spares_in(spare_folder))  # the instances went into files created ahead
    adapter.stop(grace=1)
    assert spares_in(spare_folder) == []
