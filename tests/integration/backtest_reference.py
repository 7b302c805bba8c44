"""A seeded data set for the backtest, and what a backtest of it must answer, computed without
any of the backtest's code: request by request, with the limiter's rule written out plainly.

The data set (minute rollup rows, a few rows per minute: endpoints, statuses, 429s):
bursts across the minute limits, steady traffic across the hour limit, a key across the day
limit, a key under a key override and one under an account override, a key that moved to an
overridden account, a key whose day is filled before the span starts (warm-up), quiet keys,
keys outside the span, hour/day rows that must be ignored, and random keys.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.analytics import BacktestScope
from schemas.limits import LimitPolicy, PolicyBook
from worker.settings import Settings
from worker.store.rollup import rollup_table

MINUTE = timedelta(minutes=1)
CANDIDATE = {"per_minute": 50, "per_hour": 600, "per_day": 3_000}
VIP = "acct-vip"
LOW_KEY = "cf_liv_bt_low"


@dataclass(frozen=True)
class Row:
    key_id: str
    minute: datetime
    requests: int
    account: str
    status: int = 200
    endpoint: str = "/v0/rates"
    level: str = "minute"


def day_of(now: datetime) -> datetime:
    """The first full day of the data set: two days before ``now``'s."""
    return now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)


def overrides() -> PolicyBook:
    """Default 100/1,000/5,000; one key override (10/min only); one account override (200/min, 5,000/h)."""
    book = PolicyBook(LimitPolicy())
    book.by_key[LOW_KEY] = LimitPolicy(per_minute=10, per_hour=None, per_day=None)
    book.by_account[VIP] = LimitPolicy(per_minute=200, per_hour=5_000, per_day=None)
    return book


def _split(key: str, minute: datetime, n: int, account: str, in_force_minute: int | None = 100) -> list[Row]:
    """``n`` requests of one minute as the ingest stores them: two endpoints, and what the live
    limiter refused (past ``in_force_minute``) as 429s."""
    refused = max(0, n - in_force_minute) if in_force_minute is not None else 0
    admitted = n - refused
    first = admitted * 2 // 3
    rows = [
        Row(key, minute, first, account, endpoint="/v0/rates"),
        Row(key, minute, admitted - first, account, endpoint="/v0/payments"),
        Row(key, minute, refused, account, status=429, endpoint="/v0/payments"),
    ]
    return [r for r in rows if r.requests]


def seed_rows(now: datetime, randoms: int = 20, seed: int = 7) -> list[Row]:
    d0 = day_of(now)
    d1 = d0 + timedelta(days=1)
    rows: list[Row] = []

    def run(key: str, start: datetime, minutes: int, per_minute: int, account: str) -> None:
        for i in range(minutes):
            rows.extend(_split(key, start + i * MINUTE, per_minute, account))

    # Bursts across 50 and 100 a minute, on both days.
    for day in (d0, d1):
        for i, n in enumerate((30, 60, 120, 45, 51, 99, 100, 101, 150, 10)):
            rows.extend(_split("cf_liv_bt_spiky", day + timedelta(hours=7) + i * MINUTE, n, "acct-a"))
    run("cf_liv_bt_steady", d0 + timedelta(hours=9), 180, 12, "acct-a")  # 720 an hour
    run("cf_liv_bt_heavy", d0 + timedelta(hours=12), 300, 25, "acct-b")  # 1,500 an hour, 7,500 a day
    run("cf_liv_bt_heavy", d1 + timedelta(hours=3, minutes=30), 90, 25, "acct-b")  # across an hour boundary
    rows.append(Row("cf_liv_bt_quiet", d0 + timedelta(hours=10), 3, "acct-b"))
    rows.append(Row("cf_liv_bt_quiet", d1 + timedelta(hours=10), 2, "acct-b", status=404))
    # Under the account override (200 a minute, 5,000 an hour).
    run("cf_liv_bt_vip", d0 + timedelta(hours=8), 5, 150, VIP)
    run("cf_liv_bt_vip", d1 + timedelta(hours=1), 360, 20, VIP)
    # Under the key override (10 a minute).
    run(LOW_KEY, d0 + timedelta(hours=13), 30, 15, "acct-a")
    # Moved from acct-a to the overridden account: its newest account is the VIP one.
    run("cf_liv_bt_mover", d0 + timedelta(hours=14), 3, 130, "acct-a")
    run("cf_liv_bt_mover", d1 + timedelta(hours=14), 3, 130, VIP)
    # The day filled before the span starts (06:00): 4,800 in 01:00-05:59 (960 an hour), then 300 after.
    run("cf_liv_bt_warm", d0 + timedelta(hours=1), 300, 16, "acct-c")
    run("cf_liv_bt_warm", d0 + timedelta(hours=7), 6, 50, "acct-c")
    # Not in the scan: the day before, and the minute the span ends on.
    rows.append(Row("cf_liv_bt_before", d0 - timedelta(hours=3), 500, "acct-a"))
    rows.append(Row("cf_liv_bt_quiet", now, 999, "acct-b"))
    # Other levels are never read.
    rows.append(Row("cf_liv_bt_spiky", d0 + timedelta(hours=7), 100_000, "acct-a", level="hour"))
    rows.append(Row("cf_liv_bt_spiky", d0, 100_000, "acct-a", level="day"))
    # Random keys: heavy-tailed minutes, several rows a minute, random accounts (VIP among them).
    rng = random.Random(seed)
    for k in range(randoms):
        key = f"cf_liv_bt_rand_{k:03d}"
        account = rng.choice(["acct-a", "acct-b", VIP, ""])
        start = d0 + timedelta(minutes=rng.randrange(0, 36 * 60))
        for _ in range(rng.randrange(5, 80)):
            start += MINUTE * rng.choice([1, 1, 1, 2, 7, 45])
            if start >= now:
                break
            n = int(rng.paretovariate(1.2) * 15)
            rows.extend(_split(key, start, n, account))
            if rng.random() < 0.2:
                rows.append(Row(key, start, rng.randrange(1, 40), account, status=401, endpoint="/v0/wallets"))
    return rows


