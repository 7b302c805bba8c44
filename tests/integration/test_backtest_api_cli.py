"""``POST /v1/limits/backtest`` and ``meter limits backtest`` on the seeded backtest data set: the
same answer as the query itself through the API, through the CLI (store or API, table, JSON,
CSV), with the overrides read from the limits topic; the bounds and bad input refused in one
line (CLI) or a JSON error (API)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from schemas.analytics import BacktestRequest, BacktestResult, BacktestScope
from schemas.limits import LimitPolicy, OverrideScope, PolicyBook
from tests.integration.backtest_reference import (  # noqa: F401 (the fixtures now and rows)
    CANDIDATE,
    VIP,
    Row,
    day_of,
    now_fixture,
    overrides,
    rows_fixture,
)
from worker.analytics.api import build_query_app
from worker.analytics.backtest import backtest
from worker.analytics.source import ApiAnalytics, StoreAnalytics
from worker.cli import build_parser, run_command
from worker.settings import Settings

ADMIN = secrets.token_urlsafe(32)
ISO = "%Y-%m-%dT%H:%M:%SZ"


@pytest.fixture
def api(clickhouse: Any, make_settings: Any, settings: Settings, now: datetime, rows: list[Row]) -> TestClient:
    app_settings = make_settings(admin_api_key=ADMIN, clickhouse_database=settings.clickhouse_database)
    book = overrides()
    # As the worker passes it: the live book's resolve, and no book of its own.
    app = build_query_app(app_settings, clickhouse, policy_for=book.resolve, now=lambda: now)
    return TestClient(app, headers={"X-API-Key": ADMIN})


def body(now: datetime, **extra: Any) -> dict[str, Any]:
    return {**CANDIDATE, "since": (day_of(now) + timedelta(hours=6)).strftime(ISO), "top": 50, **extra}


@pytest.mark.clickhouse
@pytest.mark.no_kafka
class TestApi:
    def test_answers_what_the_query_answers(
        self, api: TestClient, clickhouse: Any, settings: Settings, now: datetime
    ) -> None:
        for extra in (
            {},
            {"scope": "account", "subject": VIP, "ignore_overrides": True},
            # Ending now: three days back cover the whole data set whatever the time of day
            # (one day back from late evening held no refusal: the test failed after ~22:00 UTC).
            {"since": None, "span": "P3D"},
        ):
            response = api.post("/v1/limits/backtest", json=body(now, **extra))
            assert response.status_code == 200, response.text
            got = BacktestResult.model_validate_json(response.content)
            direct = backtest(
                clickhouse,
                settings.clickhouse_database,
                BacktestRequest.model_validate(body(now, **extra)),
                overrides(),
                minute_days=settings.ttl_minute_days,
                now=now,
            )
            assert got == direct
            assert got.candidate.refused > 0

    def test_the_overrides_in_force_come_from_the_book_the_api_follows(self, api: TestClient, now: datetime) -> None:
        got = BacktestResult.model_validate_json(api.post("/v1/limits/backtest", json=body(now)).content)
        sources = {k.key_id: k.in_force_source for k in got.top}
        assert sources["cf_liv_bt_low"] == "key override cf_liv_bt_low"

    def test_needs_the_admin_key(self, api: TestClient, now: datetime) -> None:
        response = api.post("/v1/limits/backtest", json=body(now), headers={"X-API-Key": ""})
        assert response.status_code == 401
        assert response.json()["error"] == "missing_api_key"

    def test_a_span_beyond_the_minute_level_is_a_422_naming_the_bound(
        self, api: TestClient, settings: Settings, now: datetime
    ) -> None:
        response = api.post("/v1/limits/backtest", json={**CANDIDATE, "span": "P8D"})
        assert response.status_code == 422
        message = response.json()["message"]
        bound = (now - timedelta(days=settings.ttl_minute_days)).strftime(ISO)
        assert f"since must be at or after {bound}" in message
        assert f"METER_TTL_MINUTE_DAYS={settings.ttl_minute_days}" in message

    @pytest.mark.parametrize(
        ("payload", "status", "fragment"),
        [
            ({"per_minute": 50, "per_hour": 600}, 422, "per_day: Field required"),
            ({**CANDIDATE, "subject": "k"}, 422, "give a subject with scope key or account"),
            ({**CANDIDATE, "scope": "key"}, 422, "give a subject with scope key or account"),
            ({**CANDIDATE, "top": 5000}, 422, "top: Input should be less than or equal to 1000"),
            ({**CANDIDATE, "per_minute": -1}, 422, "per_minute: Input should be greater than or equal to 0"),
            ({**CANDIDATE, "since": "2026-01-01T00:00:00", "until": None}, 422, "timezone"),
            ({**CANDIDATE, "rogue": 1}, 422, "Extra inputs are not permitted"),
            # Found by the fuzz test: times UTC cannot hold, or arithmetic on them cannot (were 500s).
            ({**CANDIDATE, "since": "0001-01-01T00:00:58+14:01"}, 422, "starts at 0001-01-01T00:00:58+14:01, before"),
            ({**CANDIDATE, "until": "0001-01-01T11:26:08Z"}, 422, "starts at 0001-01-01T11:26:08Z, before"),
            ({**CANDIDATE, "since": "9999-12-31T23:00:00-05:00"}, 422, "starts at 9999-12-31T23:00:00-05:00, after"),
        ],
    )
    def test_bad_requests(
        self, api: TestClient, now: datetime, payload: dict[str, Any], status: int, fragment: str
    ) -> None:
        response = api.post("/v1/limits/backtest", json=payload)
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error", "message", "request_id"}
        assert fragment in response.json()["message"]

    def test_an_empty_span_is_a_400(self, api: TestClient, now: datetime) -> None:
        at = (now - timedelta(hours=1)).strftime(ISO)
        response = api.post("/v1/limits/backtest", json={**CANDIDATE, "since": at, "until": at})
        assert response.status_code == 400
        assert "must be before until" in response.json()["message"]

    def test_the_cli_source_asks_the_api_and_gets_what_the_store_gives(
        self, api: TestClient, clickhouse: Any, settings: Settings, now: datetime
    ) -> None:
        """ApiAnalytics (a read command while a worker holds the embedded store) and StoreAnalytics
        answer the same. The clock differs (the API's is pinned), so the span is explicit."""
        remote = ApiAnalytics("http://testserver", ADMIN)
        remote._http = api  # the TestClient is an httpx.Client on the app
        local = StoreAnalytics(clickhouse, settings.clickhouse_database, lambda: overrides().resolve, overrides)
        request = BacktestRequest(
            **CANDIDATE, scope=BacktestScope.account, subject="acct-a", since=day_of(now), until=now, top=5
        )
        assert same(remote.backtest(request), local.backtest(request))  # the API's clock is pinned
        unlimited = request.model_copy(update={"per_day": None})
        assert remote.backtest(unlimited).policy.per_day is None


# -- the command line -------------------------------------------------------------------------


def meter(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    args = build_parser().parse_args(list(argv))
    code = run_command(args, settings)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def span(now: datetime) -> list[str]:
    return ["--since", (day_of(now) + timedelta(hours=6)).strftime(ISO), "--until", now.strftime(ISO)]


def same(a: BacktestResult, b: BacktestResult) -> bool:
    """Equal but for the oldest minute held, which moves with the clock between two runs."""
    clock = {"minute_level_from"}
    return a.model_dump(exclude=clock) == b.model_dump(exclude=clock)


def cli_request(now: datetime, **extra: Any) -> BacktestRequest:
    return BacktestRequest(**{**CANDIDATE, "since": day_of(now) + timedelta(hours=6), "until": now, **extra})


@pytest.mark.clickhouse
@pytest.mark.no_kafka
class TestCliWithoutKafka:
    """Kafka down: the overrides cannot be read, the CLI compares with the default (and logs so)."""

    def test_json_is_the_query_result(
        self,
        clickhouse: Any,
        settings: Settings,
        rows: list[Row],
        now: datetime,
        span: list[str],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        code, out, err = meter(
            settings, capsys, "limits", "backtest", "--per-minute", "50", "--per-hour", "600", "--per-day", "3000",
            *span, "--top", "7", "--windows", "4", "--format", "json",
        )  # fmt: skip
        assert code == 0, err
        got = BacktestResult.model_validate_json(out)
        book = PolicyBook(settings.default_policy())
        request = cli_request(now, top=7, windows_per_key=4)
        assert same(got, backtest(clickhouse, settings.clickhouse_database, request, book, settings.ttl_minute_days))
        assert len(got.top) == 7

    def test_a_limit_not_given_is_the_defaults_and_unlimited_drops_it(
        self, settings: Settings, rows: list[Row], span: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, out, _ = meter(
            settings, capsys, "limits", "backtest", "--per-minute", "50", "--per-hour", "unlimited", *span,
            "--key", "cf_liv_bt_spiky", "--format", "json",
        )  # fmt: skip
        assert code == 0
        got = BacktestResult.model_validate_json(out)
        assert (got.policy.per_minute, got.policy.per_hour, got.policy.per_day) == (50, None, 5_000)
        assert (got.scope, got.subject, got.keys) == (BacktestScope.key, "cf_liv_bt_spiky", 1)
        code, out, _ = meter(settings, capsys, "limits", "backtest", "--unlimited", *span, "--format", "json")
        assert BacktestResult.model_validate_json(out).candidate.refused == 0

    def test_table_and_csv(
        self, settings: Settings, rows: list[Row], span: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        argv = ["limits", "backtest", "--per-minute", "50", "--per-hour", "600", "--per-day", "3000", *span]
        code, out, _ = meter(settings, capsys, *argv, "--top", "3")
        assert code == 0
        lines = out.splitlines()
        assert lines[0] == "backtest of 50/min, 600/h, 3,000/day on all keys (as the default; keys and accounts " + (
            "with an override keep it)"
        )
        assert "exact at minute granularity" in lines[1]
        assert any(line.startswith("candidate  total") for line in lines)
        assert "most refused keys (candidate), with the same replay under the limits in force:" in lines
        assert any(line.startswith("key_id ") and "in_force_refused" in line for line in lines)
        assert any("their most refused windows" in line for line in lines)
        code, out, _ = meter(settings, capsys, *argv, "--top", "3", "--format", "csv")
        table = list(csv.DictReader(io.StringIO(out)))
        assert len(table) == 3
        assert int(table[0]["refused"]) >= int(table[1]["refused"]) >= int(table[2]["refused"]) > 0
        assert table[0]["candidate"] == "50/min, 600/h, 3,000/day"

    @pytest.mark.parametrize(
        ("argv", "fragment"),
        [
            (["--since", "8d"], "since must be at or after"),
            (["--top", "5000"], "top: Input should be less than or equal to 1000"),
            (["--since", "2h", "--until", "1970-01-01T00:30:00Z"], "1970"),
        ],
    )
    def test_refusals_are_one_line_and_exit_2(
        self, settings: Settings, argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = meter(settings, capsys, "limits", "backtest", "--per-minute", "50", *argv)
        assert code == 2
        line = err.strip().splitlines()[-1]
        assert line.startswith("meter limits: ")
        assert fragment in line

    def test_backtest_options_are_refused_elsewhere(
        self, settings: Settings, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = meter(settings, capsys, "limits", "show", "--format", "csv")
        assert code == 2
        assert "are for backtest" in err

    def test_unparsable_since_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["limits", "backtest", "--since", "last week"])
        assert "not a span or a time" in capsys.readouterr().err


@pytest.mark.clickhouse
@pytest.mark.kafka
def test_cli_compares_with_the_overrides_on_the_limits_topic(
    topics: Settings,
    clickhouse: Any,
    rows: list[Row],
    now: datetime,
    span: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.limits.control import set_override

    vip = LimitPolicy(per_minute=200, per_hour=5_000, per_day=None)
    asyncio.run(set_override(topics, OverrideScope.account, VIP, vip, "backtest test"))
    code, out, err = meter(
        topics, capsys, "limits", "backtest", "--per-minute", "50", "--per-hour", "600", "--per-day", "3000",
        *span, "--format", "json", "--top", "50", "--ignore-overrides",
    )  # fmt: skip
    assert code == 0, err
    assert err == ""  # the overrides were read
    got = BacktestResult.model_validate_json(out)
    book = PolicyBook(topics.default_policy())
    book.by_account[VIP] = vip
    request = cli_request(now, top=50, ignore_overrides=True, windows_per_key=3)  # --windows: 3 by default
    assert same(got, backtest(clickhouse, topics.clickhouse_database, request, book, topics.ttl_minute_days))
    # The VIP key: refused by the candidate, never by its account's override in force.
    [key] = [k for k in got.top if k.key_id == "cf_liv_bt_vip"]
    assert (key.in_force_source, key.in_force, key.in_force_refused) == (f"account override {VIP}", vip, 0)
    assert key.refused > 0
    assert json.loads(out)["in_force"]["refused"] < json.loads(out)["candidate"]["refused"]
