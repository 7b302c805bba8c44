"""Kafka's committed offsets catch up with the stored ones when a worker takes partitions over,
even when no newer record arrives: a worker killed between its write and its Kafka commit must
not leave lag that never clears (the commit is advisory; the stored offsets are authoritative)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.helpers import db_counts, expected_counts, group_caught_up, wait_for
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.faults]


async def test_the_next_owner_commits_what_the_store_holds(topics: Settings, clickhouse: Any) -> None:
    settings = topics
    events = list(generate(1_000, Traffic(seed=73)))
    store = RollupStore(clickhouse, settings.clickhouse_database)
    first = WorkerRuntime(settings, store=store)
    async with first.running():
        assert first.consumer is not None

        async def no_commit(offsets: dict[int, int]) -> bool:
            return False  # as if killed after each write, before its Kafka commit

        first.consumer.commits._send = no_commit  # type: ignore[method-assign]
        await publish(settings.kafka_bootstrap, settings.events_topic, events)
        await wait_for(
            lambda: db_counts(clickhouse, settings.clickhouse_database) == expected_counts(events),
            60,
            "every event written by the first worker",
        )
    assert not await group_caught_up(settings.kafka_bootstrap, settings.consumer_group, settings.events_topic)

    second = WorkerRuntime(settings, store=store)
    async with second.running():
        await wait_for(
            lambda: group_caught_up(settings.kafka_bootstrap, settings.consumer_group, settings.events_topic),
            30,
            "the next owner to commit the stored offsets with no new record",
        )
    assert db_counts(clickhouse, settings.clickhouse_database) == expected_counts(events)
