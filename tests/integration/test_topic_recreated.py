"""The events topic recreated under a store that keeps its offsets (real broker, chDB): the new
records are counted, not taken for ones already written."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.integration.helpers import create_again, db_counts, delete_topic, expected_counts, wait_for
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


async def recreate(settings: Settings, topic: str) -> None:
    await delete_topic(settings, topic)
    await create_again(settings, topic)


async def count_all(s: Settings, clickhouse: Any, events: list[Any], what: str) -> WorkerRuntime:
    runtime = WorkerRuntime(s, store=RollupStore(clickhouse, s.clickhouse_database))
    async with runtime.running():
        await wait_for(lambda: db_counts(clickhouse, s.clickhouse_database) == expected_counts(events), 60, what)
    return runtime


async def test_a_recreated_events_topic_is_counted_from_its_start(
    topics: Settings, clickhouse: Any, caplog: pytest.LogCaptureFixture
) -> None:
    s = topics
    before = list(generate(80, Traffic(keys=4, seed=21), end=datetime.now(UTC)))
    await publish(s.kafka_bootstrap, s.events_topic, before)
    await count_all(s, clickhouse, before, "the first topic's events to be counted")

    await recreate(s, s.events_topic)
    after = list(generate(30, Traffic(keys=4, seed=22), end=datetime.now(UTC)))
    await publish(s.kafka_bootstrap, s.events_topic, after)
    caplog.set_level(logging.ERROR, logger="worker.ingest.consumer")
    runtime = await count_all(s, clickhouse, before + after, "the recreated topic's events to be counted")

    assert "past the end of its log" in caplog.text
    assert runtime.consumer is not None
    assert runtime.consumer.stats.skipped_replayed == 0
    # A later owner resumes after what it wrote in the new log, not after the old log's offsets.
    stored = RollupStore(clickhouse, s.clickhouse_database).stored_offsets(s.events_topic, range(s.events_partitions))
    assert sum(o + 1 for o in stored.values()) == len(after)
