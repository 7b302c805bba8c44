"""The HTTP query API: admin-key auth, the JSON error format, input limits, and the numbers."""

from __future__ import annotations

import secrets
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from fastapi.testclient import TestClient

from schemas.usage import Granularity
from worker.analytics.api import build_query_app
from worker.analytics.sample import ABUSED_KEY, MANUAL_KEY, PROBER_KEY, STORM_IP, SampleFacts
from worker.settings import Settings
from worker.store.usage import floor_to

pytestmark = [pytest.mark.clickhouse, pytest.mark.no_kafka]
ADMIN = secrets.token_urlsafe(32)  # generated per run: the query API wants >= 32 bytes


@pytest.fixture
def api(clickhouse: Any, make_settings: Any, settings: Settings, sample: SampleFacts) -> TestClient:
    app_settings = make_settings(admin_api_key=ADMIN, clickhouse_database=settings.clickhouse_database)
    app = build_query_app(app_settings, clickhouse, now=lambda: sample.now)
    return TestClient(app, headers={"X-API-Key": ADMIN})


def assert_error(response: Any, status: int, error: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body: dict[str, str] = response.json()
    assert set(body) == {"error", "message", "request_id"}
    assert body["error"] == error
    assert body["message"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


@pytest.mark.parametrize("path", ["/v1/top", "/v1/blocked", f"/v1/keys/{ABUSED_KEY}/state", "/v1/signals"])
def test_v1_needs_the_admin_key(api: TestClient, path: str) -> None:
    missing = api.get(path, headers={"X-API-Key": ""})
    assert "X-API-Key" in assert_error(missing, 401, "missing_api_key")["message"]
    assert_error(api.get(path, headers={"X-API-Key": ADMIN + "x"}), 401, "invalid_api_key")
    assert api.get(path).status_code == 200


def test_query_api_is_disabled_without_a_configured_key(clickhouse: Any, settings: Settings) -> None:
    client = TestClient(build_query_app(settings, clickhouse))
    body = assert_error(client.get("/v1/blocked", headers={"X-API-Key": "anything"}), 403, "forbidden")
    assert "METER_ADMIN_API_KEY" in body["message"]


def test_top_keys(api: TestClient, sample: SampleFacts) -> None:
    body = api.get("/v1/top", params={"n": 3, "window": "1h"}).json()
    assert [(e["id"], e["requests"]) for e in body["entries"]] == [
        (ABUSED_KEY, 3000),
        (PROBER_KEY, 360),
        *[(e["id"], 60) for e in body["entries"][2:]],
    ]
    by_429 = api.get("/v1/top", params={"metric": "rate_limited", "dimension": "key"}).json()
    assert [(e["id"], e["rate_limited"]) for e in by_429["entries"]] == [(ABUSED_KEY, 1200)]


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"n": 5000}, "n: Input should be less than or equal to 1000"),
        ({"window": "1y"}, "window: String should match pattern"),
        ({"metric": "bytes"}, "metric: Input should be"),
        ({"since": "2026-01-01T00:00:00"}, "since: Input should have timezone info"),
    ],
)
def test_invalid_input_is_a_422_with_the_field_named(api: TestClient, params: dict[str, Any], fragment: str) -> None:
    assert fragment in assert_error(api.get("/v1/top", params=params), 422, "invalid_request")["message"]


def test_bad_ranges_are_a_400(api: TestClient, sample: SampleFacts) -> None:
    now = sample.now
    too_long = {"since": (now - timedelta(days=120)).isoformat(), "until": now.isoformat()}
    assert "93 days" in assert_error(api.get("/v1/top", params=too_long), 400, "bad_request")["message"]
    both = {"window": "1h", "since": now.isoformat()}
    assert_error(api.get("/v1/top", params=both), 400, "bad_request")
    reversed_range = {"since": now.isoformat(), "until": (now - timedelta(hours=1)).isoformat()}
    assert_error(api.get(f"/v1/keys/{ABUSED_KEY}/usage", params=reversed_range), 400, "bad_request")
    many = {"granularity": "minute", "since": (now - timedelta(days=40)).isoformat(), "until": now.isoformat()}
    assert "50000" in assert_error(api.get(f"/v1/keys/{ABUSED_KEY}/usage", params=many), 400, "bad_request")["message"]
    assert_error(api.get("/v1/keys/" + "k" * 65 + "/state"), 422, "invalid_request")
    assert_error(api.get("/v1/nothing-here"), 404, "not_found")


def test_key_usage_and_state(api: TestClient, sample: SampleFacts) -> None:
    params = {
        "granularity": "minute",
        "breakdown": "status_class",
        "since": (sample.now - timedelta(hours=1)).isoformat(),
    }
    body = api.get(f"/v1/keys/{ABUSED_KEY}/usage", params=params).json()
    assert {g["group"]: g["total_requests"] for g in body["groups"]} == {"2xx": 1800, "4xx": 1200}
    state = api.get(f"/v1/keys/{ABUSED_KEY}/state", params={"history": 3}).json()
    assert state["blocked"] is True
    assert len(state["history"]) == 3
    # The month also holds the baseline days that fall in it (none on the 1st).
    month = sample.now.replace(day=1, hour=0, minute=0, second=0)
    counts = {"minute": 30, "hour": 1800, "day": 1800, "month": 1800 + sample.baseline([ABUSED_KEY], month, sample.now)}
    assert {w["window"]: w["count"] for w in state["windows"]} == counts
    limits = {"minute": 100, "hour": 1000, "day": 5000, "month": None}  # no monthly quota by default
    assert {w["window"]: w["limit"] for w in state["windows"]} == limits


def test_account_usage_traffic_blocked_and_signals(api: TestClient, sample: SampleFacts) -> None:
    since = sample.now - timedelta(hours=1)
    # Hour buckets (the default granularity): in the day's first hour, yesterday's last
    # baseline hour is one of them.
    before = partial(sample.baseline, since=floor_to(since, Granularity.hour), until=sample.now)
    acct = api.get("/v1/accounts/acct-b/usage", params={"since": since.isoformat()}).json()
    assert sum(g["total_requests"] for g in acct["groups"]) == 3000 + before([ABUSED_KEY])
    traffic = api.get("/v1/traffic", params={"since": since.isoformat()}).json()
    assert {g["group"]: g["total_requests"] for g in traffic["groups"]} == {
        "2xx": 1860 + 60 + before(sample.baseline_per_hour),
        "4xx": 1200 + 300 + 150,
    }
    assert [b["key_id"] for b in api.get("/v1/blocked").json()] == [ABUSED_KEY, MANUAL_KEY]
    report = api.get("/v1/signals", params={"kind": ["invalid_key_storm", "rate_limited"]}).json()
    assert sorted((s["kind"], s["key_id"] or s["client_ip"]) for s in report["signals"]) == [
        ("invalid_key_storm", STORM_IP),
        ("rate_limited", ABUSED_KEY),
    ]
    assert_error(api.get("/v1/signals", params={"recent": "3d"}), 400, "bad_request")


def test_openapi_is_published_with_the_key_scheme(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    assert {"/v1/top", "/v1/keys/{key_id}/state", "/v1/signals", "/v1/blocked"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "the admin API key",
    }


def test_dashboard_page_is_served_without_data_and_with_a_strict_csp(api: TestClient) -> None:
    page = api.get("/dashboard", headers={"X-API-Key": ""})
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert ABUSED_KEY not in page.text  # data only reaches the page through the authenticated API
    assert api.get("/dashboard/static/charts.js").status_code == 200
