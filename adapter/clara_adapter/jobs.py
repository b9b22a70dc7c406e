"""Public names for job creation, kept in one place for plug-ins and callers:
requests and names (job_requests.py), payloads (payloads.py), sinks
(job_sinks.py) and the submitter (submitter.py)."""
from __future__ import annotations

from clara_adapter.job_requests import JobRequest, dns_part, label_value
from clara_adapter.job_sinks import JobSink, LocalJobSink
from clara_adapter.payloads import build_payload
from clara_adapter.submitter import JobSubmitter

__all__ = ["JobRequest", "JobSink", "JobSubmitter", "LocalJobSink", "build_payload", "dns_part", "label_value"]
