"""What a candidate limit policy would have done, replayed on the stored minute rollups.

The replay is the fixed-window limiter itself, exact at minute granularity:

- **Demand** is every request stored at the minute level, 429s included: a request the limiter
  in force refused was still asked for, and a looser policy would have admitted it. The
  candidate and the policy in force are replayed on that same demand, so they compare like with
  like; the stored 429s are shown beside them (``observed_refused``). A client that retried
  after a 429 is demand twice, as it was on the wire. Not demand: a fail-closed node's 503s
  (cost 0, refused before any limit was checked: no policy would have served them).
- **The limiter replayed**: fixed UTC windows; a request is admitted while its key's minute,
  hour and day counts (of admitted requests) are all below their limits, and then counts in
  all three; a refused request counts nowhere (as in the live counters).
- **Order within a minute** is not stored, and does not matter: every request of one minute
  falls in the same minute, hour and day windows, so a minute admits
  ``min(demand, what each of its windows has left)`` whatever the order. Hour and day counts
  are running sums over the minutes in order. No approximation at minute granularity; what it
  is not is the distributed limiter's overshoot (that is measured in bench/results.md).
- **Which window refused**: the longest window whose limit was reached when the request came
  (day, then hour, then minute): the window a block decision names, whose end is the
  ``Retry-After``. Once a minute refuses, its counts no longer change, so all its refusals go
  to one window.
- **Span**: minutes starting in [since, until), both rounded up to a whole minute. The hour and
  day windows count from the start of since's day (warm-up, refusals not reported) when the
  minute level still holds it, else from its oldest minute; then the first day's refusals are a
  lower bound (said in ``notes``). Since may not reach before the minute level's retention
  (``METER_TTL_MINUTE_DAYS``, default 7 days): older minutes are deleted by TTL, so such a span
  is refused (``BeyondMinuteLevel``), never answered from partial data.
- **Policy in force**: today's book (default + overrides now on the limits topic) for the whole
  span, resolved like the workers do (key override, else the account's, else the default) with
  each key's newest account in the span.
- **Where the candidate applies**: scope ``key``: that key; ``account``: the account's keys
  except those with their own key override; ``all``: as the new default, so keys and accounts
  with an override keep it. ``ignore_overrides``: every key of the scope gets the candidate.

All of it runs in ClickHouse: one aggregation per key of its minute rows into a sorted array,
then segmented running sums (minute, hour, day) with array functions; keys whose whole demand
is under every limit they could meet skip the replay. Inputs reach SQL only as parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from schemas.analytics import (
    BacktestKey,
    BacktestOutcome,
    BacktestRequest,
    BacktestResult,
    BacktestScope,
    BacktestWindow,
    RefusedWindow,
)
from schemas.decisions import Window
from schemas.limits import LimitPolicy, PolicyBook
from worker.analytics.queries import check_storable, utc
from worker.refusals import EmptyRange, OutOfRange, iso
from worker.store.rollup import rollup_table

# "Unlimited" inside the SQL: far above any count a span can hold (counts there are Int64).
UNLIMITED = 2**62
WINDOWS = (Window.minute, Window.hour, Window.day)

SEMANTICS = (
    "Replay of the fixed-window limiter on the minute rollups, exact at minute granularity: demand is every "
    "stored request (429s included; not a fail-closed node's 503s, which no policy would have served); a "
    "request is admitted while the key's minute, hour and day counts of "
    "admitted requests are below their limits, refused requests count nowhere; the order within a minute does "
    "not change what a minute admits; a refusal is charged to the longest window whose limit was reached. "
    "The policy in force is today's (default + overrides) for the whole span, replayed on the same demand; "
    "observed_refused is the stored 429s."
)


class BeyondMinuteLevel(OutOfRange):
    """The span reaches before the oldest minute the minute level keeps."""


def _minute_ceil(value: datetime) -> datetime:
    value = utc(value)
    floor = value.replace(second=0, microsecond=0)
    return floor if floor == value else floor + timedelta(minutes=1)


def minute_level_from(now: datetime, minute_days: int) -> datetime:
    """The oldest minute bucket the minute level still holds whole (TTL ``bucket + N days``)."""
    return _minute_ceil(utc(now) - timedelta(days=minute_days))


def span_of(request: BacktestRequest, now: datetime, minute_days: int) -> tuple[datetime, datetime, datetime]:
    """(since, until, oldest minute held): whole minutes; refuses what the minute level cannot answer."""
    end = request.until or now
    # Refused before any arithmetic on them: times near year 1 or 9999 would overflow it.
    check_storable(request.since or end, end)
    until = _minute_ceil(end)
    if request.since is not None:
        since = request.since
    elif request.span is not None:
        since = (request.until or now) - request.span
    else:
        since = (request.until or now) - timedelta(days=minute_days)
    check_storable(utc(since), until)
    since = _minute_ceil(since)
    if since >= until:
        raise EmptyRange(since, until, ", in whole minutes")
    oldest = minute_level_from(now, minute_days)
    if since < oldest:
        raise BeyondMinuteLevel(
            f"the minute level holds {minute_days} days (METER_TTL_MINUTE_DAYS={minute_days}): since must be at or "
            f"after {iso(oldest)}, not {iso(since)}; older minutes are deleted, a backtest cannot replay them"
        )
    return since, until, oldest


# -- SQL ------------------------------------------------------------------------------------
# The fragments below are fixed text (names of columns and aliases chosen here); every value
# comes in as a {name:Type} parameter.


def _segment_sum(x: str, starts: str) -> str:
    """Running sum of array ``x`` restarting where ``starts`` is 1 (the element itself included)."""
    before = f"arrayMap((c, v) -> c - v, arrayCumSum({x}), {x})"
    return f"arrayMap((c, s) -> c - s, arrayCumSum({x}), arrayFill((v, f) -> f, {before}, {starts}))"


def _admitted(running: str, x: str, limit: str) -> str:
    """What a window with ``limit`` admits of each element, given the running sums of what came."""
    return f"arrayMap((s, v) -> least(s, {limit}) - least(s - v, {limit}), {running}, {x})"


def _segment_total(running: str, ends: str) -> str:
    return f"arrayReverseFill((v, f) -> f, {running}, {ends})"


def _replayed(source: str, policies: tuple[str, ...]) -> str:
    """``source`` (rows with the elements ``b`` - minutes - and ``x`` - requests -, see _ELEMENTS)
    with the limiter replayed for each policy ``p`` of ``policies`` (limits ``{p}m``, ``{p}h``,
    ``{p}d``): ``{p}_sh`` / ``{p}_sd`` are the hour and day running sums of what the smaller
    windows let through (a window's limit is reached at an element when its sum is at or over
    it), ``{p}_r`` what is refused of each element from since on.

    One subquery a step: each step names the last one's columns, so the expressions stay the
    size they are written (nested inline, every step would repeat the ones before it)."""
    steps: list[Callable[[str], str]] = [
        lambda p: f"{_admitted(_segment_sum('x', 'sm'), 'x', f'{p}m')} AS {p}_a1",
        lambda p: f"{_segment_sum(f'{p}_a1', 'sh')} AS {p}_sh",
        lambda p: f"{_admitted(f'{p}_sh', f'{p}_a1', f'{p}h')} AS {p}_a2",
        lambda p: f"{_segment_sum(f'{p}_a2', 'sd')} AS {p}_sd",
        lambda p: (
            f"arrayMap((v, a, bb) -> if(bb >= since_s, v - a, 0), x, "
            f"{_admitted(f'{p}_sd', f'{p}_a2', f'{p}d')}, b) AS {p}_r"
        ),
    ]
    for step in steps:
        source = f"SELECT *, {', '.join(step(p) for p in policies)} FROM ({source})"
    return source


def _outcome(p: str) -> str:
    day, hour = f"d >= {p}d", f"d < {p}d AND h >= {p}h"
    minute = f"d < {p}d AND h < {p}h"
    return f"""
        arraySum({p}_r) AS {p}_refused,
        arraySum((v, h, d) -> if({day}, v, 0), {p}_r, {p}_sh, {p}_sd) AS {p}_day,
        arraySum((v, h, d) -> if({hour}, v, 0), {p}_r, {p}_sh, {p}_sd) AS {p}_hour,
        {p}_refused - {p}_day - {p}_hour AS {p}_minute,
        length(arrayDistinct(arrayFilter((k, v, h, d) -> v > 0 AND {minute}, b, {p}_r, {p}_sh, {p}_sd))) AS {p}_nmin,
        length(arrayDistinct(arrayFilter((k, v, h, d) -> v > 0 AND {hour}, hr, {p}_r, {p}_sh, {p}_sd))) AS {p}_nhour,
        length(arrayDistinct(arrayFilter((k, v, h, d) -> v > 0 AND {day}, dy, {p}_r, {p}_sh, {p}_sd))) AS {p}_nday"""


# Keys of the span, one row each: the key's minute rows as two arrays, minutes and requests
# (sorted by minute only for the keys replayed; the rows of one minute - endpoints, statuses -
# stay separate elements: the running sums make them one minute), demand and stored 429s from
# since on, and the policies that apply to it.
# ``{account}``: the place of the key's newest account among the account overrides (0: none);
# ``{subject}``, ``{having}``: the scope. All three are fixed fragments chosen below.
_PER_KEY = """
    SELECT *, {policies} FROM (
        SELECT key_id, {account} AS ai,
            sumIf({demand}, bucket >= {since:DateTime('UTC')}) AS total,
            sumIf(requests, bucket >= {since:DateTime('UTC')} AND status = 429) AS observed,
            sum({demand}) AS scanned,
            groupArray(toUInt32(bucket)) AS bs, groupArray(toInt64({demand})) AS xs
        FROM {table}
        WHERE level = 'minute' AND bucket >= {scan_from:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} {subject}
        GROUP BY key_id {having}
    )
