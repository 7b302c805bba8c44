"""Shadow mode end to end on the real broker and chDB: a key over a shadow policy is never
refused; the nodes mark and count what they would have refused; the worker decides and audits
the block marked shadow, and the key state and blocked list show it apart."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from pydantic import SecretStr

from node.demo_api import demo_key_store, demo_keys
from node.keys import derive_key_id
from schemas.decisions import DecisionAction
from schemas.limits import LimitPolicy, OverrideScope
from tests.integration.helpers import demo_node, until_fresh_minute, wait_for
from tests.node_secret import NODE_SECRET
from worker.analytics import queries
from worker.app import WorkerRuntime
from worker.limits.control import set_override
from worker.settings import Settings
from worker.store.decisions import DecisionStore
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

RAW = demo_keys("shadow-seed")


def kid(name: str) -> str:
    return derive_key_id(RAW[name], NODE_SECRET.encode())


async def test_a_shadow_policy_never_refuses_and_its_block_is_audited_as_shadow(
    topics: Settings, clickhouse: Any
) -> None:
    settings = topics.model_copy(update={"node_secret": SecretStr(NODE_SECRET), "batch_timeout_ms": 20})
    await set_override(
        settings, OverrideScope.key, kid("alice"), LimitPolicy(per_minute=5, shadow=True), "trying 5/min"
    )
    audit = DecisionStore(clickhouse, settings.clickhouse_database)
    worker = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))
    keys = demo_key_store(RAW, NODE_SECRET.encode())
    async with worker.running(), contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(demo_node(settings, f"node-{i}", keys)) for i in (1, 2)]
        await until_fresh_minute()
        headers = {"X-API-Key": RAW["alice"]}
        marked = 0
        for i in range(12):
            r = await nodes[i % 2][1].get("/v0/payments", headers=headers)
            assert r.status_code == 200, r.text  # never refused
            marked += "X-RateLimit-Shadow" in r.headers
        await wait_for(lambda: bool(audit.history(kid("alice"))), 15, "the shadow block to be audited")
        # Each node refused (in shadow) past 5 by its own count; once the worker's shadow block
        # reaches the nodes, every request of the key is marked.
        assert marked >= 2
        await wait_for(lambda: all(a.state.cache.check(kid("alice")) for a, _ in nodes), 10, "the block on nodes")
        for i in range(6):
            r = await nodes[i % 2][1].get("/v0/payments", headers=headers)
            assert r.status_code == 200
            assert r.headers["X-RateLimit-Shadow"].startswith("would-refuse; window=minute; limit=5")
            marked += 1
        # Another key is unaffected by alice's shadow policy.
        bob = await nodes[0][1].get("/v0/payments", headers={"X-API-Key": RAW["bob"]})
        assert bob.status_code == 200
        assert "X-RateLimit-Shadow" not in bob.headers
        counted = sum(a.state.cache.guard.shadow_refusals for a, _ in nodes)

    assert counted == marked
    [block] = [d for d in audit.history(kid("alice")) if d.action is DecisionAction.block]
    assert block.shadow
    assert block.limit == 5
    assert block.count is not None
    assert block.count >= 5  # the batch that crossed the limit may hold more than the 5th
    state = queries.key_state(
        clickhouse, settings.clickhouse_database, kid("alice"), LimitPolicy(per_minute=5, shadow=True)
    )
    assert state.shadow_blocked
    assert not state.blocked
    [listed] = [b for b in queries.blocked_keys(clickhouse, settings.clickhouse_database) if b.key_id == kid("alice")]
    assert listed.shadow
