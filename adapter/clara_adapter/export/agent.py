"""The export agent: lease tasks for our agent name, export them, report outcomes.

One poller thread leases up to ``exportConcurrency`` tasks at a time and hands
them to as many worker threads; each worker exports one task — over one C-STORE
association (TLS when the destination has ``tls``), or with STOW-RS requests to a
``dicomweb`` destination — and reports the outcome. Outcome rules (SPEC §3):

* success: every DICOM file sent, or failures not more than ``failureThreshold``
  of the task's DICOM files (non-DICOM files are skipped with a warning and not
  counted; a URI naming a missing file counts as a failed DICOM file);
* failure, ``retryLater=true``: the destination is unreachable, refuses or aborts
  the association, or the failures above the threshold are all transient
  (C-STORE "out of resources" 0xA7xx); also an unexpected error of ours;
* failure, ``retryLater=false``: bad parameters, unknown destination, a Secret the
  destination references missing or unusable, a TLS certificate not trusted or
  not valid for the destination, a DICOMweb 4xx answer, a URI or
  payload ID escaping ``<payloads root>/<payloadId>/``, too many files failing for
  lasting reasons (refused SOP class/transfer syntax, missing codec, C-STORE
  failure status), or no DICOM file at all in the task (nothing to export is a
  pipeline mistake worth seeing, not a success).

The server alone decides whether a failed task is retried (``--max-retries``).
Nothing a task contains can stop the agent: every worker catches everything.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from tenacity import retry_if_exception

from clara_dicom.config import RenderedConfig
from clara_dicom.retrying import RESULTS_POLL, RESULTS_REPORT

from clara_adapter.export.dicomweb import StowSender
from clara_adapter.export.lease import LeaseKeeper, report_kwargs
from clara_adapter.export.scu import SendReport, StoreSCU
from clara_adapter.export.secrets import SecretError, SecretsDir, default_secrets_dir
from clara_adapter.export.task import PermanentTaskError, resolve_task
from clara_adapter.export.tls import client_context

log = logging.getLogger(__name__)

PROBLEM_CHECK_SECONDS = 10.0  # Secrets may be fixed (or break) without a configuration change


def _worth_reporting_again(exc: BaseException) -> bool:
    """A report the service refused because the task moved on (409) or is gone (404) will
    never be accepted; anything else (unreachable, 5xx) may be, a moment later."""
    return type(exc).__name__ not in ("TaskConflictError", "TaskNotFoundError")


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    retry_later: bool = False
    reason: str = ""

    @property
    def label(self) -> str:
        return "succeeded" if self.succeeded else ("retry" if self.retry_later else "failed")


def decide(report: SendReport, threshold: float) -> Outcome:
    """The task outcome for what happened to its files."""
    if report.association_error:
        return Outcome(False, not report.association_permanent, report.association_error)
    total = report.dicom_files
    if total == 0:
        return Outcome(False, False, f"no DICOM files to export ({len(report.skipped)} non-DICOM skipped)")
    failed = len(report.failed)
    if failed / total > threshold:
        transient = all(f.transient for f in report.failed)
        sample = report.failed[0]
        return Outcome(False, transient, f"{failed} of {total} DICOM files failed (more than "
                                         f"{threshold:.0%}); e.g. {sample.uri}: {sample.reason}")
    note = f"{report.sent} of {total} DICOM files sent"
    if failed:
        note += f", {failed} failed (within the {threshold:.0%} threshold)"
    return Outcome(True, False, note)


class ExportAgent:
    """Polls the Results Service for ``settings.agent`` and exports its tasks.

    ``config``: returns the live RenderedConfig (destinations change at runtime).
    ``client``: a :class:`clara_results.client.ResultsClient` (or compatible).
    """

    def __init__(self, settings: Any, config: Callable[[], RenderedConfig], client: Any, metrics: Any = None,
                 results_url: str | None = None):
        self.settings = settings
        self.config = config
        self.client = client
        self.metrics = metrics
        self.results_url = results_url or getattr(client, "base_url", None)
        self.agent = settings.agent
        self.concurrency = settings.exportConcurrency
        self.scu = StoreSCU(settings.scuAeTitle, acse_timeout=settings.acseTimeout,
                            dimse_timeout=settings.dimseTimeout, network_timeout=settings.networkTimeout,
                            max_pdu=settings.maxPduSize)
        self.stow = StowSender(network_timeout=settings.networkTimeout, response_timeout=settings.dimseTimeout * 2)
        self.secrets = SecretsDir(default_secrets_dir(settings.storageDir))
        self._stop = threading.Event()
        self._slots = threading.Semaphore(self.concurrency)
        self._lock = threading.Lock()
        self._in_progress: dict[str, str] = {}  # task id -> destination name ("" while resolving)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="clara-export")
        self._thread = threading.Thread(target=self._poll_loop, name="clara-export-poller", daemon=True)
        self.last_poll_error: str | None = None
        self.counts = {"succeeded": 0, "retry": 0, "failed": 0}
        # Called with {destination: why} whenever the destinations this agent cannot serve change
        # (Kubernetes mode publishes it for the operator's ClaraDestination conditions).
        self.on_destination_problems: Callable[[dict[str, str]], None] | None = None
        self._problems: dict[str, str] | None = None
        self._problems_checked = (float("-inf"), "")  # (monotonic time, configuration version)
        self.problem_check_seconds = PROBLEM_CHECK_SECONDS

    @classmethod
    def connect(cls, settings: Any, config: Callable[[], RenderedConfig], metrics: Any, results_url: str,
                token: str | None) -> "ExportAgent":
        """An agent talking to the Results Service at ``results_url`` (not started yet)."""
        from clara_dicom.errors import UserError
        from clara_results.client import ResultsClient

        if not token:
            raise UserError("resultsUrl is set but no Results Service token: set resultsToken or resultsTokenFile "
                            "(CLARA_RESULTS_TOKEN / CLARA_RESULTS_TOKEN_FILE)")
        return cls(settings, config, ResultsClient(results_url, token), metrics, results_url=results_url)

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "ExportAgent":
        self._thread.start()
        log.info("export agent %s polling %s (calling AE %s, %d parallel associations)", self.agent,
                 self.results_url, self.settings.scuAeTitle, self.concurrency)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Stop leasing; let exports in progress finish for ``grace`` seconds, then abort
        them (their leases expire and the tasks go back to Pending)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        end = time.monotonic() + grace
        while self.tasks_in_progress and time.monotonic() < end:
            time.sleep(0.05)
        if self.tasks_in_progress:
            log.warning("aborting %d export(s) still in progress", self.tasks_in_progress)
            self.scu.abort_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.stow.close()
        close = getattr(self.client, "close", None)
        if close:
            close()

    @property
    def tasks_in_progress(self) -> int:
        with self._lock:
            return len(self._in_progress)

    def status(self) -> dict[str, Any]:
        with self._lock:
            destinations = sorted({d for d in self._in_progress.values() if d})
            n = len(self._in_progress)
        return {"exportAgent": {"agent": self.agent, "resultsService": self.results_url, "tasksInProgress": n,
                                "destinationsBusy": destinations, "lastPollError": self.last_poll_error,
                                "tasks": dict(self.counts), "destinationProblems": dict(self._problems or {})}}

    def check_destinations(self) -> None:
        """Re-check the destinations when the configuration changed or every
        ``problem_check_seconds``; log and report changes (poller thread only)."""
        config = self.config()
        when, version = self._problems_checked
        now = time.monotonic()
        if version == config.version and now - when < self.problem_check_seconds:
            return
        self._problems_checked = (now, config.version)
        try:
            problems = self.destination_problems(config)
        except Exception:  # noqa: BLE001 - a check must never stop the poller
            log.exception("checking destinations failed")
            return
        if problems == self._problems:
            return
        for name, why in problems.items():
            if (self._problems or {}).get(name) != why:
                log.warning("destination %s cannot be served: %s", name, why)
        for name in set(self._problems or {}) - set(problems):
            log.info("destination %s can be served again", name)
        self._problems = problems
        if self.on_destination_problems is not None:
            try:
                self.on_destination_problems(dict(problems))
            except Exception:  # noqa: BLE001
                log.exception("reporting destination problems failed")

    def destination_problems(self, config: RenderedConfig | None = None) -> dict[str, str]:
        """Destination name -> why this agent cannot serve it (a referenced Secret missing
        or unusable), for every destination of the configuration that has a problem."""
        config = config or self.config()
        problems = {}
        for name, dest in sorted(config.destinations.items()):
            try:
                if dest.dicomweb is not None and dest.dicomweb.tokenSecretRef is not None:
                    self.secrets.path(dest.dicomweb.tokenSecretRef.name, dest.dicomweb.tokenSecretRef.key)
                if dest.tls is not None:
                    client_context(dest.tls, self.secrets)
            except SecretError as exc:
                problems[name] = str(exc)
        return problems

    # -- polling --------------------------------------------------------------
    def _poll_loop(self) -> None:
        backoff = RESULTS_POLL.with_(initial=min(self.settings.exportPollSeconds, RESULTS_POLL.cap)).backoff()
        while not self._stop.is_set():
            self.check_destinations()
            # wait for a free worker
            if not self._slots.acquire(timeout=0.5):
                continue
            free = 1
            while free < self.concurrency and self._slots.acquire(blocking=False):
                free += 1
            try:
                tasks = self.client.lease(self.agent, size=free)
            except Exception as exc:  # noqa: BLE001 - the service may be down; keep trying
                self._release(free)
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if message != self.last_poll_error:
                    log.warning("cannot lease export tasks: %s (retrying)", message)
                self.last_poll_error = message
                self._stop.wait(backoff.next())
                continue
            if self.last_poll_error:
                log.info("Results Service reachable again")
            self.last_poll_error = None
            backoff.reset()
            self._release(free - len(tasks))
            for task in tasks:
                with self._lock:
                    self._in_progress[task.id] = ""
                try:
                    self._pool.submit(self._run, task)
                except RuntimeError:  # pool shut down: stopping
                    self._finish(task.id)
            if not tasks:
                self._stop.wait(self.settings.exportPollSeconds)

    def _release(self, n: int) -> None:
        for _ in range(max(0, n)):
            self._slots.release()

    def _finish(self, task_id: str) -> None:
        with self._lock:
            self._in_progress.pop(task_id, None)
        self._slots.release()

    # -- one task -------------------------------------------------------------
    def _run(self, task: Any) -> None:
        try:
            with LeaseKeeper(self.client, task) as lease:  # renewed while the export runs
                outcome = self.export(task)
            if lease.lost:  # another worker holds the task now: report nothing
                if self.metrics is not None:
                    self.metrics.exports.labels("unreported").inc()
                return
            self._report(task, outcome)
        except Exception:  # noqa: BLE001 - never let a task take the worker down
            log.exception("export task %s: unexpected error", getattr(task, "id", "?"))
        finally:
            self._finish(task.id)

    def export(self, task: Any) -> Outcome:
        """Export one leased task and decide its outcome (no reporting)."""
        started = time.monotonic()
        try:
            resolved = resolve_task(task, self.config(), self.settings.payloads_dir)
        except PermanentTaskError as exc:
            return Outcome(False, False, str(exc))
        dest = resolved.destination
        with self._lock:
            if task.id in self._in_progress:
                self._in_progress[task.id] = resolved.destination_name
        try:
            report = self._send(dest, resolved.files)
        except SecretError as exc:
            return Outcome(False, False, f"destination {resolved.destination_name} cannot be served: {exc}")
        except Exception as exc:  # noqa: BLE001
            log.exception("export task %s: sending failed unexpectedly", task.id)
            return Outcome(False, True, f"internal error while sending: {exc}")
        self._count_files(report)
        for uri in report.skipped:
            log.warning("export task %s: %s is not a DICOM file; skipped", task.id, uri)
        for failure in report.failed[:5]:
            log.warning("export task %s: %s not exported: %s", task.id, failure.uri, failure.reason)
        if len(report.failed) > 5:
            log.warning("export task %s: %d more files not exported", task.id, len(report.failed) - 5)
        outcome = decide(report, self.settings.failureThreshold)
        seconds = time.monotonic() - started
        log.info("export task %s to %s (%s): %s; %s in %.2fs", task.id, resolved.destination_name, dest.label,
                 outcome.label, outcome.reason, seconds)
        return outcome

    def _send(self, dest: Any, files: list) -> SendReport:
        """DICOMweb STOW-RS, C-STORE over TLS, or plain C-STORE; SecretError when a
        Secret the destination references is missing or unusable."""
        if dest.dicomweb is not None:
            ref = dest.dicomweb.tokenSecretRef
            token = self.secrets.read(ref.name, ref.key).decode("utf-8", "replace").strip() if ref else None
            return self.stow.send(dest, files, token)
        ssl_context = client_context(dest.tls, self.secrets) if dest.tls is not None else None
        return self.scu.send(dest, files, ssl_context)

    def _count_files(self, report: SendReport) -> None:
        if self.metrics is None:
            return
        files = self.metrics.exported_files
        if report.sent:
            files.labels("sent").inc(report.sent)
        if report.failed:
            files.labels("failed").inc(len(report.failed))
        if report.skipped:
            files.labels("skipped").inc(len(report.skipped))

    def _report(self, task: Any, outcome: Outcome) -> None:
        if not outcome.succeeded:
            level = logging.INFO if outcome.retry_later else logging.WARNING
            log.log(level, "export task %s failed (%s): %s", task.id,
                    "will be retried if retries remain" if outcome.retry_later else "permanent", outcome.reason)
        try:
            for attempt in RESULTS_REPORT.retrying(retry=retry_if_exception(_worth_reporting_again)):
                with attempt:
                    if outcome.succeeded:
                        self.client.report_success(task.id, **report_kwargs(task))
                    else:
                        self.client.report_failure(task.id, retry_later=outcome.retry_later,
                                                   **report_kwargs(task))
        except Exception as exc:  # noqa: BLE001
            # The lease expired and the task moved on, or the service stays away: the
            # lease brings the task back to Pending, so it is exported again later.
            log.warning("export task %s: cannot report %s: %s", task.id, outcome.label, exc)
            if self.metrics is not None:
                self.metrics.exports.labels("unreported").inc()
            return
        with self._lock:
            self.counts[outcome.label] += 1
        if self.metrics is not None:
            self.metrics.exports.labels(outcome.label).inc()
