"""TLS export (SPEC §9): C-STORE over DICOM TLS to dcmtk's ``storescp +tls``, with a
CA, server and client certificates made by the test. The destination's Secret is
read from ``<storageDir>/secrets/<name>/`` (ca.crt, tls.crt, tls.key)."""
from __future__ import annotations

import logging

import pytest

from clara_results.models import TaskState

from export_testlib import received, sop_uids, write_series
from peers import StoreSCP
from tlscerts import CA

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def pki():
    ca, other = CA("clara-test-ca"), CA("some-other-ca")
    return {"ca": ca, "other": other,
            "server": ca.issue("pacs.example.test", dns=["pacs.example.test", "localhost"], ips=["127.0.0.1"]),
            "client": ca.issue("clara-scu", client=True)}


@pytest.fixture
def tls_storescp(tmp_path, pki, dcmtk_available):
    started: list[StoreSCP] = []

    def start(name: str, require_client_cert: bool = False) -> StoreSCP:
        key, cert = pki["server"].write(tmp_path / "pki", "server")
        ca = tmp_path / "pki" / "ca.crt"
        ca.write_bytes(pki["ca"].pem)
        peer = ["-rc", "+cf", str(ca)] if require_client_cert else ["-ic"]
        scp = StoreSCP(tmp_path / "scp" / name, extra=["+tls", str(key), str(cert), "-pw", *peer])
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def failures_logged(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if "failed (" in r.getMessage())


def test_tls_export_with_client_certificate(tmp_path, export_harness, tls_storescp, pki):
    h = export_harness()
    scp = tls_storescp("mutual", require_client_cert=True)
    h.secret("pacs-tls", ca_crt=pki["ca"].pem, tls_crt=pki["client"].cert_pem, tls_key=pki["client"].key_pem)
    h.tls_destination("pacs", scp.port, "pacs-tls", server_name="pacs.example.test")
    files = write_series(h.payloads / "p1" / "out", 4)
    task = h.wait_finished(h.submit_folder("p1", "pacs").id)
    assert task.state == TaskState.SUCCEEDED and task.retries == 0
    assert received(tmp_path / "scp" / "mutual") == sop_uids(files)


def test_tls_export_verifies_the_host_without_server_name(tmp_path, export_harness, tls_storescp, pki):
    h = export_harness()
    scp = tls_storescp("server-only")
    h.secret("pacs-ca", ca_crt=pki["ca"].pem)  # no client certificate: storescp -ic does not ask for one
    h.tls_destination("pacs", scp.port, "pacs-ca")  # certificate has IP 127.0.0.1
    files = write_series(h.payloads / "p1" / "out", 3)
    assert h.wait_finished(h.submit_folder("p1", "pacs").id).state == TaskState.SUCCEEDED
    assert received(tmp_path / "scp" / "server-only") == sop_uids(files)


def test_wrong_ca_fails_permanently_and_says_so(tmp_path, export_harness, tls_storescp, pki, caplog):
    caplog.set_level(logging.INFO, logger="clara_adapter.export.agent")
    h = export_harness(max_retries=3)
    scp = tls_storescp("wrong-ca")
    h.secret("other-ca", ca_crt=pki["other"].pem)
    h.tls_destination("pacs", scp.port, "other-ca")
    write_series(h.payloads / "p1" / "out", 2)
    task = h.wait_finished(h.submit_folder("p1", "pacs").id)
    assert (task.state, task.retries) == (TaskState.FAILED, 1)  # permanent: retrying cannot help
    assert "not trusted by the configured CA" in failures_logged(caplog)
    assert received(tmp_path / "scp" / "wrong-ca") == set()


def test_wrong_server_name_fails_permanently(tmp_path, export_harness, tls_storescp, pki, caplog):
    caplog.set_level(logging.INFO, logger="clara_adapter.export.agent")
    h = export_harness(max_retries=3)
    scp = tls_storescp("wrong-name")
    h.secret("pacs-ca", ca_crt=pki["ca"].pem)
    h.tls_destination("pacs", scp.port, "pacs-ca", server_name="another.example.test")
    write_series(h.payloads / "p1" / "out", 2)
    task = h.wait_finished(h.submit_folder("p1", "pacs").id)
    assert (task.state, task.retries) == (TaskState.FAILED, 1)
    assert "certificate is not valid for another.example.test" in failures_logged(caplog)


@pytest.mark.parametrize("keys, message", [
    (None, "Secret pacs-tls not found"),
    ({"tls_crt": b"x"}, "Secret pacs-tls has no key ca.crt"),
    ({"ca_crt": b"not a certificate"}, "ca.crt is not a PEM CA certificate"),
    ({"ca_crt": "CA", "tls_crt": "CLIENT"}, "has tls.crt without tls.key"),
])
def test_unusable_tls_secret_fails_permanently_naming_it(tmp_path, export_harness, tls_storescp, pki, caplog,
                                                        keys, message):
    caplog.set_level(logging.INFO, logger="clara_adapter.export.agent")
    h = export_harness(max_retries=3)
    scp = tls_storescp("no-secret")
    if keys is not None:
        real = {"CA": pki["ca"].pem, "CLIENT": pki["client"].cert_pem}
        h.secret("pacs-tls", **{k: real.get(v, v) if isinstance(v, str) else v for k, v in keys.items()})
    h.tls_destination("pacs", scp.port, "pacs-tls")
    write_series(h.payloads / "p1" / "out", 2)
    task = h.wait_finished(h.submit_folder("p1", "pacs").id)
    assert (task.state, task.retries) == (TaskState.FAILED, 1)
    logged = failures_logged(caplog)
    assert "cannot be served" in logged and message in logged, logged
    assert message in h.agent.destination_problems()["pacs"]


def test_destinations_the_agent_cannot_serve_are_reported_until_fixed(export_harness, pki, caplog):
    """What Kubernetes mode publishes for the operator's ClaraDestination conditions."""
    from peers import free_port, wait_for

    caplog.set_level(logging.INFO, logger="clara_adapter.export.agent")
    h = export_harness()
    reported: list[dict[str, str]] = []
    h.agent.problem_check_seconds = 0.05
    h.agent.on_destination_problems = reported.append
    h.tls_destination("pacs", free_port(), "pacs-tls")
    h.dicomweb_destination("web", "http://127.0.0.1:1/dicom-web", token_secret="web-token")
    h.destination("plain", free_port())
    wait_for(lambda: reported and set(reported[-1]) == {"pacs", "web"}, 10, what="problems reported")
    assert "Secret pacs-tls not found" in reported[-1]["pacs"]
    assert "Secret web-token not found" in reported[-1]["web"]
    assert h.agent.status()["exportAgent"]["destinationProblems"] == reported[-1]
    assert "destination pacs cannot be served" in caplog.text
    h.secret("pacs-tls", ca_crt=pki["ca"].pem)
    h.secret("web-token", token="t0k3n")
    wait_for(lambda: reported[-1] == {}, 10, what="problems cleared")
    assert "destination pacs can be served again" in caplog.text
    assert "t0k3n" not in caplog.text
