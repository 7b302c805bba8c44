"""Imports point down: ``node/`` (embedded in API nodes) never imports the worker, the neutral
``common/`` (the Kafka client factory) imports only the contracts, and the contracts in
``schemas/`` import nothing of ours but each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found |= {(path.name, n.split(".")[0]) for n in names}
    return found


@pytest.mark.parametrize(
    ("package", "allowed"),
    [("node", {"node", "schemas", "common"}), ("common", {"common", "schemas"}), ("schemas", {"schemas"})],
)
def test_imports_point_down(package: str, allowed: set[str]) -> None:
    ours = {"node", "schemas", "common", "worker", "bench", "tests"}
    wrong = sorted((f, top) for f, top in imported_packages(package) if top in ours and top not in allowed)
    assert wrong == []
