"""Fixtures shared by the test modules (no test module imports another)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedir.server.runstore import RunStore
from tests.store_factory import fabricate


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    """The fabricated 3-site, 2-round run (tests/store_factory.py), open for reading."""
    with fabricate(tmp_path / "runs.sqlite") as s:
        yield s
