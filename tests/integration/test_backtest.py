"""The backtest on the real engine equals an independent replay of the seeded data set
(tests/integration/backtest_reference.py: request by request, in Python), for every scope, with
and without overrides, unlimited windows, a warm-up before the span, and the bounds it refuses."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from schemas.analytics import BacktestRequest, BacktestResult, BacktestScope
from schemas.decisions import Window
from schemas.limits import LimitPolicy, PolicyBook
from tests.integration.backtest_reference import (  # noqa: F401 (the fixtures now and rows)
    CANDIDATE,
    LOW_KEY,
    VIP,
    KeyExpectation,
    Row,
    day_of,
    expect,
    now_fixture,
    overrides,
    rows_fixture,
    utc_now_for_tests,
)
from worker.analytics.backtest import BeyondMinuteLevel, backtest
from worker.refusals import OutOfRange
from worker.settings import Settings
from worker.store.rollup import rollup_table

pytestmark = [pytest.mark.clickhouse, pytest.mark.no_kafka]


def check(result: BacktestResult, expected: dict[str, KeyExpectation], top: int, per_key: int) -> None:
    """Every figure of ``result`` against the replay, key by key and in total."""
    assert result.keys == len(expected)
    assert result.requests == sum(e.requests for e in expected.values())
    assert result.observed_refused == sum(e.observed for e in expected.values())
    for outcome, side in ((result.candidate, "candidate"), (result.in_force, "in_force")):
        replays = {k: getattr(e, side) for k, e in expected.items()}
        assert outcome.keys_refused == sum(1 for r in replays.values() if r.total)
        assert outcome.refused == sum(r.total for r in replays.values())
        assert [w.window for w in outcome.windows] == [Window.minute, Window.hour, Window.day]
        for w in outcome.windows:
            kind = w.window.value
            assert (w.keys, w.buckets, w.refused) == (
                sum(1 for r in replays.values() if r.refused[kind]),
                sum(len(r.buckets[kind]) for r in replays.values()),
                sum(r.refused[kind] for r in replays.values()),
            ), (side, kind)
    assert result.newly_refused_keys == sum(1 for e in expected.values() if e.candidate.total and not e.in_force.total)
    assert result.no_longer_refused_keys == sum(
        1 for e in expected.values() if e.in_force.total and not e.candidate.total
    )
    listed = sorted(
        (e for e in expected.values() if e.candidate.total or e.in_force.total),
        key=lambda e: (-e.candidate.total, -e.in_force.total, e.key_id),
    )[:top]
    assert [k.key_id for k in result.top] == [e.key_id for e in listed]
    for got, e in zip(result.top, listed, strict=True):
        c = e.candidate
        assert (got.account_id or "", got.requests, got.observed_refused) == (e.account, e.requests, e.observed)
        assert (got.refused, got.refused_minute, got.refused_hour, got.refused_day) == (
            c.total,
            c.refused["minute"],
            c.refused["hour"],
            c.refused["day"],
        ), e.key_id
        assert got.in_force_refused == e.in_force.total
        assert got.first_refused == c.first
        assert got.windows_refused == len(c.windows)
        assert (got.candidate, got.candidate_applies, got.in_force) == (
            e.candidate_policy,
            e.applies,
            e.in_force_policy,
        )
        ranked = sorted(c.windows.items(), key=lambda item: (-item[1], item[0][1], item[0][0]))[:per_key]
        assert [(w.window.value, w.start, w.refused, w.requests) for w in got.windows] == [
            (kind, start, n, e.demand[(kind, start)]) for (kind, start), n in ranked
        ], e.key_id


@pytest.mark.parametrize(
    ("scope", "subject", "ignore", "limits"),
    [
        (BacktestScope.all, None, False, CANDIDATE),
        (BacktestScope.all, None, True, CANDIDATE),
        (BacktestScope.all, None, False, {"per_minute": None, "per_hour": 600, "per_day": None}),
        (BacktestScope.all, None, False, {"per_minute": 0, "per_hour": None, "per_day": None}),
        (BacktestScope.account, VIP, False, CANDIDATE),
        (BacktestScope.account, "acct-a", False, {"per_minute": 40, "per_hour": 700, "per_day": 5_000}),
        (BacktestScope.account, "acct-a", True, {"per_minute": 40, "per_hour": 700, "per_day": 5_000}),
        (BacktestScope.key, "cf_liv_bt_vip", False, CANDIDATE),
        (BacktestScope.key, LOW_KEY, False, {"per_minute": 12, "per_hour": None, "per_day": None}),
        (BacktestScope.key, "cf_liv_bt_warm", False, {"per_minute": 100, "per_hour": 1_000, "per_day": 5_000}),
    ],
)
def test_backtest_equals_an_independent_replay(
    clickhouse: Any,
    settings: Settings,
    rows: list[Row],
    now: datetime,
    scope: BacktestScope,
    subject: str | None,
    ignore: bool,
    limits: dict[str, int | None],
) -> None:
    book = overrides()
    since = day_of(now) + timedelta(hours=6)  # the day's first six hours are warm-up
    request = BacktestRequest(
        **limits, scope=scope, subject=subject, since=since, ignore_overrides=ignore, top=1000, windows_per_key=25
    )
    result = backtest(clickhouse, settings.clickhouse_database, request, book, minute_days=7, now=now)
    scan_from = day_of(now)
    assert (result.since, result.until, result.counted_from) == (since, now, scan_from)
    assert result.notes == []
    expected = expect(rows, book, LimitPolicy(**limits), scope, subject, ignore, since, now, scan_from)
    assert expected, "the scope has keys"
    check(result, expected, 1000, 25)


def test_the_data_set_crosses_every_limit_and_the_overrides_matter(
    clickhouse: Any, settings: Settings, rows: list[Row], now: datetime
) -> None:
    """Guard against a data set too tame to test anything: each window refuses under both policies,
    the warm-up decides a refusal, and the VIP keys keep their override unless it is ignored."""
    book = overrides()
    since = day_of(now) + timedelta(hours=6)
    request = BacktestRequest(**CANDIDATE, since=since, top=1000)
    result = backtest(clickhouse, settings.clickhouse_database, request, book, minute_days=7, now=now)
    for outcome in (result.candidate, result.in_force):
        assert all(w.refused > 0 for w in outcome.windows), outcome
    keys = {k.key_id: k for k in result.top}
    warm = keys["cf_liv_bt_warm"]  # 4,800 before since, 300 after: day limit 5,000 refuses 100
    assert (warm.in_force_refused, warm.refused, warm.refused_day) == (100, 300, 300)
    # The account override (200/min, 5,000/h) holds and admits all of these two (the second one sent
    # 130/min from acct-a, then from VIP: its newest account).
    assert "cf_liv_bt_vip" not in keys
    assert "cf_liv_bt_mover" not in keys
    assert keys[LOW_KEY].in_force_source == f"key override {LOW_KEY}"
    assert "cf_liv_bt_before" not in keys
    ignored = backtest(
        clickhouse,
        settings.clickhouse_database,
        request.model_copy(update={"ignore_overrides": True}),
        book,
        minute_days=7,
        now=now,
    )
    listed = {k.key_id: k for k in ignored.top}
    for key in ("cf_liv_bt_vip", "cf_liv_bt_mover"):
        got = listed[key]
        assert (got.account_id, got.in_force_source) == (VIP, f"account override {VIP}")
        assert got.candidate_applies
        assert got.refused > 0 == got.in_force_refused
    # 429s are demand: 6 minutes of 130 are 780 requests, of which the seed stored 30 a minute as 429.
    assert (listed["cf_liv_bt_mover"].requests, listed["cf_liv_bt_mover"].observed_refused) == (780, 6 * 30)


def test_top_and_windows_are_cut_after_the_ranking(
    clickhouse: Any, settings: Settings, rows: list[Row], now: datetime
) -> None:
    book = overrides()
    since = day_of(now)
    request = BacktestRequest(**CANDIDATE, since=since, top=3, windows_per_key=2)
    result = backtest(clickhouse, settings.clickhouse_database, request, book, minute_days=7, now=now)
    expected = expect(rows, book, LimitPolicy(**CANDIDATE), BacktestScope.all, None, False, since, now, since)
    check(result, expected, 3, 2)
    none = backtest(
        clickhouse, settings.clickhouse_database, request.model_copy(update={"top": 0}), book, minute_days=7, now=now
    )
    assert none.top == []
    assert none.candidate == result.candidate


def test_nothing_refused_still_counts_every_key(
    clickhouse: Any, settings: Settings, rows: list[Row], now: datetime
) -> None:
    """No key can reach an unlimited candidate nor the unlimited policy in force: nothing is
    replayed, and the totals still come back."""
    book = PolicyBook(LimitPolicy.unlimited())
    since = day_of(now)
    request = BacktestRequest(per_minute=None, per_hour=None, per_day=None, since=since)
    result = backtest(clickhouse, settings.clickhouse_database, request, book, minute_days=7, now=now)
    expected = expect(rows, book, LimitPolicy.unlimited(), BacktestScope.all, None, False, since, now, since)
    assert (result.keys, result.requests) == (len(expected), sum(e.requests for e in expected.values()))
    assert result.candidate.refused == result.in_force.refused == 0
    assert result.top == []


def test_an_empty_store_answers_zeros(clickhouse: Any, settings: Settings, now: datetime) -> None:
    request = BacktestRequest(**CANDIDATE, span=timedelta(days=1))
    result = backtest(clickhouse, settings.clickhouse_database, request, overrides(), minute_days=7, now=now)
    assert (result.keys, result.requests, result.candidate.keys_refused, result.top) == (0, 0, 0, [])


def test_a_fail_closed_nodes_503s_are_no_demand(clickhouse: Any, settings: Settings, now: datetime) -> None:
    """Refused before any limit was checked (cost 0), they were counted by no limiter and no
    policy would have served them: the replay of the policy in force refuses nothing the live
    limiter did not."""
    minute = now.replace(second=0, microsecond=0) - timedelta(hours=1)
    columns = ["level", "key_id", "account_id", "bucket", "endpoint", "status", "route", "requests", "cost"]
    rows = [
        ["minute", "cf_closed", "acct", minute, "/v0/payments", 503, "", 150, 0],
        ["minute", "cf_closed", "acct", minute, "/v0/payments", 200, "", 100, 100],
    ]
    clickhouse.insert(rollup_table(settings.clickhouse_database), rows, column_names=columns)
    request = BacktestRequest(per_minute=100, per_hour=None, per_day=None, span=timedelta(days=1))
    book = PolicyBook(LimitPolicy(per_minute=100, per_hour=None, per_day=None))
    result = backtest(clickhouse, settings.clickhouse_database, request, book, minute_days=7, now=now)
    assert (result.keys, result.requests) == (1, 100)
    assert result.in_force.refused == result.candidate.refused == 0


def test_a_span_beyond_the_minute_level_is_refused_naming_the_bound(
    clickhouse: Any, settings: Settings, now: datetime
) -> None:
    request = BacktestRequest(**CANDIDATE, span=timedelta(days=7, minutes=1))
    with pytest.raises(BeyondMinuteLevel) as refused:
        backtest(clickhouse, settings.clickhouse_database, request, overrides(), minute_days=7, now=now)
    bound = (now - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"since must be at or after {bound}" in str(refused.value)
    assert "METER_TTL_MINUTE_DAYS=7" in str(refused.value)
    # Exactly the retention is fine; the default span is all of it.
    for fine in (request.model_copy(update={"span": timedelta(days=7)}), request.model_copy(update={"span": None})):
        result = backtest(clickhouse, settings.clickhouse_database, fine, overrides(), minute_days=7, now=now)
        assert result.since == result.minute_level_from == now - timedelta(days=7)
    # The retention is a setting: 2 days hold less.
    with pytest.raises(BeyondMinuteLevel):
        backtest(
            clickhouse,
            settings.clickhouse_database,
            request.model_copy(update={"span": timedelta(days=3)}),
            overrides(),
            minute_days=2,
            now=now,
        )


def test_a_first_day_cut_by_the_retention_is_said(clickhouse: Any, settings: Settings, rows: list[Row]) -> None:
    now = utc_now_for_tests()
    request = BacktestRequest(**CANDIDATE, span=timedelta(days=2))
    result = backtest(clickhouse, settings.clickhouse_database, request, overrides(), minute_days=2, now=now)
    assert result.counted_from == result.since == now - timedelta(days=2)
    assert len(result.notes) == 1
    assert "lower bound" in result.notes[0]


@pytest.mark.parametrize(
    ("update", "error", "fragment"),
    [
        ({"until": "day0"}, ValueError, "must be before until"),
        ({"since": datetime(1969, 12, 31, tzinfo=datetime.now().astimezone().tzinfo)}, OutOfRange, "1970"),
    ],
)
def test_empty_or_unstorable_spans_are_refused(
    clickhouse: Any, settings: Settings, now: datetime, update: dict[str, Any], error: type, fragment: str
) -> None:
    values = {**update}
    if values.get("until") == "day0":
        values = {"since": now - timedelta(hours=1), "until": now - timedelta(hours=1, seconds=30)}
    request = BacktestRequest(**CANDIDATE, **values)
    with pytest.raises(error, match=fragment):
        backtest(clickhouse, settings.clickhouse_database, request, overrides(), minute_days=7, now=now)
