"""STOW-RS into an AE title (SPEC §9 "DICOMweb"): `clara-dicom up` with a stowToken,
pushed to by Orthanc's DICOMweb plugin (one chunked request per study) and by plain
HTTP clients; every answer is checked against PS3.18, and what was acknowledged
must reach the pipeline job exactly as sent."""
from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable

import pytest
from pydicom import dcmread

from local_setup import require, write_config
from orthanc_dicomweb import PLUGIN, OrthancWeb
from peers import LocalAdapter, metric_value, stops_what_it_starts, storescu, wait_for

TOKEN = "stow-test-token"
BOUNDARY = "clara-test-boundary-7f3a"
CTYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
WEB_SOURCE = """
---
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraSource
metadata: {name: dicomweb-local}
spec: {aeTitle: DICOMWEB, host: 127.0.0.1}
"""
REFERENCED, FAILED = "00081199", "00081198"


@pytest.fixture(scope="module")
def orthanc_dicomweb() -> None:
    require(shutil.which("Orthanc") is not None and Path(PLUGIN).exists(),
            "Orthanc with its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")


@pytest.fixture
def stow_adapter(tmp_path, dcmtk_available):
    """`clara-dicom up` serving STOW-RS into AE title CLARA (group by study, 5 s quiet)."""
    numbers = itertools.count()

    def start(token: str | None = TOKEN, extra_config: str = WEB_SOURCE, processor: str | None = None,
              env: dict[str, str] | None = None) -> LocalAdapter:
        n = next(numbers)
        config = write_config(tmp_path / f"config{n}", ae="CLARA",
                              processor=processor or "timeout: 5\npipelines: {seg: seg-pipeline}",
                              extra=extra_config)
        environment = {**os.environ, **(env or {})}
        environment.pop("CLARA_STOW_TOKEN", None)
        if token:
            environment["CLARA_STOW_TOKEN"] = token
        return LocalAdapter(config, tmp_path / f"state{n}", env=environment)

    yield from stops_what_it_starts(start)


