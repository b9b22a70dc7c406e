"""Helpers for the export agent tests: an in-process Results Service and agent with a
mutable configuration, payload folders, and DICOM files in several transfer syntaxes.
Real peers (Orthanc, storescp) come from tests/peers.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, RLELossless

from clara_dicom.config import RenderedConfig
from clara_dicom.models import ClaraDestinationSpec
from clara_dicom.synthetic import write_study

from peers import metric_value, wait_for

TOKEN = "export-test-token"
AGENT = "ClaraSCU"


class ExportHarness:
    """Results Service + ExportAgent in this process; destinations editable at runtime."""

    def __init__(self, tmp: Path, max_retries: int = 3, retry_delay: float = 0.05, lease_seconds: float = 60,
                 **settings: Any):
        from clara_adapter.export import ExportAgent
        from clara_adapter.metrics import AdapterMetrics
        from clara_adapter.settings import AdapterSettings
        from clara_results.client import ResultsClient
        from clara_results.server import ResultsServer

        tmp.mkdir(parents=True, exist_ok=True)
        self.results = ResultsServer(port=0, database=str(tmp / "results.sqlite"), token=TOKEN,
                                     max_retries=max_retries, retry_delay=retry_delay,
                                     lease_seconds=lease_seconds).start()
        self.settings = AdapterSettings(storageDir=str(tmp / "state"), exportPollSeconds=0.05,
                                        **{"dimseTimeout": 10, "acseTimeout": 10, **settings})
        self.settings.payloads_dir.mkdir(parents=True, exist_ok=True)
        self.config = RenderedConfig()
        self.metrics = AdapterMetrics()
        self.client = ResultsClient(self.results.url, TOKEN)
        self.agent = ExportAgent.connect(self.settings, lambda: self.config, self.metrics, self.results.url,
                                         TOKEN).start()

    @property
    def payloads(self) -> Path:
        return self.settings.payloads_dir

    def destination(self, name: str, port: int, ae: str = "ANY-SCP") -> None:
        dests = dict(self.config.destinations)
        dests[name] = ClaraDestinationSpec(aeTitle=ae, host="127.0.0.1", port=port)
        self.config = self.config.model_copy(update={"destinations": dests})

    def dicomweb_destination(self, name: str, url: str, token_secret: str | None = None) -> None:
        dests = dict(self.config.destinations)
        ref = {"tokenSecretRef": {"name": token_secret}} if token_secret else {}
        dests[name] = ClaraDestinationSpec.model_validate({"dicomweb": {"url": url, **ref}})
        self.config = self.config.model_copy(update={"destinations": dests})

    def tls_destination(self, name: str, port: int, secret: str, server_name: str | None = None,
                        ae: str = "ANY-SCP") -> None:
        dests = dict(self.config.destinations)
        tls = {"secretRef": {"name": secret}, **({"serverName": server_name} if server_name else {})}
        dests[name] = ClaraDestinationSpec.model_validate({"aeTitle": ae, "host": "127.0.0.1", "port": port,
                                                           "tls": tls})
        self.config = self.config.model_copy(update={"destinations": dests})

    def secret(self, name: str, **keys: bytes | str) -> Path:
        """A Secret as the agent reads it: <storageDir>/secrets/<name>/<key> (a mounted Secret volume)."""
        folder = Path(self.settings.storageDir) / "secrets" / name
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in keys.items():
            (folder / key.replace("_", ".")).write_bytes(value.encode() if isinstance(value, str) else value)
        return folder

    def submit(self, payload_id: str, uris: list[str], parameters: str | None, job: str = "job") -> Any:
        return self.client.create_task(job_id=job, pipeline_id="pipe", payload_id=payload_id, agent=AGENT,
                                       uris=uris, parameters=parameters)

    def submit_unchecked(self, payload_id: str, uris: list[str], parameters: str | None) -> Any:
        """A task straight into the store, past the API's URI checks (as another Clara-compatible
        service, or an old database, might hand out)."""
        from clara_results.models import NewTask

        task, _ = self.results.store.create(NewTask(job_id="raw", pipeline_id="pipe", payload_id=payload_id,
                                                    agent=AGENT, uris=tuple(uris), parameters=parameters))
        return task

    def submit_folder(self, payload_id: str, destination: str) -> Any:
        root = self.payloads / payload_id
        uris = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return self.submit(payload_id, uris, json.dumps(destination), job=payload_id)

    def wait_finished(self, task_id: str, timeout: float = 30) -> Any:
        return wait_for(lambda: (t := self.client.get_task(task_id)).state.finished and t, timeout,
                        what=f"task {task_id} finished")

    def metric(self, name: str, outcome: str) -> float:
        return metric_value(self.metrics.render().decode(), name, outcome=outcome)

    def wait_metric(self, name: str, outcome: str, value: float, timeout: float = 10) -> None:
        """The agent counts a report once the service has answered it: just after the
        task's new state is visible to us, so wait for the count rather than read it."""
        wait_for(lambda: self.metric(name, outcome) == value, timeout,
                 what=f"{name}{{outcome={outcome}}} == {value}")

    def stop(self) -> None:
        self.agent.stop(grace=5)
        self.client.close()
        self.results.stop()


def write_series(folder: Path, n: int, transfer_syntax: str | None = None, patient: str = "PAT-EXP") -> list[Path]:
    """``n`` small (64x64) CT slices; Explicit VR LE, or re-encoded as RLE Lossless, or
    JPEG-LS Lossless (fake codestream: no codec here can decode it)."""
    paths = write_study(folder, slices=n, rows=64, cols=64, patient_id=patient)
    if transfer_syntax is None:
        return paths
    from pydicom import dcmread

    for p in paths:
        ds = dcmread(p)
        if transfer_syntax == RLELossless:
            ds.compress(RLELossless, generate_instance_uid=False)
        elif transfer_syntax == JPEGLSLossless:
            ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 60 + b"\xff\xd9"])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        else:
            raise ValueError(transfer_syntax)
        ds.save_as(p, enforce_file_format=True)
    return paths


def sop_uids(paths: list[Path]) -> set[str]:
    from pydicom import dcmread

    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def received(folder: Path) -> set[str]:
    """SOP Instance UIDs of the files a storescp wrote into ``folder``."""
    return sop_uids([p for p in folder.iterdir() if p.is_file()]) if folder.exists() else set()
