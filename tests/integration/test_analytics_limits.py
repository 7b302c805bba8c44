"""Issue 9 on the query side, against the real engine: series with many groups are capped
(top N + "other"), ranges the store cannot hold are a 422, failed admin logins are
throttled, and what an attacker put in a path reaches the terminal escaped."""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from schemas.analytics import Breakdown, Subject
from schemas.usage import Granularity
from worker.analytics import queries
from worker.analytics.api import build_query_app
from worker.analytics.cli import add_analytics_commands
from worker.cli import run_command
from worker.settings import Settings
from worker.store.rollup import rollup_table

pytestmark = [pytest.mark.clickhouse, pytest.mark.no_kafka]
ADMIN = secrets.token_urlsafe(32)  # generated per run, like every secret
KEY = "cf_liv_many0000000000001"
ENDPOINTS = 30  # endpoint i gets i + 1 requests a minute


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(second=0, microsecond=0)


@pytest.fixture
def many_endpoints(clickhouse: Any, settings: Settings, now: datetime) -> None:
    """One key calling 30 endpoints in each of the last 60 minutes, plus one path with escapes."""
    columns = ["level", "key_id", "bucket", "endpoint", "status", "requests", "bytes_out"]
    rows: list[list[object]] = []
    for minute in range(60):
        bucket = now - timedelta(minutes=minute)
        for i in range(ENDPOINTS):
            rows.append(["minute", KEY, bucket, f"/v0/e{i:02d}", 200, i + 1, 10])
    rows.append(["minute", "cf_liv_evil0000000000001", now, "/v0/\x1b]0;pwned\x07\x1b[2J\u202e", 404, 5000, 0])
    clickhouse.insert(rollup_table(settings.clickhouse_database), rows, column_names=columns)


@pytest.fixture
def api(clickhouse: Any, make_settings: Any, settings: Settings, now: datetime) -> Callable[..., TestClient]:
    def client(**overrides: Any) -> TestClient:
        app_settings = make_settings(admin_api_key=ADMIN, clickhouse_database=settings.clickhouse_database, **overrides)
        app = build_query_app(app_settings, clickhouse, now=lambda: now)
        return TestClient(app, headers={"X-API-Key": ADMIN})

    return client


@pytest.fixture
def meter(settings: Settings, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    parser = argparse.ArgumentParser(prog="meter")
    add_analytics_commands(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> tuple[int, str, str]:
        args = parser.parse_args(argv)
        code = run_command(args, settings)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- item 6: groups x buckets is capped --------------------------------------------------------


def test_a_breakdown_returns_the_top_groups_and_one_other(
    clickhouse: Any, settings: Settings, now: datetime, many_endpoints: None
) -> None:
    since, until = now - timedelta(minutes=59), now + timedelta(minutes=1)
    result = queries.series(
        clickhouse, settings.clickhouse_database, Subject.key, KEY, Granularity.minute, since, until, Breakdown.endpoint
    )
    names = [g.group for g in result.groups]
    assert len(names) == queries.DEFAULT_SERIES_GROUPS + 1
    assert names[: queries.DEFAULT_SERIES_GROUPS] == [f"/v0/e{i:02d}" for i in range(29, 29 - 10, -1)]
    assert names[-1] == queries.OTHER_GROUP
    other = result.groups[-1]
    assert other.requests == [sum(range(1, 21))] * 60  # endpoints e00..e19: 1 + ... + 20 a minute
    assert sum(g.total_requests for g in result.groups) == 60 * sum(range(1, ENDPOINTS + 1))

    three = queries.series(
        clickhouse,
        settings.clickhouse_database,
        Subject.key,
        KEY,
        Granularity.minute,
        since,
        until,
        Breakdown.endpoint,
        top=3,
    )
    assert [g.group for g in three.groups] == ["/v0/e29", "/v0/e28", "/v0/e27", queries.OTHER_GROUP]
    every = queries.series(
        clickhouse,
        settings.clickhouse_database,
        Subject.key,
        KEY,
        Granularity.minute,
        since,
        until,
        Breakdown.endpoint,
        top=ENDPOINTS,
    )
    assert len(every.groups) == ENDPOINTS  # no "other" when every group fits


def test_a_series_over_the_cap_is_refused_naming_the_cap(
    api: Callable[..., TestClient],
    meter: Callable[..., tuple[int, str, str]],
    now: datetime,
    many_endpoints: None,
) -> None:
    cap = f"{queries.MAX_SERIES_VALUES:,}"
    # 11 groups x 30 days of minutes = 475,200 values: more than the cap.
    long = {"granularity": "minute", "breakdown": "endpoint", "since": _iso(now - timedelta(days=30))}
    response = api().get(f"/v1/keys/{KEY}/usage", params=long)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    assert cap in response.json()["message"]
    # Fewer groups (top) or coarser buckets fit.
    assert api().get(f"/v1/keys/{KEY}/usage", params={**long, "top": 2}).status_code == 200
    assert api().get(f"/v1/keys/{KEY}/usage", params={**long, "granularity": "hour"}).status_code == 200
    assert api().get(f"/v1/keys/{KEY}/usage", params={**long, "top": 0}).status_code == 422

    code, out, err = meter(
        "key-usage", "--key", KEY, "--granularity", "minute", "--breakdown", "endpoint", "--since", long["since"]
    )
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert cap in err
    assert err.startswith("meter key-usage: ")
    since = _iso(now - timedelta(minutes=59))
    code, out, _ = meter(
        "key-usage",
        "--key",
        KEY,
        "--granularity",
        "minute",
        "--since",
        since,
        "--breakdown",
        "endpoint",
        "--top",
        "2",
        "--sparse",
        "--format",
        "csv",
    )
    assert code == 0
    assert {line.split(",")[1] for line in out.splitlines()[1:]} == {"/v0/e29", "/v0/e28", queries.OTHER_GROUP}


# -- item 13: ranges the store cannot hold --------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/keys/x/usage?granularity=minute&until=1970-01-01T00:30:00Z",
        "/v1/keys/x/usage?granularity=day&until=1970-01-05T00:00:00Z",
        "/v1/accounts/a/usage?until=1970-01-01T12:00:00Z",
        "/v1/traffic?until=1970-01-01T00:00:00Z",
        "/v1/top?until=1970-01-01T00:30:00Z",
    ],
)
def test_a_range_reaching_before_1970_is_a_422(api: Callable[..., TestClient], path: str) -> None:
    response = api().get(path)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert "1970-01-01T00:00:00Z" in body["message"]


