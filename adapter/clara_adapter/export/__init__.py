"""The SCU export agent (SPEC §3): Results Service tasks -> C-STORE to ClaraDestinations.

* :mod:`.task` — what a task asks for: destination from its parameters, files from its URIs
  (confined to ``<payloads root>/<payloadId>/``);
* :mod:`.scu` — one association per task, raw dataset bytes when the stored transfer
  syntax is accepted, transcoding/decompression fallback otherwise;
* :mod:`.agent` — the poll loop, the worker pool, outcome rules, reporting, metrics.
"""
from clara_adapter.export.agent import ExportAgent, Outcome
from clara_adapter.export.task import PermanentTaskError, resolve_task

__all__ = ["ExportAgent", "Outcome", "PermanentTaskError", "resolve_task"]
