"""Fault injection on the real broker and chDB: broker restart, failing store, 2 -> 3 -> 2
consumers with limits in play. Each asserts ClickHouse totals equal what was produced.
(10 random kill -9 of the worker: tests/integration/test_exactly_once.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from node.decision_cache import DecisionCache
from node.reporter import UsageReporter
from schemas.decisions import Decision, DecisionAction
from schemas.events import RequestEvent, make_event
from tests.integration.helpers import REPO_ROOT, db_counts, expected_counts, group_caught_up, read_topic, wait_for
from tests.report import record
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.faults, pytest.mark.slow]

OWN_BROKER_PORT = 19095


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A broker of this test alone, so it can be stopped and restarted."""
    env = {**os.environ, "KAFKA_PORT": str(OWN_BROKER_PORT), "KAFKA_DATA_DIR": str(tmp_path / "kafka")}
    script = str(REPO_ROOT / "infra" / "kafka" / "kafka.sh")
    subprocess.run([script, "start"], check=True, env=env)
    try:
        yield f"127.0.0.1:{OWN_BROKER_PORT}", env
    finally:
        subprocess.run([script, "stop"], check=False, env=env)


async def test_broker_stopped_and_restarted_mid_load(
    own_broker: tuple[str, dict[str, str]], make_settings: Any, clickhouse: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.topics import ensure_topics

    caplog.set_level(logging.INFO)
    bootstrap, env = own_broker
    settings: Settings = make_settings(kafka_bootstrap=bootstrap)
    await ensure_topics(settings)
    script = str(REPO_ROOT / "infra" / "kafka" / "kafka.sh")
    # Three nodes' reporters: buffered, resent after the outage. One has a tiny bound.
    reporters = [UsageReporter(settings, backoff_max_s=1.0) for _ in range(2)]
    small = UsageReporter(settings, max_buffer=300, backoff_max_s=1.0)
    for r in (*reporters, small):
        await r.start()
    events = list(generate(9_000, Traffic(keys=30, spread=timedelta(minutes=30), seed=21)))
    sent_by_small: list[RequestEvent] = []
    runtime = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))
    async with runtime.running():
        for i, event in enumerate(events):
            if i == 3_000:
                subprocess.run([script, "stop"], check=True, env=env)  # the broker goes away mid-load
            if i == 6_000:
                await asyncio.sleep(2.0)  # the outage lasts a while
                subprocess.run([script, "start"], check=True, env=env)
            reporter = (reporters[0], reporters[1], small)[i % 3]
            before = small.state().dropped
            reporter.report(event)
            if reporter is small and small.state().dropped == before:
                sent_by_small.append(event)
            if i % 500 == 0:
                await asyncio.sleep(0.01)
        delivered = [e for i, e in enumerate(events) if i % 3 != 2] + sent_by_small
        for r in (*reporters, small):
            await r.stop(flush_timeout_s=60)
        assert all(r.state().buffered == 0 for r in (*reporters, small))
        await wait_for(
            lambda: group_caught_up(bootstrap, settings.consumer_group, settings.events_topic),
            timeout=120,
            what="the worker to reconnect and catch up",
        )
    dropped = small.state().dropped
    assert dropped > 0, "the small reporter's bound was exceeded during the outage"
    assert any("buffer full" in r.getMessage() for r in caplog.records), "and it said so"
    assert len(delivered) == len(events) - dropped
    totals = db_counts(clickhouse, settings.clickhouse_database)
    record(
        "broker stopped and restarted mid-load",
        events_reported=len(events),
        dropped_by_small_reporter_bound=dropped,
        delivered=len(delivered),
        counted_minute_level=sum(n for (lv, _, _), n in totals.items() if lv == "minute"),
        buckets_equal=totals == expected_counts(delivered),
    )
    assert totals == expected_counts(delivered)


class FailingStore(RollupStore):
    """A store whose writes fail while ``broken`` is set (a ClickHouse outage)."""

    def __init__(self, client: Any, database: str) -> None:
        super().__init__(client, database)
        self.broken = False
        self.failed_writes = 0
        self.write_delay = 0.0

    def write(self, rows: pa.Table, token: str) -> None:
        if self.broken:
            self.failed_writes += 1
            raise ConnectionError("ClickHouse unreachable (injected)")
        time.sleep(self.write_delay)  # a slow store (in the insert's thread, as a real one)
        super().write(rows, token)


