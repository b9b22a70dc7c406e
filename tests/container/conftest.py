"""Fixtures of the container tests (helpers in container_lib.py)."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from container_lib import Image, build_image, remove


@pytest.fixture(scope="session")
def image() -> Image:
    """clara-dicom:<version>, built (or reused from the content-keyed cache) by tools/image/build.sh."""
    return build_image()


@pytest.fixture
def names() -> Iterator[callable]:
    """names("adapter") -> a unique container/volume name; all removed at teardown."""
    made: list[str] = []

    def make(what: str) -> str:
        made.append(f"clara-test-{what}-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield make
    remove(made)
