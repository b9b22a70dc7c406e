"""Helpers for tests that run the adapter in local mode: manifests and peer checks.

Kept out of conftest.py so test modules can import them by a unique name
(several conftest.py files exist under tests/)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(available: bool, what: str) -> None:
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but missing", pytrace=False)
    pytest.skip(f"{what} not installed")


PROCESSOR_TEMPLATE = """
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraAETitle
metadata: {{name: {name}}}
spec:
  aeTitle: {ae}
  processor: {name}-proc
{aet_extra}
---
apiVersion: dicom.clara.io/v1alpha1
kind: JobProcessor
metadata: {{name: {name}-proc}}
spec:
{processor}
"""

SOURCES = """
---
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraSource
metadata: {name: storescu}
spec: {aeTitle: STORESCU, host: 127.0.0.1}
---
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraSource
metadata: {name: echoscu}
spec: {aeTitle: ECHOSCU, host: 127.0.0.1}
"""


def indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line if line.strip() else line for line in text.strip("\n").splitlines())


def write_config(folder: Path, ae: str = "CLARA", processor: str = "pipelines: {seg: seg}",
                 aet_extra: str = "", name: str = "clara", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(PROCESSOR_TEMPLATE.format(name=name, ae=ae, processor=indent(processor),
                                              aet_extra=indent(aet_extra)) + SOURCES + extra)
    return path


