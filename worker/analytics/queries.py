"""Usage analytics served from the rollups: series, top lists, limit state, blocked keys.

Every query aggregates with ``sum()`` (parts may be unmerged) and never reads the internal
``dedup`` / ``offset`` rows. Values from callers only ever reach SQL as bound parameters
(``{name:Type}``); the few SQL fragments that vary (column of a dimension, ordering
metric) come from fixed tables keyed by enums, never from input text.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from schemas.analytics import (
    BlockedKey,
    Breakdown,
    KeyState,
    SeriesGroup,
    Subject,
    TopDimension,
    TopEntry,
    TopList,
    TopMetric,
    UsageSeries,
    WindowState,
)
from schemas.decisions import Window, month_bounds
from schemas.limits import LimitPolicy, split_subject
from schemas.usage import Granularity, UsagePoint
from worker.cli_args import EARLIEST, LATEST
from worker.refusals import EmptyRange, OutOfRange, QueryRefused, iso
from worker.store.client import quote_identifier
from worker.store.decisions import DecisionStore
from worker.store.rollup import rollup_table
from worker.store.usage import (
    DEFAULT_LEVELS_HELD,
    DEFAULT_SPAN,
    STEP_SECONDS,
    LevelsHeld,
    ceil_to,
    default_range,
    floor_to,
)

MAX_TOP_N = 1_000
MAX_DECISION_HISTORY = 500  # a key's decisions listed by key_state, newest first
# A breakdown returns its biggest groups (by requests) and sums the rest into OTHER_GROUP; the
# values of a series (groups x buckets) are capped so that no query holds more in memory.
DEFAULT_SERIES_GROUPS = 10
MAX_SERIES_GROUPS = 50
MAX_SERIES_VALUES = 200_000
OTHER_GROUP = "other"  # no endpoint (they start with "/") or status class ("2xx") is called that
MAX_TOP_SPAN = timedelta(days=93)
# Up to this span a window is counted from minute rows (exact to the minute); longer
# windows from hour rows, then day rows — fewer rows to read, same totals on whole buckets.
MINUTE_LEVEL_MAX_SPAN = timedelta(hours=48)
HOUR_LEVEL_MAX_SPAN = timedelta(days=31)

_SUBJECT_COLUMN = {Subject.key: "key_id", Subject.account: "account_id"}
_GROUP_EXPR = {
    Breakdown.none: "'all'",
    Breakdown.endpoint: "toString(endpoint)",
    Breakdown.status_class: "concat(toString(intDiv(status, 100)), 'xx')",
}
_DIMENSION_COLUMN = {TopDimension.key: "key_id", TopDimension.account: "account_id", TopDimension.endpoint: "endpoint"}
_METRIC_COLUMN = {
    TopMetric.requests: "n_requests",
    TopMetric.errors: "n_errors",
    TopMetric.auth_failures: "n_auth",
    TopMetric.rate_limited: "n_429",
}
# The rows that count towards a metric (must match COUNT_COLUMNS); "requests" counts all rows.
_METRIC_STATUS_FILTER = {
    TopMetric.errors: "status >= 400",
    TopMetric.auth_failures: "status IN (401, 403)",
    TopMetric.rate_limited: "status = 429",
}
# The levels that hold a copy of a level's rows of a metric's status (009_minute_429.sql).
_METRIC_SUBSET_LEVEL = {(TopMetric.rate_limited, Granularity.minute): "minute_429"}
# Shared by every per-entity count so that "errors" means the same thing everywhere.
COUNT_COLUMNS = (
    "sum(requests) AS n_requests, sumIf(requests, status >= 400) AS n_errors, "
    "sumIf(requests, status IN (401, 403)) AS n_auth, sumIf(requests, status = 429) AS n_429"
)


def utc(value: datetime) -> datetime:
    """ClickHouse hands back naive UTC datetimes; make them aware."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def window_level(
    since: datetime, until: datetime, now: datetime, held: LevelsHeld
) -> tuple[Granularity, datetime, datetime]:
    """The rollup level that counts [since, until) — fine enough for the span, and still holding
    ``since`` (else the next coarser: the finer rows are deleted) — and the range it counts:
    widened to that level's whole buckets."""
    span = until - since
    if span <= MINUTE_LEVEL_MAX_SPAN:
        level = Granularity.minute
    elif span <= HOUR_LEVEL_MAX_SPAN:
        level = Granularity.hour
    else:
        level = Granularity.day
    if level is Granularity.minute and not held.holds(level, since, now):
        level = Granularity.hour
    if level is Granularity.hour and not held.holds(level, since, now):
        level = Granularity.day
    return level, floor_to(since, level), ceil_to(until, level)


