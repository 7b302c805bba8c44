"""Fuzzed bad input through the real worker: every bad message lands in the DLQ with a
reason and its source offset, the worker stays up, the good messages around them count."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import dump_event
from tests.fuzz_strategies import bad_messages
from tests.integration.helpers import db_counts, expected_counts, read_topic, wait_for
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import Traffic, generate
from worker.store.rollup import RollupStore
from worker.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.faults]


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(bad=st.lists(bad_messages, min_size=60, max_size=60))
async def test_fuzzed_bad_input_all_dead_lettered_good_input_counted(
    bad: list[bytes], make_settings: Any, clickhouse: Any
) -> None:
    base: Settings = make_settings()
    run = uuid.uuid4().hex[:6]  # hypothesis runs several examples in one test: fresh topics each
    s = base.model_copy(
        update={
            "events_topic": f"{base.events_topic}.{run}",
            "dlq_topic": f"{base.dlq_topic}.{run}",
            "consumer_group": f"{base.consumer_group}.{run}",
        }
    )
    await ensure_topics(s)
    good = list(generate(240, Traffic(keys=6, spread=timedelta(minutes=3), seed=int(run, 16)), end=datetime.now(UTC)))
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, max_request_size=1 << 20)
    await producer.start()
    sent_bad: set[tuple[int, int]] = set()
    try:
        for i, event in enumerate(good):
            await producer.send(s.events_topic, dump_event(event), key=event["key_id"].encode())
            if i % 4 == 0:
                value = bad[i // 4]
                md = await producer.send_and_wait(s.events_topic, value, key=event["key_id"].encode())
                sent_bad.add((md.partition, md.offset))
        await producer.flush()
    finally:
        await producer.stop()

    store = RollupStore(clickhouse, s.clickhouse_database)
    before = db_counts(clickhouse, s.clickhouse_database)
    runtime = WorkerRuntime(s, store=store)
    async with runtime.running():
        await wait_for(
            lambda: runtime.consumer is not None and runtime.consumer.stats.consumed >= len(good) + len(sent_bad),
            60,
            "the worker to get through the fuzzed stream",
        )
        dlq = await read_topic(s.kafka_bootstrap, s.dlq_topic)

    bodies = [json.loads(r.value) for r in dlq]
    assert {(b["source_partition"], b["source_offset"]) for b in bodies} == sent_bad
    assert all(b["reason"] and b["detail"] for b in bodies)
    after = db_counts(clickhouse, s.clickhouse_database)
    added = after - before
    assert added == expected_counts(good)
