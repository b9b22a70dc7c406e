"""The SCU export agent (SPEC §3, §9): Results Service tasks -> C-STORE or STOW-RS to ClaraDestinations.

* :mod:`.task` — what a task asks for: destination from its parameters, files from its URIs
  (confined to ``<payloads root>/<payloadId>/``);
* :mod:`.scu` — one association per task, raw dataset bytes when the stored transfer
  syntax is accepted, transcoding/decompression fallback otherwise; the association
  itself in :mod:`.association`, TLS contexts in :mod:`.tls`;
* :mod:`.dicomweb` — STOW-RS to ``dicomweb`` destinations;
* :mod:`.secrets` — the Secrets destinations reference, read as files;
* :mod:`.agent` — the poll loop, the worker pool, outcome rules, reporting, metrics.
"""
from clara_adapter.export.agent import ExportAgent, Outcome
from clara_adapter.export.task import PermanentTaskError, resolve_task

__all__ = ["ExportAgent", "Outcome", "PermanentTaskError", "resolve_task"]
