"""Three demo nodes on the real broker: one block published, 429 everywhere; every request one
event; the raw key in no Kafka message, response or log line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from starlette.applications import Starlette

from node.demo_api import build_node_app, demo_key_store, demo_keys, run_node
from node.keys import derive_key_id
from schemas.decisions import Decision, DecisionAction, Window
from schemas.events import parse_event
from tests.integration.helpers import free_port, read_topic, until_fresh_minute, wait_for
from tests.node_secret import NODE_SECRET
from worker.settings import Settings

pytestmark = pytest.mark.kafka

SECRET = NODE_SECRET
RAW = demo_keys("integration-seed")


def kid(name: str) -> str:
    return derive_key_id(RAW[name], SECRET.encode())


@contextlib.asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            yield client


async def test_three_nodes_enforce_one_block(
    topics: Settings, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    nodes = [make_settings(node_id=f"node-{i}", node_secret=SECRET) for i in range(3)]
    apps = [build_node_app(s, demo_key_store(RAW, SECRET.encode())) for s in nodes]
    sent_requests = 0
    async with running(apps[0]) as n0, running(apps[1]) as n1, running(apps[2]) as n2:
        clients = [n0, n1, n2]
        for c in clients:
            health = await c.get("/health")
            assert health.status_code == 200, health.text
        alice = {"X-API-Key": RAW["alice"]}
        for c in clients:
            assert (await c.get("/v0/payments", headers=alice)).status_code == 200
            assert (await c.post("/v0/payments", headers={"X-API-Key": RAW["reader"]}, json={})).status_code == 403
            assert (await c.get("/v0/rates")).status_code == 401
            assert (await c.get("/v0/rates", headers={"X-API-Key": RAW["revoked"]})).status_code == 401
            sent_requests += 4

        # a worker publishes one block for alice, minute window, until the minute's end (with
        # seconds of the minute left: a block built at :59.95 expired before it reached the nodes)
        await until_fresh_minute(10.0)
        now = datetime.now(UTC)
        until = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        block = Decision(
            key_id=kid("alice"),
            action=DecisionAction.block,
            window=Window.minute,
            limit=100,
            count=100,
            until=until,
            reason="100/minute exceeded",
            version=1,
            decided_at=now,
        )
        producer = AIOKafkaProducer(bootstrap_servers=topics.kafka_bootstrap, enable_idempotence=True, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                topics.decisions_topic, block.model_dump_json().encode(), key=block.key_id.encode()
            )
            # (how fast: bench/decisions.py measures the propagation; here, that it arrives)
            await wait_for(lambda: all(app.state.cache.check(block.key_id) for app in apps), 5, "the block on 3 nodes")
        finally:
            await producer.stop()

        for c in clients:
            resp = await c.get("/v0/payments", headers=alice)
            sent_requests += 1
            assert resp.status_code == 429
            expected = max(1, math.ceil((until - datetime.now(UTC)).total_seconds()))
            assert abs(int(resp.headers["retry-after"]) - expected) <= 1
            assert resp.headers["ratelimit-limit"] == "100"
            assert resp.headers["ratelimit-remaining"] == "0"
            body = resp.json()
            assert body["error"] == "rate_limited"
            assert body["request_id"] == resp.headers["x-request-id"]
            # other keys are unaffected
            assert (await c.get("/v0/payments", headers={"X-API-Key": RAW["bob"]})).status_code == 200
            sent_requests += 1
        responses_text = repr([app.state.reporter.state() for app in apps])

    # after shutdown (reporters flushed): one event per request, none carrying a raw key
    events = await read_topic(topics, topics.events_topic, sent_requests)
    assert len(events) == sent_requests
    parsed = [parse_event(r.value) for r in events]
    assert len({e["request_id"] for e in parsed}) == sent_requests
    assert {e["node_id"] for e in parsed} == {"node-0", "node-1", "node-2"}
    statuses = sorted(e["status"] for e in parsed)
    assert statuses == sorted([200] * 6 + [401] * 6 + [403] * 3 + [429] * 3)
    assert {e["key_id"] for e in parsed if e["status"] == 429} == {kid("alice")}
    assert "anonymous" in {e["key_id"] for e in parsed}
    decisions = await read_topic(topics, topics.decisions_topic, 1)
    wire = b"".join((r.key or b"") + (r.value or b"") for r in events + decisions)
    for raw in RAW.values():
        assert raw.encode() not in wire
        assert raw not in caplog.text
        assert raw not in responses_text


async def test_run_node_serves_over_http(topics: Settings, make_settings: Callable[..., Settings]) -> None:
    token = NODE_SECRET[::-1]
    settings = make_settings(node_id="node-http", node_secret=SECRET, node_health_token=token)
    port = free_port()
    task = asyncio.create_task(run_node(settings, port, demo_seed="integration-seed"))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    health = await client.get("/health")
                    if health.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert health.json() == {"status": "ok"}
            details = await client.get("/health/details", headers={"Authorization": f"Bearer {token}"})
            assert details.json()["cache"]["ready"] is True
            # uvicorn must not honour X-Forwarded-For from loopback on its own: no proxy is trusted
            forged = {"X-API-Key": RAW["carol"], "X-Forwarded-For": "198.51.100.99"}
            resp = await client.get("/v0/rates", headers=forged)
            assert resp.status_code == 200
            assert resp.headers["x-request-id"]
            assert (await client.get("/v0/rates")).json()["error"] == "missing_api_key"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    records = await read_topic(topics, topics.events_topic, 2)
    events = sorted((e["status"], e.get("client_ip")) for e in map(parse_event, (r.value for r in records)))
    assert events == [(200, "127.0.0.1"), (401, "127.0.0.1")]
