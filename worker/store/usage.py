"""Usage series read back from the rollups (parameterized SQL only)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from schemas.decisions import WINDOW_SECONDS, Window
from schemas.usage import Granularity
from worker.refusals import EmptyRange, QueryRefused
from worker.settings import Settings

# The buckets are the limit windows (one table of lengths: schemas.decisions.WINDOW_SECONDS).
STEP_SECONDS = {g: WINDOW_SECONDS[Window(g.value)] for g in Granularity}
DEFAULT_SPAN = {
    Granularity.minute: timedelta(hours=1),
    Granularity.hour: timedelta(days=1),
    Granularity.day: timedelta(days=30),
}
MAX_POINTS = 50_000


@dataclass(frozen=True)
class LevelsHeld:
    """How many days the minute and hour levels keep their rows (METER_TTL_MINUTE_DAYS,
    METER_TTL_HOUR_DAYS): older buckets are only in the coarser levels."""

    minute_days: int = 7
    hour_days: int = 90

    @classmethod
    def of(cls, settings: Settings) -> LevelsHeld:
        return cls(settings.ttl_minute_days, settings.ttl_hour_days)

    def holds(self, granularity: Granularity, since: datetime, now: datetime) -> bool:
        """Whether ``granularity`` still holds the bucket of ``since`` whole at ``now``."""
        days = {Granularity.minute: self.minute_days, Granularity.hour: self.hour_days}.get(granularity)
        return days is None or floor_to(since, granularity) >= now - timedelta(days=days)


DEFAULT_LEVELS_HELD = LevelsHeld()  # the settings' defaults


def floor_to(ts: datetime, granularity: Granularity) -> datetime:
    step = STEP_SECONDS[granularity]
    return datetime.fromtimestamp(int(ts.timestamp()) // step * step, UTC)


def ceil_to(ts: datetime, granularity: Granularity) -> datetime:
    floored = floor_to(ts, granularity)
    return floored if floored == ts else floored + timedelta(seconds=STEP_SECONDS[granularity])


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
