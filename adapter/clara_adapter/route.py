"""What an association on one AE title is routed to, and the A-ASSOCIATE-RJ
codes of admission; light enough for a receive worker to import."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A-ASSOCIATE-RJ (result, source, reason)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded


@dataclass(frozen=True)
class Route:
    """Everything an association on one AE title needs, snapshotted at accept time
    (``processor`` is None in a receive worker: only the coordinator commits)."""

    owner: str
    ae_title: str
    processor: Any  # JobProcessorBase
    tags: frozenset[int]
    ignored_sop_classes: frozenset[str]
    allowed_sop_classes: frozenset[str]
    allowed_sources: frozenset[str]

    def drops(self, sop_class_uid: str) -> bool:
        if self.allowed_sop_classes:
            return sop_class_uid not in self.allowed_sop_classes
        return sop_class_uid in self.ignored_sop_classes
