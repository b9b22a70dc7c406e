"""Where PipelineJobs go: the sink protocol and the local (file) sink. The
Kubernetes sink is in k8s_sink.py."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol


class JobSink(Protocol):
    """Where PipelineJobs go. ``create`` is idempotent: an existing job is success."""

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create the job; True if created now, False if it already existed. Raise to retry."""


class LocalJobSink:
    """Local mode: PipelineJob objects written as JSON files under the state folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def create(self, manifest: dict[str, Any]) -> bool:
        path = self.folder / f"{manifest['metadata']['name']}.json"
        if path.exists():
            return False
        obj = json.loads(json.dumps(manifest))
        obj["metadata"]["creationTimestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        obj["status"] = {"phase": "Pending"}
        tmp = path.with_name(".tmp-" + path.name)
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return True

    def list(self) -> list[dict[str, Any]]:
        jobs = []
        for path in sorted(self.folder.glob("[!.]*.json")):
            try:
                jobs.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        jobs.sort(key=lambda j: (j["metadata"].get("creationTimestamp", ""), j["metadata"]["name"]))
        return jobs
