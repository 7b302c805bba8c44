"""Event records of the unit tests of the events path: a valid event with fields overridden,
as the Kafka record a reader gets, and the validator they are checked with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from schemas.events import dump_event, make_event
from worker.records import Validator

NOW = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)


@dataclass
class Rec:
    value: bytes | None
    key: bytes | None
    partition: int = 0
    offset: int = 0
    topic: str = "events"


def event(**over: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "request_id": "r1",
        "key_id": "k1",
        "node_id": "n1",
        "method": "GET",
        "endpoint": "/v0/payments",
        "status": 200,
        "ts": NOW - timedelta(seconds=30),
    }
    fields.update(over)
    return fields


def rec(**over: object) -> Rec:
    ev = make_event(**event(**over))
    return Rec(dump_event(ev), ev["key_id"].encode())


VALIDATOR = Validator(max_event_bytes=2048, max_age_seconds=24 * 3600, max_skew_seconds=300)


def record(partition: int, offset: int, **over: object) -> Rec:
    r = rec(**over)
    r.partition, r.offset = partition, offset
    return r
