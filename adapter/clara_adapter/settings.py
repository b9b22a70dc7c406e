"""Adapter settings (not resources): from a settings file, the environment and flags.

Precedence, lowest first: defaults < settings file (YAML/JSON) < environment
(``CLARA_`` + the field name in upper snake case, e.g. ``CLARA_DICOM_PORT``) <
command-line flags. The convention and the loading are shared by every component
(:mod:`clara_dicom.settings`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

from pydantic import Field, model_validator

from clara_dicom.models import AE_TITLE_PATTERN, AGENT_PATTERN
from clara_dicom.settings import ENV_PREFIX, ComponentSettings, env_name, results_token

__all__ = ["AdapterSettings", "ENV_PREFIX", "env_name", "load_settings"]


class AdapterSettings(ComponentSettings):
    component: ClassVar[str] = "adapter (clara-dicom up, clara-dicom adapter)"
    flags: ClassVar[dict[str, str]] = {"host": "--host", "dicomPort": "--dicom-port", "httpPort": "--http-port",
                                       "storageDir": "--storage (adapter), --state (up)", "journal": "--journal",
                                       "namespace": "--namespace", "configMap": "--config-map",
                                       "statusConfigMap": "--status-config-map"}

    # DICOM SCP
    host: str = Field("0.0.0.0", description="Address the DICOM and HTTP ports bind to.")
    dicomPort: int = Field(11112, ge=1, le=65535, description="DICOM (C-STORE SCP) port.")
    httpPort: int = Field(8080, ge=0, le=65535, description="Health and metrics port (0: none).")
    maxAssociations: int = Field(32, ge=1, le=1000, description="Concurrent inbound associations.")
    maxPduSize: int = Field(262144, ge=0, description="Largest PDU we accept (0: unlimited).")
    acseTimeout: float = Field(30, gt=0, description="Seconds to wait for association messages.")
    artimTimeout: float = Field(10, gt=0, description="Seconds a connection may take to send its A-ASSOCIATE-RQ "
                                                      "(and finish the TLS handshake) before it is closed.")
    dimseTimeout: float = Field(60, gt=0, description="Seconds to wait for DIMSE messages.")
    networkTimeout: float = Field(60, gt=0, description="Seconds of network inactivity before closing.")
    receiveWorkers: int | None = Field(
        # 0 by default: on 2 cores the coordinator hop costs more than the parallel parsing gains (bench/ingest.py)
        0, ge=0, le=256, description="Processes receiving DICOM on the shared port, with admission and commits "
        "in the main process (0, the default: receive in the main process; null: one per CPU core available).")
    rejectUnknownSources: bool = Field(True, description="Refuse calling AE titles/hosts that are no ClaraSource.")
    tlsCertFile: str | None = Field(None, description="PEM certificate for inbound DICOM TLS.")
    tlsKeyFile: str | None = Field(None, description="PEM key for inbound DICOM TLS.")
    tlsCaFile: str | None = Field(None, description="CA bundle to verify client certificates (mutual TLS).")

    # Kubernetes mode (clara-dicom adapter)
    namespace: str | None = Field(None, description="Kubernetes mode: namespace of the resources (default: the "
                                  "pod's namespace, else default).")
    configMap: str = Field("clara-dicom-adapter-config", min_length=1,
                           description="Kubernetes mode: ConfigMap the operator renders for the adapter.")
    statusConfigMap: str = Field("clara-dicom-adapter-status", min_length=1,
                                 description="Kubernetes mode: ConfigMap where the adapter publishes appliedVersion.")

    # storage
    storageDir: str = Field("/var/lib/clara-dicom", description="Root of incoming files, payloads and journal.")
    watermarkPercent: float = Field(85, gt=0, le=100, description="Refuse data when disk usage reaches this %.")
    reserveSpaceGB: float = Field(5, ge=0, description="Refuse data when free space falls below this many GB.")
    fsyncFiles: bool = Field(False, description="Power-loss safety: fsync each stored file and its directory, and "
                             "commit the SQLite journal with synchronous=FULL, before acknowledging.")
    journal: str = Field("", description="Journal: empty for SQLite under the storage root, a file path for SQLite "
                         "elsewhere, or a postgresql:// DSN (a database several adapters may share).")

    # jobs
    jobRetryMaxSeconds: float = Field(30, gt=0, description="Longest backoff between job-creation retries.")
    payloadRetentionHours: float = Field(72, gt=0, description="Delete payload folders older than this.")
    jobRecordRetentionHours: float = Field(
        168, gt=0, description="Local mode: delete PipelineJob records (state/jobs) older than this.")

    # SCU export agent
    scuAeTitle: str = Field("ClaraSCU", pattern=AE_TITLE_PATTERN, description="Calling AE title for exports.")
    agent: str = Field("ClaraSCU", pattern=AGENT_PATTERN, description="Results Service agent to take tasks for.")
    resultsUrl: str | None = Field(None, description="Results Service URL (export agent disabled when unset).")
    resultsToken: str | None = Field(None, description="Results Service bearer token.", repr=False)
    resultsTokenFile: str | None = Field(None, description="File holding the Results Service token.")
    exportConcurrency: int = Field(8, ge=1, le=64, description="Parallel export associations.")
    failureThreshold: float = Field(0.5, ge=0, le=1, description="A task fails when more than this share fails.")
    exportPollSeconds: float = Field(1.0, gt=0, description="Poll interval when no tasks are pending.")

    # STOW-RS (DICOMweb) ingest on the HTTP port
    stowToken: str | None = Field(None, description="Bearer token STOW-RS clients must send (STOW-RS off when unset).",
                                  repr=False)
    stowMaxInstanceMB: float = Field(2048, gt=0, description="STOW-RS: largest instance accepted, in MiB.")
    stowMaxRequestMB: float = Field(65536, gt=0, description="STOW-RS: largest request body accepted, in MiB.")

    @model_validator(mode="after")
    def _tls_pair(self) -> "AdapterSettings":
        if bool(self.tlsCertFile) != bool(self.tlsKeyFile):
            raise ValueError("tlsCertFile and tlsKeyFile must be set together")
        return self

    @property
    def receive_workers(self) -> int:
        if self.receiveWorkers is not None:
            return self.receiveWorkers
        return usable_cores()

    @property
    def incoming_dir(self) -> Path:
        return Path(self.storageDir) / "incoming"

    @property
    def payloads_dir(self) -> Path:
        return Path(self.storageDir) / "payloads"

    @property
    def journal_path(self) -> Path:
        return Path(self.storageDir) / "journal.sqlite"

    def results_token(self) -> str | None:
        return results_token(self.resultsToken, self.resultsTokenFile)


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPU cores this process may use: its affinity, capped by a cgroup v2 CPU
    limit (a pod limited to 2 CPUs on a 64-core node gets 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores



def load_settings(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AdapterSettings:
    """Build settings from a file, the environment and explicit overrides (flags; None = not given)."""
    return AdapterSettings.load(file, env=env, flags=overrides)