def check_storable(since: datetime, until: datetime) -> None:
    """Refuse a range reaching outside what ClickHouse stores (it would fail there, as a 500)."""
    if since < EARLIEST:
        raise OutOfRange(
            f"the range starts at {iso(since)}, before {iso(EARLIEST)} (the earliest time stored); "
            f"give a since at or after {iso(EARLIEST)}, or a later until"
        )
    if until > LATEST:
        raise OutOfRange(f"the range ends at {iso(until)}, after {iso(LATEST)} (the latest time stored)")
    if since > LATEST:  # an until left to its default: the since alone is past what is stored
        raise OutOfRange(f"the range starts at {iso(since)}, after {iso(LATEST)} (the latest time stored)")


def check_window(since: datetime, until: datetime, max_span: timedelta = MAX_TOP_SPAN) -> None:
    if since.tzinfo is None or until.tzinfo is None:
        raise QueryRefused("times need a UTC offset (for example 2026-11-27T12:00:00Z)")
    check_storable(since, until)
    if since >= until:
        raise EmptyRange(since, until)
    if until - since > max_span:
        raise QueryRefused(f"window spans {until - since}; at most {max_span.days} days per query")


# -- usage series ---------------------------------------------------------------------------


# long: one query and the zero-filled grid it fills: the steps share the bucket arithmetic
def series(
    client: Client,
    database: str,
    subject: Subject | None,
    subject_id: str,
    granularity: Granularity,
    since: datetime | None = None,
    until: datetime | None = None,
    breakdown: Breakdown = Breakdown.none,
    now: datetime | None = None,
    top: int = DEFAULT_SERIES_GROUPS,
) -> UsageSeries:
    """Requests per bucket of one key, one account, or (``subject=None``) all traffic.

    Gaps are zeros. With a breakdown: one group per endpoint / status class, the ``top``
    biggest by requests, the rest summed into one ``OTHER_GROUP`` (last). Raises
    ``OutOfRange`` for times the store cannot hold and ``QueryRefused`` for an empty or
    oversized range (more than 50,000 buckets, or groups x buckets over MAX_SERIES_VALUES).
    Only the non-empty buckets cross from ClickHouse; the columns are filled here.
    """
    if not 1 <= top <= MAX_SERIES_GROUPS:
        raise QueryRefused(f"top must be between 1 and {MAX_SERIES_GROUPS}")
    end = until or now or datetime.now(UTC)
    start = since or end - DEFAULT_SPAN[granularity]
    check_storable(start, end)
    start, end = default_range(granularity, start, end)
    step = STEP_SECONDS[granularity]
    first = int(start.timestamp())
    count = -(-(int(end.timestamp()) - first) // step)  # buckets starting in [start, end)
    where_subject = f"AND {_SUBJECT_COLUMN[subject]} = {{id:String}} " if subject else ""
    table, group = rollup_table(database), _GROUP_EXPR[breakdown]
    where = (
        "WHERE level = {level:String} AND bucket >= {since:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} "
        f"{where_subject}"
    )
    parameters: dict[str, Any] = {
        "level": granularity.value,
        "id": subject_id,
        "since": start,
        "until": end,
        "first": first,
        "step": step,
    }
    groups = 1
    if breakdown is not Breakdown.none:
        # The biggest groups first (one row each), so that what follows is bounded before it is read.
        ranked = client.query(
            f"SELECT {group} AS grp FROM {table} {where}"
            "GROUP BY grp ORDER BY sum(requests) DESC, grp LIMIT {n:UInt32}",
            parameters={**parameters, "n": top + 1},
        ).result_rows
        keep = [str(name) for (name,) in ranked[:top]]
        groups = len(keep) + (len(ranked) > top)
        if len(ranked) > top:
            group = f"if({group} IN {{keep:Array(String)}}, {group}, '{OTHER_GROUP}')"
            parameters["keep"] = keep
    if groups * count > MAX_SERIES_VALUES:
        raise QueryRefused(
            f"breakdown by {breakdown.value} gives {groups} groups x {count:,} {granularity.value} buckets = "
            f"{groups * count:,} values, over the cap of {MAX_SERIES_VALUES:,} per query: "
            "narrow the range, use a coarser granularity or ask for fewer groups (top)"
        )
    result = client.query(
        f"SELECT {group} AS grp, intDiv(toUInt32(bucket) - {{first:UInt32}}, {{step:UInt32}}), "
        f"sum(requests), sumIf(requests, status >= 400), sum(bytes_out) FROM {table} {where}GROUP BY grp, bucket",
        parameters=parameters,
        # One key's rows are read in (level, key_id, bucket) order: aggregate them as they stream.
        settings={"optimize_aggregation_in_order": 1} if subject is Subject.key else None,
    )
    columns: dict[str, tuple[list[int], list[int], list[int]]] = {}
    # Column-wise (never row tuples): a busy key's month of minutes is ~43,000 rows.
    # chDB returns no columns at all for an empty result.
    grps, index, req_in, err_in, out_in = result.result_columns or ([], [], [], [], [])
    if grps:
        for grp in set(grps):
            columns[grp] = ([0] * count, [0] * count, [0] * count)
        if len(columns) == 1:
            req, err, out = next(iter(columns.values()))
            for i, v in zip(index, req_in, strict=True):
                req[i] = v
            for i, v in zip(index, err_in, strict=True):
                err[i] = v
            for i, v in zip(index, out_in, strict=True):
                out[i] = v
        else:
            for grp, i, n, errors, bytes_out in zip(grps, index, req_in, err_in, out_in, strict=True):
                cols = columns[grp]
                cols[0][i], cols[1][i], cols[2][i] = n, errors, bytes_out
    if not columns and breakdown is Breakdown.none:
        columns["all"] = ([0] * count, [0] * count, [0] * count)
    lines = [
        SeriesGroup(group=str(grp), total_requests=sum(req), requests=req, errors=err, bytes_out=out)
        for grp, (req, err, out) in columns.items()
    ]
    lines.sort(key=lambda g: (g.group == OTHER_GROUP, -g.total_requests, g.group))
    return UsageSeries(
        subject=subject,
        id=subject_id if subject else None,
        granularity=granularity,
        breakdown=breakdown,
        since=start,
        until=end.astimezone(UTC),  # the instant asked for, in UTC like since
        step_seconds=step,
        buckets=count,
        groups=lines,
    )


def key_points(
    client: Client,
    database: str,
    key_id: str,
    granularity: Granularity,
    since: datetime | None = None,
    until: datetime | None = None,
    sparse: bool = False,
) -> list[UsagePoint]:
    """One key's buckets as points (the ``meter usage`` shape), from the same query as ``series``."""
    return points_of(series(client, database, Subject.key, key_id, granularity, since, until), sparse)


def points_of(s: UsageSeries, sparse: bool = False) -> list[UsagePoint]:
    """A series without breakdown as points (empty buckets left out when ``sparse``)."""
    (all_,) = s.groups
    points = (
        UsagePoint(
            bucket=s.bucket_start(i),
            requests=all_.requests[i],
            errors=all_.errors[i],
            bytes_out=all_.bytes_out[i],
        )
        for i in range(s.buckets)
    )
    return [p for p in points if p.requests or not sparse]


# -- top lists ------------------------------------------------------------------------------


def top(
    client: Client,
    database: str,
    dimension: TopDimension,
    metric: TopMetric,
    since: datetime,
    until: datetime,
    n: int = 20,
    held: LevelsHeld = DEFAULT_LEVELS_HELD,
    now: datetime | None = None,
) -> TopList:
    """The ``n`` keys / accounts / endpoints with the most ``metric`` in [since, until), in the
    whole buckets of the level that answers (the list says which: level, since, until).

    Entities with zero of the metric are left out; accounts exclude traffic of keys
    without an account.
    """
    check_window(since, until)
    if not 1 <= n <= MAX_TOP_N:
        raise QueryRefused(f"n must be between 1 and {MAX_TOP_N}")
    level, start, end = window_level(since, until, now or datetime.now(UTC), held)
    column = _DIMENSION_COLUMN[dimension]
    metric_column = _METRIC_COLUMN[metric]
    account = "anyIf(account_id, account_id != '')" if dimension is TopDimension.key else "''"
    skip_blank = "AND account_id != '' " if dimension is TopDimension.account else ""
    table = rollup_table(database)
    span = "bucket >= {since:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} " + skip_blank
    window = "WHERE level = {level:String} AND " + span
    result = client.query(
        f"SELECT toString({column}) AS id, {account} AS acct, {COUNT_COLUMNS} FROM {table} {window}"
        f"{_top_candidates(table, column, metric, span)}"
        f"GROUP BY id HAVING {metric_column} > 0 ORDER BY {metric_column} DESC, id LIMIT {{n:UInt32}}",
        parameters={
            "level": level.value,
            "candidates": _METRIC_SUBSET_LEVEL.get((metric, level), level.value),
            "since": start,
            "until": end,
            "n": n,
        },
    )
    entries = [
        TopEntry(
            rank=i,
            id=str(ident),
            account_id=str(acct) or None if dimension is TopDimension.key else None,
            requests=int(req),
            errors=int(err),
            auth_failures=int(auth),
            rate_limited=int(limited),
        )
        for i, (ident, acct, req, err, auth, limited) in enumerate(result.result_rows, start=1)
    ]
    return TopList(dimension=dimension, metric=metric, level=level, since=start, until=end, entries=entries)


def _top_candidates(table: str, column: str, metric: TopMetric, span: str) -> str:
    """The filter to the top n by ``metric`` among only the rows of its statuses (a few % of the
    traffic: the same ranking, exactly), so that only those n are counted in full; read from the
    level ``{candidates}`` (the window's, or its copy of those rows: ``_METRIC_SUBSET_LEVEL``).
    Nothing for a metric that counts every row."""
    status_filter = _METRIC_STATUS_FILTER.get(metric)
    if status_filter is None:
        return ""
    return (
        f"AND {column} IN (SELECT {column} FROM {table} WHERE level = {{candidates:String}} "
        f"AND {span}AND {status_filter} "
        f"GROUP BY {column} ORDER BY sum(requests) DESC, toString({column}) LIMIT {{n:UInt32}}) "
    )


# -- limit state and decisions --------------------------------------------------------------


def window_bounds(window: Window, now: datetime) -> tuple[datetime, datetime]:
    granularity = Granularity(window.value)
    start = floor_to(now, granularity)
    return start, start + timedelta(seconds=STEP_SECONDS[granularity])


# long: the windows of one key, its block and history, read and assembled in one pass
def key_state(
    client: Client,
    database: str,
    key_id: str,
    policy: LimitPolicy | Callable[[str, str], LimitPolicy],
    now: datetime | None = None,
    history: int = 50,
) -> KeyState:
    """Counts of ``key_id`` (a key, or a key on a route: ``KEY_ID@route``) in the current minute /
    hour / day / UTC calendar month against ``policy`` (the month: the sum of its day rows, as the
    workers rebuild it), plus its decisions.

    The active block is the newest decision if it is a block whose ``until`` is still ahead
    (or has no ``until``: a manual block holds until an operator unblocks).
    """
    as_of = utc(now or datetime.now(UTC))
    # A key on a route (``KEY_ID@route``) counts the key's rows on that route, as the workers do.
    key, route = split_subject(key_id)
    bounds = {w: window_bounds(w, as_of) for w in (Window.minute, Window.hour, Window.day)}
    month_start, month_end = month_bounds(as_of.timestamp())
    bounds[Window.month] = (datetime.fromtimestamp(month_start, UTC), datetime.fromtimestamp(month_end, UTC))
    result = client.query(
        # As the workers count: sums of cost (a route's cost, 0 for a fail-closed node's 503), and
        # 429s, refused by the limiter, use up nothing.
        "SELECT sumIf(cost, level = 'minute' AND bucket = {m:DateTime('UTC')} AND status != 429), "
        "sumIf(cost, level = 'hour' AND bucket = {h:DateTime('UTC')} AND status != 429), "
        "sumIf(cost, level = 'day' AND bucket = {d:DateTime('UTC')} AND status != 429), "
        "sumIf(cost, level = 'day' AND bucket >= {mo:DateTime('UTC')} AND bucket < {me:DateTime('UTC')} "
        "AND status != 429), "
        f"anyIf(account_id, account_id != '') FROM {rollup_table(database)} "
        "WHERE level IN ('minute', 'hour', 'day') AND key_id = {key:String} "
        + ("AND route = {route:String} " if route is not None else "")
        + "AND (bucket >= {d:DateTime('UTC')} OR (level = 'day' AND bucket >= {mo:DateTime('UTC')}))",
        parameters={
            "key": key,
            "route": route or "",
            "m": bounds[Window.minute][0],
            "h": bounds[Window.hour][0],
            "d": bounds[Window.day][0],
            "mo": bounds[Window.month][0],
            "me": bounds[Window.month][1],
        },
    )
    minute_n, hour_n, day_n, month_n, account = result.result_rows[0] if result.result_rows else (0, 0, 0, 0, "")
    if callable(policy):  # per-key / per-account overrides need the key's account
        policy = policy(key_id, str(account))
    counts = {Window.minute: minute_n, Window.hour: hour_n, Window.day: day_n, Window.month: month_n}
    windows = []
    for window, (start, end) in bounds.items():
        limit, count = policy.limit(window), int(counts[window])
        windows.append(
            WindowState(
                window=window,
                start=start,
                end=end,
                count=count,
                limit=limit,
                remaining=None if limit is None else max(0, limit - count),
                over=limit is not None and count > limit,
            )
        )
    decisions = DecisionStore(client, database).history(key_id, limit=history)
    latest = decisions[0] if decisions else None
    active = latest if latest is not None and latest.blocks_at(as_of.timestamp()) else None
    return KeyState(
        key_id=key_id,
        account_id=str(account) or None,
        as_of=as_of,
        windows=windows,
        blocked=active is not None and not active.shadow,
        blocked_until=active.until if active else None,
        active_block=active,
        history=decisions,
        shadow_blocked=active is not None and active.shadow,
    )


def blocked_keys(client: Client, database: str, now: datetime | None = None, n: int = 100) -> list[BlockedKey]:
    """Keys whose newest decision is a block still in force at ``now``, newest first."""
    as_of = utc(now or datetime.now(UTC))
    # The newest decision of each key, whole: argMax() skips NULLs, so an operator's block (no
    # until, limit or count) would take those of the key's older block.
    result = client.query(
        "SELECT key_id, toString(window), limit_value, count_value, until, reason, toString(source), decided_at, "
        "version, shadow FROM (SELECT * FROM "
        f"{quote_identifier(database)}.decisions ORDER BY key_id, version DESC LIMIT 1 BY key_id) "
        "WHERE action = 'block' AND (until IS NULL OR until > {now:DateTime64(3, 'UTC')}) "
        "ORDER BY decided_at DESC, key_id LIMIT {n:UInt32}",
        parameters={"now": as_of, "n": n},
    )
    return [
        BlockedKey(
            key_id=str(key),
            window=Window(window),
            limit=_opt_int(limit),
            count=_opt_int(count),
            until=utc(until) if until is not None else None,
            reason=str(reason),
            source=str(source),
            decided_at=utc(at),
            version=int(version),
            shadow=bool(shadow),
        )
        for key, window, limit, count, until, reason, source, at, version, shadow in result.result_rows
    ]


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
