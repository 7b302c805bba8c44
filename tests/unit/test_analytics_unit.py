"""Analytics pieces that need no database: level choice, window parsing, output formats, severity."""

from __future__ import annotations

import argparse
import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from schemas.analytics import Severity, TopDimension, TopEntry, TopList, TopMetric
from schemas.usage import Granularity
from worker.analytics.api import book_of, error_body, settings_limits
from worker.analytics.cli import emit
from worker.analytics.queries import check_window, window_level
from worker.analytics.signals import _fmt_span, severity
from worker.analytics.source import _span
from worker.cli_args import parse_duration
from worker.cli_args import parse_time as _time
from worker.settings import Settings
from worker.store.usage import LevelsHeld

NOW = datetime(2026, 11, 27, 12, 34, 56, tzinfo=UTC)


MINUTE_END = datetime(2026, 11, 27, 12, 35, tzinfo=UTC)  # NOW's bucket, ceiled at each level
HOUR_END = datetime(2026, 11, 27, 13, 0, tzinfo=UTC)
DAY_END = datetime(2026, 11, 28, tzinfo=UTC)


@pytest.mark.parametrize(
    ("span", "level", "floored", "ceiled"),
    [
        (timedelta(hours=1), Granularity.minute, datetime(2026, 11, 27, 11, 34, tzinfo=UTC), MINUTE_END),
        (timedelta(hours=48), Granularity.minute, datetime(2026, 11, 25, 12, 34, tzinfo=UTC), MINUTE_END),
        (timedelta(hours=49), Granularity.hour, datetime(2026, 11, 25, 11, 0, tzinfo=UTC), HOUR_END),
        (timedelta(days=31), Granularity.hour, datetime(2026, 10, 27, 12, 0, tzinfo=UTC), HOUR_END),
        (timedelta(days=32), Granularity.day, datetime(2026, 10, 26, 0, 0, tzinfo=UTC), DAY_END),
    ],
)
def test_window_level_picks_the_coarsest_level_that_stays_exact_enough(
    span: timedelta, level: Granularity, floored: datetime, ceiled: datetime
) -> None:
    # The range is widened to the level's whole buckets, and says so (it counts them all).
    assert window_level(NOW - span, NOW, NOW, LevelsHeld()) == (level, floored, ceiled)


@pytest.mark.parametrize(
    ("since", "span", "level"),
    [
        (NOW - timedelta(days=7) + timedelta(minutes=1), timedelta(hours=1), Granularity.minute),  # still held
        (NOW - timedelta(days=10), timedelta(hours=24), Granularity.hour),  # minute rows deleted
        (NOW - timedelta(days=100), timedelta(days=10), Granularity.day),  # hour rows deleted too
    ],
)
def test_window_level_answers_from_a_coarser_level_once_the_finer_rows_are_deleted(
    since: datetime, span: timedelta, level: Granularity
) -> None:
    assert window_level(since, since + span, NOW, LevelsHeld(minute_days=7, hour_days=90))[0] is level


def test_check_window_refuses_naive_reversed_and_oversized() -> None:
    with pytest.raises(ValueError, match="UTC offset"):
        check_window(NOW.replace(tzinfo=None), NOW)
    with pytest.raises(ValueError, match="before"):
        check_window(NOW, NOW)
    with pytest.raises(ValueError, match="93 days"):
        check_window(NOW - timedelta(days=94), NOW)
    check_window(NOW - timedelta(days=93), NOW)  # the limit itself is allowed


def test_window_and_time_parsing() -> None:
    # One duration parser for the CLI and the query API.
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration("1.5h") == timedelta(minutes=90)
    for bad in ("0h", "h", "1y", "-1h"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    assert _time("2026-11-27T12:00:00+02:00") == datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="offset"):
        _time("2026-11-27T12:00:00")


def test_severity_and_span_wording() -> None:
    assert [severity(s) for s in (1.0, 1.99, 2.0, 4.9, 5.0)] == [
        Severity.low,
        Severity.low,
        Severity.medium,
        Severity.medium,
        Severity.high,
    ]
    assert [_fmt_span(timedelta(hours=h)) for h in (1, 6, 24, 48)] == ["hour", "6 hours", "24 hours", "2 days"]
    assert _fmt_span(timedelta(minutes=15)) == "15 minutes"


def test_error_body_matches_the_metered_api_format() -> None:
    assert error_body(401, "Invalid API key.", "r1") == {
        "error": "invalid_api_key",
        "message": "Invalid API key.",
        "request_id": "r1",
    }
    assert error_body(422, "n: too big", "r2")["error"] == "invalid_request"
    assert error_body(401, "Missing", "r3", error="missing_api_key")["error"] == "missing_api_key"


def _top() -> TopList:
    entry = TopEntry(rank=1, id="k,1", account_id=None, requests=10, errors=2, auth_failures=1, rate_limited=0)
    return TopList(
        dimension=TopDimension.key,
        metric=TopMetric.requests,
        level=Granularity.minute,
        since=NOW,
        until=NOW,
        entries=[entry],
    )


def test_emit_table_csv_and_json() -> None:
    result = _top()
    rows = [e.model_dump() for e in result.entries]
    columns = ["rank", "id", "account_id", "requests"]
    out = io.StringIO()
    emit(rows, columns, "table", result, out)
    assert out.getvalue().splitlines() == ["rank  id   account_id  requests", "1     k,1              10"]
    out = io.StringIO()
    emit(rows, columns, "csv", result, out)
    assert out.getvalue() == 'rank,id,account_id,requests\n1,"k,1",,10\n'  # quoted, None as empty
    out = io.StringIO()
    emit(rows, columns, "json", result, out)
    doc = json.loads(out.getvalue())
    assert doc["entries"][0]["errors"] == 2
    assert doc["since"] == "2026-11-27T12:34:56Z"


@pytest.mark.parametrize("seconds", [30, 90, 1.5, 15 * 60, 2 * 3600, 36 * 3600, 7 * 86_400])
def test_a_span_sent_to_the_query_api_is_the_span_asked(seconds: float) -> None:
    # `meter signals --recent 30s` against a remote API was sent as "0d" (a 422), 90s as "1m".
    span = timedelta(seconds=seconds)
    assert parse_duration(_span(span)) == span


def test_without_a_live_book_the_key_state_uses_the_settings_route_defaults_too() -> None:
    # A query API or CLI that follows no overrides still compares a key on a route with the
    # route's default (METER_ROUTE_LIMITS), not with the key's.
    settings = Settings(route_limits={"statements": {"per_day": 30}}, limit_per_minute=100)
    lookup = settings_limits(settings)
    assert lookup("k1@statements", "").per_day == 30
    assert lookup("k1@statements", "").per_minute is None
    assert lookup("k1", "").per_minute == 100
    assert book_of(settings, None).resolve("k1@statements").per_day == 30
