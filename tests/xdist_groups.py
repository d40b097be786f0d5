"""How `make test` shares the tests between its two pytest-xdist workers (`-n 2 --dist loadfile`).

A test module is one unit of work, run on one worker in file order (`--dist loadfile`), so its
module-scoped fixtures are built once and a test that must come last stays last. On top of that,
the modules that start a real Flower deployment (a SuperLink, SuperNodes, a process per
ClientApp message) are one unit, and so are those that start Ray (Flower's simulation engine):
at most one deployment and one Ray cluster run at a time, whatever the machine's memory. These
two units are the longest and spend much of their time waiting on processes, so they are handed
out first and run beside each other, and the other modules fill the gaps.

(xdist's own `--dist loadgroup` would read `xdist_group` marks, but on pytest 9.2 it silently
stops grouping: pytest-dev/pytest-xdist#1386. A scheduler that groups by module name does not
depend on rewriting node ids.)
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from xdist.scheduler import LoadFileScheduling

DEPLOYMENT = "flower-deployment"
RAY = "ray-simulation"
GROUPS = {
    DEPLOYMENT: {"test_app_approval.py", "test_deployment.py", "test_fleet_proxy.py"},
    RAY: {"test_checkpoint.py", "test_clinical_companion.py", "test_drift_e2e.py", "test_end_to_end.py",
          "test_faulty_sites.py", "test_fedbn.py", "test_heart.py", "test_secure_aggregation.py",
          "test_wire_audit.py"},
}


def unit_of(nodeid: str) -> str:
    """The unit of work of a test: its group, or else its file."""
    path = nodeid.split("::", 1)[0]
    module = PurePosixPath(path).name
    return next((group for group, modules in GROUPS.items() if module in modules), path)


class ModuleGroupScheduling(LoadFileScheduling):
    """`--dist loadfile` with the modules of GROUPS joined into one unit each, handed out first."""

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)

    def _assign_work_unit(self, node) -> None:  # noqa: ANN001 - xdist's WorkerController
        for group in reversed(GROUPS):
            if group in self.workqueue:
                self.workqueue.move_to_end(group, last=False)
        super()._assign_work_unit(node)


class ModuleGroups:
    """The plugin (registered by conftest.py when xdist is installed)."""

    @pytest.hookimpl(tryfirst=True)  # before xdist's own, which would pick LoadFileScheduling
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log) -> ModuleGroupScheduling | None:  # noqa: ANN001
        if config.getvalue("dist") != "loadfile":
            return None
        return ModuleGroupScheduling(config, log)
