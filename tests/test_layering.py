"""The package layering of docs/architecture.md holds: lower layers never import higher ones
(imports inside functions count too), and the wheel ships no test-only method."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "labelwise"

# package -> packages it must never import
FORBIDDEN = {
    "engine": ("methods", "stages", "cli", "report", "benchmarks", "pseudo"),
    "pseudo": ("methods", "stages", "cli", "report", "benchmarks"),
    "data": ("engine", "methods", "stages", "cli", "pseudo", "modeling", "blocks"),
    "evaluation": ("engine", "methods", "stages", "cli", "pseudo"),
    "modeling": ("engine", "methods", "stages", "cli", "pseudo", "data"),
    "blocks": ("engine", "methods", "stages", "cli", "pseudo"),
    "methods": ("stages", "cli", "report", "benchmarks"),
    "stages": ("cli", "report", "benchmarks"),
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(package):
    bad = []
    for f in sorted((SRC / package).rglob("*.py")):
        for mod in _imports(f):
            parts = mod.split(".")
            if parts[0] == "labelwise" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                bad.append(f"{f.relative_to(SRC)} imports {mod}")
    assert not bad, bad


def test_no_test_method_in_the_package():
    for f in SRC.rglob("*.py"):
        assert 'name = "_toy' not in f.read_text(), f
