"""The trust boundary is the layout: an import contract that CI enforces.

fedir/ is the kernel both sides need; client/ runs inside a hospital, server/ and
strategies/ at the coordinator; simulations/ and cli/ compose them. A module on one side
that imports the other side would carry coordinator code into a hospital (or the
reverse), so the contract is checked on every module's source, including imports inside
functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"fedir": "fedir", "client": "fedir.client", "server": "fedir.server",
         "strategies": "fedir.strategies", "simulations": "fedir.simulations", "cli": "fedir.cli"}
COMPOSERS = ("fedir.simulations", "fedir.cli")
FORBIDDEN = {
    "fedir": ("fedir.client", "fedir.server", "fedir.strategies", *COMPOSERS),
    "client": ("fedir.server", "fedir.strategies", *COMPOSERS),
    "server": ("fedir.client", *COMPOSERS),
    "strategies": ("fedir.client", "fedir.server", *COMPOSERS),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return out


def _violations(folder: str) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in _imports(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[folder]):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_module_imports_across_the_boundary(folder):
    assert _violations(folder) == []


def test_the_contract_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself: a client module that imports the server is reported."""
    fake = tmp_path / "client"
    fake.mkdir()
    (fake / "leak.py").write_text("def f():\n    from fedir.server.runstore import RunStore\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _violations("client") == ["client/leak.py:2 imports fedir.server.runstore"]


def test_the_protocol_imports_neither_torch_nor_monai():
    """The server's strategy code decodes replies through fedir.protocol; it must not
    pull the deep-learning stack in (numpy and flwr only)."""
    code = ("import sys, fedir.protocol; "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