"""

# A row's demand in requests, without a fail-closed node's 503s (cost 0: no policy would have
# served them, the node could not check any). Every other request costs at least 1, so
# least() is exact unless one row mixes those 503s with requests of a route costing more than 1.
_DEMAND = "least(requests, cost)"

_ACCOUNT = "argMax(transform(account_id, {oa:Array(String)}, arrayEnumerate({oa:Array(String)}), 0), bucket)"

_SUBJECT = {
    BacktestScope.key: "AND key_id = {subject:String}",
    # The keys whose newest account is the subject (the rows of other accounts read too).
    BacktestScope.account: "AND key_id IN (SELECT key_id FROM {table} WHERE level = 'minute' "
    "AND bucket >= {scan_from:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} "
    "AND account_id = {subject:String})",
    BacktestScope.all: "",
}
_HAVING = {
    BacktestScope.key: "",
    BacktestScope.account: "HAVING argMax(account_id = {subject:String}, bucket)",
    BacktestScope.all: "",
}

# The policy in force as PolicyBook.resolve gives it (key override, else the account's when the
# key has one, else the default), and the candidate where it applies.
_POLICIES = """
    transform(key_id, {ok:Array(String)}, arrayEnumerate({ok:Array(String)}), 0) AS ki,
    multiIf(ki > 0, {okm:Array(Int64)}[ki], ai > 0, {oam:Array(Int64)}[ai], {dm:Int64}) AS fm,
    multiIf(ki > 0, {okh:Array(Int64)}[ki], ai > 0, {oah:Array(Int64)}[ai], {dh:Int64}) AS fh,
    multiIf(ki > 0, {okd:Array(Int64)}[ki], ai > 0, {oad:Array(Int64)}[ai], {dd:Int64}) AS fd,
    NOT (({keep_key:Bool} AND ki > 0) OR ({keep_account:Bool} AND ai > 0)) AS applies,
    if(applies, {cm:Int64}, fm) AS cm, if(applies, {ch:Int64}, fh) AS ch, if(applies, {cd:Int64}, fd) AS cd
