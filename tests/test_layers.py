"""The import rules of docs/architecture.md, checked on the source.

The node and the fleet meet only in ``edgeos.protocol`` (and share ``edgeos.security``):
the node must run on a device without the fleet's server code, and the fleet must not
carry the node's runtime. Lower layers never import higher ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "edgeos"

# package -> edgeos packages it must never import (directly, anywhere in its modules)
FORBIDDEN = {
    "fleet": {"node", "sync", "agents", "connectors", "cli", "demo"},
    "node": {"fleet", "cli", "demo"},
    "sync": {"fleet", "node", "cli", "demo"},
    "security": {"fleet", "node", "sync", "agents", "runtime", "state", "connectors", "cli"},
    "protocol": {"fleet", "node", "sync", "agents", "runtime", "state", "manifests", "cli"},
    "state": {"fleet", "node", "sync", "agents", "runtime", "connectors", "cli"},
    "runtime": {"fleet", "node", "sync", "agents", "connectors", "routing", "cli"},
    "agents": {"fleet", "node", "sync", "cli"},
    "connectors": {"fleet", "node", "sync", "agents", "runtime", "routing", "cli"},
    "routing": {"fleet", "node", "sync", "agents", "memory", "connectors", "cli", "demo"},
    "memory": {"fleet", "node", "sync", "agents", "connectors", "cli"},
    "genai": {"fleet", "node", "sync", "agents", "connectors", "routing", "cli"},
}


def imported_packages(path: Path) -> set[str]:
    """The second component of every ``edgeos.X`` a module imports (at any depth)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "edgeos" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_its_layer(package: str) -> None:
    offences = [
        f"{path.relative_to(SRC)} imports edgeos.{target}"
        for path in sorted((SRC / package).rglob("*.py"))
        for target in sorted(imported_packages(path) & FORBIDDEN[package])
    ]
    assert not offences, "\n".join(offences)
