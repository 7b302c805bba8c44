"""Writes and ingest-side reads of the ``usage_rollup`` table."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
from clickhouse_connect.driver.client import Client

from schemas.decisions import Window, month_bounds, window_start
from schemas.limits import ROUTE_MARK
from worker.store.client import quote_identifier, settings_for_insert

LEVELS = {
    "offset": 0,
    "minute": 1,
    "hour": 2,
    "day": 3,
    "dedup": 4,
    "client_hour": 5,
    "client_ips": 6,
    "client_401": 7,
    "minute_429": 8,
}
# ``client_ips`` rows count a key's distinct client addresses per UTC day up to this many
# (007_client_ips.sql): the leaked-key signal reads them to find its candidate keys.
CLIENT_IPS_CAP = 32

ROLLUP_SCHEMA = pa.schema(
    [
        ("level", pa.int8()),
        ("key_id", pa.string()),
        ("bucket", pa.uint32()),
        ("endpoint", pa.string()),
        ("status", pa.uint16()),
        ("node_id", pa.string()),
        ("client_ip", pa.string()),
        ("account_id", pa.string()),
        ("kafka_partition", pa.uint16()),
        ("requests", pa.uint64()),
        ("bytes_out", pa.uint64()),
        ("latency_ms_sum", pa.float64()),
        ("last_offset", pa.int64()),
        ("request_hashes", pa.list_(pa.uint64())),
        ("cost", pa.uint64()),
        ("route", pa.string()),
        ("client_ips", pa.uint32()),
    ]
)


# A batch's rows are grouped per level already (``worker.ingest.aggregate``): collapsing
# them again by the sorting key on insert finds (almost) nothing to merge and cost ~20% of
# the insert's CPU (``bench.insert_cost``). Readers sum() across parts in any case.
INSERT_SETTINGS = {"optimize_on_insert": 0}


def rollup_table(database: str) -> str:
    """The quoted name of the rollup table in ``database`` (database names come from settings)."""
    return f"{quote_identifier(database)}.usage_rollup"


class RollupStore:
    """The one place the ingest path touches ClickHouse."""

    def __init__(self, client: Client, database: str, lookup_client: Client | None = None) -> None:
        """``lookup_client``: a second client for the dedup lookups, so that the lookup of one
        batch can run while the previous batch's insert is in flight. Without it both go
        through ``client``, one at a time."""
        self._client = client
        self._lookup = lookup_client if lookup_client is not None else client
        # One call at a time on a shared client (an HTTP session refuses concurrent queries).
        self._shared: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if lookup_client is None else contextlib.nullcontext()
        )
        self._table = rollup_table(database)

    @property
    def client(self) -> Client:
        return self._client

    @property
    def table(self) -> str:
        return self._table

    def write(self, rows: pa.Table, token: str) -> None:
        """One INSERT of one block: atomic, and a retry with the same token is a no-op.

        The engine reads each chunk of an Arrow table as a block, squashes blocks up to its
        ``min_insert_block_size_rows`` and writes every squashed block as a part of its own:
        one chunk per column keeps the insert one part whatever the table's size."""
        with self._shared:
            settings = {**settings_for_insert(token), **INSERT_SETTINGS}
            self._client.insert_arrow(self._table, rows.combine_chunks(), settings=settings)

    def stored_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """Last offset written per partition of ``topic`` (absent: nothing written yet)."""
        parts = sorted(set(partitions))
        if not parts:
            return {}
        result = self._client.query(
            f"SELECT kafka_partition, max(last_offset) FROM {self._table} "
            "WHERE level = 'offset' AND key_id = {topic:String} AND kafka_partition IN {parts:Array(UInt16)} "
            "GROUP BY kafka_partition",
            parameters={"topic": topic, "parts": parts},
        )
        return {int(p): int(o) for p, o in result.result_rows}

    def seen_hashes(self, minutes_by_partition: Mapping[int, Iterable[int]], hashes: Sequence[int]) -> set[int]:
        """Which of ``hashes`` are already in the dedup memory of those partitions' minutes."""
        pairs = [(p, m) for p, minutes in minutes_by_partition.items() for m in minutes]
        if not pairs or not hashes:
            return set()
        # The hashes go as one comma-separated String parameter split in SQL: clickhouse-connect
        # formats a list parameter element by element in Python, and ClickHouse parses an
        # Array(UInt64) parameter as that many literals (both slow: see bench/results.md).
        # int.__repr__ refuses anything but ints, so nothing else can reach the text.
        with self._shared:
            result = self._lookup.query(
                f"SELECT DISTINCT h FROM {self._table} ARRAY JOIN request_hashes AS h "
                "WHERE level = 'dedup' AND (kafka_partition, toUInt32(bucket)) IN {pairs:Array(Tuple(UInt16, UInt32))} "
                "AND h IN (SELECT toUInt64(arrayJoin(splitByChar(',', {hashes:String}))))",
                parameters={
                    "pairs": "[" + ",".join(f"({int.__repr__(p)},{int.__repr__(m)})" for p, m in pairs) + "]",
                    "hashes": ",".join(map(int.__repr__, hashes)),
                },
            )
        return {int(row[0]) for row in result.result_rows}

    def forget_offsets(self, topic: str, partitions: Iterable[int]) -> None:
        """Delete the stored offsets of ``partitions`` (their log was recreated or truncated
        below them). A mutation, waited for: offsets are max()-aggregated, so a lower offset
        written next could never replace them."""
        parts = sorted(set(partitions))
        if not parts:
            return
        with self._shared:
            self._client.command(
                f"ALTER TABLE {self._table} DELETE WHERE level = 'offset' AND key_id = {{topic:String}} "
                "AND kafka_partition IN {parts:Array(UInt16)}",
                parameters={"topic": topic, "parts": parts},
                settings={"mutations_sync": 2},
            )

    def dedup_minutes(self, partitions: Iterable[int], since: int) -> dict[int, set[int]]:
        """Minutes (epoch) with stored dedup rows since ``since``, per partition."""
        parts = sorted(set(partitions))
        if not parts:
            return {}
        with self._shared:
            result = self._lookup.query(
                f"SELECT DISTINCT kafka_partition, toUInt32(bucket) FROM {self._table} "
                "WHERE level = 'dedup' AND kafka_partition IN {parts:Array(UInt16)} "
                "AND bucket >= toDateTime({since:UInt32}, 'UTC')",
                parameters={"parts": parts, "since": since},
            )
        out: dict[int, set[int]] = {}
        for p, m in result.result_rows:
            out.setdefault(int(p), set()).add(int(m))
        return out

    def current_window_counts(self, now: float) -> list[tuple[str, str, str, int, int]]:
        """(subject, account_id, level, bucket epoch, cost) of the windows containing ``now``.

        Used to rebuild the live limit counters when partitions are assigned. A subject is a
        key, and a key on a route for rows with a route (``key@route``, route limits); counts
        are sums of cost. The calendar month (level ``'month'``, bucket = the month's first
        second) is the sum of the key's day rows of the month: there is no month level in the
        table (see README, "Calendar-month quotas": day rows are kept 3 years, and a month is at
        most 31 of them per key).
        """
        starts = {window: window_start(window, now) for window in (Window.minute, Window.hour, Window.day)}
        month, month_end = month_bounds(now)
        # Each row counts for its key and, with a route, for the key on the route as well.
        subjects = f"if(route = '', [key_id], [key_id, concat(key_id, '{ROUTE_MARK}', route)])"
        result = self._client.query(
            f"SELECT subject, any(account_id), toString(level), toUInt32(bucket), sum(cost) FROM {self._table} "
            f"ARRAY JOIN {subjects} AS subject "
            # 429s are refused by the limiter: as in the live counters, they use up nothing.
            "WHERE status != 429 AND ((level = 'minute' AND bucket = toDateTime({m:UInt32}, 'UTC')) "
            "OR (level = 'hour' AND bucket = toDateTime({h:UInt32}, 'UTC')) "
            "OR (level = 'day' AND bucket = toDateTime({d:UInt32}, 'UTC'))) "
            "GROUP BY subject, level, bucket "
            "UNION ALL "
            f"SELECT subject, any(account_id), 'month', {{mo:UInt32}}, sum(cost) FROM {self._table} "
            f"ARRAY JOIN {subjects} AS subject "
            "WHERE level = 'day' AND status != 429 AND bucket >= toDateTime({mo:UInt32}, 'UTC') "
            "AND bucket < toDateTime({me:UInt32}, 'UTC') "
            "GROUP BY subject",
            parameters={
                "m": starts[Window.minute],
                "h": starts[Window.hour],
                "d": starts[Window.day],
                "mo": month,
                "me": month_end,
            },
        )
        return [(str(k), str(a), str(lv), int(b), int(n)) for k, a, lv, b, n in result.result_rows]

    def client_addresses(
        self, since_day: int, partitions: Collection[int], total: int
    ) -> list[tuple[str, int, list[str]]]:
        """(key, UTC day start, its addresses that day, up to the cap) from ``since_day`` on, of
        the keys Kafka's default partitioner puts in ``partitions`` of ``total`` (as the nodes'
        producers do): what the address counts start from when partitions are assigned."""
        result = self._client.query(
            f"SELECT key_id, toUInt32(toStartOfDay(bucket)) AS day, groupUniqArray({CLIENT_IPS_CAP})(client_ip) "
            f"FROM {self._table} WHERE level = 'client_hour' AND client_ip != '' "
            "AND bucket >= toDateTime({since:UInt32}, 'UTC') "
            "AND kafkaMurmurHash(key_id) % {total:UInt32} IN {parts:Array(UInt32)} GROUP BY key_id, day",
            parameters={"since": since_day, "total": total, "parts": sorted(partitions)},
        )
        return [(str(key), int(day), [str(ip) for ip in ips]) for key, day, ips in result.result_rows]

    def write_client_ips(self, counts: Mapping[tuple[str, int], int]) -> None:
        """``client_ips`` rows: distinct addresses per (key, UTC day start). Idempotent (max on merge)."""
        rows = [(LEVELS["client_ips"], key, day, n) for (key, day), n in counts.items()]
        with self._shared:
            self._client.insert(self._table, rows, column_names=["level", "key_id", "bucket", "client_ips"])


