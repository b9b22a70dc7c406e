"""The DICOM receiver against real dcmtk peers: acceptance, storage fidelity,
refusals, concurrency, bad input and the disk guard."""
from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest

from local_setup import write_config
from peers import dcmtk, echoscu, metric_value, storescu, wait_for

pytestmark = pytest.mark.dcmtk

# A long quiet period keeps received files in incoming/ while we inspect them.
HOLD = "pipelines: {seg: seg}\ntimeout: 3600"


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta group of a Part 10 file."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    meta_len = struct.unpack("<I", data[140:144])[0]
    return data[144 + meta_len:]


def stored_files(adapter) -> list[Path]:
    return sorted((adapter.state / "incoming").glob("*.dcm"))


def by_sop(paths: list[Path]) -> dict[str, Path]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}


def test_echo(local_adapter):
    adapter = local_adapter()
    assert echoscu(adapter.dicom_port).returncode == 0


def test_ct_series_is_stored_byte_identical(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    storescu(ct_series, adapter.dicom_port)
    stored = by_sop(stored_files(adapter))
    sent = by_sop(ct_series)
    assert stored.keys() == sent.keys()
    for sop, path in stored.items():
        assert dataset_bytes(path) == dataset_bytes(sent[sop])
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert meta.MediaStorageSOPInstanceUID == sop
        assert meta.SourceApplicationEntityTitle == "STORESCU"
    assert metric_value(adapter.metrics(), "clara_instances_received_total", ae_title="CLARA") == len(ct_series)


@pytest.mark.parametrize("codec, ts, propose", [("dcmcjpeg", "1.2.840.10008.1.2.4.70", "-xs"),
                                               ("dcmcrle", "1.2.840.10008.1.2.5", "-xr")])
def test_compressed_instance_is_stored_as_received(local_adapter, tmp_path, ct_series, codec, ts, propose):
    compressed = tmp_path / f"{codec}.dcm"
    subprocess.run([dcmtk(codec), str(ct_series[0]), str(compressed)], check=True, capture_output=True)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == ts
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    storescu([compressed], adapter.dicom_port, extra=[propose])  # propose the compressed syntax first
    (stored,) = stored_files(adapter)
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == ts
    assert dataset_bytes(stored) == dataset_bytes(compressed)


def test_unknown_called_ae_title_is_refused(local_adapter, ct_series):
    adapter = local_adapter()
    proc = storescu(ct_series[:1], adapter.dicom_port, called="NOT-SERVED", check=False)
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stderr
    assert "Rejected Permanent" in proc.stderr and "Service User" in proc.stderr


def test_unknown_source_is_refused(local_adapter, ct_series):
    adapter = local_adapter()
    proc = storescu(ct_series[:1], adapter.dicom_port, calling="INTRUDER", check=False)
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stderr
    assert not stored_files(adapter)


def test_unknown_sources_accepted_when_the_setting_is_off(local_adapter, tmp_path, ct_series):
    settings = tmp_path / "settings.yaml"
    settings.write_text("rejectUnknownSources: false\n")
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD), extra=["--settings", str(settings)])
    storescu(ct_series[:2], adapter.dicom_port, calling="ANYONE")
    assert len(stored_files(adapter)) == 2


def test_allowed_sources_restrict_an_ae_title(local_adapter, tmp_path, ct_series):
    cfg = write_config(tmp_path / "cfg", processor=HOLD, aet_extra="allowedSources: [echoscu]")
    adapter = local_adapter(cfg)
    proc = storescu(ct_series[:1], adapter.dicom_port, check=False)  # STORESCU is known, but not allowed here
    assert "Calling AE Title Not Recognized" in proc.stderr


def test_ignored_sop_class_is_acknowledged_and_dropped(local_adapter, tmp_path, ct_series):
    cfg = write_config(tmp_path / "cfg", processor=HOLD, aet_extra="ignoredSopClasses: ['1.2.840.10008.5.1.4.1.1.2']")
    adapter = local_adapter(cfg)
    storescu(ct_series[:3], adapter.dicom_port)  # succeeds
    assert stored_files(adapter) == []
    assert metric_value(adapter.metrics(), "clara_instances_ignored_total", reason="sop_class") == 3


