"""Abuse signals: patterns worth a person's look, each with the numbers and a plain sentence.

All of them read the rollups (never raw events): minute rows for the last-hour rates,
day rows for a key's own baseline, ``client_ips`` rows (addresses per key and day) for the
keys to look at and ``client_hour`` rows for their client IPs, the ``decisions`` table for
repeated blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from clickhouse_connect.driver.client import Client
from pydantic import BaseModel, ConfigDict, Field

from schemas.analytics import Severity, Signal, SignalKind, SignalReport
from schemas.usage import Granularity
from worker.analytics.queries import utc
from worker.store.client import quote_identifier
from worker.store.rollup import CLIENT_IPS_CAP, rollup_table
from worker.store.usage import floor_to


class SignalThresholds(BaseModel):
    """When a pattern becomes a signal. ``score`` = how many times over its threshold."""

    model_config = ConfigDict(frozen=True)

    recent: timedelta = Field(default=timedelta(hours=1), description="window of the rate signals")
    lookback: timedelta = Field(default=timedelta(hours=24), description="window of IPs, blocks, 401 storms")
    baseline_days: int = Field(default=7, ge=1, le=30)
    rate_jump_factor: float = Field(default=10.0, gt=1)
    rate_jump_min_requests: int = Field(default=100, ge=1)
    auth_failures_min: int = Field(default=50, ge=1)
    auth_failures_min_share: float = Field(default=0.2, ge=0, le=1)
    rate_limited_min: int = Field(default=100, ge=1)
    client_ips_min: int = Field(default=20, ge=2)
    # 0 = off: behind a round-robin balancer every busy key reaches every node, so a node
    # count only means something on large fleets; set it to a share of your node count.
    nodes_min: int = Field(default=0, ge=0)
    repeated_blocks_min: int = Field(default=3, ge=2)
    invalid_key_401_min: int = Field(default=100, ge=1)
    max_per_kind: int = Field(default=50, ge=1, le=1000)


def severity(score: float) -> Severity:
    return Severity.high if score >= 5 else Severity.medium if score >= 2 else Severity.low


def _fmt_span(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds % 86400 == 0:
        days = seconds // 86400
        return "24 hours" if days == 1 else f"{days} days"
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return "hour" if hours == 1 else f"{hours} hours"
    return f"{seconds // 60} minutes"


RecentRow = tuple[str, str, int, int, int, int]  # key, account, requests, 401/403, 429, 401


def recent_counts(client: Client, database: str, now: datetime, th: SignalThresholds) -> list[RecentRow]:
    """Per-key counts of the recent window, for the keys that may make a rate-jump or error-burst signal.

    One scan of the minute rows serves both detectors (``abuse_signals`` runs it once).
    """
    since = floor_to(now - th.recent, Granularity.minute)
    rows = client.query(
        "SELECT key_id, anyIf(account_id, account_id != ''), sum(requests) AS n, "
        "sumIf(requests, status IN (401, 403)) AS auth, sumIf(requests, status = 429) AS limited, "
        "sumIf(requests, status = 401) AS n401 "
        f"FROM {rollup_table(database)} WHERE level = 'minute' "
        "AND bucket >= {since:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} "
        "GROUP BY key_id HAVING n >= {min_n:UInt64} OR auth >= {auth_min:UInt64} OR limited >= {limited_min:UInt64}",
        parameters={
            "since": since,
            "until": now,
            "min_n": th.rate_jump_min_requests,
            "auth_min": th.auth_failures_min,
            "limited_min": th.rate_limited_min,
        },
    ).result_rows
    return [(str(k), str(a), int(n), int(auth), int(lim), int(n401)) for k, a, n, auth, lim, n401 in rows]


# long: one signal's query and its plain-words explanation read best together
def rate_jumps(
    client: Client,
    database: str,
    now: datetime,
    th: SignalThresholds,
    recent: list[RecentRow] | None = None,
) -> list[Signal]:
    """Keys whose rate in the recent window is far above their average of the previous days."""
    since = floor_to(now - th.recent, Granularity.minute)
    # The baseline's days end where the recent window's first day begins: a day it overlaps
    # would count the jump in its own baseline (a burst yesterday, looked at over 24 h, hid itself).
    base_until = floor_to(since, Granularity.day)
    base_since = base_until - timedelta(days=th.baseline_days)
    if recent is None:
        recent = recent_counts(client, database, now, th)
    current = [(key, acct, n) for key, acct, n, *_ in recent if n >= th.rate_jump_min_requests]
    if not current:
        return []
    # The candidate keys are few, so their baseline is read by primary key (level, key_id, ...).
    baseline = {
        str(key): int(total)
        for key, total in client.query(
            f"SELECT key_id, sum(requests) FROM {rollup_table(database)} "
            "WHERE level = 'day' AND key_id IN {keys:Array(String)} "
            "AND bucket >= {base_since:DateTime('UTC')} AND bucket < {base_until:DateTime('UTC')} GROUP BY key_id",
            parameters={
                "keys": sorted(key for key, _, _ in current),
                "base_since": base_since,
                "base_until": base_until,
            },
        ).result_rows
    }
    hours = max((now - since).total_seconds() / 3600, 1 / 60)
    base_hours = th.baseline_days * 24
    out = []
    for key, acct, n in current:
        rate = n / hours
        base_rate = baseline.get(key, 0) / base_hours
        if base_rate > 0 and rate < th.rate_jump_factor * base_rate:
            continue
        if base_rate > 0:
            factor = rate / base_rate
            score = factor / th.rate_jump_factor
            text = (
                f"Key {key} made {int(n):,} requests in the last {_fmt_span(th.recent)} "
                f"({rate:,.0f}/hour), {factor:,.0f}× its own average of {base_rate:,.1f}/hour over the "
                f"previous {th.baseline_days} days. A sudden jump like this is typical of a leaked key "
                "or a runaway client."
            )
        else:
            factor = float("inf")
            score = int(n) / th.rate_jump_min_requests
            text = (
                f"Key {key} made {int(n):,} requests in the last {_fmt_span(th.recent)} "
                f"({rate:,.0f}/hour) but none in the previous {th.baseline_days} days: "
                "a dormant or new key that suddenly became busy."
            )
        out.append(
            Signal(
                kind=SignalKind.rate_jump,
                severity=severity(score),
                key_id=str(key),
                account_id=str(acct) or None,
                score=round(score, 2),
                explanation=text,
                evidence={
                    "requests": int(n),
                    "rate_per_hour": round(rate, 1),
                    "baseline_per_hour": round(base_rate, 2),
                    "factor": round(factor, 1) if base_rate > 0 else "no baseline",
                },
                since=since,
                until=now,
            )
        )
    return out


def error_bursts(
    client: Client,
    database: str,
    now: datetime,
    th: SignalThresholds,
    recent: list[RecentRow] | None = None,
) -> list[Signal]:
    """Keys with many 401/403 (auth failures) or many 429 (rate limited) in the recent window."""
    since = floor_to(now - th.recent, Granularity.minute)
    if recent is None:
        recent = recent_counts(client, database, now, th)
    span = _fmt_span(th.recent)
    out = []
    for key, acct, n, auth, limited, n401 in recent:
        if auth >= th.auth_failures_min and auth / n >= th.auth_failures_min_share:
            score = auth / th.auth_failures_min
            out.append(
                Signal(
                    kind=SignalKind.auth_failures,
                    severity=severity(score),
                    key_id=str(key),
                    account_id=str(acct) or None,
                    score=round(score, 2),
                    explanation=(
                        f"Key {key} got {auth:,} responses 401/403 in the last {span} "
                        f"({auth / n:.0%} of its {n:,} requests): someone keeps calling with a key that is "
                        "invalid, revoked or lacks the permission, e.g. probing endpoints it may not use."
                    ),
                    evidence={
                        "requests": n,
                        "auth_failures": auth,
                        "status_401": int(n401),
                        "share": round(auth / n, 3),
                    },
                    since=since,
                    until=now,
                )
            )
        if limited >= th.rate_limited_min:
            score = limited / th.rate_limited_min
            out.append(
                Signal(
                    kind=SignalKind.rate_limited,
                    severity=severity(score),
                    key_id=str(key),
                    account_id=str(acct) or None,
                    score=round(score, 2),
                    explanation=(
                        f"Key {key} was answered 429 Too Many Requests {limited:,} times in the last {span} "
                        f"({limited / n:.0%} of its {n:,} requests): the client does not honour Retry-After "
                        "and keeps hammering past its limit."
                    ),
                    evidence={"requests": n, "rate_limited": limited, "share": round(limited / n, 3)},
                    since=since,
                    until=now,
                )
            )
    return out


# long: one signal's two queries and its plain-words explanation read best together
def many_sources(client: Client, database: str, now: datetime, th: SignalThresholds) -> list[Signal]:
    """Keys seen from unusually many client IPs (or nodes): the key is probably shared or leaked."""
    since = floor_to(now - th.lookback, Granularity.hour)
    table = rollup_table(database)
    params = {"since": since, "until": now, "ips_min": th.client_ips_min, "nodes_min": th.nodes_min}
    ip_rows = (
        f"FROM {table} WHERE level = 'client_hour' AND client_ip != '' "
        "AND bucket >= {since:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} "
    )
    flagged = _many_address_candidates(client, database, since, now, th)
    found: dict[str, tuple[str, int, int]] = {}
    top_ips: dict[str, list[str]] = {}
    ip_count: dict[str, int] = {}
    if flagged:
        # The candidates' addresses counted exactly (one group per key and address), read by
        # primary key (level, key_id, ...), with their busiest addresses.
        for key, acct, ip, n, ips, total in client.query(
            "SELECT key_id, acct, client_ip, n, ips, total FROM ("
            " SELECT key_id, client_ip, sum(requests) AS n, count() OVER w AS ips, sum(n) OVER w AS total,"
            " max(anyIf(account_id, account_id != '')) OVER w AS acct"
            f" {ip_rows}AND key_id IN {{keys:Array(String)}} GROUP BY key_id, client_ip"
            " WINDOW w AS (PARTITION BY key_id)"
            ") WHERE ips >= {ips_min:UInt64} ORDER BY key_id, n DESC, client_ip LIMIT 3 BY key_id",
            parameters={**params, "keys": flagged},
        ).result_rows:
            found[str(key)] = (str(acct), int(ips), int(total))
            top_ips.setdefault(str(key), []).append(f"{ip} ({int(n):,})")
            ip_count[str(key)] = int(ips)
    nodes: dict[str, int] = {}
    if th.nodes_min > 0:
        for key, acct, n_nodes, n in client.query(
            "SELECT key_id, anyIf(account_id, account_id != ''), uniqExact(node_id) AS nodes, sum(requests) "
            f"FROM {table} WHERE level = 'hour' "
            "AND bucket >= {since:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} "
            "GROUP BY key_id HAVING nodes >= {nodes_min:UInt64}",
            parameters=params,
        ).result_rows:
            nodes[str(key)] = int(n_nodes)
            found.setdefault(str(key), (str(acct), 0, int(n)))
    if not found:
        return []
    keys = sorted(found)
    # The busiest IPs and the IP count of keys flagged by their nodes only.
    if missing := [key for key in keys if key not in ip_count]:
        for key, ip, n, total_ips in client.query(
            "SELECT key_id, client_ip, sum(requests) AS n, count() OVER (PARTITION BY key_id) "
            f"{ip_rows}AND key_id IN {{keys:Array(String)}} "
            "GROUP BY key_id, client_ip ORDER BY key_id, n DESC, client_ip LIMIT 3 BY key_id",
            parameters={**params, "keys": missing},
        ).result_rows:
            top_ips.setdefault(str(key), []).append(f"{ip} ({int(n):,})")
            ip_count[str(key)] = int(total_ips)
    if th.nodes_min == 0:
        for key, n_nodes in client.query(
            f"SELECT key_id, uniqExact(node_id) FROM {table} WHERE level = 'hour' AND key_id IN {{keys:Array(String)}} "
            "AND bucket >= {since:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} GROUP BY key_id",
            parameters={**params, "keys": keys},
        ).result_rows:
            nodes[str(key)] = int(n_nodes)
    span = _fmt_span(th.lookback)
    out = []
    for key in keys:
        acct, ips, n = found[key]
        ips = ips or ip_count.get(key, 0)
        n_nodes = nodes.get(key, 0)
        score = max(ips / th.client_ips_min, n_nodes / th.nodes_min if th.nodes_min else 0.0)
        out.append(
            Signal(
                kind=SignalKind.many_sources,
                severity=severity(score),
                key_id=key,
                account_id=acct or None,
                score=round(score, 2),
                explanation=(
                    f"Key {key} was used from {ips:,} different client IPs through {n_nodes} API nodes in the "
                    f"last {span} ({n:,} requests; busiest: {', '.join(top_ips.get(key, [])) or 'n/a'}). "
                    "One integration rarely needs that many addresses: the key may be leaked or shared."
                ),
                evidence={
                    "client_ips": ips,
                    "nodes": n_nodes,
                    "requests": n,
                    "top_ips": ", ".join(top_ips.get(key, [])),
                },
                since=since,
                until=now,
            )
        )
    return out


def _many_address_candidates(
    client: Client, database: str, since: datetime, until: datetime, th: SignalThresholds
) -> list[str]:
    """Keys that may have been used from ``client_ips_min`` addresses or more in [since, until):
    a superset, which the exact per-(key, address) count then settles.

    A key with N addresses over a window touching D UTC days had at least N/D of them on one
    of those days, so the ``client_ips`` rows (distinct addresses per key and day, counted as
    the batches were written) name every candidate while reading a few rows. Only when N/D is
    under 2 (a long window, a low threshold) are the ``client_hour`` rows grouped per key.
    """
    table = rollup_table(database)
    first_day = floor_to(since, Granularity.day)
    days = (floor_to(until - timedelta(seconds=1), Granularity.day) - first_day).days + 1
    per_day = -(-th.client_ips_min // days)
    params = {"since": since, "until": until, "first_day": first_day, "ips_min": th.client_ips_min}
    if per_day >= 2:
        return [
            str(key)
            for (key,) in client.query(
                # A (key, day) count is the max of its rows: one row at or over it is enough, so
                # the filter runs on the small columns and the key ids of the few rows are read.
                f"SELECT DISTINCT key_id FROM {table} PREWHERE level = 'client_ips' "
                "AND client_ips >= {per_day:UInt32} "
                "AND bucket >= {first_day:DateTime('UTC')} AND bucket < {until:DateTime('UTC')}",
                parameters={**params, "per_day": min(per_day, CLIENT_IPS_CAP)},
            ).result_rows
        ]
    # One group per key (~0.5 M a day): uniqUpTo(N) is exact up to N and keeps at most N+1
    # hashes inline; keys grouped by a 64-bit hash of the id, as uniqUpTo hashes the addresses
    # (12% faster than by the string, bench/results.md).
    distinct = f"uniqUpTo({th.client_ips_min})(client_ip)" if th.client_ips_min <= 100 else "uniqExact(client_ip)"
    return [
        str(key)
        for (key,) in client.query(
            f"SELECT any(key_id) FROM {table} WHERE level = 'client_hour' AND client_ip != '' "
            "AND bucket >= {since:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} "
            f"GROUP BY cityHash64(key_id) HAVING {distinct} >= {{ips_min:UInt64}}",
            parameters=params,
        ).result_rows
    ]


def repeated_blocks(client: Client, database: str, now: datetime, th: SignalThresholds) -> list[Signal]:
    """Keys blocked again and again: the client ignores its limits instead of backing off."""
    since = now - th.lookback
    rows = client.query(
        "SELECT key_id, count() AS blocks, arrayStringConcat(arraySort(groupUniqArray(toString(window))), ', '), "
        "max(decided_at), countIf(shadow) "
        f"FROM {quote_identifier(database)}.decisions FINAL WHERE action = 'block' "
        "AND decided_at >= {since:DateTime64(3, 'UTC')} AND decided_at < {until:DateTime64(3, 'UTC')} "
        "GROUP BY key_id HAVING blocks >= {min_blocks:UInt64}",
        parameters={"since": since, "until": now, "min_blocks": th.repeated_blocks_min},
    ).result_rows
    span = _fmt_span(th.lookback)
    out = []
    for key, blocks, windows, last, shadow in rows:
        score = int(blocks) / th.repeated_blocks_min
        # A shadow block (dry run) refused nothing: said, so "blocked" is not taken literally.
        dry = f"; {int(shadow)} of them shadow blocks, a dry run the nodes served" if shadow else ""
        out.append(
            Signal(
                kind=SignalKind.repeated_blocks,
                severity=severity(score),
                key_id=str(key),
                score=round(score, 2),
                explanation=(
                    f"Key {key} was blocked {int(blocks)} times in the last {span} (limits: {windows}; "
                    f"last at {utc(last):%Y-%m-%d %H:%M} UTC{dry}): it runs into its limit again as soon as "
                    "a window reopens."
                ),
                evidence={
                    "blocks": int(blocks),
                    "shadow_blocks": int(shadow),
                    "windows": str(windows),
                    "last_block": utc(last).isoformat(),
                },
                since=since,
                until=now,
            )
        )
    return out


def invalid_key_storms(client: Client, database: str, now: datetime, th: SignalThresholds) -> list[Signal]:
    """Client IPs that collect many 401s, usually across many key ids: key guessing or a broken deploy."""
    since = floor_to(now - th.lookback, Granularity.hour)
    rows = client.query(
        "SELECT client_ip, sum(requests) AS n, uniqExact(key_id) AS keys "
        f"FROM {rollup_table(database)} WHERE level = 'client_401' AND client_ip != '' "
        "AND bucket >= {since:DateTime('UTC')} AND bucket < {until:DateTime('UTC')} "
        "GROUP BY client_ip HAVING n >= {min_n:UInt64} ORDER BY n DESC LIMIT {cap:UInt32}",
        parameters={"since": since, "until": now, "min_n": th.invalid_key_401_min, "cap": th.max_per_kind},
    ).result_rows
    span = _fmt_span(th.lookback)
    out = []
    for ip, n, keys in rows:
        score = int(n) / th.invalid_key_401_min
        guess = (
            "trying many different keys looks like key guessing or credential stuffing"
            if int(keys) >= 10
            else "the same few keys again and again looks like a client still using a revoked key"
        )
        out.append(
            Signal(
                kind=SignalKind.invalid_key_storm,
                severity=severity(score),
                client_ip=str(ip),
                score=round(score, 2),
                explanation=(
                    f"Client IP {ip} got {int(n):,} responses 401 (missing or invalid key) over {int(keys):,} "
                    f"different key ids in the last {span}: {guess}."
                ),
                evidence={"status_401": int(n), "distinct_keys": int(keys)},
                since=since,
                until=now,
            )
        )
    return out


def _cap_per_kind(signals: list[Signal], th: SignalThresholds) -> list[Signal]:
    """The ``max_per_kind`` strongest signals of each kind."""
    kept: list[Signal] = []
    for kind in SignalKind:
        kept.extend(sorted((s for s in signals if s.kind is kind), key=lambda s: -s.score)[: th.max_per_kind])
    return kept


DETECTORS: dict[SignalKind, Callable[..., list[Signal]]] = {
    SignalKind.rate_jump: rate_jumps,
    SignalKind.auth_failures: error_bursts,  # one query serves both kinds
    SignalKind.rate_limited: error_bursts,
    SignalKind.many_sources: many_sources,
    SignalKind.repeated_blocks: repeated_blocks,
    SignalKind.invalid_key_storm: invalid_key_storms,
}


def abuse_signals(
    client: Client,
    database: str,
    now: datetime | None = None,
    thresholds: SignalThresholds | None = None,
    kinds: set[SignalKind] | None = None,
    key_id: str | None = None,
    side: Client | None = None,
) -> SignalReport:
    """Every signal (or those of ``kinds``), strongest first; ``key_id`` keeps that key's only.

    ``side``: a second handle on the same store (``side_handle``): the leaked-key detector then
    runs on it beside the others.
    """
    as_of = utc(now or datetime.now(UTC))
    th = thresholds or SignalThresholds()
    wanted = kinds or set(SignalKind)
    signals: list[Signal] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="signals") as pool:
        aside: Future[list[Signal]] | None = None
        if side is not None and SignalKind.many_sources in wanted and len(wanted) > 1:
            aside = pool.submit(DETECTORS[SignalKind.many_sources], side, database, as_of, th)
            wanted = wanted - {SignalKind.many_sources}
        # On error the pool still waits for the side query: the handle is free on return.
        signals.extend(_detect(client, database, as_of, th, wanted))
        if aside is not None:
            signals.extend(aside.result())
    if key_id is not None:  # before the cap: the key's signals must not be cut for other keys'
        signals = [s for s in signals if s.key_id == key_id]
    signals = _cap_per_kind(signals, th)
    order = {Severity.high: 0, Severity.medium: 1, Severity.low: 2}
    signals.sort(key=lambda s: (order[s.severity], -s.score, s.kind.value))
    return SignalReport(as_of=as_of, signals=signals)


def _detect(
    client: Client,
    database: str,
    as_of: datetime,
    th: SignalThresholds,
    wanted: set[SignalKind],
) -> list[Signal]:
    """The detectors of the ``wanted`` kinds, one after the other on ``client``."""
    signals: list[Signal] = []
    ran: set[Callable[..., list[Signal]]] = set()
    recent: list[RecentRow] | None = None
    for kind, detect in DETECTORS.items():
        if kind not in wanted or detect in ran:
            continue
        ran.add(detect)
        if detect is rate_jumps or detect is error_bursts:
            # Both read the same per-key counts of the recent window: one scan, not two.
            if recent is None:
                recent = recent_counts(client, database, as_of, th)
            found = detect(client, database, as_of, th, recent)
        else:
            found = detect(client, database, as_of, th)
        signals.extend(s for s in found if s.kind in wanted)
    return signals
