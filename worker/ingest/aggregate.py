"""Aggregate one batch of valid events into rollup rows (minute, hour, day, client IPs),
the dedup memory of the batch and the offsets it covers, as one Arrow table."""

from __future__ import annotations

from collections import defaultdict
from itertools import chain

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from schemas.events import RequestEvent
from worker.store.rollup import LEVELS, ROLLUP_SCHEMA

# The dimensions of each level (columns of the per-event table built by ``_event_table``).
_MINUTE_DIMS = ["key_id", "account_id", "minute", "endpoint", "status"]
_HOUR_DIMS = ["key_id", "account_id", "hour", "endpoint", "status", "node_id"]
_DAY_DIMS = ["key_id", "account_id", "day", "endpoint", "status", "node_id"]
_CLIENT_DIMS = ["key_id", "account_id", "hour", "status", "client_ip"]
_SUMS = [("requests", "sum"), ("bytes_out", "sum"), ("latency_ms", "sum")]


def request_hash(key_id: str, request_id: str) -> int:
    """Stable 64-bit identity of a request for the dedup memory."""
    return int(xxhash.xxh3_64_intdigest(f"{key_id}\x00{request_id}".encode()))


class BatchAggregate:
    """Accumulates events; ``to_arrow`` renders every level's rows for one atomic insert.

    The events are kept as they come and grouped per level in Arrow (C++) when the batch is
    rendered: one row per distinct (key, account, bucket, endpoint, status[, node]) at the
    minute, hour and day levels and per (key, account, hour, status, client IP) for client
    IPs, with the sums of requests, bytes out and latency.
    """

    def __init__(self) -> None:
        self._events: list[RequestEvent] = []
        self._minutes: list[int] = []
        self._hashes: dict[tuple[int, int], list[int]] = defaultdict(list)  # (partition, minute)
        self._levels: dict[str, pa.Table] | None = None
        self.offsets: dict[int, int] = {}  # partition -> last offset of this batch
        self.first_offsets: dict[int, int] = {}
        self.events = 0

    def add(self, partition: int, event: RequestEvent, epoch: float, digest: int) -> None:
        minute = int(epoch) // 60 * 60
        self._events.append(event)
        self._minutes.append(minute)
        self._hashes[(partition, minute)].append(digest)
        self.events += 1
        self._levels = None

    def cover(self, partition: int, offset: int) -> None:
        """Record that ``offset`` of ``partition`` is part of this batch (counted or not)."""
        if offset > self.offsets.get(partition, -1):
            self.offsets[partition] = offset
        if offset < self.first_offsets.get(partition, offset + 1):
            self.first_offsets[partition] = offset

    def token(self, topic: str) -> str:
        """Deterministic identity of the batch: the same records give the same token."""
        spans = ",".join(f"{p}:{self.first_offsets[p]}-{o}" for p, o in sorted(self.offsets.items()))
        return f"{topic}|{spans}"

    def minutes_by_partition(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = defaultdict(set)
        for partition, minute in self._hashes:
            out[partition].add(minute)
        return out

    def key_minute_counts(self) -> dict[tuple[str, int], int]:
        """Requests per (key_id, minute) — what the limit counters add."""
        out: dict[tuple[str, int], int] = defaultdict(int)
        if not self._events:
            return out
        counts = (
            self._grouped()["minute"]
            .group_by(["key_id", "minute"], use_threads=False)
            .aggregate([("requests_sum", "sum")])
        )
        keys = counts.column("key_id").to_pylist()
        minutes = counts.column("minute").to_pylist()
        out.update(zip(zip(keys, minutes, strict=True), counts.column("requests_sum_sum").to_pylist(), strict=True))
        return out

    def _event_table(self) -> pa.Table:
        """One row per event with the dimensions of every level (absent optionals as ''/0)."""
        events = self._events
        minute = pa.array(self._minutes, pa.int64())
        return pa.table(
            {
                "key_id": pa.array([e["key_id"] for e in events], pa.string()),
                "account_id": pa.array([e.get("account_id") or "" for e in events], pa.string()),
                "minute": minute,
                "hour": pc.multiply(pc.divide(minute, 3600), 3600),  # buckets are >= 0: truncation is floor
                "day": pc.multiply(pc.divide(minute, 86400), 86400),
                "endpoint": pa.array([e["endpoint"] for e in events], pa.string()),
                "status": pa.array([e["status"] for e in events], pa.int64()),
                "node_id": pa.array([e["node_id"] for e in events], pa.string()),
                "client_ip": pa.array([e.get("client_ip") or "" for e in events], pa.string()),
                "requests": pa.repeat(pa.scalar(1, pa.int64()), len(events)),
                "bytes_out": pa.array([e.get("bytes_out") or 0 for e in events], pa.int64()),
                "latency_ms": pa.array([e.get("latency_ms") or 0.0 for e in events], pa.float64()),
            }
        )

    def _grouped(self) -> dict[str, pa.Table]:
        if self._levels is None:
            table = self._event_table()
            with_ip = table.filter(pc.not_equal(table.column("client_ip"), ""))
            self._levels = {
                "minute": table.group_by(_MINUTE_DIMS, use_threads=False).aggregate(_SUMS),
                "hour": table.group_by(_HOUR_DIMS, use_threads=False).aggregate(_SUMS),
                "day": table.group_by(_DAY_DIMS, use_threads=False).aggregate(_SUMS),
                "client_hour": with_ip.group_by(_CLIENT_DIMS, use_threads=False).aggregate(_SUMS),
            }
        return self._levels

    def to_arrow(self, topic: str) -> pa.Table:
        # Columns in ROLLUP_SCHEMA order, each assembled from one piece per level (rows of a
        # level dimension it lacks hold '' / 0), then the dedup rows and the offset rows.
        parts: list[list[pa.Array]] = []
        no_hashes = pa.array([], pa.uint64())
        grouped = self._grouped() if self._events else {}
        bucket_of = {"minute": "minute", "hour": "hour", "day": "day", "client_hour": "hour"}
        for name, rows in grouped.items():
            n = rows.num_rows
            if n == 0:
                continue

            def col(column: str, rows: pa.Table = rows, n: int = n) -> pa.Array:
                if column in rows.column_names:
                    return rows.column(column).combine_chunks()
                return pa.repeat(pa.scalar("", pa.string()), n)

            parts.append(
                [
                    pa.repeat(pa.scalar(LEVELS[name], pa.int8()), n),
                    col("key_id"),
                    rows.column(bucket_of[name]).combine_chunks().cast(pa.uint32()),
                    col("endpoint") if name != "client_hour" else col(""),
                    rows.column("status").combine_chunks().cast(pa.uint16()),
                    col("node_id") if name in ("hour", "day") else col(""),
                    col("client_ip") if name == "client_hour" else col(""),
                    col("account_id"),
                    pa.repeat(pa.scalar(0, pa.uint16()), n),
                    rows.column("requests_sum").combine_chunks().cast(pa.uint64()),
                    rows.column("bytes_out_sum").combine_chunks().cast(pa.uint64()),
                    rows.column("latency_ms_sum").combine_chunks(),
                    pa.repeat(pa.scalar(0, pa.int64()), n),
                    pa.ListArray.from_arrays(pa.repeat(pa.scalar(0, pa.int32()), n + 1), no_hashes),
                ]
            )

        extra_level: list[int] = []
        extra_key: list[str] = []
        extra_bucket: list[int] = []
        extra_partition: list[int] = []
        extra_offset: list[int] = []
        hash_lists: list[list[int]] = []
        for (part, minute), digests in self._hashes.items():
            extra_level.append(LEVELS["dedup"])
            extra_key.append("")
            extra_bucket.append(minute)
            extra_partition.append(part)
            extra_offset.append(0)
            hash_lists.append(digests)
        for part, off in self.offsets.items():
            extra_level.append(LEVELS["offset"])
            extra_key.append(topic)
            extra_bucket.append(0)
            extra_partition.append(part)
            extra_offset.append(off)
            hash_lists.append([])
        n = len(extra_level)
        list_offsets = [0]
        for digests in hash_lists:
            list_offsets.append(list_offsets[-1] + len(digests))
        blank = pa.repeat(pa.scalar("", pa.string()), n)
        parts.append(
            [
                pa.array(extra_level, pa.int8()),
                pa.array(extra_key, pa.string()),
                pa.array(extra_bucket, pa.uint32()),
                blank,
                pa.repeat(pa.scalar(0, pa.uint16()), n),
                blank,
                blank,
                blank,
                pa.array(extra_partition, pa.uint16()),
                pa.repeat(pa.scalar(0, pa.uint64()), n),
                pa.repeat(pa.scalar(0, pa.uint64()), n),
                pa.repeat(pa.scalar(0.0, pa.float64()), n),
                pa.array(extra_offset, pa.int64()),
                pa.ListArray.from_arrays(
                    pa.array(list_offsets, pa.int32()), pa.array(list(chain.from_iterable(hash_lists)), pa.uint64())
                ),
            ]
        )
        # One chunk per column: the insert must be one block (one part, atomic).
        return pa.Table.from_arrays(
            [pa.concat_arrays([p[i] for p in parts]) for i in range(len(ROLLUP_SCHEMA))],
            schema=ROLLUP_SCHEMA,
        )
