"""Several `clara-dicom up --journal DSN --state SHARED` processes acting as one
adapter (SPEC §9), on a real PostgreSQL and with dcmtk storescu as the modality:
replicas started together on an empty database, one study spread over all of
them, a replica SIGKILLed after it received the last instance, PostgreSQL
stopped mid-study, and reference scenarios with instances spread over replicas."""
from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from clara_dicom.synthetic import write_study
from local_setup import write_config
from peers import LocalAdapter, adapter_command, dcmtk, dcmtk_env, start_together, wait_for
from postgres_server import own_postgres_server, postgres_server  # noqa: F401 (fixtures)
from test_scenarios import FIXTURES, imported_config, payload_sops, sops

pytestmark = [pytest.mark.postgres, pytest.mark.dcmtk, pytest.mark.slow]


@pytest.fixture
def replicas(tmp_path, dcmtk_available):
    """Factory: n `up` processes on one DSN and one state folder, started at the same moment."""
    started: list[LocalAdapter] = []

    def start(n: int, config: Path, dsn: str, state: Path | None = None) -> list[LocalAdapter]:
        state = state or tmp_path / "shared"
        adapters, errors = start_together(n, lambda: LocalAdapter(config, state, extra=["--journal", dsn]), 120)
        started.extend(adapters)
        if errors:
            raise errors[0]
        return adapters

    yield start
    for adapter in started:
        adapter.stop_and_report()


