"""The worker on the real broker and chDB: counts equal an independent expectation."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.events import RequestEvent, dump_event
from tests.integration.helpers import db_counts, expected_counts, read_topic, wait_for
from worker.app import WorkerRuntime
from worker.ingest.dlq import original_bytes
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def mixed_events(n: int, seed: int, hours: float) -> list[RequestEvent]:
    """Several keys over many minutes, hours and days, shuffled (late and out-of-order)."""
    events = list(generate(n, Traffic(keys=12, spread=timedelta(hours=hours), seed=seed)))
    random.Random(seed).shuffle(events)
    return events


async def run_until_consumed(runtime: WorkerRuntime, total: int, timeout: float = 60) -> None:
    await wait_for(
        lambda: runtime.consumer is not None and runtime.consumer.stats.consumed >= total,
        timeout,
        f"worker to consume {total} records",
    )


async def test_counts_equal_expectation_across_minutes_hours_days(
    topics: Settings, clickhouse: Any, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(dedup_horizon_hours=72, batch_max_records=700)
    events = mixed_events(6_000, seed=1, hours=60)  # spans at least two UTC midnights
    assert len({e["ts"].date() for e in events}) >= 3
    await publish(settings.kafka_bootstrap, settings.events_topic, events)

    store = RollupStore(clickhouse, settings.clickhouse_database)
    runtime = WorkerRuntime(settings, store=store)
    async with runtime.running():
        await run_until_consumed(runtime, len(events))

    assert db_counts(clickhouse, settings.clickhouse_database) == expected_counts(events)
    assert runtime.consumer is not None
    assert runtime.consumer.stats.counted == len(events)
    assert runtime.consumer.stats.batches > 1  # several batches, so the per-batch path was exercised


async def test_breakdowns_by_endpoint_status_and_node(topics: Settings, clickhouse: Any) -> None:
    events = mixed_events(1_500, seed=2, hours=2)
    await publish(topics.kafka_bootstrap, topics.events_topic, events)
    runtime = WorkerRuntime(topics, store=RollupStore(clickhouse, topics.clickhouse_database))
    async with runtime.running():
        await run_until_consumed(runtime, len(events))

    db = topics.clickhouse_database
    by_endpoint_status = {
        (k, ep, st): int(n)
        for k, ep, st, n in clickhouse.query(
            f"SELECT key_id, endpoint, status, sum(requests) FROM `{db}`.usage_minute GROUP BY key_id, endpoint, status"
        ).result_rows
    }
    expected: dict[tuple[str, str, int], int] = {}
    for e in events:
        k = (e["key_id"], e["endpoint"], e["status"])
        expected[k] = expected.get(k, 0) + 1
    assert by_endpoint_status == expected

    by_node = {
        (k, node): int(n)
        for k, node, n in clickhouse.query(
            f"SELECT key_id, node_id, sum(requests) FROM `{db}`.usage_day GROUP BY key_id, node_id"
        ).result_rows
    }
    expected_node: dict[tuple[str, str], int] = {}
    for e in events:
        expected_node[(e["key_id"], e["node_id"])] = expected_node.get((e["key_id"], e["node_id"]), 0) + 1
    assert by_node == expected_node


async def test_duplicates_counted_once_within_batch_across_batches_and_restarts(
    topics: Settings, clickhouse: Any
) -> None:
    settings = topics
    events = mixed_events(2_000, seed=3, hours=3)
    store = RollupStore(clickhouse, settings.clickhouse_database)

    # Duplicates inside the first batches (each event twice, back to back).
    doubled = [e for e in events[:1000] for _ in range(2)]
    await publish(settings.kafka_bootstrap, settings.events_topic, doubled)
    runtime = WorkerRuntime(settings, store=store)
    async with runtime.running():
        await run_until_consumed(runtime, len(doubled))
        # Duplicates of already-written events arriving later (a node's retry).
        await publish(settings.kafka_bootstrap, settings.events_topic, events[:500] + events[1000:1500])
        await run_until_consumed(runtime, len(doubled) + 1000)
        assert runtime.consumer is not None
        assert runtime.consumer.stats.duplicates == 1000 + 500

    # After a restart (new worker, no memory of its own), old duplicates are still known.
    await publish(settings.kafka_bootstrap, settings.events_topic, events[1000:2000] + events[:100])
    restarted = WorkerRuntime(settings, store=store)
    async with restarted.running():
        await run_until_consumed(restarted, 1100)
        assert restarted.consumer is not None
        assert restarted.consumer.stats.duplicates == 500 + 100

    assert db_counts(clickhouse, settings.clickhouse_database) == expected_counts(events)


def _good(n: int, now: datetime) -> list[RequestEvent]:
    return list(generate(n, Traffic(keys=5, spread=timedelta(minutes=5), seed=4), end=now))


async def test_bad_input_goes_to_dlq_with_reason_and_good_events_still_count(topics: Settings, clickhouse: Any) -> None:
    from aiokafka import AIOKafkaProducer

    settings = topics
    now = datetime.now(UTC)
    good = _good(300, now)
    template = json.loads(dump_event(good[0]))
    key = template["key_id"].encode()

    def variant(**changes: Any) -> bytes:
        body = {**template, "request_id": f"bad-{random.random()}", **changes}
        return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()

    bad: list[tuple[bytes | None, bytes | None, str]] = [
        (key, b"not json at all", "invalid_json"),
        (key, dump_event(good[1])[:40], "invalid_json"),
        (key, b"\xff\xfe\x00garbage", "invalid_json"),
        (key, b"[1, 2, 3]", "schema_violation"),
        (key, b"[" * 5000 + b"]" * 5000, "oversized"),
        (key, variant(status=99), "schema_violation"),
        (key, variant(status=600), "schema_violation"),
        (key, variant(status="two hundred"), "schema_violation"),
        (key, variant(endpoint=...), "schema_violation"),
        (key, variant(ts="2026-11-27T12:00:00"), "schema_violation"),
        (key, variant(ts="yesterday"), "schema_violation"),
        (key, variant(ts=(now - timedelta(days=400)).isoformat()), "ts_too_old"),
        (key, variant(ts=(now + timedelta(days=3)).isoformat()), "ts_in_future"),
        (key, variant(request_id="x" * 5000), "schema_violation"),
        (key, variant(endpoint="/v0/" + "a" * 9000), "oversized"),
        (key, variant(key_id="someone-else"), "key_mismatch"),
        (None, variant(), "missing_key"),
        (key, None, "empty_value"),
        (key, variant(v=99), "schema_violation"),
        (key, variant(method=""), "schema_violation"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        sent_bad: list[tuple[int, int, str]] = []
        for i, event in enumerate(good):
            await producer.send(settings.events_topic, dump_event(event), key=event["key_id"].encode())
            if i % 15 == 0 and bad:
                k, v, reason = bad.pop()
                md = await producer.send_and_wait(settings.events_topic, v, key=k, partition=0)
                sent_bad.append((md.partition, md.offset, reason))
        await producer.flush()
    finally:
        await producer.stop()
    assert not bad, "every bad record was interleaved with good ones"

    runtime = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))
    async with runtime.running():
        await run_until_consumed(runtime, len(good) + len(sent_bad))
        dlq = await read_topic(settings.kafka_bootstrap, settings.dlq_topic)

    got = {}
    for rec in dlq:
        body = json.loads(rec.value)
        got[(body["source_partition"], body["source_offset"])] = body["reason"]
        assert body["detail"]
        assert dict(rec.headers)["dlq.reason"].decode() == body["reason"]
    assert got == {(p, o): reason for p, o, reason in sent_bad}
    first_bad = next(r for r in dlq if json.loads(r.value)["reason"] == "invalid_json")
    assert original_bytes(first_bad.value) in (b"not json at all", dump_event(good[1])[:40], b"\xff\xfe\x00garbage")
    assert db_counts(clickhouse, settings.clickhouse_database) == expected_counts(good)
    assert runtime.consumer is not None
    assert sum(runtime.consumer.stats.rejected.values()) == len(sent_bad)


@pytest.mark.parametrize(("min_bytes", "most_batches"), [(1024 * 1024, 3), (1, None)])
async def test_a_trickle_of_events_is_written_in_few_batches(
    topics: Settings, clickhouse: Any, min_bytes: int, most_batches: int | None
) -> None:
    """The broker holds the ingest's fetch until METER_INGEST_FETCH_MIN_BYTES or
    METER_INGEST_FETCH_MAX_WAIT_MS: 30 events arriving one by one over a second or two are a
    few inserts, where a fetch answered at once made one per few events (each a part to merge)."""
    settings = topics.model_copy(update={"ingest_fetch_min_bytes": min_bytes, "ingest_fetch_max_wait_ms": 2_000})
    events = list(generate(30, Traffic(seed=5, keys=5)))
    runtime = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))
    async with runtime.running():
        for event in events:
            await publish(settings.kafka_bootstrap, settings.events_topic, [event])
            await asyncio.sleep(0.02)
        await wait_for(
            lambda: db_counts(clickhouse, settings.clickhouse_database) == expected_counts(events), 30, "every event"
        )
        assert runtime.consumer is not None
        batches = runtime.consumer.stats.batches
    if most_batches is None:
        assert batches > 3  # the contrast: answered at once, the trickle makes many batches
    else:
        assert batches <= most_batches
