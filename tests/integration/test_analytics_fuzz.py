"""Schemathesis against the query API's own OpenAPI schema: whatever the inputs, no 5xx,
and every error is the JSON {"error", "message", "request_id"} body."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from worker.analytics.api import build_query_app
from worker.analytics.sample import seed_sample
from worker.settings import Settings

pytestmark = [pytest.mark.clickhouse, pytest.mark.no_kafka, pytest.mark.faults]
ADMIN = secrets.token_urlsafe(32)  # generated per run: the query API wants >= 32 bytes


def test_query_api_never_fails_with_a_server_error(clickhouse: Any, make_settings: Any, settings: Settings) -> None:
    now = datetime.now(UTC).replace(second=30, microsecond=0)
    seed_sample(clickhouse, settings.clickhouse_database, now)
    app_settings = make_settings(admin_api_key=ADMIN, clickhouse_database=settings.clickhouse_database)
    schema = schemathesis.openapi.from_asgi("/openapi.json", build_query_app(app_settings, clickhouse))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7  # every /v1 route is in the published schema

    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            case.headers = {**(case.headers or {}), "X-API-Key": ADMIN}
            response = case.call()
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error", "message", "request_id"}, body
                assert body["message"]

        call()


# The edges of what a date-time or window parameter can say: year 1 and year 9999 with the
# widest offsets (UTC cannot hold some of them), the first and last times ClickHouse stores,
# and the longest windows the patterns allow.
EDGE_TIMES = [
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+14:00",
    "0001-01-01T11:26:08-14:00",
    "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59-14:00",
    "9999-12-31T12:00:00+14:00",
    "1970-01-01T00:00:00Z",  # the first and last times stored: accepted, so they reach the queries
    "1970-01-01T00:00:00-14:00",
    "2106-02-06T23:59:59Z",
    "2106-02-07T00:00:00Z",
]
EDGE_WINDOWS = ["9999d", "9999h", "9999m", "1m"]


def _edge_queries(parameters: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One query per edge value of each time or window parameter, the others left out."""
    queries: list[dict[str, str]] = []
    for p in parameters:
        schema = str(p.get("schema"))
        if p["in"] != "query":
            continue
        if "date-time" in schema:
            queries += [{p["name"]: t} for t in EDGE_TIMES]
        elif "[mhd]" in schema:
            queries += [{p["name"]: w} for w in EDGE_WINDOWS]
    return queries


def test_times_and_windows_at_their_edges_get_an_answer_or_a_clear_error(
    clickhouse: Any, make_settings: Any, settings: Settings
) -> None:
    """Every GET route, each time parameter at year 1 / year 9999 (alone and as a range with
    the other end), each window at its longest: never a 5xx (the backtest's year-1 500 was
    found by the fuzzer by chance; this asks every route the same question every run)."""
    app = build_query_app(
        make_settings(admin_api_key=ADMIN, clickhouse_database=settings.clickhouse_database), clickhouse
    )
    client = TestClient(app)
    spec = client.get("/openapi.json").json()
    asked = 0
    for path, operations in spec["paths"].items():
        if "get" not in operations:
            continue
        parameters = operations["get"].get("parameters", [])
        url = path.replace("{key_id}", "k-edge").replace("{account_id}", "acct-edge")
        queries = _edge_queries(parameters)
        names = {p["name"] for p in parameters}
        if {"since", "until"} <= names:
            queries += [
                {"since": EDGE_TIMES[0], "until": EDGE_TIMES[3]},
                {"since": EDGE_TIMES[4], "until": EDGE_TIMES[5]},
                {"since": EDGE_TIMES[6], "until": EDGE_TIMES[9]},
                {"since": EDGE_TIMES[8], "until": EDGE_TIMES[9]},
            ]
        for query in queries:
            response = client.get(url, params=query, headers={"X-API-Key": ADMIN})
            asked += 1
            assert response.status_code < 500, f"GET {url} {query}: {response.status_code} {response.text}"
            body = response.json()
            if response.status_code == 200:  # times come back in UTC, whatever offset was given
                assert all(body[k].endswith("Z") for k in ("since", "until", "as_of") if k in body), (url, query, body)
            if response.status_code >= 400:
                assert set(body) == {"error", "message", "request_id"}, (url, query, body)
                assert body["message"], (url, query, body)
                assert "--" not in body["message"], (url, query, body)  # the API's names, not the CLI's flags
    assert asked >= 40  # every route with a time or window parameter was asked