async def caught_up(settings: Settings, what: str, timeout: float) -> None:
    """Wait until the worker's group has committed every record of the events topic."""
    await wait_for(
        lambda: group_caught_up(settings.kafka_bootstrap, settings.consumer_group, settings.events_topic),
        timeout,
        what,
    )


async def committed(settings: Settings) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.consumer_group)
        return sum(o.offset for o in offsets.values() if o.offset > 0)
    finally:
        await admin.close()


async def test_failing_clickhouse_writes_are_retried_without_commit_or_loss(topics: Settings, clickhouse: Any) -> None:
    settings = topics.model_copy(update={"store_retry_max_seconds": 0.5})
    store = FailingStore(clickhouse, settings.clickhouse_database)
    first = list(generate(2_000, Traffic(seed=31)))
    second = list(generate(2_000, Traffic(seed=32)))
    runtime = WorkerRuntime(settings, store=store)
    async with runtime.running():
        await publish(settings.kafka_bootstrap, settings.events_topic, first)
        await caught_up(settings, "first load written", 30)
        committed_before = await committed(settings)
        assert committed_before == 2_000

        store.broken = True
        await publish(settings.kafka_bootstrap, settings.events_topic, second)
        await wait_for(lambda: store.failed_writes >= 3, 30, "writes failing and being retried")
        assert await committed(settings) == committed_before, "no offset committed while the store is down"
        assert db_counts(clickhouse, settings.clickhouse_database) == expected_counts(first)

        store.broken = False  # the store is back
        await caught_up(settings, "recovery", 30)
        assert runtime.consumer is not None
        assert runtime.consumer.pipeline.store_errors >= 3
    totals = db_counts(clickhouse, settings.clickhouse_database)
    record(
        "ClickHouse writes failing, then back",
        events_produced=len(first) + len(second),
        failed_writes=store.failed_writes,
        counted_minute_level=sum(n for (lv, _, _), n in totals.items() if lv == "minute"),
        buckets_equal=totals == expected_counts(first + second),
    )
    assert totals == expected_counts(first + second)


async def test_the_limits_go_on_counting_while_the_store_is_down_and_nothing_is_lost(
    topics: Settings, clickhouse: Any
) -> None:
    """The limits' fast lane never waits for the ClickHouse write: with every insert failing,
    it counts the whole second load; once the store is back every event is in ClickHouse once."""
    settings = topics.model_copy(update={"store_retry_max_seconds": 0.5})
    store = FailingStore(clickhouse, settings.clickhouse_database)
    first = list(generate(500, Traffic(seed=41)))
    second = list(generate(2_000, Traffic(seed=42)))
    runtime = WorkerRuntime(settings, store=store)
    async with runtime.running():
        await publish(settings.kafka_bootstrap, settings.events_topic, first)
        await caught_up(settings, "first load written", 30)
        assert runtime.limits is not None
        lane = runtime.limits.fast_lane
        store.broken = True
        for i in range(0, len(second), 250):  # several fetches, several batches the write cannot take
            await publish(settings.kafka_bootstrap, settings.events_topic, second[i : i + 250])
            await asyncio.sleep(0.4)
        await wait_for(lambda: lane.records == len(first) + len(second), 30, "the limits counted the second load")
        assert store.broken
        assert store.failed_writes >= 1
        assert db_counts(clickhouse, settings.clickhouse_database) == expected_counts(first)
        store.broken = False
        await caught_up(settings, "recovery", 60)
        assert lane.records == len(first) + len(second)  # not counted again
    assert db_counts(clickhouse, settings.clickhouse_database) == expected_counts(first + second)


