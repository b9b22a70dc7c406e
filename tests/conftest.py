"""Shared fixtures. Real-peer tests need Debian's dcmtk/Orthanc/PostgreSQL: on a
developer machine without them they skip with the install command; in CI
(CI=true) a missing peer is a failure, never a silent skip."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_setup import require, write_config  # noqa: E402
from peers import DCMTK_DIR, LocalAdapter, stops_what_it_starts  # noqa: E402


@pytest.fixture(scope="session")
def dcmtk_available() -> None:
    require((DCMTK_DIR / "storescu").exists(), "dcmtk (apt-get install dcmtk)")


@pytest.fixture(scope="session")
def orthanc_available() -> None:
    require(shutil.which("Orthanc") is not None, "Orthanc (apt-get install orthanc)")


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory) -> list[Path]:
    """A small CT series (20 slices of 64x64) shared by tests that only read it."""
    from clara_dicom.synthetic import write_study

    return write_study(tmp_path_factory.mktemp("ct"), slices=20, rows=64, cols=64, patient_id="PAT-CT")


@pytest.fixture
def local_adapter(tmp_path, dcmtk_available):
    """Factory: start `clara-dicom up` with a config; stopped at teardown (log shown on failure)."""
    def start(config: Path | None = None, state: Path | None = None, **kwargs) -> LocalAdapter:
        return LocalAdapter(config or write_config(tmp_path / "config"), state or tmp_path / "state", **kwargs)

    yield from stops_what_it_starts(start, LocalAdapter.stop_and_report)
