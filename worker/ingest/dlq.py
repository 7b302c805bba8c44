"""Dead-letter records: the reason, where it came from, and the original bytes.

A DLQ record always fits the broker: the original is kept up to ``MAX_ORIGINAL_BYTES``
(base64 inside JSON grows it by a third), the rest is cut and the record says so, with the
full original's size and SHA-256. Each record carries a stable ``id`` (its source topic,
partition and offset): a worker killed after dead-lettering a batch but before writing it
dead-letters the same records again, and readers collapse them by that id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from common.retry import retry_forever
from worker.records import Rejection

log = logging.getLogger(__name__)

# 512 KiB of original -> ~700 KB of base64: well under the 1 MiB producer / broker limit.
MAX_ORIGINAL_BYTES = 512 * 1024
MAX_KEY_BYTES = 256
MAX_DETAIL_CHARS = 2_000


def record_id(topic: str, partition: int, offset: int) -> str:
    """The stable id of the DLQ record for one source record."""
    return f"{topic}[{partition}]@{offset}"


def dead_letter(rejection: Rejection, now: datetime | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The DLQ message value and headers for one rejected record."""
    original = rejection.value or b""
    kept = original[:MAX_ORIGINAL_BYTES]
    rid = record_id(rejection.topic, rejection.partition, rejection.offset)
    body = {
        "id": rid,
        "reason": rejection.reason,
        "detail": rejection.detail[:MAX_DETAIL_CHARS],
        "source_topic": rejection.topic,
        "source_partition": rejection.partition,
        "source_offset": rejection.offset,
        "original_b64": base64.b64encode(kept).decode(),
        "original_size": len(original),
        "truncated": len(kept) < len(original),
        "original_sha256": hashlib.sha256(original).hexdigest(),
        "rejected_at": (now or datetime.now(UTC)).isoformat(),
    }
    headers = [("dlq.reason", rejection.reason.encode()), ("dlq.source", rid.encode())]
    return json.dumps(body).encode(), headers


def refused_by_broker(exc: Exception) -> bool:
    """A publish failure no retry can fix: the record itself is refused for its size."""
    return isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError)


async def send_or_skip(send: Callable[[], Awaitable[Any]], place: str, reason: str) -> bool:
    """Send one dead letter, waiting for the broker (bad input is never dropped silently); a
    letter the broker will never take (too large even cut) is logged with its place and skipped:
    retrying it would stall everything behind it. False: skipped."""
    try:
        await retry_forever(send, f"dead-lettering {place}", permanent=refused_by_broker)
    except Exception as exc:
        log.error("record %s (%s) could not be dead-lettered and is skipped: %s", place, reason, exc)
        return False
    return True


def dead_letter_key(rejection: Rejection) -> bytes | None:
    """The DLQ record's key: the original key (replay keeps the partitioning), bounded."""
    return rejection.key[:MAX_KEY_BYTES] if rejection.key is not None else None


@dataclass(frozen=True)
class DeadLetter:
    """One DLQ record as read back (for ``meter dlq`` and replay)."""

    id: str
    reason: str
    detail: str
    key: bytes | None
    original: bytes
    truncated: bool
    rejected_at: str
    dlq_offset: int

    @classmethod
    def parse(cls, key: bytes | None, value: bytes | None, dlq_offset: int) -> DeadLetter:
        """Raises ``ValueError`` for a record that is not a dead letter (any JSON, any types)."""
        if value is None:
            raise ValueError("no value (a tombstone)")
        body = json.loads(value)
        if not isinstance(body, dict):
            raise ValueError(f"a JSON {type(body).__name__}, not an object")
        letter_id = body.get("id") or record_id(
            _field(body, "source_topic", str), _field(body, "source_partition", int), _field(body, "source_offset", int)
        )
        if not isinstance(letter_id, str):
            raise ValueError(f"id is a {type(letter_id).__name__}, not a str")
        return cls(
            id=letter_id,
            reason=_field(body, "reason", str),
            detail=_field(body, "detail", str, ""),
            key=key,
            original=base64.b64decode(_field(body, "original_b64", str), validate=True),
            truncated=_field(body, "truncated", bool, False),
            rejected_at=_field(body, "rejected_at", str, ""),
            dlq_offset=dlq_offset,
        )


T = TypeVar("T")
_MISSING: Any = object()


def _field(body: dict[str, Any], name: str, kind: type[T], default: T = _MISSING) -> T:
    value = body.get(name, default)
    if value is _MISSING:
        raise ValueError(f"no {name}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def original_bytes(dlq_value: bytes) -> bytes:
    """The rejected message's bytes back from a DLQ record (for replay or inspection)."""
    return base64.b64decode(json.loads(dlq_value)["original_b64"])
