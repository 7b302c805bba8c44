"""Retention from the settings, on a store that exists already.

A table's TTL is set by the migration that creates it, rendered from the settings of that
day, and a migration runs once: without this, raising ``METER_DEDUP_HORIZON_HOURS`` on a
running store would let the worker accept events older than its stored dedup memory lives
(a late retry counted twice), and a changed ``METER_TTL_*_DAYS`` would do nothing.
"""

from __future__ import annotations

import logging
import re

from clickhouse_connect.driver.client import Client

from worker.settings import Settings
from worker.store.client import quote_identifier
from worker.store.migrations import for_cluster, retention

log = logging.getLogger(__name__)

# Each table's TTL as its last migration states it (001/007/008/009, 002, 005): a fresh store gets
# exactly this, so re-applying it changes nothing there (tests/integration/test_retention.py).
TTL: dict[str, str] = {
    "usage_rollup": (
        "bucket + INTERVAL {ttl_minute_days} DAY DELETE WHERE level IN ('minute', 'minute_429'), "
        "bucket + INTERVAL {ttl_hour_days} DAY DELETE "
        "WHERE level IN ('hour', 'client_hour', 'client_ips', 'client_401'), "
        "bucket + INTERVAL {ttl_day_days} DAY DELETE WHERE level = 'day', "
        "bucket + INTERVAL {dedup_ttl_hours} HOUR DELETE WHERE level = 'dedup'"
    ),
    "decisions": "toDateTime(decided_at) + INTERVAL {ttl_day_days} DAY",
    "notifications": "toDateTime(decided_at) + INTERVAL {ttl_day_days} DAY",
}


def ttl_of(table: str, settings: Settings) -> str:
    return TTL[table].format(**retention(settings))


def apply_retention(client: Client, settings: Settings) -> list[str]:
    """Set every table's TTL from ``settings``; the tables whose TTL changed. Stored parts are
    not rewritten (``materialize_ttl_after_modify = 0``): the new TTL applies as they merge."""
    database = settings.clickhouse_database
    db = quote_identifier(database)
    changed = []
    for table in TTL:
        before = _definition(client, database, table)
        ttl = ttl_of(table, settings)
        statement = f"ALTER TABLE {db}.{table} MODIFY TTL {ttl}"
        client.command(
            for_cluster(statement, settings.clickhouse_cluster), settings={"materialize_ttl_after_modify": 0}
        )
        if _definition(client, database, table) != before:
            log.info("retention of %s.%s set from the settings: TTL %s", database, table, ttl)
            changed.append(table)
    return changed


_DEDUP_TTL = re.compile(r"toIntervalHour\((\d+)\)\s+WHERE\s+level\s*=\s*'dedup'")


def dedup_memory_hours(client: Client, database: str) -> int | None:
    """How long the stored dedup memory lives (its TTL), or None if it cannot be read."""
    match = _DEDUP_TTL.search(_definition(client, database, "usage_rollup"))
    return int(match.group(1)) if match else None


def ensure_dedup_memory(client: Client, settings: Settings) -> list[str]:
    """At a worker's start: if the stored dedup memory is shorter than the horizon this worker
    accepts, set the retention from its settings (``apply_retention``). A shorter horizon
    changes nothing here (an older worker restarting during a rollout must not cut the memory
    newer ones rely on): shortening is ``meter migrate``'s, an operator's decision."""
    stored = dedup_memory_hours(client, settings.clickhouse_database)
    needed = retention(settings)["dedup_ttl_hours"]
    if stored is not None and stored >= needed:
        return []
    log.warning(
        "the stored dedup memory lives %s h, shorter than the %d h this worker's horizon needs: "
        "setting the retention from its settings",
        stored if stored is not None else "an unknown number of",
        needed,
    )
    return apply_retention(client, settings)


def _definition(client: Client, database: str, table: str) -> str:
    rows = client.query(
        "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {table:String}",
        parameters={"db": database, "table": table},
    ).result_rows
    return str(rows[0][0]) if rows else ""