def insert(client: Any, table: str, rows: list[Row]) -> None:
    columns = ["level", "key_id", "bucket", "endpoint", "status", "account_id", "requests"]
    data = [[r.level, r.key_id, r.minute, r.endpoint, r.status, r.account, r.requests] for r in rows]
    client.insert(table, data, column_names=columns)


# -- the expectation -------------------------------------------------------------------------


@dataclass
class Replay:
    refused: dict[str, int] = field(default_factory=lambda: {"minute": 0, "hour": 0, "day": 0})
    buckets: dict[str, set[datetime]] = field(default_factory=lambda: {"minute": set(), "hour": set(), "day": set()})
    windows: dict[tuple[str, datetime], int] = field(default_factory=lambda: defaultdict(int))
    first: datetime | None = None

    @property
    def total(self) -> int:
        return sum(self.refused.values())


def _start(kind: str, minute: datetime) -> datetime:
    if kind == "day":
        return minute.replace(hour=0, minute=0)
    if kind == "hour":
        return minute.replace(minute=0)
    return minute


def replay(per_minute: dict[datetime, int], policy: LimitPolicy, since: datetime) -> Replay:
    """The limiter, one request at a time: admitted while every window's count of admitted requests
    is under its limit; a refusal goes to the longest window at its limit; before ``since`` the
    requests count but their refusals are not reported."""
    out = Replay()
    limits = {"minute": policy.per_minute, "hour": policy.per_hour, "day": policy.per_day}
    counts: dict[str, tuple[datetime, int]] = {}
    for minute in sorted(per_minute):
        for _ in range(per_minute[minute]):
            at_limit = None
            for kind in ("day", "hour", "minute"):
                start = _start(kind, minute)
                held = counts.get(kind)
                count = held[1] if held and held[0] == start else 0
                limit = limits[kind]
                if limit is not None and count >= limit:
                    at_limit = kind
                    break
            if at_limit is None:
                for kind in ("minute", "hour", "day"):
                    start = _start(kind, minute)
                    held = counts.get(kind)
                    counts[kind] = (start, (held[1] if held and held[0] == start else 0) + 1)
                continue
            if minute >= since:
                out.refused[at_limit] += 1
                out.buckets[at_limit].add(_start(at_limit, minute))
                out.windows[(at_limit, _start(at_limit, minute))] += 1
                out.first = out.first or minute
    return out


@dataclass
class KeyExpectation:
    key_id: str
    account: str
    requests: int
    observed: int
    candidate_policy: LimitPolicy
    applies: bool
    in_force_policy: LimitPolicy
    candidate: Replay
    in_force: Replay
    demand: dict[tuple[str, datetime], int]


def expect(
    rows: list[Row],
    book: PolicyBook,
    candidate: LimitPolicy,
    scope: BacktestScope,
    subject: str | None,
    ignore_overrides: bool,
    since: datetime,
    until: datetime,
    scan_from: datetime,
) -> dict[str, KeyExpectation]:
    """Every key of the scope with requests in [since, until), as the backtest must see it."""
    by_key: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.level == "minute" and scan_from <= r.minute < until:
            by_key[r.key_id].append(r)
    out: dict[str, KeyExpectation] = {}
    for key, key_rows in sorted(by_key.items()):
        newest = max(key_rows, key=lambda r: r.minute)
        account = newest.account
        if scope is BacktestScope.key and key != subject:
            continue
        if scope is BacktestScope.account and account != subject:
            continue
        in_span = [r for r in key_rows if r.minute >= since]
        if not sum(r.requests for r in in_span):
            continue
        per_minute: dict[datetime, int] = defaultdict(int)
        demand: dict[tuple[str, datetime], int] = defaultdict(int)
        for r in key_rows:
            per_minute[r.minute] += r.requests
            for kind in ("minute", "hour", "day"):
                demand[(kind, _start(kind, r.minute))] += r.requests
        in_force = book.resolve(key, account)
        if scope is BacktestScope.key or ignore_overrides:
            applies = True
        elif scope is BacktestScope.account:
            applies = key not in book.by_key
        else:
            applies = key not in book.by_key and not (account and account in book.by_account)
        policy = candidate if applies else in_force
        out[key] = KeyExpectation(
            key_id=key,
            account=account,
            requests=sum(r.requests for r in in_span),
            observed=sum(r.requests for r in in_span if r.status == 429),
            candidate_policy=policy,
            applies=applies,
            in_force_policy=in_force,
            candidate=replay(per_minute, policy, since),
            in_force=replay(per_minute, in_force, since),
            demand=demand,
        )
    return out


def utc_now_for_tests() -> datetime:
    """Half past the current hour: the data set ends before it, the minute level holds all of it."""
    return datetime.now(UTC).replace(minute=30, second=0, microsecond=0)


# Fixtures of the backtest tests (imported by them as *_fixture): the data set in the test's database.


@pytest.fixture(name="now")
def now_fixture() -> datetime:
    return utc_now_for_tests()


@pytest.fixture(name="rows")
def rows_fixture(clickhouse: Any, settings: Settings, now: datetime) -> list[Row]:
    data = seed_rows(now)
    insert(clickhouse, rollup_table(settings.clickhouse_database), data)
    return data
