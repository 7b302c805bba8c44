"""Usage series read back from the rollups (parameterized SQL only)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.decisions import WINDOW_SECONDS, Window
from schemas.usage import Granularity
from worker.refusals import EmptyRange, QueryRefused

# The buckets are the limit windows (one table of lengths: schemas.decisions.WINDOW_SECONDS).
STEP_SECONDS = {g: WINDOW_SECONDS[Window(g.value)] for g in Granularity}
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
        raise EmptyRange(start, end)
    start = floor_to(start, granularity)
    points = (end - start).total_seconds() / STEP_SECONDS[granularity]
    if points > MAX_POINTS:
        raise QueryRefused(f"range has {points:.0f} {granularity.value} buckets; at most {MAX_POINTS} per query")
    return start, end
