"""Aggregate one batch of valid events into rollup rows (minute, hour, day, client IPs, 401s, 429s),
the dedup memory of the batch and the offsets it covers, as one Arrow table."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from common.retry import describe_error
from schemas.decisions import WINDOW_SECONDS, Window
from schemas.events import make_event
from worker.records import EVENT_FIELDS, ROW_HASH, EventRow, event_row
from worker.store import rollup

_HOUR = WINDOW_SECONDS[Window.hour]
_DAY = WINDOW_SECONDS[Window.day]

_EVENT_TYPES = {
    "partition": pa.int64(),
    "key_id": pa.string(),
    "account_id": pa.string(),
    "minute": pa.int64(),
    "endpoint": pa.string(),
    "status": pa.int64(),
    "node_id": pa.string(),
    "client_ip": pa.string(),
    "bytes_out": pa.int64(),
    "latency_ms": pa.float64(),
    "hash": pa.uint64(),
    "cost": pa.int64(),
    "route": pa.string(),
}


# The rollup levels: the dimensions each groups by (columns of the per-event table) and the
# one that is its bucket. Each dimension but the bucket is the rollup column of that name.
# ``route`` follows from the endpoint (the nodes' route configuration): grouping by it adds no row.
_LEVELS: dict[str, tuple[list[str], str]] = {
    "minute": (["key_id", "account_id", "minute", "endpoint", "status", "route"], "minute"),
    "hour": (["key_id", "account_id", "hour", "endpoint", "status", "node_id", "route"], "hour"),
    "day": (["key_id", "account_id", "day", "endpoint", "status", "node_id", "route"], "day"),
    "client_hour": (["key_id", "account_id", "hour", "status", "client_ip"], "hour"),
}
# Sums of each level: per-event column -> its sum's rollup column.
_SUMS = {"requests": "requests", "bytes_out": "bytes_out", "latency_ms": "latency_ms_sum", "cost": "cost"}


class BatchAggregate:
    """The counted events of one batch and the offsets it covers; ``to_arrow`` renders every
    level's rows for one atomic insert.

    Events are grouped per level in Arrow (C++) when the batch is rendered: one row per
    distinct (key, account, bucket, endpoint, status[, node]) at the minute, hour and day
    levels and per (key, account, hour, status, client IP) for client IPs (the client IP rows of
    status 401 and the minute rows of status 429 once more, as their own levels), with the sums
    of requests, bytes out and latency. The dedup rows (hashes per partition and minute) and the
    offset rows (last offset per partition) go into the same insert.
    """

    def __init__(self, rows: list[EventRow], offsets: dict[int, int], first_offsets: dict[int, int]) -> None:
        """``offsets`` / ``first_offsets``: last and first offset per partition of the records
        the batch covers (dead-lettered ones included: they are done with too)."""
        self._rows = rows
        self.offsets = offsets
        self.first_offsets = first_offsets
        self._columns: dict[str, Sequence[Any]] | None = None
        self._table: pa.Table | None = None
        self._levels: dict[str, pa.Table] | None = None

    @property
    def events(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[EventRow]:
        """The events, in order (less any ``drop`` removed)."""
        return self._rows

    @property
    def empty(self) -> bool:
        """No record at all: nothing to write, not even offsets."""
        return not self.offsets

    def token(self, topic: str) -> str:
        """Deterministic identity of the batch: the same records give the same token."""
        spans = ",".join(f"{p}:{self.first_offsets[p]}-{o}" for p, o in sorted(self.offsets.items()))
        return f"{topic}|{spans}"

    def column(self, name: str) -> Sequence[Any]:
        """One field of every event, in event order (see ``EVENT_FIELDS``)."""
        if self._columns is None:
            transposed = list(zip(*self._rows, strict=True)) if self._rows else [() for _ in EVENT_FIELDS]
            self._columns = dict(zip(EVENT_FIELDS, transposed, strict=True))
        return self._columns[name]

    def dedup_keys(self) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
        """(partitions, minutes, hashes) of the events, for the recent-hash cache."""
        return self.column("partition"), self.column("minute"), self.column("hash")

    def minutes_by_partition(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for p, m in zip(self.column("partition"), self.column("minute"), strict=True):
            out.setdefault(p, set()).add(m)
        return out

    def drop(self, hashes: Collection[int]) -> int:
        """Remove the events whose hash is in ``hashes`` (found in the dedup memory); returns how many."""
        if not hashes or not self._rows:
            return 0
        kept = [row for row in self._rows if row[ROW_HASH] not in hashes]
        dropped = len(self._rows) - len(kept)
        if dropped:
            self._rows = kept
            self._columns = self._table = self._levels = None
        return dropped

    def _event_table(self) -> pa.Table:
        """One row per event with the dimensions of every level."""
        if self._table is None:
            # The fields the rollups keep (not the event time and node counts, which the limits read).
            columns = {name: pa.array(self.column(name), kind) for name, kind in _EVENT_TYPES.items()}
            minute = columns["minute"]
            columns["hour"] = _floor(minute, _HOUR)
            columns["day"] = _floor(minute, _DAY)
            columns["requests"] = pa.repeat(pa.scalar(1, pa.int64()), self.events)
            self._table = pa.table(columns)
        return self._table

    def _grouped(self) -> dict[str, pa.Table]:
        if self._levels is None:
            table = self._event_table()
            with_ip = table.filter(pc.not_equal(table.column("client_ip"), ""))
            sums = [(column, "sum") for column in _SUMS]
            levels = {
                level: (with_ip if level == "client_hour" else table).group_by(dims, use_threads=False).aggregate(sums)
                for level, (dims, _) in _LEVELS.items()
            }
            for level, copied in rollup.COPIED_LEVELS.items():  # one status of another level
                rows = levels[copied.source]
                levels[level] = rows.filter(pc.equal(rows.column("status"), copied.status))
            self._levels = levels
        return self._levels

    def addresses(self) -> tuple[list[str], list[int], list[str]]:
        """(key, UTC day start, client address) of the events that have one, for the address
        counts (``worker.ingest.client_ips``); repeated triples are fine there."""
        if not self._rows:
            return [], [], []
        rows = self._grouped()["client_hour"]
        days = _floor(rows.column("hour"), _DAY)
        return rows.column("key_id").to_pylist(), days.to_pylist(), rows.column("client_ip").to_pylist()

    def to_arrow(self, topic: str, client_ips: Mapping[tuple[str, int], int] | None = None) -> pa.Table:
        """The batch's one insert: every level's rows, the dedup rows and the offset rows, each
        column assembled by name in ``ROLLUP_SCHEMA`` (a column a row kind lacks is ''/0).
        ``client_ips``: address counts per (key, day) that grew, written with the batch."""
        parts = [self._level_part(level, rows) for level, rows in self._grouped().items()] if self._rows else []
        if client_ips:
            parts.append(_client_ips_part(client_ips))
        parts.append(self._dedup_part())
        parts.append(self._offset_part(topic))
        return _assemble([p for p in parts if p[0]])

    def _level_part(self, level: str, rows: pa.Table) -> tuple[int, dict[str, pa.Array]]:
        copied = rollup.COPIED_LEVELS.get(level)
        dims, bucket = _LEVELS[copied.source if copied is not None else level]
        columns = {dim: rows.column(dim) for dim in dims if dim != bucket}
        columns["bucket"] = rows.column(bucket)
        columns.update({total: rows.column(f"{column}_sum") for column, total in _SUMS.items()})
        columns["level"] = pa.repeat(pa.scalar(rollup.LEVELS[level], pa.int8()), rows.num_rows)
        return rows.num_rows, columns

    def _dedup_part(self) -> tuple[int, dict[str, pa.Array]]:
        """The dedup memory: one row per (partition, minute) holding the hashes counted there."""
        if not self._rows:
            return 0, {}
        dedup = self._event_table().group_by(["partition", "minute"], use_threads=False).aggregate([("hash", "list")])
        n = dedup.num_rows
        return n, {
            "level": pa.repeat(pa.scalar(rollup.LEVELS["dedup"], pa.int8()), n),
            "kafka_partition": dedup.column("partition"),
            "bucket": dedup.column("minute"),
            "request_hashes": dedup.column("hash_list"),
        }

    def _offset_part(self, topic: str) -> tuple[int, dict[str, pa.Array]]:
        """The offsets the batch covers: one row per partition, keyed by the topic."""
        partitions = list(self.offsets)
        n = len(partitions)
        return n, {
            "level": pa.repeat(pa.scalar(rollup.LEVELS["offset"], pa.int8()), n),
            "key_id": pa.repeat(pa.scalar(topic, pa.string()), n),
            "kafka_partition": pa.array(partitions, pa.int64()),
            "last_offset": pa.array([self.offsets[p] for p in partitions], pa.int64()),
        }


def unrenderable(rows: list[EventRow], topic: str) -> list[tuple[EventRow, str]]:
    """The rows a batch cannot be rendered with, each with its error, found by halving (a few
    renders per bad row; only after the whole batch failed to render). [] when every half
    renders on its own: the failure is not one row's, and nothing is set aside for it."""
    try:
        probe = BatchAggregate(rows, {}, {})
        probe.addresses()
        probe.to_arrow(topic)
        return []
    except Exception as exc:  # whatever the input trips: what is isolated here is a bug's trigger
        if len(rows) <= 1:
            return [(row, describe_error(exc)[:500]) for row in rows]
    middle = len(rows) // 2
    return unrenderable(rows[:middle], topic) + unrenderable(rows[middle:], topic)