"""

_ELEMENTS = """
    toUInt32({since:DateTime('UTC')}) AS since_s,
    arraySort(bs) AS b, arraySort((v, k) -> k, xs, bs) AS x,
    arrayMap(v -> intDiv(v, 3600), b) AS hr, arrayMap(v -> intDiv(v, 86400), b) AS dy,
    arrayMap((d, i) -> i = 1 OR d != 0, arrayDifference(b), arrayEnumerate(b)) AS sm,
    arrayMap((d, i) -> i = 1 OR d != 0, arrayDifference(hr), arrayEnumerate(b)) AS sh,
    arrayMap((d, i) -> i = 1 OR d != 0, arrayDifference(dy), arrayEnumerate(b)) AS sd
"""

_SUMMARY = ", ".join(
    f"countIf({p}_refused > 0) AS s_{p}_keys, sum({p}_refused) AS s_{p}_refused, "
    + ", ".join(
        f"countIf({p}_{w} > 0) AS s_{p}_{w}_keys, sum({p}_n{'min' if w == 'minute' else w}) AS s_{p}_{w}_buckets, "
        f"sum({p}_{w}) AS s_{p}_{w}_refused"
        for w in ("minute", "hour", "day")
    )
    for p in ("c", "f")
)

# What is listed of each of the most refused keys (SQL, name), in ranking order: the first
# three sort them.
_TOP = (
    ("-c_refused", "rank_c"),
    ("-f_refused", "rank_f"),
    ("key_id", "key_id"),
    ("total", "total"),
    ("observed", "observed"),
    ("applies", "applies"),
    ("c_refused", "c_refused"),
    ("c_minute", "c_minute"),
    ("c_hour", "c_hour"),
    ("c_day", "c_day"),
    ("c_nmin + c_nhour + c_nday", "c_windows"),
    ("c_first", "c_first"),
    ("f_refused", "f_refused"),
)
_TOP_FIELDS = ", ".join(sql for sql, _ in _TOP)

# The totals count every key of the scope; only the keys that could be refused go on to the
# replay: a key that asked for no more than its smallest limit in the whole scan cannot be.
# LEFT ARRAY JOIN keeps one (empty) row when none could, so the totals still come back.
_COLLECTED = f"""
    SELECT *, {_ELEMENTS} FROM (
        SELECT all_keys, all_requests, all_observed, k.1 AS key_id, k.2 AS total, k.3 AS observed,
            k.4 AS applies, k.5 AS cm, k.6 AS ch, k.7 AS cd, k.8 AS fm, k.9 AS fh, k.10 AS fd, k.11 AS bs, k.12 AS xs
        FROM (
            SELECT countIf(total > 0) AS all_keys, sum(total) AS all_requests, sum(observed) AS all_observed,
                groupArrayIf((key_id, total, observed, applies, cm, ch, cd, fm, fh, fd, bs, xs),
                             scanned > least(cm, ch, cd, fm, fh, fd)) AS keys
            FROM ({_PER_KEY})
        )
        LEFT ARRAY JOIN keys AS k
    )
