"""Helpers for the integration tests: independent expectations, ClickHouse totals, Kafka reads."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from starlette.applications import Starlette

from node.demo_api import build_node_app
from node.keys import KeyStore
from schemas.events import RequestEvent
from worker.settings import Settings

BucketCounts = Counter[tuple[str, str, int]]  # (level, key_id, bucket epoch) -> requests

STEP = {"minute": 60, "hour": 3600, "day": 86400}


def expected_counts(events: Iterable[RequestEvent]) -> BucketCounts:
    """What the rollups must hold, computed without any of the worker's code."""
    out: BucketCounts = Counter()
    for e in events:
        epoch = int(e["ts"].timestamp())
        for level, step in STEP.items():
            out[(level, e["key_id"], epoch - epoch % step)] += 1
    return out


def db_counts(client: Any, database: str) -> BucketCounts:
    rows = client.query(
        f"SELECT toString(level), key_id, toUInt32(bucket), sum(requests) FROM `{database}`.usage_rollup "
        "WHERE level IN ('minute', 'hour', 'day') GROUP BY level, key_id, bucket"
    ).result_rows
    return Counter({(lv, k, int(b)): int(n) for lv, k, b, n in rows if n})


async def wait_for(cond: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = cond()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    # A consumer learns a topic's partitions only once it asks for that topic's metadata.
    cluster = consumer._client.cluster
    consumer._client.add_topic(topic)
    await consumer._client.force_metadata_update()
    return [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or set())]


async def read_all(bootstrap: str, topic: str, timeout: float = 10.0) -> list[Any]:
    """Every record currently in ``topic`` (all partitions, from the beginning)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await partitions_of(consumer, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end in {timeout}s")
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


async def group_caught_up(bootstrap: str, group: str, topic: str) -> bool:
    """True when the group's committed offsets reached the end of every partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        parts = await partitions_of(consumer, topic)
        end = await consumer.end_offsets(parts)
        return all(tp in committed and committed[tp].offset >= end[tp] for tp in parts if end[tp] > 0)
    finally:
        await consumer.stop()
        await admin.close()


@contextlib.asynccontextmanager
async def demo_node(
    settings: Settings, node_id: str, keys: KeyStore, now: Callable[[], datetime] | None = None
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """One demo API node (reporter, decision cache, guard) on the real broker, served in-process
    (``now``: its clock, when a test moves time)."""
    app = build_node_app(settings.model_copy(update={"node_id": node_id}), keys, now=now)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            yield app, client


async def until_fresh_minute(min_left: float = 25.0) -> None:
    """Start a minute-window test with enough of the minute left to finish inside it."""
    left = 60 - time.time() % 60
    if left < min_left:
        await asyncio.sleep(left + 0.5)
