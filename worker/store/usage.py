"""Usage series read back from the rollups (parameterized SQL only)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from clickhouse_connect.driver.client import Client

from schemas.usage import Granularity, UsagePoint
from worker.store.rollup import rollup_table

STEP_SECONDS = {Granularity.minute: 60, Granularity.hour: 3600, Granularity.day: 86400}
DEFAULT_SPAN = {
    Granularity.minute: timedelta(hours=1),
    Granularity.hour: timedelta(days=1),
    Granularity.day: timedelta(days=30),
}
MAX_POINTS = 50_000


def floor_to(ts: datetime, granularity: Granularity) -> datetime:
    step = STEP_SECONDS[granularity]
    return datetime.fromtimestamp(int(ts.timestamp()) // step * step, UTC)


def default_range(
    granularity: Granularity, since: datetime | None, until: datetime | None, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """[since, until) aligned to the granularity; defaults end now and span a sensible window."""
    end = until or (now or datetime.now(UTC))
    start = since or end - DEFAULT_SPAN[granularity]
    if start >= end:
        raise ValueError(f"--since ({start.isoformat()}) must be before --until ({end.isoformat()})")
    start = floor_to(start, granularity)
    points = (end - start).total_seconds() / STEP_SECONDS[granularity]
    if points > MAX_POINTS:
        raise ValueError(f"range has {points:.0f} {granularity.value} buckets; at most {MAX_POINTS} per query")
    return start, end


def usage_series(
    client: Client,
    database: str,
    key_id: str,
    granularity: Granularity,
    since: datetime,
    until: datetime,
    fill: bool = True,
) -> list[UsagePoint]:
    """Requests of one key per bucket in [since, until), gaps filled with zeros."""
    step = STEP_SECONDS[granularity]
    fill_clause = (
        "WITH FILL FROM toDateTime({since:DateTime('UTC')}, 'UTC') "
        "TO toDateTime({until:DateTime('UTC')}, 'UTC') STEP {step:UInt32}"
        if fill
        else ""
    )
    result = client.query(
        f"SELECT bucket, sum(requests) AS n_requests, sumIf(requests, status >= 400) AS n_errors, "
        f"sum(bytes_out) AS n_bytes FROM {rollup_table(database)} "
        "WHERE level = {level:String} AND key_id = {key:String} "
        "AND bucket >= {since:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} "
        f"GROUP BY bucket ORDER BY bucket {fill_clause}",
        parameters={"level": granularity.value, "key": key_id, "since": since, "until": until, "step": step},
    )
    return [
        UsagePoint(bucket=b.replace(tzinfo=UTC), requests=int(r), errors=int(e), bytes_out=int(bo))
        for b, r, e, bo in result.result_rows
    ]
