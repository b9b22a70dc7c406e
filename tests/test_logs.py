"""Log lines a cluster can index: --log-format / CLARA_LOG_FORMAT, stable JSON
fields, and no patient data in any line of a real receive-and-group run."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from clara_dicom import logs
from local_setup import write_config
from peers import REPO, storescu, wait_for

STABLE = {"time", "level", "component", "logger", "message"}


@pytest.fixture
def captured():
    """The root logger set up as the CLI does, writing into a buffer."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()

    def setup(fmt: str, component: str = "adapter") -> io.StringIO:
        logs.setup_logging(logging.INFO, fmt, component)
        root.handlers[0].setStream(stream)
        return stream

    yield setup
    root.handlers[:], root.level = saved[0], saved[1]


def test_json_line_has_the_stable_fields(captured):
    out = captured("json", "adapter")
    log = logging.getLogger("clara_adapter.test")
    log.info("group %s of %s closed", "abc123", "CLARA",
             extra=logs.fields("group.closed", aeTitle="CLARA", group="abc123"))
    with logs.log_context(aeTitle="CT_AI"):
        log.warning("refused")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    log.info("outside")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert STABLE <= set(line), line
        assert line["component"] == "adapter" and line["logger"] == "clara_adapter.test"
        assert line["time"].endswith("Z") and "T" in line["time"]
    first, refused, failed, outside = lines
    assert first["message"] == "group abc123 of CLARA closed" and first["level"] == "INFO"
    assert (first["event"], first["aeTitle"], first["group"]) == ("group.closed", "CLARA", "abc123")
    assert refused["aeTitle"] == "CT_AI" and refused["level"] == "WARNING"
    assert failed["aeTitle"] == "CT_AI" and "RuntimeError: boom" in failed["exception"]
    assert "aeTitle" not in outside  # the context ended with its block


def test_text_stays_the_classic_line(captured):
    out = captured("text")
    logging.getLogger("clara_adapter.test").info("hello %s", "world", extra=logs.fields(aeTitle="CLARA"))
    line = out.getvalue().strip()
    assert line.endswith(" INFO clara_adapter.test: hello world")
    with pytest.raises(ValueError):
        json.loads(line)


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="PatientID"):
        logs.fields(PatientID="x")


def test_format_from_flag_then_environment_then_text():
    assert logs.resolve_format(None, {}) == "text"
    assert logs.resolve_format(None, {"CLARA_LOG_FORMAT": "json"}) == "json"
    assert logs.resolve_format("text", {"CLARA_LOG_FORMAT": "json"}) == "text"
    with pytest.raises(ValueError, match="CLARA_LOG_FORMAT"):
        logs.resolve_format(None, {"CLARA_LOG_FORMAT": "yaml"})


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "clara_dicom.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=60)


@pytest.mark.parametrize("argv,env,where", [
    (["--log-format", "yaml", "jobs", "list"], {}, "--log-format"),
    (["jobs", "list", "--log-format", "xml"], {}, "--log-format"),
    (["jobs", "list"], {"CLARA_LOG_FORMAT": "yaml"}, "CLARA_LOG_FORMAT"),
])
def test_bad_format_is_one_line_usage_error(argv, env, where):
    res = _cli(*argv, env=env)
    assert res.returncode == 2
    assert where in res.stderr.strip().splitlines()[-1] and "Traceback" not in res.stderr


def test_register_results_takes_the_options(tmp_path):
    """register-results logs its retries as JSON lines too (no service listening: it gives up)."""
    import os

    env = {**os.environ, "CLARA_RESULTS_URL": "http://127.0.0.1:9", "CLARA_JOB_ID": "j", "CLARA_PIPELINE_ID": "p",
           "CLARA_PAYLOAD_ID": "x", "CLARA_OPERATOR": "op", "CLARA_RESULTS_TOKEN": "t",
           "CLARA_PAYLOAD_ROOT": str(tmp_path), "CLARA_LOG_FORMAT": "json"}
    (tmp_path / "out.dcm").write_bytes(b"x")
    res = subprocess.run([sys.executable, "-m", "clara_results.register", "--agent", "ClaraSCU", "--input",
                          str(tmp_path), "--attempts", "2", "--retry-wait", "0"], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=60)
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    retry = json.loads(lines[0])
    assert retry["component"] == "register-results" and retry["level"] == "WARNING"
    assert "retrying" in retry["message"]
    assert lines[-1].startswith("register-results: error:")  # the user's one line stays plain


def test_no_patient_data_in_json_logs_of_a_receive_and_group_run(local_adapter, tmp_path):
    """Group by PatientID, DEBUG level: every line is JSON with the stable fields, the group
    close and job creation carry aeTitle/job/group, and neither the PatientID nor the
    PatientName appears anywhere."""
    from clara_dicom.synthetic import write_study

    patient = "PID-7734-SECRET"
    files = write_study(tmp_path / "study", slices=3, rows=16, cols=16, patient_id=patient)
    config = write_config(tmp_path / "config", ae="LOGTEST",
                          processor="groupBy: Patient\ntimeout: 5\npipelines: {seg: seg-pipeline}")
    adapter = local_adapter(config, extra=["--log-format", "json", "--log-level", "DEBUG"])
    storescu(files, adapter.dicom_port, called="LOGTEST", calling="STORESCU")
    storescu(files[:1], adapter.dicom_port, called="NOSUCHAE", calling="STORESCU", check=False)  # refused
    wait_for(lambda: adapter.jobs(), timeout=30, what="the pipeline job")
    wait_for(lambda: '"job.created"' in adapter.log(), timeout=10, what="the job-created log line")
    adapter.stop()
    text = adapter.log()
    assert text.strip()
    lines = []
    for raw in text.strip().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            pytest.fail(f"not a JSON line: {raw!r}")
    for line in lines:
        assert STABLE <= set(line), line
        assert line["component"] == "up"
    closed = [line for line in lines if line.get("event") == "group.closed"]
    created = [line for line in lines if line.get("event") == "job.created"]
    assert len(closed) == 1 and closed[0]["aeTitle"] == "LOGTEST" and len(closed[0]["group"]) == 10
    assert len(created) == 1 and created[0]["group"] == closed[0]["group"]
    assert created[0]["job"] == adapter.jobs()[0]["metadata"]["name"]
    for secret in (patient, "SYNTHETIC", "7734"):
        assert secret not in text, f"{secret!r} reached a log line"