async def test_the_limits_count_ahead_of_a_slow_store(topics: Settings, clickhouse: Any) -> None:
    """Each insert takes a second: the writes fall behind (16 s of them), the limits do not:
    they have counted every event within 3 s of the last one sent, long before ClickHouse
    holds them all."""
    settings = topics.model_copy(update={"ingest_fetch_min_bytes": 1, "ingest_fetch_max_wait_ms": 100})
    store = FailingStore(clickhouse, settings.clickhouse_database)
    store.write_delay = 1.0
    events = list(generate(2_000, Traffic(seed=43)))
    runtime = WorkerRuntime(settings, store=store)
    async with runtime.running():
        assert runtime.limits is not None
        lane = runtime.limits.fast_lane
        await wait_for(lambda: len(lane.positions) == settings.events_partitions, 30, "partitions assigned")
        for i in range(0, len(events), 125):  # 16 fetches: 16 s of writes
            await publish(settings.kafka_bootstrap, settings.events_topic, events[i : i + 125])
            await asyncio.sleep(0.2)
        await wait_for(lambda: lane.records == len(events), 3, "the limits counted every event")
        assert db_counts(clickhouse, settings.clickhouse_database) != expected_counts(events), "writes behind"
        await wait_for(
            lambda: db_counts(clickhouse, settings.clickhouse_database) == expected_counts(events), 120, "all written"
        )
    assert lane.records == len(events)


def hot_events(key: str, n: int, start: datetime) -> list[RequestEvent]:
    return [
        make_event(
            request_id=f"{key}-{start.timestamp()}-{i}",
            key_id=key,
            node_id="node-1",
            method="GET",
            endpoint="/v0/payments",
            status=200,
            ts=start + timedelta(milliseconds=i),
        )
        for i in range(n)
    ]


async def test_consumers_join_and_leave_2_3_2_counts_and_decisions_stay_right(
    topics: Settings, clickhouse: Any
) -> None:
    settings = topics.model_copy(update={"batch_max_records": 400})
    store = RollupStore(clickhouse, settings.clickhouse_database)
    left = 60 - time.time() % 60
    if left < 35:
        await asyncio.sleep(left + 0.5)
    minute_start = datetime.fromtimestamp(time.time() // 60 * 60, UTC)
    background = list(generate(24_000, Traffic(keys=200, spread=timedelta(seconds=20), seed=41)))
    hot_keys = [f"hot-{i:02d}" for i in range(12)]
    hot = [e for k in hot_keys for e in hot_events(k, 130, minute_start + timedelta(seconds=1))]
    stream = background + hot
    random.Random(5).shuffle(stream)

    cache = DecisionCache(settings)
    await cache.start()
    workers = [WorkerRuntime(settings, store=store) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(workers[0].running())
        await stack.enter_async_context(workers[1].running())
        producer = asyncio.create_task(_publish_in_chunks(settings, stream, 30, 0.25))
        await asyncio.sleep(2.0)
        third = contextlib.AsyncExitStack()
        await third.enter_async_context(workers[2].running())  # 2 -> 3
        await wait_for(lambda: bool(workers[2].consumer and workers[2].consumer.stats.batches), 30, "third works")
        await third.aclose()  # 3 -> 2
        await producer
        await caught_up(settings, "all written", 60)
        await wait_for(lambda: all(cache.check(k) for k in hot_keys), 10, "every hot key blocked")
    await cache.stop()
    totals = db_counts(clickhouse, settings.clickhouse_database)
    record(
        "consumers 2->3->2 under load with limits",
        events_produced=len(stream),
        hot_keys=len(hot_keys),
        counted_minute_level=sum(n for (lv, _, _), n in totals.items() if lv == "minute"),
        buckets_equal=totals == expected_counts(stream),
    )
    assert totals == expected_counts(stream)

    decisions = [
        Decision.model_validate_json(r.value)
        for r in await read_topic(settings.kafka_bootstrap, settings.decisions_topic)
    ]
    for key in hot_keys:
        mine = sorted((d for d in decisions if d.key_id == key), key=lambda d: d.version)
        assert mine, f"{key} was blocked"
        assert mine[0].action is DecisionAction.block
        assert mine[0].until == minute_start + timedelta(minutes=1)
        for d in mine:
            # No key unblocked early: an unblock is only ever decided at or after the window end.
            if d.action is DecisionAction.unblock:
                assert d.decided_at >= minute_start + timedelta(minutes=1)
        versions = [d.version for d in mine]
        assert versions == sorted(set(versions)), "versions strictly rise across workers"


async def _publish_in_chunks(settings: Settings, events: list[RequestEvent], chunks: int, pause: float) -> None:
    size = len(events) // chunks + 1
    for i in range(0, len(events), size):
        await publish(settings.kafka_bootstrap, settings.events_topic, events[i : i + size])
        await asyncio.sleep(pause)
