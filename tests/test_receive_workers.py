"""Several receive worker processes on one DICOM port, one coordinator owning
admission, the journal, groups and jobs: against dcmtk storescu, with real
SIGKILLs of a worker and of the coordinator mid-study."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from clara_dicom.synthetic import write_study
from local_setup import write_config
from peers import dcmtk, dcmtk_env, metric_value, port_open, storescu, wait_for

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

WORKERS = ["--receive-workers", "2"]


def payload_sops(job: dict) -> list[str]:
    return sorted(p.stem for p in Path(job["spec"]["payload"]["path"], "input").rglob("*.dcm"))


def sops(files: list[Path]) -> list[str]:
    import pydicom

    return sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files)


def children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


def workers_of(adapter) -> set[int]:
    return {w["pid"] for w in adapter.status()["receiveWorkers"]}


def serving_pid(port: int, candidates: set[int]) -> int | None:
    """The process among ``candidates`` holding an established connection on local ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":  # ESTABLISHED
                inodes.add(cols[9])
    for pid in candidates:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None


def leftovers(state: Path) -> list[str]:
    return [p.name for p in (state / "incoming").iterdir()]


def acked(output: str) -> int:
    return output.count("Received Store Response (Success)")


def open_study_association(port: int, files: list[Path], first: int):
    """A pynetdicom SCU (calling STORESCU) that has sent and had acknowledged the
    first ``first`` instances and holds its association open: mid-study."""
    import pydicom
    from pynetdicom import AE

    sample = pydicom.dcmread(files[0], stop_before_pixels=True)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(sample.SOPClassUID, sample.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CLARA")
    assert assoc.is_established
    for f in files[:first]:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    return assoc


def send_rest(assoc, files: list[Path]) -> int:
    """Keep sending; the number acknowledged before the association died."""
    import pydicom

    done = 0
    for f in files:
        try:
            status = assoc.send_c_store(pydicom.dcmread(f))
        except (RuntimeError, ValueError):
            break
        if "Status" not in status or status.Status != 0x0000:
            break
        done += 1
    assoc.release() if assoc.is_established else None
    return done


def test_concurrent_associations_over_workers_make_exactly_one_job(tmp_path, local_adapter):
    config = write_config(tmp_path / "cfg", processor="pipelines: {seg: p-seg}\ntimeout: 5")
    adapter = local_adapter(config, extra=WORKERS)
    assert len(workers_of(adapter)) == 2
    assert workers_of(adapter) <= children(adapter.proc.pid)  # processes of their own, not threads
    files = write_study(tmp_path / "study", slices=48, rows=64, cols=64, patient_id="P-WORKERS")
    senders = [subprocess.Popen([dcmtk("storescu"), "-aec", "CLARA", "127.0.0.1", str(adapter.dicom_port),
                                 *map(str, files[i::6])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=dcmtk_env()) for i in range(6)]
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
    (job,) = wait_for(lambda: adapter.jobs(), 60, what="the job")
    assert payload_sops(job) == sops(files)
    wait_for(adapter.settled, 30, what="no open group, no pending job")  # a split study would show now
    assert len(adapter.jobs()) == 1
    metrics = adapter.metrics()
    # counted by the coordinator from what every worker reports
    assert metric_value(metrics, "clara_instances_received_total", ae_title="CLARA") == len(files)
    assert metric_value(metrics, "clara_associations_total", result="accepted") == 6
    status = adapter.status()
    per_worker = [w["associationsAccepted"] for w in status["receiveWorkers"]]
    assert sum(per_worker) == 6 and min(per_worker) >= 2  # handed to the least busy worker: spread
    assert status["activeAssociations"] == 0


def test_refusals_decided_by_the_coordinator_keep_their_exact_codes(tmp_path, local_adapter, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg"), extra=WORKERS)
    proc = storescu(ct_series[:1], adapter.dicom_port, called="NOT-SERVED", check=False)
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stderr and "Rejected Permanent" in proc.stderr
    proc = storescu(ct_series[:1], adapter.dicom_port, calling="STRANGER", check=False)
    assert "Calling AE Title Not Recognized" in proc.stderr
    assert metric_value(adapter.metrics(), "clara_associations_total", result="rejected") == 2


def test_worker_sigkill_mid_study_aborts_its_association_and_loses_or_duplicates_nothing(tmp_path, local_adapter):
    timeout = 10
    config = write_config(tmp_path / "cfg", processor=f"pipelines: {{seg: p-seg}}\ntimeout: {timeout}")
    state = tmp_path / "state"
    adapter = local_adapter(config, state=state, extra=WORKERS)
    before = workers_of(adapter)
    files = write_study(tmp_path / "study", slices=60, rows=64, cols=64, patient_id="P-WKILL")
    assoc = open_study_association(adapter.dicom_port, files, 20)
    victim = serving_pid(adapter.dicom_port, before)
    assert victim is not None, "no worker holds the association"
    os.kill(victim, signal.SIGKILL)
    n_acked = 20 + send_rest(assoc, files[20:])
    assert n_acked < len(files) and assoc.is_aborted  # the association died with its worker
    assert adapter.alive()
    # another worker takes its place; the coordinator kept running
    wait_for(lambda: len(workers_of(adapter)) == 2 and victim not in workers_of(adapter), 30,
             what="a new worker")
    assert victim not in children(adapter.proc.pid)
    # the sender resends what was not acknowledged (the one in flight may already be committed)
    storescu(files[n_acked:], adapter.dicom_port)
    (job,) = wait_for(lambda: adapter.jobs(), timeout + 30, what="the job")
    got = payload_sops(job)
    assert len(got) == len(set(got)) and got == sops(files)  # everything once
    wait_for(adapter.settled, timeout + 30, what="no open group, no pending job")
    assert len(adapter.jobs()) == 1
    assert leftovers(state) == []  # no partial file of the dead worker, nothing unreleased


def test_coordinator_sigkill_takes_the_workers_down_and_a_restart_loses_or_duplicates_nothing(tmp_path,
                                                                                              local_adapter):
    timeout = 30  # longer than a restart (and the resend) on a machine loaded by 5 helpers
    config = write_config(tmp_path / "cfg", processor=f"pipelines: {{seg: p-seg}}\ntimeout: {timeout}")
    state = tmp_path / "state"
    adapter = local_adapter(config, state=state, extra=WORKERS)
    workers = workers_of(adapter)
    files = write_study(tmp_path / "study", slices=60, rows=64, cols=64, patient_id="P-CKILL")
    assoc = open_study_association(adapter.dicom_port, files, 20)
    os.kill(adapter.proc.pid, signal.SIGKILL)  # the coordinator alone, not its process group
    adapter.proc.wait(10)
    n_acked = 20 + send_rest(assoc, files[20:])
    assert n_acked < len(files) and assoc.is_aborted
    # no orphan keeps the port: every worker exits with the coordinator
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers), 15,
             what="workers gone")
    wait_for(lambda: not port_open(adapter.dicom_port), 15, what="port closed")
    restarted = local_adapter(config, state=state, extra=WORKERS, dicom_port=adapter.dicom_port)
    storescu(files[n_acked:], restarted.dicom_port)
    (job,) = wait_for(lambda: restarted.jobs(), timeout + 30, what="the job")
    got = payload_sops(job)
    assert len(got) == len(set(got)) and got == sops(files)
    wait_for(restarted.settled, timeout + 30, what="no open group, no pending job")
    assert len(restarted.jobs()) == 1
    assert leftovers(state) == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_sigterm_drain_waits_for_an_association_in_a_worker(tmp_path, local_adapter):
    """SIGTERM while a worker is mid-association: the coordinator waits for it, every
    instance is acknowledged, and everything ends."""
    config = write_config(tmp_path / "cfg", processor="pipelines: {seg: p-seg}\ntimeout: 3600")
    adapter = local_adapter(config, extra=WORKERS)
    files = write_study(tmp_path / "study", slices=60, rows=64, cols=64, patient_id="P-DRAIN")
    workers = workers_of(adapter)
    assoc = open_study_association(adapter.dicom_port, files, 20)
    adapter.signal(signal.SIGTERM)  # the whole process group, as Kubernetes and Ctrl-C do
    wait_for(lambda: not adapter.ready(), 15, what="adapter draining")  # the signal landed
    assert adapter.alive()
    assert send_rest(assoc, files[20:]) == len(files) - 20  # every instance acknowledged, then released
    assert adapter.proc.wait(60) == 0
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers), 15,
             what="workers gone")


