"""Prometheus metrics of one adapter (own registry, so tests can run several).

Labels carry AE titles and pipeline keys only, never patient data.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class AdapterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.instances = Counter("clara_instances_received_total", "Instances stored and acknowledged",
                                 ["ae_title"], registry=r)
        self.ignored = Counter("clara_instances_ignored_total", "Instances acknowledged but dropped",
                               ["ae_title", "reason"], registry=r)
        self.bytes = Counter("clara_bytes_received_total", "Bytes of stored instances", ["ae_title"], registry=r)
        self.store_failures = Counter("clara_store_failures_total", "C-STOREs answered with a failure",
                                      ["reason"], registry=r)
        self.associations = Counter("clara_associations_total", "Inbound associations by result", ["result"],
                                    registry=r)
        self.active = Gauge("clara_associations_active", "Inbound associations in progress", registry=r)
        self.groups_open = Gauge("clara_groups_open", "Groups waiting for their quiet period", registry=r)
        self.groups_closed = Counter("clara_groups_closed_total", "Groups closed", ["ae_title"], registry=r)
        self.groups_quarantined = Counter("clara_groups_quarantined_total",
                                          "Groups whose payload could not be built (files kept in quarantine/)",
                                          ["ae_title"], registry=r)
        self.jobs = Counter("clara_jobs_created_total", "PipelineJobs created", ["pipeline_key"], registry=r)
        self.job_failures = Counter("clara_job_creation_failures_total", "Failed job-creation attempts",
                                    registry=r)
        self.job_latency = Histogram("clara_job_creation_latency_seconds",
                                     "Group deadline to PipelineJob created", registry=r,
                                     buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        # _count: the receive path's journal commits; _sum: the instances they held (the group commit's batching)
        self.journal_batches = Histogram("clara_journal_transaction_instances",
                                         "Instances per journal transaction of the receive path", registry=r,
                                         buckets=(1, 2, 4, 8, 16, 32, 64))
        self.stow_requests = Counter("clara_stow_requests_total", "STOW-RS requests by HTTP status", ["status"],
                                     registry=r)
        self.exports = Counter("clara_export_results_total", "Export tasks by outcome", ["outcome"], registry=r)
        self.exported_files = Counter("clara_export_files_total", "Exported DICOM files by outcome", ["outcome"],
                                      registry=r)

    def job_created(self, request: Any, created: bool, deadline: float | None) -> None:
        if created:
            self.jobs.labels(request.pipeline_key).inc()
            if deadline is not None:
                self.job_latency.observe(max(0.0, time.time() - deadline))

    def job_creation_failed(self) -> None:
        self.job_failures.inc()

    def group_closed(self, ae_title: str) -> None:
        self.groups_closed.labels(ae_title).inc()

    def group_quarantined(self, ae_title: str) -> None:
        self.groups_quarantined.labels(ae_title).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
