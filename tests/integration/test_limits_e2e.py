"""Limits end to end on the real broker: demo nodes -> Kafka -> worker -> decisions -> every node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr

from node.decision_cache import DecisionCache
from schemas.decisions import DecisionAction, Window
from schemas.limits import LimitPolicy, OverrideScope
from tests.integration.helpers import (
    RAW,
    SECRET,
    Clock,
    blocked_everywhere,
    kid,
    node,
    read_topic,
    until_fresh_minute,
    wait_for,
    window_count,
)
from worker.analytics.queries import key_state
from worker.app import WorkerRuntime
from worker.limits.control import manual_decision, set_override
from worker.settings import Settings
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.fixture
def e2e_settings(topics: Settings) -> Settings:
    return topics.model_copy(update={"node_secret": SecretStr(SECRET), "batch_timeout_ms": 20})


async def test_three_nodes_block_at_100_per_minute_and_unblock_at_rollover(
    e2e_settings: Settings, clickhouse: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = e2e_settings
    clock = Clock()
    worker = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database), clock=clock)
    async with worker.running(), contextlib.AsyncExitStack() as stack:
        # The nodes share the worker's clock: the rollover below moves time for all of them.
        nodes = [await stack.enter_async_context(node(settings, f"node-{i}", clock)) for i in (1, 2, 3)]
        apps = [a for a, _ in nodes]
        clients = [c for _, c in nodes]
        await until_fresh_minute()
        headers = {"X-API-Key": RAW["alice"]}
        for i in range(100):
            r = await clients[i % 3].get("/v0/payments", headers=headers)
            assert r.status_code == 200, r.text
        delay = await blocked_everywhere(apps, kid("alice"))
        assert delay < 5.0

        now = datetime.now(UTC)
        for client in clients:
            r = await client.get("/v0/rates", headers=headers)
            assert r.status_code == 429
            body = r.json()
            assert body["error"] == "rate_limited"
            assert body["request_id"] == r.headers["X-Request-Id"]
            minute_end = 60 - now.timestamp() % 60
            assert 1 <= int(r.headers["Retry-After"]) <= math.ceil(minute_end) + 1
            assert r.headers["RateLimit-Limit"] == "100"
            assert r.headers["RateLimit-Remaining"] == "0"
        # Another key is not affected.
        assert (await clients[0].get("/v0/payments", headers={"X-API-Key": RAW["bob"]})).status_code == 200

        # A node that starts after the block bootstraps it from the compacted topic.
        async with node(settings, "node-late", clock) as (late_app, late_client):
            assert late_app.state.cache.check(kid("alice")) is not None
            assert (await late_client.get("/v0/payments", headers=headers)).status_code == 429

        # Rollover (the worker's clock moves to the next minute): one unblock, every node admits.
        clock.offset = 61 - time.time() % 60
        await wait_for(lambda: not any(a.state.cache.check(kid("alice")) for a in apps), 10, "unblock everywhere")
        # (the nodes' clocks moved too, so the block is over for them by itself: wait for the unblock)
        await wait_for(lambda: all(a.state.cache.state().applied >= 2 for a in apps), 10, "the unblock applied")
        for client in clients:
            assert (await client.get("/v0/payments", headers=headers)).status_code == 200

        decisions = [d for d in await read_topic(settings.kafka_bootstrap, settings.decisions_topic)]

    from schemas.decisions import Decision

    mine = [Decision.model_validate_json(r.value) for r in decisions if r.key == kid("alice").encode()]
    assert [d.action for d in mine] == [DecisionAction.block, DecisionAction.unblock]  # edge-triggered
    assert (mine[0].window, mine[0].limit, mine[0].count) == (Window.minute, 100, 100)
    assert mine[1].version > mine[0].version

    # The raw API keys appear in no Kafka message, no ClickHouse row and no log line.
    events = await read_topic(settings.kafka_bootstrap, settings.events_topic)
    assert len(events) >= 106
    kafka_bytes = b"".join((r.key or b"") + (r.value or b"") for r in events + decisions)
    db = settings.clickhouse_database
    rows = clickhouse.query(
        f"SELECT concat(key_id, account_id, endpoint, node_id, client_ip) FROM `{db}`.usage_rollup "
        f"UNION ALL SELECT concat(key_id, reason, source) FROM `{db}`.decisions"
    ).result_rows
    stored = "".join(r[0] for r in rows)
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for raw in RAW.values():
        assert raw.encode() not in kafka_bytes
        assert raw not in stored
        assert raw not in logs
    assert kid("alice") in stored  # the key id is what is stored


async def test_worker_restarted_mid_window_rebuilds_and_still_blocks(e2e_settings: Settings, clickhouse: Any) -> None:
    settings = e2e_settings
    store = RollupStore(clickhouse, settings.clickhouse_database)
    headers = {"X-API-Key": RAW["carol"]}
    async with node(settings, "node-1") as (app, client):
        await until_fresh_minute(40)
        first = WorkerRuntime(settings, store=store)
        async with first.running():
            for _ in range(60):
                assert (await client.get("/v0/payments", headers=headers)).status_code == 200
            await wait_for(lambda: first.consumer is not None and first.consumer.stats.counted >= 60, 15, "60 counted")
        second = WorkerRuntime(settings, store=store)  # a new process: only ClickHouse remembers the 60
        async with second.running():
            for _ in range(40):
                assert (await client.get("/v0/payments", headers=headers)).status_code == 200
            await blocked_everywhere([app], kid("carol"))
            block = app.state.cache.check(kid("carol"))
            assert block.count == 100
            assert (await client.get("/v0/payments", headers=headers)).status_code == 429


async def test_overrides_and_manual_block_unblock_reach_every_node(e2e_settings: Settings, clickhouse: Any) -> None:
    settings = e2e_settings
    worker = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))
    async with worker.running(), node(settings, "node-1") as (a1, c1), node(settings, "node-2") as (a2, c2):
        assert worker.limits is not None
        # A lower tier for one key, changed at run time through the limits topic.
        await set_override(settings, OverrideScope.key, kid("dave"), LimitPolicy(per_minute=5), "trial tier")
        await wait_for(lambda: worker.limits.policies.resolve(kid("dave")).per_minute == 5, 10, "override applied")
        await until_fresh_minute(20)
        for i in range(5):
            assert (await (c1, c2)[i % 2].get("/v0/payments", headers={"X-API-Key": RAW["dave"]})).status_code == 200
        await blocked_everywhere([a1, a2], kid("dave"))
        assert a1.state.cache.check(kid("dave")).limit == 5

        # An internal key with no limit at all.
        await set_override(settings, OverrideScope.account, "acct-bob", LimitPolicy.unlimited(), "internal")
        await wait_for(lambda: worker.limits.policies.resolve(kid("bob"), "acct-bob").per_day is None, 10, "applied")
        # Nodes follow the limits topic too: their own guard applies the override.
        await wait_for(
            lambda: a1.state.cache.guard.policies.resolve(kid("bob"), "acct-bob").per_day is None, 10, "on the node"
        )
        for _ in range(120):
            assert (await c1.get("/v0/rates", headers={"X-API-Key": RAW["bob"]})).status_code == 200

        # Operator block and unblock go through the same topic.
        await manual_decision(settings, kid("alice"), DecisionAction.block, None, "incident 42")
        await blocked_everywhere([a1, a2], kid("alice"))
        r = await c2.get("/v0/payments", headers={"X-API-Key": RAW["alice"]})
        assert r.status_code == 429
        await manual_decision(settings, kid("alice"), DecisionAction.unblock, None, "resolved")
        await wait_for(
            lambda: not a1.state.cache.check(kid("alice")) and not a2.state.cache.check(kid("alice")),
            10,
            "manual unblock everywhere",
        )
        assert (await c2.get("/v0/payments", headers={"X-API-Key": RAW["alice"]})).status_code == 200
        await asyncio.sleep(1.0)  # the audit of the decisions topic is asynchronous
    audited = clickhouse.query(
        f"SELECT action, source, reason FROM `{settings.clickhouse_database}`.decisions FINAL "
        "WHERE key_id = {k:String} ORDER BY version",
        parameters={"k": kid("alice")},
    ).result_rows
    assert [(a, s) for a, s, _ in audited] == [("block", "operator"), ("unblock", "operator")]


async def test_a_fail_closed_nodes_503s_are_stored_and_use_up_nothing(
    e2e_settings: Settings, clickhouse: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client retrying through an outage of a fail-closed node is not blocked for its refused
    retries once the meter is back: their events cost 0, for the worker, its rebuild and key-state."""
    settings = e2e_settings.model_copy(update={"node_fail_open": False})
    store = RollupStore(clickhouse, settings.clickhouse_database)
    headers = {"X-API-Key": RAW["carol"]}
    carol = kid("carol")
    first = WorkerRuntime(settings, store=store)
    async with node(settings, "node-1") as (app, client):
        await until_fresh_minute(45)
        async with first.running():
            with monkeypatch.context() as outage:  # the node out of touch with the broker
                outage.setattr(DecisionCache, "available", property(lambda self: False))
                for _ in range(150):
                    assert (await client.get("/v0/payments", headers=headers)).status_code == 503
            for _ in range(99):
                assert (await client.get("/v0/payments", headers=headers)).status_code == 200
            await wait_for(lambda: first.consumer is not None and first.consumer.stats.counted >= 249, 15, "counted")
            assert window_count(first, carol, Window.minute) == 99
            assert app.state.cache.check(carol) is None
            assert (await client.get("/v0/payments", headers=headers)).status_code == 200  # the 100th
            await blocked_everywhere([app], carol)
            assert app.state.cache.check(carol).count == 100

            def stored() -> list[tuple[int, int, int]]:
                return clickhouse.query(
                    f"SELECT status, sum(requests), sum(cost) FROM `{settings.clickhouse_database}`.usage_rollup "
                    "WHERE level = 'minute' AND key_id = {k:String} GROUP BY status ORDER BY status",
                    parameters={"k": carol},
                ).result_rows

            await wait_for(lambda: sum(n for _, n, _ in stored()) >= 250, 15, "the rows written")
            assert stored() == [(200, 100, 100), (503, 150, 0)]
            state = key_state(clickhouse, settings.clickhouse_database, carol, LimitPolicy())
            assert [w.count for w in state.windows if w.window is Window.minute] == [100]

        # A new worker rebuilds the count from the rollups: the 503s add nothing there either.
        second = WorkerRuntime(settings, store=store)
        async with second.running():
            await wait_for(lambda: window_count(second, carol, Window.minute) == 100, 20, "rebuilt")
