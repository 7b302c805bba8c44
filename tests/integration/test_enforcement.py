"""Enforcement under bursts on the real broker: three demo nodes (guard + allowances), one worker.

Counts are asserted, not timings: the nodes are served in-process and driven as fast as one
event loop goes (round-robin over the nodes), which is ~1,000 requests/s here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from node.demo_api import demo_key_store, demo_keys
from node.keys import derive_key_id
from schemas.allowances import Allowance
from tests.integration.helpers import demo_node, until_fresh_minute, wait_for
from tests.node_secret import NODE_SECRET
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

SECRET = NODE_SECRET
RAW = demo_keys("enforcement-seed", extra=20)
Node = tuple[Starlette, httpx.AsyncClient]


def kid(name: str) -> str:
    return derive_key_id(RAW[name], SECRET.encode())


@pytest.fixture
def enf_settings(topics: Settings) -> Settings:
    return topics.model_copy(update={"node_secret": SecretStr(SECRET), "http_port": 0})


@contextlib.asynccontextmanager
async def cluster(settings: Settings, n: int = 3) -> AsyncIterator[list[Node]]:
    keys = demo_key_store(RAW, SECRET.encode())
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(demo_node(settings, f"node-{i + 1}", keys)) for i in range(n)]
        yield nodes


async def send(nodes: Sequence[Node], name: str, count: int) -> list[int]:
    """``count`` requests of key ``name``, round-robin over ``nodes``, ~1 ms apart; the status codes.

    The pause lets the nodes' reporters and followers run: an in-process request never yields
    to the event loop by itself."""
    headers = {"X-API-Key": RAW[name]}
    statuses = []
    for i in range(count):
        statuses.append((await nodes[i % len(nodes)][1].get("/v0/rates", headers=headers)).status_code)
        await asyncio.sleep(0.001)
    return statuses


async def burst(nodes: Sequence[Node], name: str, count: int, in_flight: int) -> list[int]:
    """``count`` requests of key ``name`` spread round-robin over ``nodes``, all sent at once with
    at most ``in_flight`` at a time per node (as ``hey -c``); the status codes."""
    headers = {"X-API-Key": RAW[name]}
    slots = [asyncio.Semaphore(in_flight) for _ in nodes]

    async def one(i: int) -> int:
        async with slots[i % len(nodes)]:
            return (await nodes[i % len(nodes)][1].get("/v0/rates", headers=headers)).status_code

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def holds_allowance(node: Node, name: str) -> bool:
    return node[0].state.cache.guard.allowance(kid(name)) is not None


def worker_for(settings: Settings, clickhouse: Any) -> WorkerRuntime:
    return WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))


async def counting(worker: WorkerRuntime) -> None:
    """Wait until the worker owns every partition and its fast lane counts them."""
    await wait_for(
        lambda: (
            worker.limits is not None and len(worker.limits.fast_lane.positions) == worker.settings.events_partitions
        ),
        60,
        "partitions assigned and counters rebuilt",
    )


@contextlib.asynccontextmanager
async def metered_cluster(settings: Settings, clickhouse: Any, min_left: float) -> AsyncIterator[list[Node]]:
    """A worker and three nodes, counting, with at least ``min_left`` s left in the minute."""
    worker = worker_for(settings, clickhouse)
    async with worker.running(), cluster(settings) as nodes:
        await counting(worker)
        # One request per node with a key of its own: the worker knows the cluster's nodes (it
        # holds back the burst share of each known node not yet heard from on a hot key).
        for _, client in nodes:
            assert (await client.get("/v0/rates", headers={"X-API-Key": RAW["k0019"]})).status_code == 200
        engine = worker.limits.engine if worker.limits is not None else None
        await wait_for(lambda: engine is not None and len(engine.nodes_seen) == len(nodes), 10, "nodes known")
        await until_fresh_minute(min_left)
        yield nodes


async def test_three_nodes_hold_the_limit_in_a_burst_and_refusals_explain_themselves(
    enf_settings: Settings, clickhouse: Any
) -> None:
    async with metered_cluster(enf_settings, clickhouse, min_left=20) as nodes:
        statuses = await send(nodes, "k0000", 300)
        admitted = statuses.count(200)
        assert 100 <= admitted <= 110, admitted  # never under the limit, at most 10 past it
        assert statuses.count(429) == 300 - admitted
        # Each node holds the worker's allowance for the key, listing all three.
        allowances = [app.state.cache.guard.allowance(kid("k0000")) for app, _ in nodes]
        assert all(isinstance(a, Allowance) for a in allowances)
        minute = allowances[0].for_window(allowances[0].windows[-1].window)
        assert minute is not None
        assert set(minute.grants) == {"node-1", "node-2", "node-3"}
        refused = await nodes[0][1].get("/v0/rates", headers={"X-API-Key": RAW["k0000"]})
        body = refused.json()
        assert refused.status_code == 429
        assert body["refused_by"] in ("allowance", "decision", "local_limit")
        assert (body["window"], body["limit"]) == ("minute", 100)
        assert body["version"] is not None or body["refused_by"] == "local_limit"
        assert int(refused.headers["retry-after"]) >= 1


async def test_a_key_under_its_limit_is_never_refused_wherever_its_requests_go(
    enf_settings: Settings, clickhouse: Any
) -> None:
    async with metered_cluster(enf_settings, clickhouse, min_left=25) as nodes:
        assert await send(nodes[:1], "k0001", 90) == [200] * 90  # all on one node
        assert await send(nodes, "k0002", 90) == [200] * 90  # spread over the three
        # Moving mid-minute: 45 on node 1, then 45 on node 2.
        assert await send(nodes[:1], "k0003", 45) + await send(nodes[1:2], "k0003", 45) == [200] * 90
        # The key went hot (allowances were divided) and still nobody was refused.
        await wait_for(lambda: holds_allowance(nodes[1], "k0003"), 10, "allowance")


async def test_with_handlers_that_take_time_the_requests_in_flight_are_not_given_out_twice(
    enf_settings: Settings, clickhouse: Any
) -> None:
    """Each call served in 80 ms: a node has admitted requests whose events come later. Their
    share was divided again while the events did not say what the node still served
    (``node_in_flight``: up to 158 admitted of 100 over real HTTP); the limit and the 90% key hold."""
    settings = enf_settings.model_copy(update={"demo_serving_ms": 80})
    async with metered_cluster(settings, clickhouse, min_left=25) as nodes:
        statuses = await burst(nodes, "k0010", 300, in_flight=30)
        admitted = statuses.count(200)
        assert 100 <= admitted <= 120, admitted
        assert statuses.count(429) == 300 - admitted
        assert await burst(nodes, "k0011", 90, in_flight=10) == [200] * 90


async def test_a_node_that_stops_hands_its_share_back(enf_settings: Settings, clickhouse: Any) -> None:
    worker = worker_for(enf_settings, clickhouse)
    keys = demo_key_store(RAW, SECRET.encode())
    async with worker.running(), demo_node(enf_settings, "node-1", keys) as first:
        await counting(worker)
        await until_fresh_minute(25)
        async with demo_node(enf_settings, "node-2", keys) as second:
            assert await send([first, second], "k0004", 60) == [200] * 60  # hot: divided over two nodes
            await wait_for(lambda: holds_allowance(first, "k0004"), 10, "allowance on node-1")
        # node-2 is gone; the 40 that remain are node-1's to use, not stuck in node-2's share.
        assert await send([first], "k0004", 40) == [200] * 40
        assert (await send([first], "k0004", 10)).count(200) <= 2  # and the limit still holds


async def test_a_worker_restart_mid_window_gives_no_fresh_allowance(enf_settings: Settings, clickhouse: Any) -> None:
    keys = demo_key_store(RAW, SECRET.encode())
    async with demo_node(enf_settings, "node-1", keys) as a, demo_node(enf_settings, "node-2", keys) as b:
        await until_fresh_minute(45)
        first_worker = worker_for(enf_settings, clickhouse)
        async with first_worker.running():
            await counting(first_worker)
            first = await send([a, b], "k0005", 70)
            assert first == [200] * 70
            await wait_for(lambda: holds_allowance(a, "k0005"), 10, "allowance")
        # A new worker rebuilds the key's count from ClickHouse and counts on after it.
        second = worker_for(enf_settings, clickhouse)
        async with second.running():
            await counting(second)
            after = await send([a, b], "k0005", 60)
            await wait_for(
                lambda: any(
                    (al := app.state.cache.guard.allowance(kid("k0005"))) is not None and al.windows[-1].count >= 70
                    for app, _ in (a, b)
                ),
                10,
                "the new owner's allowance, made from the rebuilt count",
            )
        assert 70 + after.count(200) <= 105
