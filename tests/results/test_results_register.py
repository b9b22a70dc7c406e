"""register-results against a running Results Service (SPEC §4)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clara_results.client import ResultsClient, TaskState
from clara_results.register import main
from results_testlib import TOKEN, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend():
    return "sqlite"  # the register tests need a service, not a particular database


@pytest.fixture
def service(start_server):
    return start_server()


@pytest.fixture
def client(service):
    with ResultsClient(service.url, TOKEN) as c:
        yield c


@pytest.fixture
def job(tmp_path, service, monkeypatch):
    """A job's payload directory with two operators' outputs, and the §4 environment."""
    root = tmp_path / "payloads" / "payload-1"
    dicom = root / "operators" / "dicom-writer" / "dicom"
    (dicom / "series1").mkdir(parents=True)
    (dicom / "series1" / "1.dcm").write_bytes(b"a")
    (dicom / "series1" / "2.dcm").write_bytes(b"b")
    (dicom / "report.txt").write_text("c")
    mhd = root / "operators" / "dicom-reader" / "output"
    mhd.mkdir(parents=True)
    (mhd / "volume.mhd").write_text("d")
    for k in list(os.environ):
        if k.startswith(("CLARA_", "NVIDIA_CLARA_")):
            monkeypatch.delenv(k)
    env = {
        "CLARA_JOB_ID": "liver-job-1", "CLARA_PIPELINE_ID": "liver-tumor", "CLARA_PAYLOAD_ID": "payload-1",
        "CLARA_PAYLOAD_ROOT": str(root), "CLARA_OPERATOR": "register-dicom-output",
        "CLARA_RESULTS_URL": service.url, "CLARA_RESULTS_TOKEN": TOKEN, "CLARA_INPUT_PATHS": str(dicom),
        "CLARA_RESULTS_RETRY_WAIT": "0.05",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {"root": root, "dicom": dicom, "mhd": mhd, "env": env}


DICOM_URIS = ["operators/dicom-writer/dicom/report.txt", "operators/dicom-writer/dicom/series1/1.dcm",
              "operators/dicom-writer/dicom/series1/2.dcm"]


def run_ok(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def run_bad(capsys, *argv, code=2):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert len(err) == 1 and err[0].startswith("register-results: error: "), err
    return err[0]


def test_reference_example_three_destinations(job, client, capsys):
    out = run_ok(capsys, "--agent", "ClaraSCU", "--data", '["Orthanc","DCM4CHEE","ImageViewer1"]')
    assert "3 new task(s)" in out
    tasks = client.list_tasks(agent="ClaraSCU")
    assert [t.parameters for t in tasks] == ['"Orthanc"', '"DCM4CHEE"', '"ImageViewer1"']
    for t in tasks:
        assert list(t.uris) == DICOM_URIS
        assert (t.job_id, t.pipeline_id, t.payload_id, t.operator) == (
            "liver-job-1", "liver-tumor", "payload-1", "register-dicom-output")
        assert t.state == TaskState.PENDING


def test_without_data_one_task_with_null_parameters(job, client, capsys, monkeypatch):
    monkeypatch.setenv("CLARA_OPERATOR", "register-mhd-output")
    run_ok(capsys, "--agent", "renderserver", "--input", str(job["mhd"]))
    tasks = client.list_tasks(agent="renderserver")
    assert len(tasks) == 1
    assert tasks[0].parameters is None
    assert list(tasks[0].uris) == ["operators/dicom-reader/output/volume.mhd"]


def test_running_twice_registers_nothing_new(job, client, capsys):
    run_ok(capsys, "--agent", "ClaraSCU", "--data", '["Orthanc","DCM4CHEE"]')
    out = run_ok(capsys, "--agent", "ClaraSCU", "--data", '["Orthanc","DCM4CHEE"]')
    assert "0 new task(s), 2 already registered" in out
    assert len(client.list_tasks()) == 2


def test_two_operators_of_the_same_job_are_both_kept(job, client, capsys, monkeypatch):
    run_ok(capsys, "--agent", "ClaraSCU", "--data", '["Orthanc"]')
    monkeypatch.setenv("CLARA_OPERATOR", "register-other-output")
    run_ok(capsys, "--agent", "ClaraSCU", "--data", '["Orthanc"]', "--input", str(job["mhd"]))
    tasks = client.list_tasks(agent="ClaraSCU")
    assert sorted(t.operator for t in tasks) == ["register-dicom-output", "register-other-output"]
    assert len({t.id for t in tasks}) == 2


def test_objects_in_data_are_serialised_as_json(job, client, capsys):
    run_ok(capsys, "--agent", "ClaraSCU", "--data", '[{"destination": "Orthanc", "n": 1}, null, [1, 2]]')
    assert [t.parameters for t in client.list_tasks()] == ['{"destination": "Orthanc", "n": 1}', "null", "[1, 2]"]


def test_several_inputs_and_clara_variables(job, client, capsys, monkeypatch):
    for k, nk in [("CLARA_JOB_ID", "NVIDIA_CLARA_JOBID"), ("CLARA_PIPELINE_ID", "NVIDIA_CLARA_PIPELINEID"),
                  ("CLARA_PAYLOAD_ID", "NVIDIA_CLARA_PAYLOADID")]:
        monkeypatch.setenv(nk, job["env"][k])
        monkeypatch.delenv(k)
    monkeypatch.setenv("CLARA_INPUT_PATHS", f"{job['dicom']}:{job['mhd']}:")
    run_ok(capsys, "--agent", "renderserver")
    t, = client.list_tasks()
    assert list(t.uris) == ["operators/dicom-reader/output/volume.mhd", *DICOM_URIS]
    assert t.job_id == "liver-job-1"


def test_symlink_inside_the_payload_is_followed(job, client, capsys):
    os.symlink(job["mhd"], job["dicom"] / "linked")
    run_ok(capsys, "--agent", "renderserver")
    assert "operators/dicom-reader/output/volume.mhd" in client.list_tasks()[0].uris


# --------------------------------------------------------------------------- bad input: exit 2, one line
@pytest.mark.parametrize("data,fragment", [
    ("[", "not valid JSON"),
    ("['Orthanc']", "not valid JSON"),
    ("[NaN]", "not valid JSON"),
    ("", "not valid JSON"),
    ("[]", "non-empty JSON array"),
    ('{"a": 1}', "non-empty JSON array"),
    ('"Orthanc"', "non-empty JSON array"),
    ("null", "non-empty JSON array"),
    ("[" * 100_000, "deeper than 64 levels"),
    ("[" * 65 + "]" * 65, "deeper than 64 levels"),
    ('[{"a": ' * 40 + "1" + "}]" * 40, "deeper than 64 levels"),
    ("[" * 200_000, "longer than 131072 characters"),
    ('["' + "x" * 140_000 + '"]', "longer than 131072 characters"),
    ("[1e999]", "not valid JSON: the number 1e999 is too large"),
    ("[" + "9" * 5000 + "]", "not valid JSON"),
    ("[" + ",".join(["1"] * 1001) + "]", "1001 elements; at most 1000"),
    ('["' + "x" * 70_000 + '"]', "element 0 is longer than 65536"),
])
def test_bad_data(job, client, capsys, data, fragment):
    assert fragment in run_bad(capsys, "--agent", "ClaraSCU", "--data", data)
    assert client.list_tasks() == []


def test_data_at_the_limits_is_accepted(job, client, capsys):
    deep = "[" * 64 + "]" * 64  # one element nested 63 levels below the top array
    brackets_in_strings = '["' + "[" * 500 + '", "\\\"{"]'
    run_ok(capsys, "--agent", "ClaraSCU", "--data", deep)
    run_ok(capsys, "--agent", "renderserver", "--data", brackets_in_strings)
    run_ok(capsys, "--agent", "Viewer", "--data", "[" + ",".join(["1"] * 1000) + "]")
    assert client.list_tasks(agent="ClaraSCU")[0].parameters == "[" * 63 + "]" * 63
    assert [t.parameters for t in client.list_tasks(agent="renderserver")] == ['"' + "[" * 500 + '"', '"\\\"{"']
    assert len(list(client.iter_tasks(agent="Viewer"))) == 1000


def test_deeply_nested_data_from_the_command_line_is_one_line(job, client):
    """The issue's case through the real console script: 100 KB of '[' → exit 2, one line."""
    proc = subprocess.run([sys.executable, "-m", "clara_results.register", "--agent", "ClaraSCU",
                           "--data", "[" * 100_000], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "deeper than 64 levels" in lines[0], lines
    assert client.list_tasks() == []


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.text(alphabet='[]{}",:0123456789.eE-+ tfnaulrs\\\\x\ud800', max_size=300),
    st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
                 lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children,
                                                                                  max_size=4),
                 max_leaves=30).map(json.dumps),
    st.integers(1, 300_000).map(lambda n: "[" * n),
))
def test_any_data_parses_or_is_one_line_user_error(text):
    from clara_dicom.errors import UserError
    from clara_results.register import parse_data

    try:
        parameters = parse_data(text)
    except UserError as exc:
        assert len(str(exc).splitlines()) == 1
    else:
        assert parameters == [json.dumps(json.loads(p)) for p in parameters]  # each one valid JSON


