"""The records on our Kafka topics as JSON Schema documents, for producers and followers not
written in Python (an API node in Go or Node.js, a gateway).

``python -m schemas.json_schemas docs/contracts`` writes one ``<name>.schema.json`` per record;
a test regenerates them and fails when the committed files differ, so a change to a contract
here is a change to ``docs/contracts/`` in the same commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from schemas.allowances import Allowance
from schemas.decisions import Decision
from schemas.events import EVENT_ADAPTER
from schemas.limits import LimitOverride
from schemas.notifications import Notification

# name -> (the record's type, where it travels: topic setting, message key, what else to know)
CONTRACTS: dict[str, tuple[type[BaseModel] | TypeAdapter[Any], str]] = {
    "request-event": (
        EVENT_ADAPTER,
        "Topic METER_EVENTS_TOPIC (default usage.events). One JSON object (UTF-8) per request, "
        "message key = key_id (it decides the partition, so the worker that counts the key). "
        "Unknown fields are ignored; JSON types are strict.",
    ),
    "decision": (
        Decision,
        "Topic METER_DECISIONS_TOPIC (default usage.decisions), compacted, message key = key_id. "
        "Apply a decision only if its version is above the one held for the key; a block is over "
        "at `until` even if its unblock is late. Unknown fields are ignored.",
    ),
    "allowance": (
        Allowance,
        "Topic METER_ALLOWANCES_TOPIC (default usage.allowances), compacted, message key = "
        "key_id. Apply only a newer version; each window's allowance is void after its `until`.",
    ),
    "limit-override": (
        LimitOverride,
        "Topic METER_LIMITS_TOPIC (default usage.limits), compacted, message key = "
        '"{scope}:{subject}". policy = null removes the override.',
    ),
    "notification": (
        Notification,
        "Topic METER_NOTIFICATIONS_TOPIC (default usage.notifications), not compacted, message key = "
        "key_id; also the JSON body of each webhook (signed: X-Meter-Signature). One per key, window "
        "start and threshold; `id` is the same for every copy of one crossing: deduplicate on it.",
    ),
}


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one contract, as pydantic validates it."""
    record, where = CONTRACTS[name]
    adapter = record if isinstance(record, TypeAdapter) else TypeAdapter(record)
    schema = adapter.json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{name}.schema.json",
        "$comment": where,
        **schema,
    }


def render(name: str) -> str:
    """The file's text: stable key order, two-space indent, ASCII only (escapes), a final newline."""
    return json.dumps(json_schema(name), indent=2, sort_keys=True) + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in CONTRACTS:
        path = directory / f"{name}.schema.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/contracts")):
        print(path)
