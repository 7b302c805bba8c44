"""Dead-letter records: the reason, where it came from, and the original bytes."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from worker.ingest.validate import Rejection

# (topic, key, value, headers) -> awaitable publish; the worker passes its broker's publish.
Publish = Callable[[bytes | None, bytes, list[tuple[str, bytes]]], Awaitable[None]]


def dead_letter(rejection: Rejection, now: datetime | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The DLQ message value and headers for one rejected record."""
    original = rejection.value or b""
    body = {
        "reason": rejection.reason,
        "detail": rejection.detail,
        "source_topic": rejection.topic,
        "source_partition": rejection.partition,
        "source_offset": rejection.offset,
        "original_b64": base64.b64encode(original).decode(),
        "original_size": len(original),
        "rejected_at": (now or datetime.now(UTC)).isoformat(),
    }
    headers = [
        ("dlq.reason", rejection.reason.encode()),
        ("dlq.source", f"{rejection.topic}[{rejection.partition}]@{rejection.offset}".encode()),
    ]
    return json.dumps(body).encode(), headers


def original_bytes(dlq_value: bytes) -> bytes:
    """The rejected message's bytes back from a DLQ record (for replay or inspection)."""
    return base64.b64decode(json.loads(dlq_value)["original_b64"])
