"""Records that used to wedge a worker, on the real broker and chDB: each is dead-lettered or
skipped with its place, and the records after it are processed."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from schemas.decisions import DecisionAction
from schemas.events import dump_event
from tests.integration.helpers import db_counts, expected_counts, read_topic, wait_for
from worker.app import WorkerRuntime
from worker.ingest.dlq import MAX_ORIGINAL_BYTES, DeadLetter
from worker.limits.control import manual_decision
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.decisions import DecisionStore
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


async def _produce(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=1 << 20)
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def test_an_event_near_the_size_limit_is_dead_lettered_truncated_and_the_partition_moves_on(
    topics: Settings, clickhouse: Any
) -> None:
    s = topics
    before = list(generate(50, Traffic(keys=3, seed=7), end=datetime.now(UTC)))
    after = list(generate(50, Traffic(keys=3, seed=8), end=datetime.now(UTC)))
    # ~790 KB: under the broker's 1 MB limit, but > 1 MB once base64'd into a DLQ record.
    huge = dump_event(before[0]).replace(b'"request_id":"', b'"request_id":"' + b"x" * 790_000, 1)
    await publish(s.kafka_bootstrap, s.events_topic, before)
    await _produce(s.kafka_bootstrap, s.events_topic, [(b"k", huge)])
    await publish(s.kafka_bootstrap, s.events_topic, after)

    runtime = WorkerRuntime(s, store=RollupStore(clickhouse, s.clickhouse_database))
    async with runtime.running():
        await wait_for(
            lambda: runtime.consumer is not None and runtime.consumer.stats.consumed >= 101,
            60,
            "the worker to get past the oversized record",
        )
        dlq = await read_topic(s.kafka_bootstrap, s.dlq_topic)

    assert db_counts(clickhouse, s.clickhouse_database) == expected_counts(before + after)
    [record] = dlq
    letter = DeadLetter.parse(record.key, record.value, record.offset)
    assert letter.reason == "oversized"  # past METER_MAX_EVENT_BYTES, so not even parsed
    assert letter.truncated
    assert letter.original == huge[:MAX_ORIGINAL_BYTES]
    body = json.loads(record.value)
    assert body["original_size"] == len(huge)
    assert body["original_sha256"] == hashlib.sha256(huge).hexdigest()
    assert len(record.value) < 1_000_000


@pytest.mark.parametrize("header", [b"\xff\xfe", None], ids=["not-utf8", "null"])
async def test_an_event_with_a_header_that_is_no_text_is_counted_with_its_batch(
    topics: Settings, clickhouse: Any, header: bytes | None
) -> None:
    # Headers mean nothing to the worker, but FastStream's batch parser decoded the first
    # record's: a header that is not UTF-8 (or null, as Kafka allows) failed the parser, and
    # FastStream dropped the whole fetched batch after the consumer had moved past it.
    s = topics
    events = list(generate(60, Traffic(keys=3, seed=9), end=datetime.now(UTC)))
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    await producer.start()
    try:
        for event in events:  # every record carries it, so it is the first of any batch
            await producer.send(
                s.events_topic, dump_event(event), key=event["key_id"].encode(), headers=[("trace", header)]
            )
        await producer.flush()
    finally:
        await producer.stop()

    runtime = WorkerRuntime(s, store=RollupStore(clickhouse, s.clickhouse_database))
    async with runtime.running():
        await wait_for(
            lambda: db_counts(clickhouse, s.clickhouse_database) == expected_counts(events),
            60,
            "the events with the odd header to be counted",
        )
        assert runtime.consumer is not None
        assert sum(runtime.consumer.stats.rejected.values()) == 0


@pytest.mark.parametrize(
    "bad",
    [{"version": -1}, {"version": 2**64}, {"limit": -5}, {"count": 2**64}, {"reason": "x" * 10_000}],
    ids=["version-negative", "version-2^64", "limit-negative", "count-2^64", "reason-10k"],
)
async def test_an_out_of_range_decision_does_not_stop_the_decisions_follower(
    topics: Settings, clickhouse: Any, bad: dict[str, Any]
) -> None:
    s = topics
    now = datetime.now(UTC).isoformat()
    decision = {"key_id": "mallory", "action": "block", "window": "manual", "version": 5, "decided_at": now}
    await _produce(s.kafka_bootstrap, s.decisions_topic, [(b"mallory", json.dumps(decision | bad).encode())])
    good = await manual_decision(s, "alice", DecisionAction.block, None, "incident 7")

    runtime = WorkerRuntime(s, store=RollupStore(clickhouse, s.clickhouse_database))
    audit = DecisionStore(clickhouse, s.clickhouse_database)
    async with runtime.running():
        # The operator's block after the bad record is seen by the worker and audited.
        await wait_for(lambda: bool(audit.history("alice")), 30, "the operator block to be audited")
    assert [d.version for d in audit.history("alice")] == [good.version]
    assert audit.history("mallory") == []
