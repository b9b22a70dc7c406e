"""Secrets that ClaraDestinations reference (TLS certificates, DICOMweb tokens).

The rendered configuration carries only Secret *names* (never their data); the
agent reads the data from ``<storageDir>/secrets``: one folder per Secret, one
file per key — the layout of a Kubernetes Secret mounted as a volume, and easy
to lay out by hand in local mode. Files are read when a task needs them, so a rotated
Secret applies to the next task.
"""
from __future__ import annotations

import os
from pathlib import Path


class SecretError(Exception):
    """A referenced Secret or key is missing or unreadable (a configuration problem)."""


class SecretsDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str, key: str) -> Path:
        """The file of ``key`` in Secret ``name``; SecretError when it does not exist.

        Names and keys are validated by the models (DNS names, ``[-._a-zA-Z0-9]+``);
        the check here keeps a hand-written configuration inside the root too."""
        if not name or not key or "/" in name + key or name in (".", "..") or key in (".", ".."):
            raise SecretError(f"Secret reference {name!r}/{key!r} is not a plain name")
        folder = self.root / name
        if not folder.is_dir():
            # The condition a user sees in a cluster: name the chart value that mounts it.
            raise SecretError(f"Secret {name} not found (expected the folder {folder}; with the Helm chart, "
                              f"add {name} to the values list adapter.destinationSecrets)")
        path = folder / key
        if not path.is_file():
            present = ", ".join(sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))) or "none"
            raise SecretError(f"Secret {name} has no key {key} (keys: {present})")
        return path

    def read(self, name: str, key: str) -> bytes:
        path = self.path(name, key)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SecretError(f"Secret {name} key {key}: cannot read {path}: {exc.strerror or exc}") from None

    def has(self, name: str, key: str) -> bool:
        try:
            self.path(name, key)
            return True
        except SecretError:
            return False


def default_secrets_dir(storage_dir: str | Path) -> Path:
    return Path(os.path.join(storage_dir, "secrets"))