def test_allowed_sop_classes_drop_the_others(local_adapter, tmp_path, ct_series):
    cfg = write_config(tmp_path / "cfg", processor=HOLD, aet_extra="allowedSopClasses: ['1.2.840.10008.5.1.4.1.1.4']")
    adapter = local_adapter(cfg)
    storescu(ct_series[:2], adapter.dicom_port)
    assert stored_files(adapter) == []


def test_ten_concurrent_storescu_all_succeed(local_adapter, tmp_path):
    from clara_dicom.synthetic import write_study

    studies = [write_study(tmp_path / f"study{i}", slices=5, rows=64, cols=64, patient_id=f"P{i}") for i in range(10)]
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    procs = [subprocess.Popen([dcmtk("storescu"), "-aec", "CLARA", "127.0.0.1", str(adapter.dicom_port),
                               *map(str, files)], stderr=subprocess.PIPE) for files in studies]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert len(stored_files(adapter)) == 50


def test_garbage_and_truncated_input_do_not_stop_the_server(local_adapter, ct_series):
    adapter = local_adapter()
    # 1. not DICOM at all
    with socket.create_connection(("127.0.0.1", adapter.dicom_port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
    # 2. an A-ASSOCIATE-RQ header announcing far more than is sent, then hang up
    with socket.create_connection(("127.0.0.1", adapter.dicom_port)) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0, 5000) + b"\x00\x01" + b"\x00" * 50)
    # 3. a C-STORE whose dataset is garbage: an element claiming more bytes than follow
    from pynetdicom import AE, _config

    from clara_adapter.storage import file_header

    bad = adapter.state.parent / "garbage.dcm"
    body = struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 8) + b"1.2.3.4\0"
    body += struct.pack("<HH2sH", 0x0020, 0x000D, b"UI", 0xFFF0) + b"\x01" * 10
    bad.write_bytes(file_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", "X") + body)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", adapter.dicom_port, ae_title="CLARA")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        status = assoc.send_c_store(bad)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status and status.Status != 0x0000
    assoc.release()
    # the server still serves
    assert adapter.alive()
    assert echoscu(adapter.dicom_port).returncode == 0
    storescu(ct_series[:2], adapter.dicom_port)
    assert not list((adapter.state / "incoming").glob(".tmp-*"))


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs to fill up (needs root, as in CI)."""
    import os

    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        from local_setup import require

        require(False, f"a tmpfs mount (root): {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    assert os.path.ismount(mount) is False


def fill(disk: Path, percent: float) -> Path:
    """Write a filler file until the disk is at least `percent` full."""
    import os

    st = os.statvfs(disk)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    need = int(total * percent / 100) - (total - free)
    filler = disk / "filler.bin"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(need, 0))
    return filler


def test_disk_guard_refuses_new_associations_and_answers_a700_inside_open_ones(local_adapter, tmp_path, ct_series,
                                                                               small_disk):
    from pynetdicom import AE

    settings = tmp_path / "settings.yaml"
    settings.write_text("watermarkPercent: 80\nreserveSpaceGB: 0\n")
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD), state=small_disk / "state",
                            extra=["--settings", str(settings)])
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", adapter.dicom_port, ae_title="CLARA")
    assert assoc.is_established
    datasets = [pydicom.dcmread(p) for p in ct_series[:3]]
    assert assoc.send_c_store(datasets[0]).Status == 0x0000
    filler = fill(small_disk, 85)  # the disk crosses the watermark mid-association
    assert assoc.send_c_store(datasets[1]).Status == 0xA700
    assoc.release()
    # new associations are refused as transient
    proc = storescu(ct_series[2:3], adapter.dicom_port, check=False)
    assert proc.returncode != 0 and "Rejected Transient" in proc.stderr
    incoming = adapter.state / "incoming"
    assert not list(incoming.glob(".tmp-*"))
    assert len(list(incoming.glob("*.dcm"))) == 1  # only the acknowledged one
    # space comes back: the adapter accepts again without a restart
    filler.unlink()
    storescu(ct_series[2:3], adapter.dicom_port)
    assert len(list(incoming.glob("*.dcm"))) == 2
    assert metric_value(adapter.metrics(), "clara_store_failures_total", reason="disk_full") == 1