"""

# One row: the totals, each policy's refusals by window, and the most refused keys (sorted, at
# most n, kept in memory n at a time).
_MAIN = f"""
SELECT any(all_keys) AS all_keys, any(all_requests) AS all_requests, any(all_observed) AS all_observed,
    {_SUMMARY},
    countIf(c_refused > 0 AND f_refused = 0) AS s_newly,
    countIf(f_refused > 0 AND c_refused = 0) AS s_no_longer,
    groupArraySortedIf({{n:UInt32}})(({_TOP_FIELDS}), c_refused > 0 OR f_refused > 0) AS top
FROM (
    SELECT key_id, total, observed, applies, all_keys, all_requests, all_observed,
        {_outcome("c")}, {_outcome("f")}, arrayFirst((k, v) -> v > 0, b, c_r) AS c_first
    FROM ({_replayed(_COLLECTED, ("c", "f"))})
)
"""

# The listed keys again (by primary key): their newest account and most refused windows.
_DETAILS = f"""
SELECT key_id, w.1 AS kind, w.2 AS start, any(w.3) AS demand, sum(w.4) AS refused
FROM (
    SELECT key_id, arrayJoin(arrayFilter(t -> t.4 > 0, arrayMap(
            (k, v, h, d, mt, ht, dt) -> multiIf(
                d >= cd, ('day', intDiv(k, 86400) * 86400, dt, v),
                h >= ch, ('hour', intDiv(k, 3600) * 3600, ht, v),
                ('minute', k, mt, v)),
            b, c_r, c_sh, c_sd,
            {_segment_total(_segment_sum("x", "sm"), "arrayPopFront(arrayPushBack(sm, 1))")},
            {_segment_total(_segment_sum("x", "sh"), "arrayPopFront(arrayPushBack(sh, 1))")},
            {_segment_total(_segment_sum("x", "sd"), "arrayPopFront(arrayPushBack(sd, 1))")}))) AS w
    FROM ({_replayed("SELECT *, " + _ELEMENTS + " FROM (" + _PER_KEY + ")", ("c",))})
)
GROUP BY key_id, kind, start
ORDER BY key_id, refused DESC, start, kind
LIMIT {{per_key:UInt32}} BY key_id
"""

_ACCOUNTS = """
SELECT key_id, argMax(account_id, bucket) FROM {table}
WHERE level = 'minute' AND key_id IN {keys:Array(String)}
    AND bucket >= {scan_from:DateTime('UTC')} AND bucket < {until:DateTime('UTC')}
