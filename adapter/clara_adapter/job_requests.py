"""A PipelineJob to create for a closed group: its name, labels and manifest."""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clara_dicom.logs import short_hash
from clara_dicom.models import API_VERSION, GROUP

from clara_adapter.journal import InstanceRecord

NAME_MAX = 52
ANNOTATION_CLARA_NAME = f"{GROUP}/clara-job-name"
LABEL_AE_TITLE = f"{GROUP}/ae-title"
LABEL_PROCESSOR = f"{GROUP}/processor"
LABEL_PIPELINE_KEY = f"{GROUP}/pipeline-key"
LABEL_GROUP_HASH = f"{GROUP}/group-hash"


def dns_part(text: str) -> str:
    """Lowercase DNS-label fragment: invalid characters become '-', runs collapse."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "x"


def label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63].strip("-_.")
    return value or "x"


@dataclass
class JobRequest:
    """One PipelineJob to create for a closed group."""

    namespace: str
    ae_title: str
    processor: str
    pipeline_key: str
    pipeline_id: str
    priority: str
    group_by: str
    group_value: str
    sequence: str  # unique per group occurrence (journal epoch + group id)
    instances: list[InstanceRecord]
    closed_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        digest = hashlib.sha256(
            "\0".join((self.namespace, self.ae_title, self.processor, self.group_value, self.sequence,
                       self.pipeline_key)).encode()
        ).hexdigest()[:10]
        aet, key = dns_part(self.ae_title), dns_part(self.pipeline_key)
        room = NAME_MAX - len(digest) - 2
        if len(aet) + len(key) > room:
            aet = aet[: max(room // 2, room - len(key))].strip("-") or "x"
            key = key[: room - len(aet)].strip("-") or "x"
        return f"{aet}-{key}-{digest}"

    @property
    def clara_name(self) -> str:
        stamp = datetime.fromtimestamp(self.closed_at, timezone.utc).strftime("%Y%m%d%H%M%S")
        return f"{self.ae_title}-{self.pipeline_key}-{stamp}"

    def manifest(self, payload_path: Path) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "PipelineJob",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {
                    LABEL_AE_TITLE: label_value(self.ae_title),
                    LABEL_PROCESSOR: label_value(self.processor),
                    LABEL_PIPELINE_KEY: label_value(self.pipeline_key),
                    LABEL_GROUP_HASH: short_hash(self.group_value),
                },
                "annotations": {ANNOTATION_CLARA_NAME: self.clara_name},
            },
            "spec": {
                "pipeline": self.pipeline_id,
                "priority": self.priority,
                "source": {"aeTitle": self.ae_title, "processor": self.processor},
                "group": {"by": self.group_by, "value": self.group_value},
                "payload": {
                    "path": str(payload_path),
                    "instances": len(self.instances),
                    "bytes": sum(i.size for i in self.instances),
                },
            },
        }
