"""Schemathesis against the query API's own OpenAPI schema: whatever the inputs, no 5xx,
and every error is the JSON {"error", "message", "request_id"} body."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import pytest
import schemathesis
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