def test_default_worker_count_follows_the_cgroup_cpu_limit(tmp_path):
    from clara_adapter.settings import usable_cores

    affinity = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("max 100000\n")
    assert usable_cores(limit) == affinity
    limit.write_text("150000 100000\n")  # 1.5 CPUs: two workers can use them
    assert usable_cores(limit) == min(affinity, 2)
    limit.write_text("50000 100000\n")
    assert usable_cores(limit) == 1
    assert usable_cores(tmp_path / "missing") == affinity


@pytest.mark.parametrize("workers", [WORKERS, []], ids=["workers", "in-process"])
def test_a_peer_leaving_right_after_its_last_instance_is_no_error(tmp_path, local_adapter, workers):
    """A peer that closes the connection right after sending an instance (it does not wait
    for the answer): with workers, its association's slot may come back to the coordinator
    before the worker's batched commit does. That is a peer leaving, not a worker sending
    garbage: the complete instance is kept, as in-process, and nothing is logged as an error."""
    from raw_dicom import CT, associate, c_store_bytes, encode

    from clara_dicom.synthetic import ct_slice

    adapter = local_adapter(write_config(tmp_path / "cfg", processor="pipelines: {seg: p-seg}\ntimeout: 3600"),
                            extra=workers)
    for i in range(40):
        ds = ct_slice("PAT-LEAVE", "1.2.3.77", "1.2.3.77.1", i, rows=16, cols=16)
        with associate(adapter.dicom_port) as s:
            s.sendall(c_store_bytes(CT, str(ds.SOPInstanceUID), encode(ds)))
        # closed at once: no C-STORE-RSP read, no A-RELEASE
    wait_for(lambda: adapter.status()["activeAssociations"] == 0, 30, what="every association over")
    assert metric_value(adapter.metrics(), "clara_associations_total", result="accepted") == 40
    wait_for(lambda: adapter.status()["instancesHeld"] == 40, 30, what="every complete instance kept")
    assert "unknown association" not in adapter.log()
    assert "ERROR" not in adapter.log()
