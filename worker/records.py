"""Records of the events topic as the worker reads them: one Kafka record becomes a valid
event or a ``Rejection`` with a reason, and a request's identity for dedup.

Shared by the exactly-once path (``worker.ingest``) and the limits' fast lane
(``worker.limits.fastlane``), so both accept exactly the same events and recognise the same
retries; neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import xxhash
from pydantic import ValidationError

from schemas.events import EVENT_ADAPTER, RequestEvent
from worker.settings import Settings

# ``EVENT_ADAPTER.validate_json`` without the TypeAdapter's Python wrapper (measurably
# cheaper on the hot path): the same core validator, schema, config and errors.
_validate_event_json = EVENT_ADAPTER.validator.validate_json
_xxh3: Callable[[bytes], int] = xxhash.xxh3_64_intdigest


def request_hash(key_id: str, request_id: str) -> int:
    """Stable 64-bit identity of a request: what the dedup memory and the fast lane remember."""
    return _xxh3(f"{key_id}\x00{request_id}".encode())


class KafkaRecord(Protocol):
    """The fields of an aiokafka ``ConsumerRecord`` the worker reads."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that will not be counted, and why; it goes to the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    reason: str
    detail: str
    key: bytes | None
    value: bytes | None


class Validator:
    """Checks size, schema, key consistency and event time against a sane window."""

    def __init__(self, max_event_bytes: int, max_age_seconds: float, max_skew_seconds: float) -> None:
        self.max_event_bytes = max_event_bytes
        self.max_age_seconds = max_age_seconds
        self.max_skew_seconds = max_skew_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> Validator:
        """The bounds the worker applies (the ingest path and the limits' fast lane alike)."""
        return cls(
            settings.max_event_bytes,
            max_age_seconds=settings.dedup_horizon_hours * 3600,
            max_skew_seconds=settings.max_clock_skew_seconds,
        )

    def check(self, record: KafkaRecord, now: float) -> tuple[RequestEvent, float] | Rejection:
        """(event, event time in epoch seconds), or the rejection. A plain tuple, not a
        dataclass: this runs once per event on the hot path."""
        value = record.value
        if value is None:
            return self._reject(record, "empty_value", "message has no value (tombstone)")
        if len(value) > self.max_event_bytes:
            return self._reject(record, "oversized", f"{len(value)} bytes > limit {self.max_event_bytes}")
        try:
            event: RequestEvent = _validate_event_json(value)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            kind = "invalid_json" if first["type"].startswith("json") else "schema_violation"
            where = ".".join(str(p) for p in first["loc"]) or "message"
            return self._reject(record, kind, f"{where}: {first['msg']}"[:500])
        if record.key is None:
            return self._reject(record, "missing_key", "message key must be the event's key_id")
        if record.key != event["key_id"].encode():
            # The key decides the partition and so which worker counts the key: a
            # mismatch would count it on the wrong worker's window counters.
            return self._reject(record, "key_mismatch", "message key differs from key_id")
        epoch = event["ts"].timestamp()
        if epoch < now - self.max_age_seconds:
            return self._reject(record, "ts_too_old", f"event time {event['ts'].isoformat()} is past the horizon")
        if epoch > now + self.max_skew_seconds:
            return self._reject(record, "ts_in_future", f"event time {event['ts'].isoformat()} is ahead of now")
        return event, epoch

    @staticmethod
    def _reject(record: KafkaRecord, reason: str, detail: str) -> Rejection:
        return Rejection(record.topic, record.partition, record.offset, reason, detail, record.key, record.value)
