"""Abuse guards on the real broker and chDB: a key collecting 401/403s is blocked by the
worker's guard as an audited decision (source guard, plain-words reason), shadow first, and
an operator's unblock lifts it for good (the guard does not block the key again)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.decisions import DecisionAction
from schemas.events import RequestEvent, make_event
from tests.integration.helpers import wait_for
from worker.app import WorkerRuntime
from worker.limits.control import manual_decision
from worker.settings import Settings
from worker.simulate import publish
from worker.store.decisions import DecisionStore
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def _failures(key_id: str, n: int) -> list[RequestEvent]:
    now = datetime.now(UTC)
    return [
        make_event(
            request_id=uuid.uuid4().hex,
            key_id=key_id,
            node_id="node-1",
            method="GET",
            endpoint="/v0/payments",
            status=403,
            ts=now,
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("shadow", [True, False], ids=["shadow-first", "enforcing"])
async def test_a_guard_blocks_a_key_with_many_auth_failures_and_an_unblock_lifts_it(
    topics: Settings, clickhouse: Any, shadow: bool
) -> None:
    s = topics.model_copy(
        update={
            "guard_max_auth_failures": 20,
            "guard_shadow": shadow,
            "guard_interval_seconds": 0.2,
            "batch_timeout_ms": 20,
        }
    )
    audit = DecisionStore(clickhouse, s.clickhouse_database)
    runtime = WorkerRuntime(s, store=RollupStore(clickhouse, s.clickhouse_database))
    async with runtime.running():
        await publish(s.kafka_bootstrap, s.events_topic, _failures("prober", 25) + _failures("clumsy", 5))
        await wait_for(lambda: bool(audit.history("prober")), 30, "the guard's block to be audited")
        [block] = audit.history("prober")
        assert (block.action, block.source, block.shadow) == (DecisionAction.block, "guard", shadow)
        assert "25 responses 401/403 in 10 min (more than 20)" in block.reason
        assert audit.history("clumsy") == []  # under the threshold

        unblock = await manual_decision(s, "prober", DecisionAction.unblock, None, "false positive")
        await wait_for(
            lambda: runtime.limits is not None and runtime.limits.latest_decision("prober") == unblock,
            15,
            "the worker to see the unblock",
        )
        await asyncio.sleep(1.0)  # several guard rounds: the key still breaks the rule
        assert runtime.guards is not None
        published = runtime.guards.blocks_issued
    assert published == 1
    assert [d.action for d in audit.history("prober")] == [DecisionAction.unblock, DecisionAction.block]