@pytest.mark.parametrize("agent", ["", "1abc", "-abc", "abc-", "a_b", "a b", "a" * 64, "ä"])
def test_bad_agent(job, client, capsys, agent):
    assert "bad agent name" in run_bad(capsys, f"--agent={agent}")
    assert client.list_tasks() == []


def test_no_files_found(job, client, capsys, tmp_path):
    empty = job["root"] / "operators" / "empty" / "out"
    empty.mkdir(parents=True)
    assert "no files found" in run_bad(capsys, "--agent", "ClaraSCU", "--input", str(empty))


def test_input_outside_the_payload_root(job, capsys, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.dcm").write_bytes(b"x")
    assert "outside the payload root" in run_bad(capsys, "--agent", "ClaraSCU", "--input", str(outside))


def test_symlink_escaping_the_payload_root(job, capsys, tmp_path):
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(b"x")
    os.symlink(secret, job["dicom"] / "escape.dcm")
    assert "outside the payload root" in run_bad(capsys, "--agent", "ClaraSCU")


def test_file_name_with_a_newline_is_refused_on_one_line(job, capsys):
    (job["dicom"] / "bad\nname.dcm").write_bytes(b"x")
    assert "cannot be registered" in run_bad(capsys, "--agent", "ClaraSCU")


def test_missing_input(job, capsys, monkeypatch):
    assert "does not exist" in run_bad(capsys, "--agent", "ClaraSCU", "--input", str(job["root"] / "nope"))
    monkeypatch.delenv("CLARA_INPUT_PATHS")
    assert "no input directories" in run_bad(capsys, "--agent", "ClaraSCU")


@pytest.mark.parametrize("var", ["CLARA_JOB_ID", "CLARA_PAYLOAD_ROOT", "CLARA_OPERATOR", "CLARA_RESULTS_URL",
                                 "CLARA_RESULTS_TOKEN"])
def test_missing_environment(job, capsys, monkeypatch, var):
    monkeypatch.delenv(var)
    assert var in run_bad(capsys, "--agent", "ClaraSCU")


def test_bad_payload_id(job, capsys, monkeypatch):
    monkeypatch.setenv("CLARA_PAYLOAD_ID", "../x")
    assert "payload ID" in run_bad(capsys, "--agent", "ClaraSCU")


# --------------------------------------------------------------------------- service problems
def test_unreachable_service_is_retried_then_fails(job, capsys, monkeypatch):
    monkeypatch.setenv("CLARA_RESULTS_URL", f"http://127.0.0.1:{free_port()}")
    rc = main(["--agent", "ClaraSCU", "--attempts", "3", "--retry-wait", "0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert sum("retrying" in line for line in err) == 2
    assert "gave up after 3 attempts" in err[-1]


def test_a_busy_service_is_waited_for_as_long_as_it_asks(job, service, client, capsys, monkeypatch):
    """The Results Service answers 503 with Retry-After: 5 while its database is away:
    register-results waits those 5 s (not its own 0.05 s), then registers."""
    from clara_results import register
    from clara_results.store import StoreUnavailable

    create, failures = service.store.create, []

    def database_away_once(new):
        if not failures:
            failures.append(new)
            raise StoreUnavailable("connection refused")
        return create(new)

    waits: list[float] = []
    monkeypatch.setattr(service.store, "create", database_away_once)
    monkeypatch.setattr(register, "_sleep", waits.append)
    run_ok(capsys, "--agent", "ClaraSCU")
    assert waits == [5.0] and len(failures) == 1
    assert len(client.list_tasks()) == 1


def test_wrong_token_is_a_one_line_failure(job, client, capsys, monkeypatch):
    monkeypatch.setenv("CLARA_RESULTS_TOKEN", "wrong")
    assert "wrong bearer token" in run_bad(capsys, "--agent", "ClaraSCU", code=1)


def test_token_file(job, client, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("CLARA_RESULTS_TOKEN")
    (tmp_path / "token").write_text(TOKEN + "\n")
    run_ok(capsys, "--agent", "ClaraSCU", "--token-file", str(tmp_path / "token"))
    assert len(client.list_tasks()) == 1


# --------------------------------------------------------------------------- entry points
def test_clara_dicom_register_results(job, client, capsys):
    from clara_dicom.cli import main as cli_main

    assert cli_main(["register-results", "--agent", "ClaraSCU", "--data", '["Orthanc"]']) == 0
    assert len(client.list_tasks()) == 1
    assert cli_main(["register-results", "--agent", "ClaraSCU", "--data", "[]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-empty JSON array" in err[0]


def test_python_register_py_from_the_working_directory(job, client, tmp_path):
    workdir = tmp_path / "app"
    workdir.mkdir()
    shutil.copy(REPO / "results" / "register.py", workdir / "register.py")
    env = {**os.environ}
    cmd = [sys.executable, "register.py", "--agent", "ClaraSCU", "--data", '["Orthanc","DCM4CHEE","ImageViewer1"]']
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [t.parameters for t in client.list_tasks()] == ['"Orthanc"', '"DCM4CHEE"', '"ImageViewer1"']
    bad = subprocess.run([sys.executable, "register.py", "--agent", "x-"], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_register_results_console_script(job, client):
    exe = shutil.which("register-results")
    if exe is None:
        pytest.fail("the register-results console script is not installed (pip install -e .)")
    done = subprocess.run([exe, "--agent", "renderserver"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(client.list_tasks(agent="renderserver")) == 1