def send_together(parts: list[tuple[LocalAdapter, list[Path]]]) -> None:
    """One association per part, all at once."""
    procs = [subprocess.Popen([dcmtk("storescu"), "-aec", "CLARA", "127.0.0.1", str(a.dicom_port), *map(str, files)],
                              env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for a, files in parts]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def store_one(adapter: LocalAdapter, path: Path) -> tuple[bool, str]:
    """(acknowledged, storescu's output) for one instance in its own association."""
    out = subprocess.run([dcmtk("storescu"), "-v", "-aec", "CLARA", "127.0.0.1", str(adapter.dicom_port), str(path)],
                         env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    return "Received Store Response (Success)" in text, text


def jobs_listed(state: Path) -> list[dict]:
    out = subprocess.run(adapter_command("jobs", "list", "--state", str(state), "-o", "json"), capture_output=True,
                         text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def created_at(job: dict) -> float:
    return datetime.strptime(job["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=timezone.utc).timestamp()


def test_three_replicas_started_together_make_one_job_per_pipeline(tmp_path, postgres_server, replicas):
    dsn = postgres_server.fresh_database("together")  # empty: the three race to create the schema
    timeout = 5
    config = write_config(tmp_path / "cfg", processor=f"pipelines: {{seg: p-seg, qa: p-qa}}\ntimeout: {timeout}")
    group = replicas(3, config, dsn)
    files = write_study(tmp_path / "study", slices=36, rows=32, cols=32, patient_id="P-REPLICAS")
    # six interleaved associations, two to each replica, at the same time
    send_together([(group[i % 3], files[i::6]) for i in range(6)])
    state = group[0].state
    wait_for(lambda: len(group[0].jobs()) >= 2, timeout + 20, what="two jobs")
    # every replica: no group open (in the database), no job submission pending; a second job would exist now
    wait_for(lambda: all(r.settled() for r in group), timeout + 30, what="no open group, no pending job")
    jobs = jobs_listed(state)  # the CLI sees every replica's jobs
    assert sorted(j["spec"]["pipeline"] for j in jobs) == ["p-qa", "p-seg"]
    for job in jobs:
        assert payload_sops(job) == sops(files)
    wait_for(lambda: not list((state / "incoming").glob("*.dcm")), 10, what="instances released")
    assert all(a.alive() for a in group)


def test_sigkill_of_the_replica_with_the_last_instance_still_closes_on_time(tmp_path, postgres_server, replicas):
    dsn = postgres_server.fresh_database("sigkill")
    timeout = 5
    config = write_config(tmp_path / "cfg", processor=f"pipelines: {{seg: p-seg, qa: p-qa}}\ntimeout: {timeout}")
    a, b, c = replicas(3, config, dsn)
    files = write_study(tmp_path / "study", slices=12, rows=32, cols=32, patient_id="P-KILLED")
    send_together([(a, files[0:10:2]), (b, files[1:10:2])])
    ok, out = store_one(c, files[10])
    assert ok, out
    sent = time.time()  # the last acknowledgement falls between these two
    ok, out = store_one(c, files[11])
    answered = time.time()
    assert ok, out
    c.kill()  # the replica that received the last instance dies at once
    jobs = wait_for(lambda: len(a.jobs()) >= 2 and a.jobs(), timeout + 20, interval=0.05, what="jobs")
    for job in jobs:
        late = created_at(job) - (answered + timeout)
        assert late <= 1.0, f"job {job['metadata']['name']} created {late:.2f}s after the deadline"
        assert created_at(job) >= sent + timeout  # never before the quiet period ended
    wait_for(lambda: a.settled() and b.settled(), timeout + 30, what="no open group, no pending job")
    jobs = jobs_listed(a.state)
    assert sorted(j["spec"]["pipeline"] for j in jobs) == ["p-qa", "p-seg"]
    for job in jobs:
        assert payload_sops(job) == sops(files)


def test_postgres_stopped_mid_study_refuses_transiently_and_loses_nothing(tmp_path, own_postgres_server, replicas):
    pg = own_postgres_server
    timeout = 30  # not due while the database is down
    config = write_config(tmp_path / "cfg", processor=f"pipelines: {{seg: p-seg}}\ntimeout: {timeout}")
    group = replicas(3, config, pg.dsn)
    files = write_study(tmp_path / "study", slices=24, rows=32, cols=32, patient_id="P-OUTAGE")
    send_together([(group[i % 3], files[:12][i::3]) for i in range(3)])
    acked = set(files[:12])
    pg.halt()
    outcomes: list[str] = []
    try:
        stopped = time.monotonic()
        pending = list(files[12:])
        i = 0
        while time.monotonic() - stopped < 10 and pending:
            ok, out = store_one(group[i % 3], pending[0])
            i += 1
            if ok:
                acked.add(pending.pop(0))
                outcomes.append("acknowledged")
            elif "Association Rejected" in out and "Transient" in out:
                outcomes.append("refused (transient)")
            elif "Refused: OutOfResources" in out:
                outcomes.append("0xA700")
            else:
                outcomes.append("other: " + out[-400:])
            time.sleep(0.2)  # a modality's retry interval, not a wait for a condition
    finally:
        pg.launch()
    assert [o for o in outcomes if o.startswith("other")] == []
    assert "refused (transient)" in outcomes or "0xA700" in outcomes, outcomes  # the outage was felt
    # the modality sends what was not acknowledged again, once the database is back
    for n, path in enumerate(files):
        if path in acked:
            continue
        wait_for(lambda: store_one(group[n % 3], path)[0], 30, interval=0.5, what="store accepted again")
        acked.add(path)
    last_ack = time.time()
    (job,) = wait_for(lambda: group[0].jobs(), timeout + 30, interval=0.2, what="one job")
    assert created_at(job) >= last_ack + timeout - 0.2
    assert payload_sops(job) == sops(files)  # nothing acknowledged lost, nothing twice
    assert len(jobs_listed(group[0].state)) == 1


def test_scenario_2b_with_each_instance_on_another_replica(tmp_path, postgres_server, replicas):
    """Clara's Scenario 2 (groupBy Study, timeout 5): instances at T1, T1+4, T2+3, T3+1, each
    to another replica -> one job with all four."""
    dsn = postgres_server.fresh_database("scenario2b")
    config = imported_config(tmp_path / "cfg", FIXTURES / "scenario2.json", "scenario-2")
    group = replicas(3, config, dsn)
    files = write_study(tmp_path / "study", slices=4, rows=32, cols=32, patient_id="PATIENT-W")
    for i, (gap, f) in enumerate(zip([0, 4, 3, 1], files)):
        time.sleep(gap)  # the scenario's own timing
        ok, out = store_one(group[i % 3], f)
        assert ok, out
    last = time.time()
    (job,) = wait_for(lambda: group[0].jobs(), 15, what="one job")
    assert payload_sops(job) == sops(files)
    assert created_at(job) - last >= 4.5
    time.sleep(1)
    assert len(group[0].jobs()) == 1


def test_scenario_2a_three_studies_interleaved_over_replicas(tmp_path, postgres_server, replicas):
    """Scenario 2 (groupBy Study): three studies' instances interleaved over three replicas
    in parallel associations -> three jobs, one per study, each with its own instances."""
    dsn = postgres_server.fresh_database("scenario2a")
    config = imported_config(tmp_path / "cfg", FIXTURES / "scenario2.json", "scenario-2")
    group = replicas(3, config, dsn)
    studies = [write_study(tmp_path / f"s{i}", slices=6, rows=32, cols=32, patient_id="PATIENT-Z") for i in range(3)]
    everything = [f for files in studies for f in files]
    send_together([(group[i], everything[i::3]) for i in range(3)])
    jobs = wait_for(lambda: len(group[0].jobs()) >= 3 and group[0].jobs(), 25, what="three jobs")
    time.sleep(1)
    jobs = group[0].jobs()
    assert len(jobs) == 3
    assert sorted(payload_sops(j) for j in jobs) == sorted(sops(files) for files in studies)
