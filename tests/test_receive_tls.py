"""Inbound DICOM TLS against dcmtk's storescu, with certificates this test
makes (openssl CLI): mutual TLS, a client without a certificate refused when
tlsCaFile requires one, plain TCP refused, anonymous clients when no CA is set."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from local_setup import require, write_config
from peers import storescu

pytestmark = pytest.mark.dcmtk

HOLD = "pipelines: {seg: seg}\ntimeout: 3600"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    require(shutil.which("openssl") is not None, "openssl (apt-get install openssl)")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=clara-test-ca", cwd=d)
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def tls_adapter(local_adapter, tmp_path: Path, pki: Path, require_client_cert: bool):
    settings = tmp_path / "settings.yaml"
    text = f"tlsCertFile: {pki / 'server.pem'}\ntlsKeyFile: {pki / 'server.key'}\nartimTimeout: 5\n"
    if require_client_cert:
        text += f"tlsCaFile: {pki / 'ca.pem'}\n"
    settings.write_text(text)
    return local_adapter(write_config(tmp_path / "cfg", processor=HOLD), extra=["--settings", str(settings)])


def stored(adapter) -> list[Path]:
    return sorted((adapter.state / "incoming").glob("*.dcm"))


def test_mutual_tls_stores_and_refuses_clients_without_a_certificate(local_adapter, tmp_path, pki, ct_series):
    adapter = tls_adapter(local_adapter, tmp_path, pki, require_client_cert=True)
    client = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]
    storescu(ct_series[:3], adapter.dicom_port, extra=client)
    assert len(stored(adapter)) == 3
    # no client certificate where tlsCaFile requires one
    anonymous = storescu(ct_series[3:4], adapter.dicom_port, extra=["+tla", "+cf", str(pki / "ca.pem")], check=False)
    assert anonymous.returncode != 0
    # plain TCP on the TLS port
    plain = storescu(ct_series[4:5], adapter.dicom_port, check=False, timeout=60)
    assert plain.returncode != 0
    assert len(stored(adapter)) == 3
    storescu(ct_series[5:6], adapter.dicom_port, extra=client)  # still serving
    assert len(stored(adapter)) == 4


def test_tls_without_a_ca_accepts_clients_without_certificates(local_adapter, tmp_path, pki, ct_series):
    adapter = tls_adapter(local_adapter, tmp_path, pki, require_client_cert=False)
    storescu(ct_series[:2], adapter.dicom_port, extra=["+tla", "+cf", str(pki / "ca.pem")])
    assert len(stored(adapter)) == 2