GROUP BY key_id
"""


def _sql(template: str, table: str, scope: BacktestScope, params: dict[str, Any]) -> str:
    """``template`` with its fixed fragments in place (never a value: those are parameters).
    Without account overrides the keys' accounts are not even read (a String per row)."""
    account = _ACCOUNT if params["oa"] else "toUInt32(0)"
    return (
        template.replace("{policies}", _POLICIES)
        .replace("{demand}", _DEMAND)
        .replace("{account}", account)
        .replace("{subject}", _SUBJECT[scope])
        .replace("{having}", _HAVING[scope])
        .replace("{table}", table)
    )


def _limit(value: int | None) -> int:
    return UNLIMITED if value is None else value


def _policy_parameters(
    book: PolicyBook, candidate: LimitPolicy, scope: BacktestScope, ignore_overrides: bool
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "cm": _limit(candidate.per_minute),
        "ch": _limit(candidate.per_hour),
        "cd": _limit(candidate.per_day),
        "dm": _limit(book.default.per_minute),
        "dh": _limit(book.default.per_hour),
        "dd": _limit(book.default.per_day),
        # Where the candidate is set decides which overrides still win over it.
        "keep_key": not ignore_overrides and scope is not BacktestScope.key,
        "keep_account": not ignore_overrides and scope is BacktestScope.all,
    }
    for prefix, table in (("ok", book.by_key), ("oa", book.by_account)):
        # A copy first: a book followed live may change meanwhile (dict() copies in one step).
        overrides = sorted(dict(table).items())
        params[prefix] = [subject for subject, _ in overrides]
        params[prefix + "m"] = [_limit(p.per_minute) for _, p in overrides]
        params[prefix + "h"] = [_limit(p.per_hour) for _, p in overrides]
        params[prefix + "d"] = [_limit(p.per_day) for _, p in overrides]
    return params


def scan_from(since: datetime, oldest: datetime) -> datetime:
    """Where the hour and day counts start: since's day when the minute level holds it, else its oldest minute."""
    day = since.replace(hour=0, minute=0, second=0, microsecond=0)
    return max(day, oldest)


def backtest(
    client: Client,
    database: str,
    request: BacktestRequest,
    book: PolicyBook,
    minute_days: int,
    now: datetime | None = None,
) -> BacktestResult:
    """Replay ``request``'s candidate and the policy in force (``book``) on the minute rollups.

    ``minute_days``: how long the minute level keeps its rows (``METER_TTL_MINUTE_DAYS``).
    Raises ``BeyondMinuteLevel`` (an ``OutOfRange``) for a span the minute level no longer
    holds, ``OutOfRange`` for times the store cannot hold, ``ValueError`` for an empty span.
    """
    now = utc(now or datetime.now(UTC))
    since, until, oldest = span_of(request, now, minute_days)
    start = scan_from(since, oldest)
    candidate = LimitPolicy(per_minute=request.per_minute, per_hour=request.per_hour, per_day=request.per_day)
    table = rollup_table(database)
    params: dict[str, Any] = {
        **_policy_parameters(book, candidate, request.scope, request.ignore_overrides),
        "since": since,
        "until": until,
        "scan_from": start,
        "subject": request.subject or "",
        "n": max(request.top, 1),
    }
    result = client.query(_sql(_MAIN, table, request.scope, params), parameters=params)
    first = dict(zip(result.column_names, result.result_rows[0], strict=True)) if result.result_rows else None
    top = first["top"] if first else []
    listed = [dict(zip((name for _, name in _TOP), entry, strict=True)) for entry in top][: request.top]
    keys = [str(r["key_id"]) for r in listed]
    accounts = _accounts(client, table, params, keys)
    windows = _refused_windows(client, table, params, keys, request.windows_per_key)
    notes = _notes(book, since, start, minute_days)
    return BacktestResult(
        scope=request.scope,
        subject=request.subject,
        policy=candidate,
        ignore_overrides=request.ignore_overrides,
        since=since,
        until=until,
        counted_from=start,
        minute_level_from=oldest,
        keys=int(first["all_keys"]) if first else 0,
        requests=int(first["all_requests"]) if first else 0,
        observed_refused=int(first["all_observed"]) if first else 0,
        candidate=_summary(first, "c"),
        in_force=_summary(first, "f"),
        newly_refused_keys=int(first["s_newly"]) if first else 0,
        no_longer_refused_keys=int(first["s_no_longer"]) if first else 0,
        top=[
            _key(r, book, candidate, accounts.get(str(r["key_id"]), ""), windows.get(str(r["key_id"]), []))
            for r in listed
        ],
        semantics=SEMANTICS,
        notes=notes,
    )


