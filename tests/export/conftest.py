"""Fixtures for the export agent tests (helpers in export_testlib.py)."""
from __future__ import annotations

import logging
from typing import Any

import pytest

from export_testlib import ExportHarness
from local_setup import require
from peers import ORTHANC_DICOMWEB_PLUGIN


@pytest.fixture(scope="session")
def orthanc_dicomweb_available(orthanc_available) -> None:
    require(ORTHANC_DICOMWEB_PLUGIN.exists(), "Orthanc's DICOMweb plugin (apt-get install orthanc-dicomweb)")


@pytest.fixture
def export_harness(tmp_path):
    """Factory: ``export_harness(max_retries=..., retry_delay=..., **adapter settings)``."""
    made: list[ExportHarness] = []
    logging.getLogger("httpx").setLevel(logging.WARNING)

    def make(**kwargs: Any) -> ExportHarness:
        h = ExportHarness(tmp_path / f"h{len(made)}", **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()
