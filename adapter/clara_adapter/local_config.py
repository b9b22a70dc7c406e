"""Local mode's configuration: a file or folder of manifests, re-read when it changes."""
from __future__ import annotations

import logging
from pathlib import Path

from clara_dicom.config import RenderedConfig, resolve
from clara_dicom.errors import UserError
from clara_dicom.manifests import iter_manifest_files, load_manifests

log = logging.getLogger(__name__)


class LocalConfigSource:
    def __init__(self, path: str | Path, namespace: str = "default"):
        self.path = Path(path)
        self.namespace = namespace
        self._signature: tuple = ()
        self.last_error: str | None = None

    def signature(self) -> tuple:
        try:
            files = iter_manifest_files(self.path)
            return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        except (UserError, OSError):
            return ("missing",)

    def load(self) -> RenderedConfig:
        """Load and resolve; raises UserError naming the file/object/field on bad input."""
        self._signature = self.signature()
        resources = load_manifests(self.path, namespace=self.namespace)
        resolution = resolve(resources, namespace=self.namespace)
        for key, conds in sorted(resolution.conditions.items()):
            for cond in conds:
                if not cond.status:
                    log.warning("%s/%s not ready: %s: %s", key[0], key[2], cond.reason, cond.message)
        return resolution.config

    def poll(self) -> RenderedConfig | None:
        """A new configuration if the files changed and still load; None otherwise.
        A broken edit keeps the last valid configuration serving."""
        if self.signature() == self._signature:
            return None
        try:
            config = self.load()
        except UserError as exc:
            if str(exc) != self.last_error:
                log.error("configuration not applied, still serving the last valid one: %s", exc)
            self.last_error = str(exc)
            return None
        self.last_error = None
        return config