def mark_client_ips(client: Client, database: str, since_day: int) -> None:
    """Write the ``client_ips`` rows that the stored ``client_hour`` rows since ``since_day``
    call for, where rows were written without them: straight into the table (a bulk import,
    the sample data). Idempotent: max() on merge, and a count never exceeds the true one."""
    table = rollup_table(database)
    client.command(
        f"INSERT INTO {table} (level, key_id, bucket, client_ips) "
        "SELECT 'client_ips', key_id, toStartOfDay(bucket) AS day, "
        f"least(uniqExact(client_ip), {CLIENT_IPS_CAP}) AS n FROM {table} "
        "WHERE level = 'client_hour' AND client_ip != '' AND bucket >= toDateTime({since:UInt32}, 'UTC') "
        "GROUP BY key_id, day HAVING n >= 2",
        parameters={"since": since_day},
    )


# What a level that copies the rows of one status lacks, per its grouping: the source level's
# sums less its own, so that running it again adds nothing. The migrations that add such a level
# state the same for the stored rows (tests/unit/test_subset_backfill.py checks they agree).
_SUBSET_SUMS = (
    "toInt64(sumIf(requests, level = '{source}')) - toInt64(sumIf(requests, level = '{level}')) AS n, "
    "greatest(0, toInt64(sumIf(bytes_out, level = '{source}')) - toInt64(sumIf(bytes_out, level = '{level}'))), "
    "sumIf(latency_ms_sum, level = '{source}') - sumIf(latency_ms_sum, level = '{level}'), "
    "greatest(0, toInt64(sumIf(cost, level = '{source}')) - toInt64(sumIf(cost, level = '{level}'))) "
)
CLIENT_401_MISSING = (
    "INSERT INTO {table} "
    "(level, key_id, account_id, bucket, status, client_ip, requests, bytes_out, latency_ms_sum, cost) "
    "SELECT 'client_401', key_id, account_id, bucket, 401, client_ip, "
    + _SUBSET_SUMS.format(source="client_hour", level="client_401")
    + "FROM {table} WHERE level IN ('client_hour', 'client_401') AND status = 401 AND client_ip != '' "
    "AND bucket >= toDateTime({{since:UInt32}}, 'UTC') "
    "GROUP BY key_id, account_id, bucket, client_ip HAVING n > 0"
)
MINUTE_429_MISSING = (
    "INSERT INTO {table} "
    "(level, key_id, account_id, bucket, status, endpoint, route, requests, bytes_out, latency_ms_sum, cost) "
    "SELECT 'minute_429', key_id, account_id, bucket, 429, endpoint, max(route), "
    + _SUBSET_SUMS.format(source="minute", level="minute_429")
    + "FROM {table} WHERE level IN ('minute', 'minute_429') AND status = 429 "
    "AND bucket >= toDateTime({{since:UInt32}}, 'UTC') "
    "GROUP BY key_id, account_id, bucket, endpoint HAVING n > 0"
)