def _notes(book: PolicyBook, since: datetime, start: datetime, minute_days: int) -> list[str]:
    """What bounds the figures: a first day cut by the retention, what the replay leaves out."""
    notes = []
    day_start = since.replace(hour=0, minute=0, second=0, microsecond=0)
    if start > day_start:
        notes.append(
            f"the day of since ({iso(day_start)}) began before the oldest minute the minute level holds "
            f"({iso(start)}): hour and day windows of that day count from {iso(start)}, so their refusals "
            "are a lower bound"
        )
    policies = [book.default, *dict(book.by_key).values(), *dict(book.by_account).values()]
    if any(p.per_month is not None for p in policies):
        notes.append(
            f"calendar-month quotas (per_month) in force are not replayed: the minute level holds {minute_days} days"
        )
    if book.shadow_all or any(p.shadow for p in policies):
        notes.append(
            "some policies in force are in shadow (dry run: live they refuse nothing); they are replayed as if enforced"
        )
    return notes


def _summary(row: dict[str, Any] | None, p: str) -> BacktestOutcome:
    def n(name: str) -> int:
        return int(row[f"s_{p}_{name}"]) if row else 0

    return BacktestOutcome(
        keys_refused=n("keys"),
        refused=n("refused"),
        windows=[
            BacktestWindow(window=w, keys=n(f"{w}_keys"), buckets=n(f"{w}_buckets"), refused=n(f"{w}_refused"))
            for w in WINDOWS
        ],
    )


def _key(
    row: dict[str, Any], book: PolicyBook, candidate: LimitPolicy, account: str, windows: list[RefusedWindow]
) -> BacktestKey:
    key_id = str(row["key_id"])
    in_force = book.resolve(key_id, account)
    first = int(row["c_first"])
    return BacktestKey(
        key_id=key_id,
        account_id=account or None,
        requests=int(row["total"]),
        observed_refused=int(row["observed"]),
        refused=int(row["c_refused"]),
        refused_minute=int(row["c_minute"]),
        refused_hour=int(row["c_hour"]),
        refused_day=int(row["c_day"]),
        first_refused=datetime.fromtimestamp(first, UTC) if first else None,
        windows_refused=int(row["c_windows"]),
        in_force_refused=int(row["f_refused"]),
        candidate=candidate if row["applies"] else in_force,
        candidate_applies=bool(row["applies"]),
        in_force=in_force,
        in_force_source=book.source(key_id, account),
        windows=windows,
    )


def _accounts(client: Client, table: str, params: dict[str, Any], keys: Sequence[str]) -> dict[str, str]:
    """The newest account of each of ``keys`` in the scan."""
    if not keys:
        return {}
    result = client.query(_ACCOUNTS.replace("{table}", table), parameters={**params, "keys": list(keys)})
    return {str(k): str(a) for k, a in result.result_rows}


def _refused_windows(
    client: Client, table: str, params: dict[str, Any], keys: Sequence[str], per_key: int
) -> dict[str, list[RefusedWindow]]:
    """The most refused window buckets of ``keys`` under the candidate (the same replay, those keys only)."""
    if not keys or per_key <= 0:
        return {}
    # The keys are already chosen: any scope's filter is replaced by the list.
    sql = _sql(_DETAILS, table, BacktestScope.key, params).replace(
        _SUBJECT[BacktestScope.key], "AND key_id IN {keys:Array(String)}"
    )
    result = client.query(sql, parameters={**params, "keys": list(keys), "per_key": per_key})
    out: dict[str, list[RefusedWindow]] = {}
    for key_id, kind, start, demand, refused in result.result_rows:
        out.setdefault(str(key_id), []).append(
            RefusedWindow(
                window=Window(kind),
                start=datetime.fromtimestamp(int(start), UTC),
                requests=int(demand),
                refused=int(refused),
            )
        )
    return out