def test_the_cli_refuses_a_range_before_1970_in_one_line(meter: Callable[..., tuple[int, str, str]]) -> None:
    code, _, err = meter("key-usage", "--key", "x", "--granularity", "minute", "--until", "1970-01-01T00:30:00Z")
    assert code == 2
    assert err.count("\n") == 1
    assert "1970-01-01T00:00:00Z" in err


def test_meter_usage_refuses_a_range_before_1970_in_one_line(
    settings: Settings, clickhouse: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import build_parser

    args = build_parser().parse_args(["usage", "--key", "x", "--until", "1970-01-01T00:30:00Z"])
    assert run_command(args, settings) == 2
    err = capsys.readouterr().err
    assert err.startswith("meter usage: ")
    assert err.count("\n") == 1
    assert "1970-01-01T00:00:00Z" in err


# -- item 14: failed admin logins are throttled ----------------------------------------------------


def test_failed_admin_logins_are_throttled_per_client(api: Callable[..., TestClient]) -> None:
    client = api(admin_login_burst=3, admin_login_refill_per_minute=1)
    wrong = {"X-API-Key": "not-the-key"}
    for _ in range(3):
        assert client.get("/v1/blocked", headers=wrong).status_code == 401
    throttled = client.get("/v1/blocked", headers=wrong)
    assert throttled.status_code == 429
    assert throttled.json()["error"] == "rate_limited"
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    # While throttled, even the right key is not looked at (or guessing would go on).
    assert client.get("/v1/blocked").status_code == 429
    # Another client is not affected.
    other = TestClient(client.app, headers={"X-API-Key": ADMIN}, client=("198.51.100.5", 50000))
    assert other.get("/v1/blocked").status_code == 200


def test_behind_a_trusted_proxy_failed_logins_are_throttled_per_forwarded_client(
    api: Callable[..., TestClient],
) -> None:
    # Keyed on the proxy's address, one guesser behind it locked every admin out.
    client = api(admin_login_burst=2, admin_login_refill_per_minute=1, node_trusted_proxies="10.0.0.0/8")
    proxy = TestClient(client.app, client=("10.0.0.2", 40000))
    guesser = {"X-API-Key": "not-the-key", "X-Forwarded-For": "203.0.113.9"}
    for _ in range(2):
        assert proxy.get("/v1/blocked", headers=guesser).status_code == 401
    assert proxy.get("/v1/blocked", headers=guesser).status_code == 429
    admin = {"X-API-Key": ADMIN, "X-Forwarded-For": "198.51.100.7"}
    assert proxy.get("/v1/blocked", headers=admin).status_code == 200
    # An address written by the client itself, left of the proxy's hop, is not believed.
    spoofed = {"X-API-Key": ADMIN, "X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    assert proxy.get("/v1/blocked", headers=spoofed).status_code == 429


# -- item 9: escapes in what reaches a terminal ----------------------------------------------------


def test_cli_table_escapes_control_characters_from_stored_paths(
    meter: Callable[..., tuple[int, str, str]], now: datetime, many_endpoints: None
) -> None:
    code, out, _ = meter("top", "--by", "endpoint", "-n", "1", "--until", _iso(now + timedelta(minutes=1)))
    assert code == 0
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "\u202e" not in out
    assert "/v0/\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in out