@dataclass(frozen=True)
class CopiedLevel:
    """A level that copies the rows of another level with one status, so that a scan of them
    reads only those (008_client_401.sql, 009_minute_429.sql). The ingest writes them with each
    batch (``worker.ingest.aggregate``); ``missing`` derives them for rows written without."""

    source: str  # the level it copies
    status: int  # the status it keeps
    missing: str  # INSERT ... SELECT of what the stored source rows call for (``mark_copied_level``)


COPIED_LEVELS: dict[str, CopiedLevel] = {
    "client_401": CopiedLevel("client_hour", 401, CLIENT_401_MISSING),
    "minute_429": CopiedLevel("minute", 429, MINUTE_429_MISSING),
}


def mark_copied_level(client: Client, database: str, level: str, since: int) -> None:
    """Write the rows of a copied level (``COPIED_LEVELS``) that the stored source rows since
    ``since`` call for, where rows were written without them: a bulk import, the sample data,
    workers of the version before. Idempotent: what is written is the difference per group
    between the two levels, so nothing is counted twice."""
    client.command(COPIED_LEVELS[level].missing.format(table=rollup_table(database)), parameters={"since": since})


def mark_summary_levels(client: Client, database: str, since: int) -> None:
    """The rows of the levels derived from the ``client_hour`` and ``minute`` rows since ``since``:
    what rows written straight into the table lack (the ingest writes them with each batch)."""
    mark_client_ips(client, database, since)
    for level in COPIED_LEVELS:
        mark_copied_level(client, database, level, since)
