"""Fixtures shared by the test modules (no test module imports another)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedir.server.runstore import RunStore
from tests.store_factory import fabricate

# `make test` runs the tests on two pytest-xdist workers (tests/xdist_groups.py). Each worker's
# torch, and the Flower, Ray and fedir processes its tests start (they inherit the variable),
# get the worker's share of the cores rather than a thread per core each: two workers' thread
# pools on the same cores only wait on each other. A value the caller set is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):  # the [test] extra installs it; a bare pytest runs without
        from tests.xdist_groups import ModuleGroups

        config.pluginmanager.register(ModuleGroups(), "fedir-xdist-module-groups")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    """The fabricated 3-site, 2-round run (tests/store_factory.py), open for reading."""
    with fabricate(tmp_path / "runs.sqlite") as s:
        yield s
