"""The shape the code keeps (issue 12): no function in schemas/, common/, node/ or worker/ longer
than 60 lines unless it says why, in a ``# long: <reason>`` comment on its ``def`` line or the
line above it. Cyclomatic complexity is checked by ruff (C901, max 15, in pyproject.toml); the
import layers by import-linter (``lint-imports``, also in pyproject.toml)."""

from __future__ import annotations

import ast
from collections.abc import Iterator

from tests.integration.helpers import REPO_ROOT

PACKAGES = ("schemas", "common", "node", "worker")
MAX_LINES = 60
REASON = "# long:"

# Long functions in files other work is rewriting now: split them there or give the reason
# beside them there, then drop the entry (an entry for a function no longer long fails).
PENDING: dict[str, str] = {}


def long_functions() -> Iterator[tuple[str, int, bool]]:
    """(path::name, lines, has a reason) of every function longer than MAX_LINES."""
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            source = path.read_text()
            lines = source.splitlines()
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                size = (node.end_lineno or node.lineno) - first + 1
                if size > MAX_LINES:
                    near = lines[max(0, first - 2) : node.lineno]
                    yield f"{path.relative_to(REPO_ROOT)}::{node.name}", size, any(REASON in line for line in near)


def test_long_functions_say_why() -> None:
    found = long_functions()
    unexplained = [f"{where} ({size} lines)" for where, size, why in found if not why and where not in PENDING]
    assert not unexplained, f"split these or put '{REASON} <reason>' beside their def: {unexplained}"


def test_pending_entries_are_still_needed() -> None:
    still = {where for where, _, why in long_functions() if not why}
    stale = sorted(set(PENDING) - still)
    assert not stale, f"no longer long (or now explained in place): drop them from PENDING: {stale}"
