"""Hostile records on the decisions, limits and allowances topics: no input stops a follower.

Every record goes through the handlers the followers call (the worker's limit service, with
its real chDB audit table, and the node's decision cache with a guard); none may raise or
hang, and every record refused is logged with its place (topic, partition, offset).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from node.decision_cache import DecisionCache
from node.guard import LocalGuard
from schemas.allowances import Allowance, AllowanceVersion
from schemas.decisions import Decision
from schemas.limits import LimitOverride, PolicyBook
from worker.limits.service import LimitService
from worker.settings import Settings
from worker.store.decisions import DecisionStore

pytestmark = [pytest.mark.clickhouse]

NOW = datetime.now(UTC)
extreme_int = st.sampled_from([-1, 0, 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -(2**63), 10**12 + 1]) | st.integers()
odd_time = st.sampled_from(
    ["0001-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "9999-12-31T23:59:59Z", "2262-04-12T00:00:00Z", NOW.isoformat()]
)
odd_text = st.text(max_size=20) | st.sampled_from(["\x1b[31m", "\u202e", "x" * 600, ""])
maybe = st.none() | extreme_int


def _decision() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "key_id": odd_text,
            "action": st.sampled_from(["block", "unblock", "ban"]),
            "window": st.sampled_from(["minute", "hour", "day", "manual", "month"]),
            "limit": maybe,
            "count": maybe,
            "until": st.none() | odd_time,
            "reason": odd_text,
            "version": extreme_int,
            "decided_at": odd_time,
            "source": odd_text,
        }
    )


def _policy() -> st.SearchStrategy[Any]:
    return st.none() | st.fixed_dictionaries({"per_minute": maybe, "per_hour": maybe, "per_day": maybe})


def _override() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "scope": st.sampled_from(["key", "account", "planet"]),
            "subject": odd_text,
            "policy": _policy(),
            "updated_at": odd_time,
            "note": odd_text,
        }
    )


def _allowance() -> st.SearchStrategy[dict[str, Any]]:
    grant = st.fixed_dictionaries({"used": extreme_int, "cap": extreme_int})
    window = st.fixed_dictionaries(
        {
            "window": st.sampled_from(["minute", "hour", "day", "manual"]),
            "start": odd_time,
            "until": odd_time,
            "limit": extreme_int,
            "count": extreme_int,
            "grants": st.dictionaries(odd_text, grant, max_size=3),
            "others": extreme_int,
        }
    )
    return st.fixed_dictionaries(
        {
            "key_id": odd_text,
            "version": extreme_int,
            "decided_at": odd_time,
            "windows": st.lists(window, max_size=4),
        }
    )


def _value(body: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes | None]:
    as_json = body.map(lambda d: json.dumps(d).encode())
    return as_json | st.binary(max_size=40) | st.just(b"\xff\xfe{") | st.none()


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None


def _records(topic: str, values: list[bytes | None]) -> list[Record]:
    return [Record(topic, 0, offset, value) for offset, value in enumerate(values)]


def _refused(model: type[BaseModel], records: list[Record]) -> list[Record]:
    refused = []
    for record in records:
        if record.value is None:
            continue
        try:
            model.model_validate_json(record.value)
        except ValidationError:
            refused.append(record)
    return refused


def _assert_logged(caplog: pytest.LogCaptureFixture, refused: list[Record], place: str) -> None:
    text = caplog.text
    for r in refused:
        assert place.format(topic=r.topic, partition=r.partition, offset=r.offset) in text


control_values = st.tuples(
    st.lists(_value(_decision()), max_size=8),
    st.lists(_value(_override()), max_size=8),
    st.lists(_value(_allowance()), max_size=8),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(values=control_values)
async def test_worker_followers_survive_any_record(
    values: tuple[list[bytes | None], ...], settings: Settings, clickhouse: Any, caplog: pytest.LogCaptureFixture
) -> None:
    decisions_v, overrides_v, allowances_v = values

    async def send(topic: str, key: str, value: bytes) -> None:
        return None

    service = LimitService(
        settings,
        rollups=cast(Any, None),  # only read on partition assignment, which this test does not do
        audit=DecisionStore(clickhouse, settings.clickhouse_database),
        send=send,
        partition_count=lambda: 1,
        stored_offsets=dict,
    )
    decisions = _records(settings.decisions_topic, decisions_v)
    overrides = _records(settings.limits_topic, overrides_v)
    allowances = _records(settings.allowances_topic, allowances_v)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        # A hang (a record retried forever) fails as a timeout, an exception as itself.
        await asyncio.wait_for(service._on_decisions(cast(Any, decisions)), 20)
        await asyncio.wait_for(service._unaudited.record(), 20)  # the audit's insert, done by its task
        await asyncio.wait_for(service._on_overrides(cast(Any, overrides)), 20)
        await asyncio.wait_for(service._on_allowances(cast(Any, allowances)), 20)
        service.engine.evaluate_all(range(1))
    place = "{topic}[{partition}]@{offset}"
    _assert_logged(caplog, _refused(Decision, decisions), place)
    _assert_logged(caplog, _refused(LimitOverride, overrides), place)
    # A worker reads only the key and version of an allowance (the nodes read it whole).
    _assert_logged(caplog, _refused(AllowanceVersion, allowances), place)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(values=control_values)
def test_node_decision_cache_survives_any_record(
    values: tuple[list[bytes | None], ...], settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    decisions_v, overrides_v, allowances_v = values
    guard = LocalGuard(PolicyBook(settings.default_policy()), settings.node_id)
    cache = DecisionCache(settings, guard=guard)
    decisions = _records(settings.decisions_topic, decisions_v)
    overrides = _records(settings.limits_topic, overrides_v)
    allowances = _records(settings.allowances_topic, allowances_v)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        for record in decisions + overrides + allowances:
            cache._handle(record, 0.0)
        guard.admit("k", "", NOW.timestamp())
    place = "{topic}[{partition}] offset {offset}"
    _assert_logged(caplog, _refused(Decision, decisions), place)
    _assert_logged(caplog, _refused(LimitOverride, overrides), place)
    _assert_logged(caplog, _refused(Allowance, allowances), place)
