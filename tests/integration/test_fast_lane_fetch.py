"""The fast lane's fetch settings: how many fetches a trickle of events costs."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from tests.integration.helpers import wait_for
from worker.limits.fastlane import FastBatch
from worker.limits.service import LimitService
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish


@pytest.mark.parametrize(("min_bytes", "most_fetches"), [(1024 * 1024, 3), (1, None)])
async def test_the_broker_holds_the_fast_lanes_fetch_as_set(
    topics: Settings, min_bytes: int, most_fetches: int | None
) -> None:
    """METER_FAST_LANE_FETCH_MIN_BYTES / _MAX_WAIT_MS reach the fast lane's consumer: held, 30
    events arriving one by one over a second are a few fetches; answered at once, many."""
    settings = topics.model_copy(update={"fast_lane_fetch_min_bytes": min_bytes, "fast_lane_fetch_max_wait_ms": 1_500})
    batches: list[FastBatch] = []

    async def on_batch(batch: FastBatch) -> None:
        batches.append(batch)

    service = LimitService(
        settings,
        rollups=cast(Any, None),  # only read on partition assignment, which the service does not do here
        audit=cast(Any, None),
        send=cast(Any, None),
        partition_count=lambda: settings.events_partitions,
        stored_offsets=dict,
    )
    lane = service.fast_lane  # as the service built it from the settings, counting into on_batch
    lane.on_batch = on_batch
    for partition in range(settings.events_partitions):
        lane.assign(partition, None)
    events = list(generate(30, Traffic(seed=7, keys=5)))
    await lane.start()
    try:
        await asyncio.sleep(1.0)  # the consumer is up and fetching before the first event
        for event in events:
            await publish(settings.kafka_bootstrap, settings.events_topic, [event])
            await asyncio.sleep(0.03)
        await wait_for(lambda: sum(b.records for b in batches) == len(events), 30, "every event counted")
    finally:
        await lane.stop()
    if most_fetches is None:
        assert len(batches) > 3  # the contrast: answered at once, the trickle is many fetches
    else:
        assert len(batches) <= most_fetches