# A valid event with every optional field set: what any batch of good input looks like to
# the rendering. If it renders while every row of a batch fails, the rows are at fault.
_TYPICAL_EVENT = make_event(
    request_id="typical",
    key_id="k_typical",
    node_id="node-typical",
    method="GET",
    endpoint="/v1/typical",
    status=200,
    ts="2026-01-01T00:00:00Z",
    account_id="acct-typical",
    latency_ms=12.5,
    client_ip="192.0.2.1",
    bytes_out=1024,
    cost=2,
    route="typical",
    node_counts=[1, 1, 1],
    node_in_flight=0,
)


def renders_typical_event(topic: str) -> bool:
    """Whether a typical valid event renders: tells a batch whose every row trips the
    rendering (the input's fault) from a rendering that fails on anything (the code's)."""
    epoch = _TYPICAL_EVENT["ts"].timestamp()
    return not unrenderable([event_row(0, _TYPICAL_EVENT, epoch, 1)], topic)


def _floor(epochs: Any, step: int) -> Any:
    """Epoch seconds floored to a multiple of ``step`` (buckets are >= 0: truncation is floor)."""
    return pc.multiply(pc.divide(epochs, step), step)


def _client_ips_part(counts: Mapping[tuple[str, int], int]) -> tuple[int, dict[str, pa.Array]]:
    """One ``client_ips`` row per (key, day): the key's distinct addresses that day so far."""
    n = len(counts)
    return n, {
        "level": pa.repeat(pa.scalar(rollup.LEVELS["client_ips"], pa.int8()), n),
        "key_id": pa.array([key for key, _ in counts], pa.string()),
        "bucket": pa.array([day for _, day in counts], pa.int64()),
        "client_ips": pa.array(list(counts.values()), pa.int64()),
    }


def _assemble(parts: list[tuple[int, dict[str, pa.Array]]]) -> pa.Table:
    """One table in ``ROLLUP_SCHEMA``: each column by its name, from every part in order (cast
    to the column's type; '' / 0 / [] where a part has no such column), in one chunk per
    column so the insert is one block (one part, atomic)."""
    schema = rollup.ROLLUP_SCHEMA
    columns = []
    for field in schema:
        pieces = []
        for n, part in parts:
            given = part.get(field.name)
            if given is None:
                pieces.append(_blank(field.type, n))
            else:
                if isinstance(given, pa.ChunkedArray):
                    given = given.combine_chunks()
                pieces.append(given.cast(field.type))
        columns.append(pa.concat_arrays(pieces) if pieces else pa.array([], field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _blank(kind: pa.DataType, n: int) -> pa.Array:
    """``n`` empty values of a rollup column's type: '' for text, 0 for numbers, [] for lists."""
    if pa.types.is_list(kind):
        return pa.ListArray.from_arrays(pa.repeat(pa.scalar(0, pa.int32()), n + 1), pa.array([], kind.value_type))
    return pa.repeat(pa.scalar("" if pa.types.is_string(kind) else 0, kind), n)
