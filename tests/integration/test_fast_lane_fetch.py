"""The fast lane's fetch settings: how many fetches a trickle of events costs."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, cast

import pytest

from common import kafka_clients
from schemas.events import dump_event
from tests.integration.helpers import wait_for
from worker.limits.fastlane import FastBatch
from worker.limits.service import LimitService
from worker.settings import Settings
from worker.simulate import Traffic, generate

HELD_MS = 1_500


@pytest.mark.parametrize("min_bytes", [1024 * 1024, 1])
async def test_the_broker_holds_the_fast_lanes_fetch_as_set(topics: Settings, min_bytes: int) -> None:
    """METER_FAST_LANE_FETCH_MIN_BYTES / _MAX_WAIT_MS reach the fast lane's consumer: held, 30
    events sent one by one are about one fetch per held wait of the time they took to send;
    answered at once, many more."""
    settings = topics.model_copy(
        update={"fast_lane_fetch_min_bytes": min_bytes, "fast_lane_fetch_max_wait_ms": HELD_MS}
    )
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
    producer = kafka_clients.producer(settings, acks="all", linger_ms=0)
    await producer.start()
    await lane.start()
    try:
        await asyncio.sleep(1.0)  # the consumer is up and fetching before the first event
        started = time.monotonic()
        for event in events:
            await producer.send_and_wait(settings.events_topic, dump_event(event), key=event["key_id"].encode())
            await asyncio.sleep(0.03)
        sent_in = time.monotonic() - started
        await wait_for(lambda: sum(b.records for b in batches) == len(events), 30, "every event counted")
    finally:
        await lane.stop()
        await producer.stop()
    held_fetches = math.ceil(sent_in * 1000 / HELD_MS) + 1  # at most one answer per held wait
    if min_bytes == 1:
        assert len(batches) > held_fetches  # the contrast: answered at once, the trickle is many fetches
    else:
        assert len(batches) <= held_fetches
