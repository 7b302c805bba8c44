"""Aggregate one batch of valid events into rollup rows (minute, hour, day, client IPs),
the dedup memory of the batch and the offsets it covers, as one Arrow table."""

from __future__ import annotations

from collections.abc import Collection

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from worker.store.rollup import LEVELS, ROLLUP_SCHEMA

# The dimensions of each level (columns of the per-event table built by ``_event_table``).
_MINUTE_DIMS = ["key_id", "account_id", "minute", "endpoint", "status"]
_HOUR_DIMS = ["key_id", "account_id", "hour", "endpoint", "status", "node_id"]
_DAY_DIMS = ["key_id", "account_id", "day", "endpoint", "status", "node_id"]
_CLIENT_DIMS = ["key_id", "account_id", "hour", "status", "client_ip"]
_SUMS = [("requests", "sum"), ("bytes_out", "sum"), ("latency_ms", "sum")]

_xxh3 = xxhash.xxh3_64_intdigest


def request_hash(key_id: str, request_id: str) -> int:
    """Stable 64-bit identity of a request for the dedup memory (the pipeline inlines it)."""
    return int(_xxh3(f"{key_id}\x00{request_id}".encode()))


class BatchAggregate:
    """Accumulates events; ``to_arrow`` renders every level's rows for one atomic insert.

    The events are kept column-wise as they come (plain lists the pipeline appends to
    directly, one pass per event) and grouped per level in Arrow (C++) when the batch is
    rendered: one row per distinct (key, account, bucket, endpoint, status[, node]) at the
    minute, hour and day levels and per (key, account, hour, status, client IP) for client
    IPs, with the sums of requests, bytes out and latency. The dedup rows (hashes per
    partition and minute) and the limit counts come from the same table.
    """

    def __init__(self) -> None:
        # One list per column, index = event (see ``columns``).
        self.partition: list[int] = []
        self.key_id: list[str] = []
        self.account_id: list[str] = []
        self.minute: list[int] = []
        self.endpoint: list[str] = []
        self.status: list[int] = []
        self.node_id: list[str] = []
        self.client_ip: list[str] = []
        self.bytes_out: list[int] = []
        self.latency_ms: list[float] = []
        self.hashes: list[int] = []
        self._table: pa.Table | None = None
        self._levels: dict[str, pa.Table] | None = None
        self.offsets: dict[int, int] = {}  # partition -> last offset of this batch
        self.first_offsets: dict[int, int] = {}

    @property
    def events(self) -> int:
        return len(self.hashes)

    def changed(self) -> None:
        """Forget rendered tables (after appending to the column lists directly)."""
        self._table = None
        self._levels = None

    def token(self, topic: str) -> str:
        """Deterministic identity of the batch: the same records give the same token."""
        spans = ",".join(f"{p}:{self.first_offsets[p]}-{o}" for p, o in sorted(self.offsets.items()))
        return f"{topic}|{spans}"

    def minutes_by_partition(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        if not self.hashes:
            return out
        pairs = self._table_or_build().group_by(["partition", "minute"], use_threads=False).aggregate([])
        for p, m in zip(pairs.column("partition").to_pylist(), pairs.column("minute").to_pylist(), strict=True):
            out.setdefault(p, set()).add(m)
        return out

    def drop(self, hashes: Collection[int]) -> int:
        """Remove the events whose hash is in ``hashes`` (found in the dedup memory); returns how many."""
        if not hashes or not self.hashes:
            return 0
        keep = [h not in hashes for h in self.hashes]
        dropped = keep.count(False)
        if dropped:
            for name in _COLUMN_LISTS:
                column = getattr(self, name)
                column[:] = [v for v, k in zip(column, keep, strict=True) if k]
            self.changed()
        return dropped

    def _table_or_build(self) -> pa.Table:
        if self._table is None:
            self._table = self._event_table()
        return self._table

    def _event_table(self) -> pa.Table:
        """One row per event with the dimensions of every level (absent optionals as ''/0)."""
        minute = pa.array(self.minute, pa.int64())
        return pa.table(
            {
                "partition": pa.array(self.partition, pa.int64()),
                "key_id": pa.array(self.key_id, pa.string()),
                "account_id": pa.array(self.account_id, pa.string()),
                "minute": minute,
                "hour": pc.multiply(pc.divide(minute, 3600), 3600),  # buckets are >= 0: truncation is floor
                "day": pc.multiply(pc.divide(minute, 86400), 86400),
                "endpoint": pa.array(self.endpoint, pa.string()),
                "status": pa.array(self.status, pa.int64()),
                "node_id": pa.array(self.node_id, pa.string()),
                "client_ip": pa.array(self.client_ip, pa.string()),
                "requests": pa.repeat(pa.scalar(1, pa.int64()), len(self.hashes)),
                "bytes_out": pa.array(self.bytes_out, pa.int64()),
                "latency_ms": pa.array(self.latency_ms, pa.float64()),
                "hash": pa.array(self.hashes, pa.uint64()),
            }
        )

    def _grouped(self) -> dict[str, pa.Table]:
        if self._levels is None:
            table = self._table_or_build()
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
        grouped = self._grouped() if self.hashes else {}
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

        # The dedup memory: one row per (partition, minute) holding the hashes counted there.
        if self.hashes:
            table = self._table_or_build()
            dedup = table.group_by(["partition", "minute"], use_threads=False).aggregate([("hash", "list")])
            d_part = dedup.column("partition").combine_chunks().cast(pa.uint16())
            d_minute = dedup.column("minute").combine_chunks().cast(pa.uint32())
            d_hashes = dedup.column("hash_list").combine_chunks().cast(pa.list_(pa.uint64()))
        else:
            d_part = pa.array([], pa.uint16())
            d_minute = pa.array([], pa.uint32())
            d_hashes = pa.array([], pa.list_(pa.uint64()))
        nd = len(d_part)
        offset_parts = list(self.offsets)
        no = len(offset_parts)
        n = nd + no
        blank = pa.repeat(pa.scalar("", pa.string()), n)
        parts.append(
            [
                pa.array([LEVELS["dedup"]] * nd + [LEVELS["offset"]] * no, pa.int8()),
                pa.array([""] * nd + [topic] * no, pa.string()),
                pa.concat_arrays([d_minute, pa.repeat(pa.scalar(0, pa.uint32()), no)]),
                blank,
                pa.repeat(pa.scalar(0, pa.uint16()), n),
                blank,
                blank,
                blank,
                pa.concat_arrays([d_part, pa.array(offset_parts, pa.uint16())]),
                pa.repeat(pa.scalar(0, pa.uint64()), n),
                pa.repeat(pa.scalar(0, pa.uint64()), n),
                pa.repeat(pa.scalar(0.0, pa.float64()), n),
                pa.array([0] * nd + [self.offsets[p] for p in offset_parts], pa.int64()),
                pa.concat_arrays([d_hashes, pa.array([[]] * no, pa.list_(pa.uint64()))]),
            ]
        )
        # One chunk per column: the insert must be one block (one part, atomic).
        return pa.Table.from_arrays(
            [pa.concat_arrays([p[i] for p in parts]) for i in range(len(ROLLUP_SCHEMA))],
            schema=ROLLUP_SCHEMA,
        )


_COLUMN_LISTS = (
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
    "hashes",
)
