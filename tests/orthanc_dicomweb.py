"""Debian's Orthanc with its DICOMweb plugin, as a STOW-RS client (``servers``) and
server (``/dicom-web/``), on loopback. Used by tests/test_stow.py and bench/stow.py."""
from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Any

from peers import Process, free_port, port_open, wait_for

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancWeb(Process):
    """Orthanc with the DICOMweb plugin; TCP_NODELAY=1 as every benchmark peer."""

    def __init__(self, workdir: Path, servers: dict[str, tuple[str, str | None]] | None = None):
        """``servers``: name -> (STOW-RS base URL, bearer token or None)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        config = {
            "Name": "clara-stow-test", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"), "StorageCompression": False,
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpServerEnabled": True, "SaveJobs": False,
            "Plugins": [PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {
                name: {"Url": url, **({"HttpHeaders": {"Authorization": f"Bearer {token}"}} if token else {})}
                for name, (url, token) in (servers or {}).items()
            }},
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1))
        super().__init__(["Orthanc", "--no-jobs", str(cfg)], self.workdir / "orthanc.log",
                         env={**os.environ, "TCP_NODELAY": "1"})
        wait_for(lambda: port_open(self.http_port) or not self.alive(), 30, what="Orthanc")
        if not self.alive():
            raise RuntimeError(f"Orthanc did not start: {self.log()[-2000:]}")

    def call(self, method: str, path: str, body: bytes | None = None, timeout: float = 300) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request(method, path, body=body)
            rsp = conn.getresponse()
            data = rsp.read()
            return rsp.status, json.loads(data) if data else None
        finally:
            conn.close()

    def upload(self, files: list[Path]) -> str:
        study = ""
        for f in files:
            status, info = self.call("POST", "/instances", f.read_bytes())
            assert status == 200, info
            study = info["ParentStudy"]
        return study

    def delete_all(self) -> None:
        _, studies = self.call("GET", "/studies")
        for study in studies:
            self.call("DELETE", f"/studies/{study}")
