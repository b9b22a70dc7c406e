"""Part 10 files, header scan, disk guard and adapter settings."""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from clara_dicom.errors import UserError
from clara_dicom.synthetic import ct_slice

from clara_adapter.settings import env_name, load_settings
from clara_adapter.storage import DiskGuard, InstanceStore, file_header, read_tags

STUDY, SERIES, PATIENT = 0x0020000D, 0x0020000E, 0x00100020


def encode(ds, implicit=False, little=True) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.fixture
def ds():
    return ct_slice("PAT 7", "1.2.3", "1.2.3.4", 0, rows=8, cols=8)


@pytest.mark.parametrize("ts, implicit, little", [
    ("1.2.840.10008.1.2", True, True),
    ("1.2.840.10008.1.2.1", False, True),
    ("1.2.840.10008.1.2.2", False, False),
])
def test_read_tags_in_each_uncompressed_syntax(ds, ts, implicit, little):
    raw = encode(ds, implicit, little)
    assert read_tags(memoryview(raw), ts, {STUDY, SERIES, PATIENT}) == {STUDY: "1.2.3", SERIES: "1.2.3.4",
                                                                         PATIENT: "PAT 7"}


def test_read_tags_deflated(ds):
    raw = encode(ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = comp.compress(raw) + comp.flush()
    assert read_tags(memoryview(deflated), "1.2.840.10008.1.2.1.99", {STUDY})[STUDY] == "1.2.3"


def test_read_tags_refuses_truncated_data(ds):
    raw = encode(ds)
    with pytest.raises(ValueError):  # inside a value we read
        read_tags(memoryview(raw[:-3]), "1.2.840.10008.1.2.1", {0x7FE00010})
    with pytest.raises(ValueError):  # inside a value we skip
        read_tags(memoryview(raw[:57]), "1.2.840.10008.1.2.1", {0x7FE00010})


def test_part10_file_round_trips_through_pydicom(tmp_path, ds):
    raw = encode(ds)
    header = file_header(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1", "MODALITY")
    path, size = InstanceStore(tmp_path).write(header, memoryview(raw))
    assert size == path.stat().st_size and path.suffix == ".dcm"
    back = pydicom.dcmread(path)
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert back.PatientID == "PAT 7" and back.PixelData == ds.PixelData
    assert path.read_bytes().endswith(raw)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_sweep_removes_unjournaled_and_temporary_files(tmp_path):
    store = InstanceStore(tmp_path)
    keep = tmp_path / "a.dcm"
    keep.write_bytes(b"x")
    (tmp_path / "b.dcm").write_bytes(b"x")
    (tmp_path / ".tmp-c").write_bytes(b"x")
    assert store.sweep({str(keep)}) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a.dcm"]


def test_disk_guard_rules(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    assert DiskGuard(tmp_path, 100, 0).check() is None
    assert "reserve" in DiskGuard(tmp_path, 100, free + 1).check()
    assert "watermark" in DiskGuard(tmp_path, 0.001, 0).check()


def test_settings_precedence_file_env_flags(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("dicomPort: 2000\nagent: FromFile\nwatermarkPercent: 70\n")
    s = load_settings(f, env={"CLARA_DICOM_PORT": "3000", "CLARA_AGENT": "FromEnv"}, overrides={"dicomPort": 4000})
    assert (s.dicomPort, s.agent, s.watermarkPercent, s.reserveSpaceGB) == (4000, "FromEnv", 70, 5)
    assert env_name("dicomPort") == "CLARA_DICOM_PORT"
    assert env_name("rejectUnknownSources") == "CLARA_REJECT_UNKNOWN_SOURCES"


@pytest.mark.parametrize("content, env, message", [
    ("dicomPort: 70000\n", {}, "dicomPort (from settings file"),
    ("dicomPrt: 1\n", {}, "unknown setting"),
    ("", {"CLARA_WATERMARK_PERCENT": "abc"}, "environment variable CLARA_WATERMARK_PERCENT"),
    ("agent: -bad\n", {}, "agent"),
    ("tlsCertFile: /x.pem\n", {}, "tlsKeyFile"),
    ("[1, 2\n", {}, "invalid YAML"),
    ("- a\n", {}, "expected a mapping"),
])
def test_bad_settings_give_one_line_naming_the_source(tmp_path, content, env, message):
    f = tmp_path / "s.yaml"
    f.write_text(content)
    with pytest.raises(UserError) as exc:
        load_settings(f, env=env)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_missing_settings_file(tmp_path):
    with pytest.raises(UserError, match="settings file"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_retention_purges_old_payloads_and_keeps_recent_ones(tmp_path):
    import time as _time

    from clara_adapter.service import purge_older_than

    old, new = tmp_path / "old-job", tmp_path / "new-job"
    for d in (old, new):
        (d / "input").mkdir(parents=True)
        (d / "input" / "a.dcm").write_bytes(b"x")
    record = tmp_path / "old.json"
    record.write_text("{}")
    past = _time.time() - 7200
    os.utime(old, (past, past))
    os.utime(record, (past, past))
    assert purge_older_than(tmp_path, 3600) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new-job"]
    assert purge_older_than(tmp_path / "missing", 1) == 0


def test_disk_guard_asks_the_disk_again_within_a_second_and_always_near_its_limits(tmp_path, monkeypatch):
    """statvfs is cached only while the disk is far (≥ HEADROOM_BYTES) from both limits."""

    calls = []
    real = os.statvfs
    free_blocks = {"n": 0}

    class Fake:
        def __init__(self, st):
            self.f_blocks, self.f_frsize, self.f_bavail = st.f_blocks, st.f_frsize, free_blocks["n"] or st.f_bavail

    def counting(path):
        calls.append(path)
        return Fake(real(path))

    monkeypatch.setattr(os, "statvfs", counting)
    now = [100.0]
    far = DiskGuard(tmp_path, 100, 0, clock=lambda: now[0])
    far.HEADROOM_BYTES = 0  # this disk counts as far from the limits
    assert far.check() is None and far.check() is None
    assert len(calls) == 1  # the second check within a second used the first answer
    now[0] += 1.01
    assert far.check() is None and len(calls) == 2
    near = DiskGuard(tmp_path, 100, 0, clock=lambda: now[0])
    near.HEADROOM_BYTES = 1 << 62  # every disk is "near" its limits: asked every time
    for _ in range(3):
        assert near.check() is None
    assert len(calls) == 5
    # the disk fills up between two checks of a guard within 1 GiB of its reserve: the second sees it
    st = real(tmp_path)
    guard = DiskGuard(tmp_path, 100, st.f_bavail * st.f_frsize - 1024**3, clock=lambda: now[0])
    assert guard.check() is None
    free_blocks["n"] = 1
    assert "reserve" in guard.check()


def test_instance_file_names_are_unique(tmp_path):
    from clara_adapter.storage import unique_name

    names = {unique_name() for _ in range(10000)}
    assert len(names) == 10000 and all(len(n) == 32 for n in names)

    # a forked process (a receive worker) draws its own prefix: its names never repeat its parent's
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.write(write_end, unique_name().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    child = os.read(read_end, 64).decode()
    os.close(read_end)
    parent = unique_name()
    assert len(child) == 32 and child[:24] != parent[:24]


# --- the header goes out with the first dataset bytes (one system call per small instance)

WRITEV_HEADER = file_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", "SCU")


def test_the_header_goes_out_with_the_first_dataset_bytes_in_one_system_call(tmp_path, monkeypatch):
    store = InstanceStore(tmp_path)
    writer = store.open(WRITEV_HEADER)
    calls = []
    real_write, real_writev = os.write, os.writev
    monkeypatch.setattr(os, "write", lambda fd, data: calls.append("write") or real_write(fd, data))
    monkeypatch.setattr(os, "writev", lambda fd, bufs: calls.append("writev") or real_writev(fd, bufs))
    writer.write(memoryview(bytearray(b"\x08\x00\x18\x00UI\x02\x001\x00")))
    writer.write(b"\x10\x00\x10\x00PN\x02\x00AB")
    monkeypatch.undo()
    path, size = writer.finalize()
    assert calls == ["writev", "write"]
    assert path.read_bytes() == WRITEV_HEADER + b"\x08\x00\x18\x00UI\x02\x001\x00\x10\x00\x10\x00PN\x02\x00AB"
    assert size == len(path.read_bytes())


def test_a_header_without_dataset_bytes_is_still_written(tmp_path):
    path, size = InstanceStore(tmp_path).open(WRITEV_HEADER).finalize()
    assert path.read_bytes() == WRITEV_HEADER and size == len(WRITEV_HEADER)


def test_partial_writev_is_completed(tmp_path, monkeypatch):
    """A short writev (disk nearly full, signals) goes on where it stopped."""
    writer = InstanceStore(tmp_path).open(WRITEV_HEADER)
    real_writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real_writev(fd, [bytes(bufs[0])[:7]]))
    writer.write(b"0123456789" * 3)
    monkeypatch.undo()
    path, _ = writer.finalize()
    assert path.read_bytes() == WRITEV_HEADER + b"0123456789" * 3
