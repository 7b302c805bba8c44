"""The ``/v1`` routes of the query API, one router per concern; every route needs the admin key.

Handlers are plain functions over the ``QueryContext`` (``worker.analytics.query_context``):
they validate what FastAPI cannot, then run one query under the context's client lock.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi import Path as PathParam
from pydantic import AfterValidator, AwareDatetime

from schemas.analytics import (
    BacktestRequest,
    BacktestResult,
    BlockedKey,
    Breakdown,
    KeyState,
    SignalKind,
    SignalReport,
    Subject,
    TopDimension,
    TopList,
    TopMetric,
    UsageSeries,
)
from schemas.usage import Granularity
from worker.analytics import backtest, queries, signals
from worker.analytics.query_context import Context, require_admin
from worker.cli_args import EARLIEST, LATEST, parse_duration

WINDOW_PATTERN = r"^[1-9][0-9]{0,3}[mhd]$"
ADMIN: list[Any] = [Depends(require_admin)]

usage = APIRouter(prefix="/v1", tags=["usage"], dependencies=ADMIN)
limits = APIRouter(prefix="/v1", tags=["limits"], dependencies=ADMIN)
abuse = APIRouter(prefix="/v1", tags=["abuse"], dependencies=ADMIN)

KeyIdPath = Annotated[str, PathParam(min_length=1, max_length=64, description="key id (never the raw key)")]
AccountPath = Annotated[str, PathParam(min_length=1, max_length=64)]


def _storable(value: datetime | None) -> datetime | None:
    """ClickHouse DateTime cannot hold the rest: a 422 here, not a 500 from the store."""
    if value is not None and not (EARLIEST <= value < LATEST):
        raise ValueError("time must be between 1970-01-01T00:00:00Z and 2106-02-07T00:00:00Z")
    return value


StorableTime = Annotated[AwareDatetime | None, AfterValidator(_storable)]
Since = Annotated[StorableTime, Query(description="RFC 3339 start, with offset (default: one span back)")]
Until = Annotated[StorableTime, Query(description="RFC 3339 end, exclusive (default: now)")]
TopGroups = Annotated[
    int,
    Query(
        ge=1,
        le=queries.MAX_SERIES_GROUPS,
        description="with a breakdown: this many biggest groups, the rest summed into one 'other' group",
    ),
]
WindowParam = Annotated[
    str | None,
    Query(pattern=WINDOW_PATTERN, description="a span ending now, e.g. 15m, 1h, 24h, 7d (instead of since/until)"),
]


@usage.get("/keys/{key_id}/usage")
def key_usage(
    ctx: Context,
    key_id: KeyIdPath,
    since: Since = None,
    until: Until = None,
    granularity: Granularity = Granularity.minute,
    breakdown: Breakdown = Breakdown.none,
    top: TopGroups = queries.DEFAULT_SERIES_GROUPS,
) -> UsageSeries:
    """Requests of one key per minute / hour / day bucket, optionally by endpoint or status class."""
    return ctx.run(
        lambda: queries.series(
            ctx.client, ctx.database, Subject.key, key_id, granularity, since, until, breakdown, ctx.clock(), top
        )
    )


@usage.get("/accounts/{account_id}/usage")
def account_usage(
    ctx: Context,
    account_id: AccountPath,
    since: Since = None,
    until: Until = None,
    granularity: Granularity = Granularity.hour,
    breakdown: Breakdown = Breakdown.none,
    top: TopGroups = queries.DEFAULT_SERIES_GROUPS,
) -> UsageSeries:
    """Requests of all keys of one account per bucket."""
    return ctx.run(
        lambda: queries.series(
            ctx.client,
            ctx.database,
            Subject.account,
            account_id,
            granularity,
            since,
            until,
            breakdown,
            ctx.clock(),
            top,
        )
    )


@usage.get("/traffic")
def traffic(
    ctx: Context,
    since: Since = None,
    until: Until = None,
    granularity: Granularity = Granularity.hour,
    breakdown: Breakdown = Breakdown.status_class,
    top: TopGroups = queries.DEFAULT_SERIES_GROUPS,
) -> UsageSeries:
    """All traffic per bucket (default: the last 24 hours by status class)."""
    return ctx.run(
        lambda: queries.series(
            ctx.client, ctx.database, None, "", granularity, since, until, breakdown, ctx.clock(), top
        )
    )


@usage.get("/top")
def top(
    ctx: Context,
    dimension: TopDimension = TopDimension.key,
    metric: TopMetric = TopMetric.requests,
    n: Annotated[int, Query(ge=1, le=queries.MAX_TOP_N)] = 20,
    window: WindowParam = None,
    since: Since = None,
    until: Until = None,
) -> TopList:
    """The top N keys / accounts / endpoints by requests, errors (status >= 400), 401+403 or 429."""
    start, end = ctx.window(window, since, until, "1h")
    return ctx.run(
        lambda: queries.top(ctx.client, ctx.database, dimension, metric, start, end, n, ctx.held, ctx.clock())
    )


@limits.get("/keys/{key_id}/state")
def key_state(
    ctx: Context, key_id: KeyIdPath, history: Annotated[int, Query(ge=1, le=queries.MAX_DECISION_HISTORY)] = 50
) -> KeyState:
    """Counts in the current windows vs the key's limits, its active block and decisions."""
    return ctx.run(lambda: queries.key_state(ctx.client, ctx.database, key_id, ctx.lookup, ctx.clock(), history))


@limits.get("/blocked")
def blocked(ctx: Context, n: Annotated[int, Query(ge=1, le=queries.MAX_TOP_N)] = 100) -> list[BlockedKey]:
    """Keys blocked right now (newest decision is a block still in force)."""
    return ctx.run(lambda: queries.blocked_keys(ctx.client, ctx.database, ctx.clock(), n))


@limits.post("/limits/backtest")
def limits_backtest(ctx: Context, body: BacktestRequest) -> BacktestResult:
    """What a candidate policy would have refused, replayed on the minute rollups (exact at minute
    granularity), beside the policy in force. A span reaching before the oldest minute the minute
    level holds (METER_TTL_MINUTE_DAYS) is a 422 naming that bound."""
    minute_days = ctx.held.minute_days
    return ctx.run(lambda: backtest.backtest(ctx.client, ctx.database, body, ctx.book, minute_days, ctx.clock()))


@abuse.get("/signals")
def abuse_signals(
    ctx: Context,
    kind: Annotated[list[SignalKind] | None, Query(description="only these kinds (repeatable)")] = None,
    key_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    recent: Annotated[str, Query(pattern=WINDOW_PATTERN, description="window of rate signals")] = "1h",
    lookback: Annotated[str, Query(pattern=WINDOW_PATTERN, description="window of IP/block signals")] = "24h",
    as_of: Annotated[StorableTime, Query(description="RFC 3339: the signals as of then (default: now)")] = None,
) -> SignalReport:
    """Abuse signals, strongest first, each with its numbers and a plain-words explanation."""
    recent_span, lookback_span = parse_duration(recent), parse_duration(lookback)
    if recent_span > queries.MINUTE_LEVEL_MAX_SPAN or lookback_span > timedelta(days=7):
        raise HTTPException(400, "recent may span at most 48h and lookback at most 7d.")
    thresholds = signals.SignalThresholds(recent=recent_span, lookback=lookback_span)
    kinds = set(kind) if kind else None
    return ctx.run_beside(
        lambda side: signals.abuse_signals(
            ctx.client, ctx.database, as_of or ctx.clock(), thresholds, kinds, key_id=key_id, side=side
        )
    )
