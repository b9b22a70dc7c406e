"""The adapter process: storage, journal, processors, SCP and health, wired together.

Used by local mode (`clara-dicom up`) and Kubernetes mode (`clara-dicom adapter`);
only the configuration source and the job sink differ.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from clara_dicom.config import RenderedConfig
from clara_dicom.errors import UserError

from clara_adapter.housekeeping import Housekeeper
from clara_adapter.http import HealthServer
from clara_adapter.ingest import Ingest
from clara_adapter.job_sinks import JobSink
from clara_adapter.journal import open_journal
from clara_adapter.metrics import AdapterMetrics
from clara_adapter.processors.base import ProcessorContext
from clara_adapter.receive_coordinator import ReceiveCoordinator
from clara_adapter.scp import StorageSCP
from clara_adapter.settings import AdapterSettings
from clara_adapter.stow import StowService
from clara_adapter.storage import DiskGuard, InstanceStore
from clara_adapter.submitter import JobSubmitter
from clara_adapter.timers import ThreadScheduler

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 30.0
SHARED_SWEEP_MIN_AGE = 600.0


class Adapter:
    def __init__(self, settings: AdapterSettings, sink: JobSink, namespace: str = "default",
                 scheduler: Any = None):
        self.settings = settings
        self.namespace = namespace
        self.metrics = AdapterMetrics()
        self.scheduler = scheduler or ThreadScheduler()
        self.journal = open_journal(settings.journal or str(settings.journal_path), settings.storageDir,
                                    durable=settings.fsyncFiles)
        guard = DiskGuard(settings.incoming_dir.parent, settings.watermarkPercent,
                          int(settings.reserveSpaceGB * 1024**3))
        settings.incoming_dir.mkdir(parents=True, exist_ok=True)
        settings.payloads_dir.mkdir(parents=True, exist_ok=True)
        self.store = InstanceStore(settings.incoming_dir, guard, fsync=settings.fsyncFiles)
        self.submitter = JobSubmitter(sink, settings.payloads_dir, self.scheduler, self.journal, self.metrics,
                                      max_backoff=settings.jobRetryMaxSeconds)
        self.ctx = ProcessorContext(namespace, self.journal, self.scheduler, self.submitter, self.metrics)
        self.ingest = Ingest(self.ctx, self.store, settings.rejectUnknownSources)
        self.extra_status: list[Callable[[], dict[str, Any]]] = []
        if settings.receive_workers:
            self.scp = ReceiveCoordinator(self.ingest, settings, settings.receive_workers,
                                          on_association=self._count_association)
            self.extra_status.append(self.scp.status)
        else:
            self.scp = StorageSCP(self.ingest, settings, on_association=self._count_association)
        # Read at each scrape (housekeeping runs only every 30 s): dashboards show groups as they open.
        self.metrics.groups_open.set_function(self._open_groups)
        self.stow = StowService(self.ingest, settings.stowToken, self.metrics,
                                max_instance_bytes=int(settings.stowMaxInstanceMB * 1024**2),
                                max_request_bytes=int(settings.stowMaxRequestMB * 1024**2))
        self.http: HealthServer | None = None
        self.config_version = ""
        self.started = False
        self.stopping = threading.Event()
        # Local mode's PipelineJob records, purged like payloads (Kubernetes has its own retention).
        self.job_records: Path | None = getattr(sink, "folder", None)
        self.export: Any = None  # the SCU export agent, once start_export() ran
        self.closer: Any = None  # SharedGroupCloser, on a journal replicas share
        self.housekeeper = Housekeeper(HOUSEKEEPING_SECONDS, self._housekeeping)
        # Configuration: applied one at a time, in the order offered; before start() has
        # recovered the journal only the newest offer is kept (applied by start()).
        self._config_lock = threading.Lock()
        self._recovered = False
        self._offered: RenderedConfig | None = None
        self.applied_listeners: list[Callable[[str], None]] = []  # e.g. publish appliedVersion, in order

    def _open_groups(self) -> int:
        # Without the journal lock: a scrape must never hold up a C-STORE commit.
        for _ in range(3):
            try:
                return self.ingest.open_groups()
            except RuntimeError:  # a processor's groups changed while counting: count again
                continue
        return 0

    def _count_association(self, result: str) -> None:
        self.metrics.associations.labels(result).inc()

    # -- configuration --------------------------------------------------------
    def apply_config(self, config: RenderedConfig) -> None:
        """Apply a configuration (any thread). Configurations apply in the order
        offered; one offered before start() waits for recovery, and a newer offer
        replaces it, so an older configuration is never applied after a newer one."""
        with self._config_lock:
            if not self._recovered:
                self._offered = config
                return
            self._apply(config)

    def _apply(self, config: RenderedConfig) -> None:
        with self.ctx.lock:  # the lock housekeeping and the processors take
            self.ingest.apply_config(config)
        if config.version != self.config_version:
            log.info("configuration %s applied: %d AE titles (%s), %d sources, %d destinations", config.version,
                     len(config.aeTitles), ", ".join(sorted(a.aeTitle for a in config.aeTitles.values())) or "none",
                     len(config.sources), len(config.destinations))
        self.config_version = config.version
        for listener in self.applied_listeners:
            listener(config.version)

    # -- lifecycle ------------------------------------------------------------
    def start(self, config: RenderedConfig | None = None) -> None:
        kept = self.journal.instance_paths()
        # Replicas share the incoming folder: spare what another one is receiving now.
        swept = self.store.sweep(kept, min_age=SHARED_SWEEP_MIN_AGE if self.journal.shared else 0.0)
        if swept:
            log.info("removed %d unacknowledged or temporary files from a previous run", swept)
        recovered = self.ingest.recover()
        if recovered:
            log.info("recovered %d acknowledged instances from the journal", recovered)
        with self._config_lock:
            self._recovered = True
            newest = self._offered if self._offered is not None else config  # offers came after `config`
            self._offered = None
            if newest is not None:
                self._apply(newest)
        if self.journal.shared:  # groups of every replica, closed by the database's clock
            from clara_adapter.shared_groups import SharedGroupCloser

            self.closer = SharedGroupCloser(self.ingest, ThreadScheduler(name="clara-closer"))
            self.closer.start()
        s = self.settings
        try:
            self.scp.start(s.host, s.dicomPort)
            if s.httpPort:
                self.http = HealthServer(s.host, s.httpPort, self.status, self.not_ready, self.metrics.render,
                                         stow=self.stow)
                self.http.start()
        except OSError as exc:
            self.scp.stop_accepting() if self.scp.server else None
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port already in use on {s.host} (DICOM {s.dicomPort}, HTTP {s.httpPort}): "
                                "stop the other process or choose another port") from None
            raise UserError(f"cannot listen on {s.host}: {exc.strerror}") from None
        self.housekeeper.start()
        if s.resultsUrl:
            self.start_export(s.resultsUrl, s.results_token())
        self.started = True
        log.info("adapter listening: DICOM %s:%d, HTTP %s (STOW-RS %s)", s.host, s.dicomPort,
                 f"{s.host}:{self.http.port}" if self.http else "off", "on" if s.stowToken and self.http else "off")

    def start_export(self, results_url: str, token: str | None) -> None:
        """Start the SCU export agent against the Results Service at ``results_url``."""
        from clara_adapter.export import ExportAgent

        self.export = ExportAgent.connect(self.settings, lambda: self.ingest.config, self.metrics, results_url, token)
        # Kubernetes mode: destinations the agent cannot serve go to the operator (ClaraDestination conditions).
        self.export.on_destination_problems = getattr(self.submitter.sink, "publish_destination_problems", None)
        self.export.start()
        self.extra_status.append(self.export.status)

    def _housekeeping(self) -> None:
        """On the housekeeping thread, never the timer thread (rmtree can take seconds)."""
        self.metrics.groups_open.set(self.ingest.open_groups())
        with self._config_lock, self.ctx.lock:
            self.ingest.collect_retired()
        purge_older_than(self.settings.payloads_dir, self.settings.payloadRetentionHours * 3600)
        if self.job_records is not None:
            purge_older_than(self.job_records, self.settings.jobRecordRetentionHours * 3600)

    def ready(self) -> bool:
        return self.not_ready() is None

    def not_ready(self) -> str | None:
        """Why this adapter should get no traffic now, or None. A replica whose journal
        is unreachable refuses associations, so it leaves the Service until it is back."""
        if self.stopping.is_set():
            return "stopping"
        if not self.started:
            return "starting"
        if not self.config_version:
            return "no configuration applied yet"
        if not self.journal.available():
            return "journal unreachable"
        return None

    def status(self) -> dict[str, Any]:
        out = {
            "configVersion": self.config_version,
            "activeAssociations": self.scp.active_associations,
            "aeTitles": sorted(self.ingest.routes),
            "groupsOpen": self.ingest.open_groups(),
            "instancesHeld": self.journal.count_instances(),
            "jobSubmissionsPending": self.submitter.pending,
        }
        for extra in self.extra_status:
            out.update(extra())
        return out

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, finish the C-STOREs in flight, flush the journal."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("stopping: no new associations; waiting for %d in progress", self.scp.active_associations)
        self.scp.stop_accepting()
        if not self.scp.wait_idle(grace):
            log.warning("associations still open after %.0fs: aborting them", grace)
            self.scp.abort_all()
        self.scp.close()
        self.stow.stop_accepting()
        if not self.stow.wait_idle(grace):
            log.warning("STOW-RS requests still in progress after %.0fs", grace)
        if self.export is not None:
            self.export.stop()
        if self.http is not None:
            self.http.stop()
        self.housekeeper.stop()
        if self.closer is not None:
            self.closer.stop()
            self.closer.scheduler.stop()
        self.scheduler.stop()
        self.submitter.stop()
        if self.closer is not None:
            try:  # what this replica left unsubmitted may be taken over at once
                self.journal.forget_replica()
            except Exception as exc:
                log.warning("could not sign this replica off the journal: %s", exc)
        self.journal.close()
        log.info("stopped; open groups resume from the journal at the next start")


def purge_older_than(folder: Path, seconds: float, now: float | None = None) -> int:
    """Delete entries of ``folder`` last modified more than ``seconds`` ago.

    Payload folders and local job records must not grow without bound; a
    payload is only needed while its pipeline runs (far shorter than the
    retention)."""
    now = time.time() if now is None else now
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in os.scandir(folder):
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime <= seconds:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            continue
    if removed:
        log.info("retention: removed %d entries older than %.0fh from %s", removed, seconds / 3600, folder)
    return removed


def run_until_signalled(stop: Callable[[], None], tick: Callable[[], None] | None = None,
                        interval: float = 1.0) -> None:
    """Block until SIGTERM/SIGINT, calling ``tick`` every ``interval`` seconds."""
    done = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    try:
        while not done.wait(interval):
            if tick is not None:
                try:
                    tick()
                except UserError as exc:
                    log.error("%s", exc)
                except Exception:
                    log.exception("periodic task failed")
    finally:
        stop()
        time.sleep(0)
