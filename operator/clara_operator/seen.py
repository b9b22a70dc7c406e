"""The latest watched state of PipelineJobs and their Jobs (what an informer keeps), so a
reconcile triggered by a watch event reads the object from that event instead of
asking the API again. A miss falls back to the API; only the newest resourceVersion
is kept; Jobs are kept trimmed (name, owner, status) and PipelineJobs without their
managedFields (half of a PipelineJob's bytes, never read) — small at thousands of jobs.
"""
from __future__ import annotations

from typing import Any

Key = tuple[str, str]


def _version(body: dict[str, Any]) -> int | None:
    value = (body.get("metadata") or {}).get("resourceVersion")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def trim_job(job: dict[str, Any]) -> dict[str, Any]:
    meta = job.get("metadata") or {}
    return {"metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "ownerReferences")
                         if k in meta},
            "status": job.get("status") or {}}


def trim_pipelinejob(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    if "managedFields" not in meta:
        return body
    return {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def brief_pipelinejob(body: dict[str, Any]) -> dict[str, Any]:
    """What the resync compares (pipelinejobs.needs_reconcile) and nothing else: a listing of
    thousands of PipelineJobs is held as these (as parsed dicts a whole PipelineJob is ~10x
    its JSON: at 5,000 that was the operator's peak memory)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    conds = [c for c in status.get("conditions") or [] if isinstance(c, dict) and c.get("type") == "ResultsRegistered"]
    return {"metadata": {k: meta[k] for k in ("name", "namespace", "deletionTimestamp") if k in meta},
            "spec": {"pipeline": (body.get("spec") or {}).get("pipeline")},
            "status": {**{k: status[k] for k in ("phase", "reason", "jobName") if k in status},
                       **({"conditions": conds} if conds else {})}}


class Seen:
    def __init__(self) -> None:
        self.pipelinejobs: dict[Key, dict[str, Any]] = {}
        self.jobs: dict[Key, dict[str, Any]] = {}
        self.pipelines: dict[Key, dict[str, Any]] = {}  # ClaraPipelines (few, kept whole)

    @staticmethod
    def _put(store: dict[Key, dict[str, Any]], body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace"), meta.get("name"))
        old = store.get(key)
        if old is not None:
            new_v, old_v = _version(body), _version(old)
            if new_v is not None and old_v is not None and new_v < old_v:
                return  # an older event after a newer write
        store[key] = body

    def pipelinejob(self, body: dict[str, Any]) -> None:
        self._put(self.pipelinejobs, trim_pipelinejob(body))

    def job(self, body: dict[str, Any]) -> None:
        self._put(self.jobs, trim_job(body))

    def pipeline(self, body: dict[str, Any], deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        if deleted:
            self.pipelines.pop((meta.get("namespace"), meta.get("name")), None)
        else:
            self._put(self.pipelines, body)

    def pipelines_of(self, namespace: str) -> list[dict[str, Any]]:
        return [b for (ns, _), b in self.pipelines.items() if ns == namespace]

    def forget_pipelinejob(self, namespace: str, name: str) -> None:
        self.pipelinejobs.pop((namespace, name), None)

    def replace_jobs(self, namespace: str | None, jobs: list[dict[str, Any]]) -> None:
        """Exactly these Jobs now (a relist of ``namespace``; None: of every namespace)."""
        for key in [k for k in self.jobs if namespace is None or k[0] == namespace]:
            del self.jobs[key]
        for job in jobs:
            self.job(job)

    def forget_job(self, namespace: str, name: str) -> None:
        self.jobs.pop((namespace, name), None)
