"""Figures the fault tests measured, appended to test-artifacts/faults.jsonl (printed by scripts/test.sh)."""

from __future__ import annotations

import json
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def record(test: str, **figures: object) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with (ARTIFACTS / "faults.jsonl").open("a") as out:
        out.write(json.dumps({"test": test, **figures}) + "\n")
