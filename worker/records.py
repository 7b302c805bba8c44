"""Records of the events topic as the worker reads them: one Kafka record becomes a valid
event or a ``Rejection`` with a reason, a request's identity for dedup, and the row the
ingest path aggregates.

Shared by the exactly-once path (``worker.ingest``) and the limits' fast lane
(``worker.limits.fastlane``), so both accept exactly the same events and recognise the same
retries; neither imports the other. Each reads every record (two consumers: the fast lane
never waits for the exactly-once path's writes), and whichever reads a record first hands
the row it checked to the other (``RowExchange``), so a record is parsed and validated once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

import xxhash
from pydantic import ValidationError

from common.retry import describe_error
from schemas.decisions import WINDOW_SECONDS, Window
from schemas.events import EVENT_ADAPTER, RequestEvent, zero_cost_violation
from worker.settings import Settings

log = logging.getLogger(__name__)

# ``EVENT_ADAPTER.validate_json`` without the TypeAdapter's Python wrapper (measurably
# cheaper on the hot path): the same core validator, schema, config and errors.
_validate_event_json = EVENT_ADAPTER.validator.validate_json
_xxh3: Callable[[bytes], int] = xxhash.xxh3_64_intdigest
_MINUTE = WINDOW_SECONDS[Window.minute]  # a constant: window_start() costs an enum hash per event

# One counted event as the ingest path keeps it: a plain tuple (cheapest to build once per
# event) whose fields are named, in order, by EVENT_FIELDS; ``event_row`` is the only place
# that builds one.
EventRow = tuple[int, str, str, int, str, int, str, str, int, float, int, int, str, float, list[int] | None, int]
EVENT_FIELDS = (
    "partition",
    "key_id",
    "account_id",
    "minute",
    "endpoint",
    "status",
    "node_id",
    "client_ip",
    "bytes_out",
    "latency_ms",
    "hash",
    "cost",
    "route",
    "epoch",  # the event time (s); the rollups use the minute, the limits the time itself
    "node_counts",  # the node's own counts (limits only)
    "node_in_flight",  # what of them it was still serving (limits only)
)
ROW_HASH: Final = 10  # a literal, so the type checker knows the field's type
assert EVENT_FIELDS[ROW_HASH] == "hash"
ROW_LATENCY: Final = 9
assert EVENT_FIELDS[ROW_LATENCY] == "latency_ms"


def request_hash(key_id: str, request_id: str) -> int:
    """Stable 64-bit identity of a request: what the dedup memory and the fast lane remember."""
    return _xxh3(f"{key_id}\x00{request_id}".encode())


def event_row(partition: int, event: RequestEvent, epoch: float, digest: int) -> EventRow:
    """One valid event (absent optionals as ''/0; no cost: 1), bucketed into its UTC minute."""
    return (
        partition,
        event["key_id"],
        event.get("account_id") or "",
        int(epoch) // _MINUTE * _MINUTE,
        event["endpoint"],
        event["status"],
        event["node_id"],
        event.get("client_ip") or "",
        event.get("bytes_out") or 0,
        event.get("latency_ms") or 0.0,
        digest,
        event.get("cost", 1),
        event.get("route") or "",
        epoch,
        event.get("node_counts"),
        event.get("node_in_flight") or 0,
    )


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


def validation_reason(exc: ValidationError) -> tuple[str, str]:
    """(DLQ reason, detail) of a record its schema refused: the first error, where it is."""
    first = exc.errors(include_url=False)[0]
    kind = "invalid_json" if first["type"].startswith("json") else "schema_violation"
    where = ".".join(str(p) for p in first["loc"]) or "message"
    return kind, f"{where}: {first['msg']}"[:500]


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
            return self.reject(record, "empty_value", "message has no value (tombstone)")
        if len(value) > self.max_event_bytes:
            return self.reject(record, "oversized", f"{len(value)} bytes > limit {self.max_event_bytes}")
        try:
            event: RequestEvent = _validate_event_json(value)
        except ValidationError as exc:
            return self.reject(record, *validation_reason(exc))
        if event.get("cost") == 0:  # the rule's call only then: this runs once per event
            zero_cost = zero_cost_violation(event)
            if zero_cost is not None:
                return self.reject(record, *validation_reason(zero_cost))
        if record.key is None:
            return self.reject(record, "missing_key", "message key must be the event's key_id")
        if record.key != event["key_id"].encode():
            # The key decides the partition and so which worker counts the key: a
            # mismatch would count it on the wrong worker's window counters.
            return self.reject(record, "key_mismatch", "message key differs from key_id")
        epoch = event["ts"].timestamp()
        if epoch < now - self.max_age_seconds:
            return self.reject(record, "ts_too_old", f"event time {event['ts'].isoformat()} is past the horizon")
        if epoch > now + self.max_skew_seconds:
            return self.reject(record, "ts_in_future", f"event time {event['ts'].isoformat()} is ahead of now")
        return event, epoch

    @staticmethod
    def reject(record: KafkaRecord, reason: str, detail: str) -> Rejection:
        return Rejection(record.topic, record.partition, record.offset, reason, detail, record.key, record.value)


class CheckedRows:
    """Rows one reader of the events topic has checked, by (partition, offset), until the other
    reader reaches them (one direction of a ``RowExchange``).

    Kafka records are immutable, so the row of (partition, offset) is what the reader would
    build itself. Only valid records are handed over (a rejection is checked again by the ingest
    path, which dead-letters it with its exact reason). Bounded: past ``max_rows`` nothing more is
    handed over until the reader catches up (neither reader ever waits for the other), and a
    record not found here is checked by the reader itself. Rows the reader skips (replayed
    records, a seek) are dropped when it passes them.
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._rows: dict[int, deque[tuple[int, EventRow]]] = {}
        self._passed: dict[int, int] = {}  # partition -> last offset the reader asked for
        self.size = 0
        self.hits = 0
        self.misses = 0

    def put(self, partition: int, offset: int, row: EventRow) -> None:
        """Hand over the row of a record (in offset order per partition)."""
        if self.size >= self.max_rows or offset <= self._passed.get(partition, -1):
            return
        rows = self._rows.get(partition)
        if rows is None:
            rows = self._rows[partition] = deque()
        elif rows and rows[-1][0] >= offset:
            return  # read again after a seek: the first copy is there
        rows.append((offset, row))
        self.size += 1

    def take(self, partition: int, offset: int) -> EventRow | None:
        """The row of (partition, offset) if the other reader checked it; drops the rows before it."""
        self._passed[partition] = offset
        rows = self._rows.get(partition)
        while rows:
            at = rows[0][0]
            if at > offset:
                break
            row = rows.popleft()[1]
            self.size -= 1
            if at == offset:
                self.hits += 1
                return row
        self.misses += 1
        return None

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions assigned or revoked: what was handed over for them is not for this owner."""
        for p in partitions:
            rows = self._rows.pop(p, None)
            if rows:
                self.size -= len(rows)
            self._passed.pop(p, None)


class RowExchange:
    """The two readers' hand-over: rows the fast lane checked for the ingest path, and rows the
    ingest path checked for the fast lane (whichever reads a record first checks it)."""

    def __init__(self, max_rows: int) -> None:
        self.to_ingest = CheckedRows(max_rows)
        self.to_fast_lane = CheckedRows(max_rows)

    def forget(self, partitions: Iterable[int]) -> None:
        self.to_ingest.forget(partitions)
        self.to_fast_lane.forget(partitions)


class RecordChecker:
    """One reader's way to a record's row: taken from the other reader if it checked the record
    already, else checked here (and handed over, for the other). The same ``Validator`` decides
    either way; a rejection is never handed over (each reader sees it, the ingest path
    dead-letters it with its reason)."""

    def __init__(self, validator: Validator, inbox: CheckedRows | None, outbox: CheckedRows | None) -> None:
        self.validator = validator
        self.inbox = inbox
        self.outbox = outbox

    def row(self, record: KafkaRecord, now: float) -> EventRow | Rejection:
        partition, offset = record.partition, record.offset
        if self.inbox is not None:
            row = self.inbox.take(partition, offset)
            if row is not None:
                return row
        try:
            result = self.validator.check(record, now)
            if isinstance(result, Rejection):
                return result
            event, epoch = result
            row = event_row(partition, event, epoch, request_hash(event["key_id"], event["request_id"]))
        except Exception as exc:
            # A bug that some input trips must not stall the partition (the batch would be read
            # again for ever): the record goes to the DLQ with the error, to replay once fixed.
            log.error("checking %s[%d]@%d failed; dead-lettered", record.topic, partition, offset, exc_info=True)
            return Validator.reject(record, "check_failed", describe_error(exc)[:500])
        if self.outbox is not None:
            self.outbox.put(partition, offset, row)  # ignored past its bound
        return row