def multipart(files: Iterable[Path | bytes], boundary: str = BOUNDARY, part_type: str = "application/dicom",
              close: bool = True) -> bytes:
    out = b""
    for f in files:
        data = f if isinstance(f, bytes) else Path(f).read_bytes()
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def post(port: int, body: bytes | Iterable[bytes], path: str = "/dicomweb/aetitles/CLARA/studies",
         ctype: str = CTYPE, token: str | None = TOKEN, chunked: bool = False,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    h = {"Content-Type": ctype, **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if chunked:
            conn.request("POST", path, body=iter(body if isinstance(body, list) else [body]), headers=h,
                         encode_chunked=True)
        else:
            conn.request("POST", path, body=body, headers=h)
        rsp = conn.getresponse()
        data = rsp.read()
        assert rsp.getheader("Content-Type", "").startswith(("application/dicom+json", "application/json")), data
        return rsp.status, json.loads(data)
    finally:
        conn.close()


def referenced(answer: dict[str, Any]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in answer.get(REFERENCED, {}).get("Value", [])]


def failed(answer: dict[str, Any]) -> list[tuple[str, int]]:
    return [(item["00081155"].get("Value", [""])[0], item["00081197"]["Value"][0])
            for item in answer.get(FAILED, {}).get("Value", [])]


def payload_datasets(adapter: LocalAdapter) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes (after the file meta group) of the job's payload."""
    (job,) = adapter.jobs()
    out = {}
    for path in Path(job["spec"]["payload"]["path"]).rglob("*.dcm"):
        ds = dcmread(path)
        assert ds.file_meta.SourceApplicationEntityTitle.strip() == "DICOMWEB"
        out[ds.SOPInstanceUID] = _dataset_bytes(path.read_bytes())
    return out


def _dataset_bytes(data: bytes) -> bytes:
    from clara_adapter.stow import parse_file_meta

    _, offset = parse_file_meta(data)
    return data[offset:]


def sop_uid(path: Path) -> str:
    return dcmread(path, stop_before_pixels=True).SOPInstanceUID


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    from clara_dicom.synthetic import write_study

    return write_study(tmp_path_factory.mktemp("stow-study"), slices=12, rows=64, cols=64, patient_id="PAT-STOW")


# --------------------------------------------------------------------------- Orthanc as the client
@pytest.mark.orthanc
def test_orthanc_pushes_a_study_in_one_chunked_request(tmp_path, stow_adapter, study, orthanc_dicomweb):
    adapter = stow_adapter()
    orthanc = OrthancWeb(tmp_path / "orthanc", {"clara": (
        f"http://127.0.0.1:{adapter.http_port}/dicomweb/aetitles/CLARA/", TOKEN)})
    try:
        study_id = orthanc.upload(study)
        status, answer = orthanc.call("POST", "/dicom-web/servers/clara/stow", json.dumps(
            {"Resources": [study_id], "Synchronous": True}).encode())
        assert status == 200, (answer, orthanc.log()[-2000:])
        wait_for(adapter.jobs, 30, what="the pipeline job")
        sent = {sop_uid(f): _dataset_bytes(f.read_bytes()) for f in study}
        assert payload_datasets(adapter) == sent  # every instance, byte for byte, in one job
        assert metric_value(adapter.metrics(), "clara_stow_requests_total", status="200") == 1
        assert metric_value(adapter.metrics(), "clara_instances_received_total", ae_title="CLARA") == len(study)
    finally:
        orthanc.stop()


@pytest.mark.orthanc
def test_orthanc_reports_failure_when_the_token_is_wrong(tmp_path, stow_adapter, study, orthanc_dicomweb):
    adapter = stow_adapter()
    orthanc = OrthancWeb(tmp_path / "orthanc", {"clara": (
        f"http://127.0.0.1:{adapter.http_port}/dicomweb/aetitles/CLARA/", "not-the-token")})
    try:
        study_id = orthanc.upload(study[:2])
        status, _ = orthanc.call("POST", "/dicom-web/servers/clara/stow", json.dumps(
            {"Resources": [study_id], "Synchronous": True}).encode())
        assert status != 200
        assert metric_value(adapter.metrics(), "clara_stow_requests_total", status="403") == 1
        assert adapter.status()["instancesHeld"] == 0
    finally:
        orthanc.stop()


# --------------------------------------------------------------------------- plain HTTP clients
def test_all_stored_then_the_same_job_rules_as_c_store(stow_adapter, study):
    """200 with one ReferencedSOPSequence item per instance, chunked or not; a
    study sent partly by STOW-RS and partly by C-STORE is one group, one job."""
    adapter = stow_adapter()  # its configuration also has the ClaraSource for storescu
    status, answer = post(adapter.http_port, [multipart(study[:4])], chunked=True)
    assert status == 200 and referenced(answer) == [sop_uid(f) for f in study[:4]] and FAILED not in answer
    status, answer = post(adapter.http_port, multipart(study[4:8]),
                          path=f"/dicomweb/aetitles/CLARA/studies/{dcmread(study[0]).StudyInstanceUID}")
    assert status == 200 and len(referenced(answer)) == 4
    storescu(study[8:], adapter.dicom_port, called="CLARA", calling="STORESCU")
    status, answer = post(adapter.http_port, multipart(study[:1]))  # a duplicate: acknowledged again
    assert status == 200 and referenced(answer) == [sop_uid(study[0])]
    wait_for(adapter.jobs, 30, what="the pipeline job")
    assert len(adapter.jobs()) == 1 and adapter.jobs()[0]["spec"]["payload"]["instances"] == len(study)


def test_some_failed_is_202_and_none_stored_is_409(stow_adapter, study, tmp_path):
    adapter = stow_adapter()
    whole = study[0].read_bytes()
    truncated = whole[: len(whole) - 1000]  # the pixel data element overruns the part
    not_dicom = b"this is not a DICOM file, it has no DICM prefix" * 10
    status, answer = post(adapter.http_port, multipart([study[1], truncated, not_dicom]))
    assert status == 202
    assert referenced(answer) == [sop_uid(study[1])]
    assert failed(answer) == [(sop_uid(study[0]), 0xC000), ("", 0xC000)]
    status, answer = post(adapter.http_port, multipart([truncated]))
    assert status == 409 and REFERENCED not in answer and failed(answer) == [(sop_uid(study[0]), 0xC000)]
    status, answer = post(adapter.http_port, multipart([study[2]], part_type="application/octet-stream"))
    assert status == 409 and failed(answer) == [("", 0xC000)]
    other_study = dcmread(study[3])
    status, answer = post(adapter.http_port, multipart([study[3]]), path="/dicomweb/aetitles/CLARA/studies/1.2.3.4")
    assert status == 409 and failed(answer) == [(other_study.SOPInstanceUID, 0xC000)]
    assert adapter.status()["instancesHeld"] == 1  # only the one acknowledged
    assert not [p for p in (adapter.state / "incoming").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("case", ["no_closing_boundary", "garbage", "no_parts", "no_boundary_param",
                                  "body_shorter_than_length", "bad_chunk"])
def test_malformed_multipart_is_400_and_stores_nothing(stow_adapter, study, case):
    adapter = stow_adapter()
    port = adapter.http_port
    if case == "no_closing_boundary":
        status, answer = post(port, multipart(study[:2], close=False))
    elif case == "garbage":
        status, answer = post(port, b"\x00\x01 this is not multipart at all " * 50)
    elif case == "no_parts":
        status, answer = post(port, f"--{BOUNDARY}--\r\n".encode())
    elif case == "no_boundary_param":
        status, answer = post(port, multipart(study[:1]), ctype='multipart/related; type="application/dicom"')
    elif case == "body_shorter_than_length":
        body = multipart(study[:2])
        status, answer = raw_post(port, body[: len(body) // 2], {"Content-Length": str(len(body))})
    else:
        status, answer = raw_post(port, b"zz\r\nnot a chunk\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"})
    assert status == 400, answer
    assert answer["message"]
    assert adapter.status()["instancesHeld"] == 0
    assert not list((adapter.state / "incoming").iterdir())  # no temp file left behind
    assert adapter.ready()  # and the adapter stays up


def raw_post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """A request written by hand (a lying Content-Length, broken chunking); the
    client half-closes after the body so the server sees its end."""
    head = [f"POST /dicomweb/aetitles/CLARA/studies HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {CTYPE}",
            f"Authorization: Bearer {TOKEN}", *[f"{k}: {v}" for k, v in headers.items()], "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall("\r\n".join(head).encode() + body)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_text, _, payload = data.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(payload)


@pytest.mark.parametrize("ctype", ["application/dicom", "multipart/form-data; boundary=x",
                                   'multipart/related; type="application/dicom+json"; boundary=x', ""])
def test_wrong_content_type_is_415(stow_adapter, study, ctype):
    adapter = stow_adapter()
    status, answer = post(adapter.http_port, multipart(study[:1]), ctype=ctype)
    assert status == 415 and answer["message"]


def test_token_and_ae_title_checks(stow_adapter, study):
    adapter = stow_adapter()
    body = multipart(study[:1])
    assert post(adapter.http_port, body, token=None)[0] == 401
    assert post(adapter.http_port, body, token="wrong")[0] == 403
    assert post(adapter.http_port, body, path="/dicomweb/aetitles/NOSUCH/studies")[0] == 404
    assert adapter.status()["instancesHeld"] == 0
    metrics = adapter.metrics()
    for code in ("401", "403", "404"):
        assert metric_value(metrics, "clara_stow_requests_total", status=code) == 1


def test_unknown_source_is_403(stow_adapter, study):
    """Source checks as for C-STORE: calling AE DICOMWEB from the client's address."""
    adapter = stow_adapter(extra_config="")
    status, answer = post(adapter.http_port, multipart(study[:1]))
    assert status == 403 and "DICOMWEB" in answer["message"]


def test_stow_is_off_without_a_token(stow_adapter, study):
    adapter = stow_adapter(token=None)
    status, answer = post(adapter.http_port, multipart(study[:1]))
    assert status == 404 and "stowToken" in answer["message"]


def test_size_limit_is_413_and_stores_nothing(stow_adapter, study):
    adapter = stow_adapter(env={"CLARA_STOW_MAX_INSTANCE_MB": "0.01"})  # ~10 KiB; the slices are ~9 KiB
    big = study[0].read_bytes() + b"\0" * 20000
    status, answer = post(adapter.http_port, [multipart([study[1], big])], chunked=True)
    assert status == 413 and answer["message"]
    assert adapter.status()["instancesHeld"] == 0
    assert adapter.ready()


def test_acknowledged_instances_survive_a_kill(tmp_path, stow_adapter, study):
    """Journal before the answer: SIGKILL right after the 200, restart on the same
    state, and the group still closes into one job with every acknowledged instance."""
    adapter = stow_adapter()
    status, answer = post(adapter.http_port, [multipart(study)], chunked=True)
    assert status == 200 and len(referenced(answer)) == len(study)
    adapter.kill()
    config = tmp_path / "config0" / "config.yaml"
    again = LocalAdapter(config, adapter.state, env={**os.environ, "CLARA_STOW_TOKEN": TOKEN})
    try:
        wait_for(again.jobs, 30, what="the pipeline job after the restart")
        sent = {sop_uid(f): _dataset_bytes(f.read_bytes()) for f in study}
        assert payload_datasets(again) == sent
    finally:
        again.stop()


def test_client_gone_mid_part_stores_nothing_and_the_adapter_stays_up(stow_adapter, study):
    """A chunked upload cut off inside an instance (the client dies): no answer can be
    sent, nothing of the request is stored, no temporary file stays behind."""
    adapter = stow_adapter()
    body = multipart(study[:3])
    head = ["POST /dicomweb/aetitles/CLARA/studies HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {CTYPE}",
            f"Authorization: Bearer {TOKEN}", "Transfer-Encoding: chunked", "", ""]
    cut = len(body) * 2 // 3  # inside the third instance
    with socket.create_connection(("127.0.0.1", adapter.http_port), timeout=30) as sock:
        sock.sendall("\r\n".join(head).encode() + f"{cut:x}\r\n".encode() + body[:cut] + b"\r\n")
        wait_for(lambda: any((adapter.state / "incoming").iterdir()), 10, what="the parts streaming to disk")
    wait_for(lambda: "HTTP connection from" in adapter.log() or "STOW-RS from" in adapter.log(), 10,
             what="the request to end")
    wait_for(lambda: not any((adapter.state / "incoming").iterdir()), 10, what="the temporary files removed")
    assert adapter.status()["instancesHeld"] == 0
    assert "Traceback" not in adapter.log()
    status, answer = post(adapter.http_port, multipart(study[:1]))  # and it still serves
    assert status == 200


def test_sop_uid_differing_from_the_file_meta_is_refused_like_a_c_store(stow_adapter, study):
    """The C-STORE receive path's check: dataset UIDs must match those announced
    (for STOW-RS, the part's file meta group) -> 0xA900, not stored."""
    real = sop_uid(study[5])
    other = real[:-1] + ("1" if real[-1] != "1" else "2")  # same length: only the file meta's copy changes
    lying = study[5].read_bytes().replace(real.encode(), other.encode(), 1)  # the meta group comes first
    adapter = stow_adapter()
    status, answer = post(adapter.http_port, multipart([lying, study[6]]))
    assert status == 202
    assert failed(answer) == [(other, 0xA900)]
    assert referenced(answer) == [sop_uid(study[6])]


def test_chart_turns_stow_on_with_a_secret_reference():
    from test_chart import HELM, by_kind, render

    if HELM is None:
        pytest.skip("helm not built (bash e2e/build.sh)")

    def adapter_env(*args: str) -> dict[str, Any]:
        docs = render(*args)
        dep = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-adapter"))
        return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert "CLARA_STOW_TOKEN" not in adapter_env()  # off by default
    env = adapter_env("--set", "adapter.stow.tokenSecret.name=stow-token")
    assert env["CLARA_STOW_TOKEN"] == {"name": "CLARA_STOW_TOKEN",
                                       "valueFrom": {"secretKeyRef": {"name": "stow-token", "key": "token"}}}
