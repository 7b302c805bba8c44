"""The events consumer's fetch settings: how many fetches a trickle of events costs the limits."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest

from common import kafka_clients
from schemas.events import dump_event
from tests.integration.helpers import db_counts, expected_counts, wait_for
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import Traffic, generate
from worker.store.rollup import RollupStore

HELD_MS = 1_500


@pytest.mark.parametrize("min_bytes", [1024 * 1024, 1])
async def test_the_broker_holds_the_events_fetch_as_set(topics: Settings, clickhouse: Any, min_bytes: int) -> None:
    """METER_FAST_LANE_FETCH_MIN_BYTES / _MAX_WAIT_MS reach the worker's one events consumer,
    whose every fetch the limits count: held, 30 events sent one by one are about one fetch per
    held wait of the time they took to send; answered at once, many more. Either way each event
    is counted once for the limits and once in ClickHouse."""
    settings = topics.model_copy(
        update={"fast_lane_fetch_min_bytes": min_bytes, "fast_lane_fetch_max_wait_ms": HELD_MS}
    )
    events = list(generate(30, Traffic(seed=7, keys=5)))
    runtime = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))
    producer = kafka_clients.producer(settings, acks="all", linger_ms=0)
    await producer.start()
    try:
        async with runtime.running():
            assert runtime.limits is not None
            lane = runtime.limits.fast_lane
            await wait_for(lambda: len(lane.positions) == settings.events_partitions, 30, "partitions assigned")
            await asyncio.sleep(1.0)  # the consumer is fetching before the first event
            counting_from = lane.fetches
            started = time.monotonic()
            for event in events:
                await producer.send_and_wait(settings.events_topic, dump_event(event), key=event["key_id"].encode())
                await asyncio.sleep(0.03)
            sent_in = time.monotonic() - started
            await wait_for(lambda: lane.records == len(events), 30, "every event counted for the limits")
            fetches = lane.fetches - counting_from
            await wait_for(
                lambda: db_counts(clickhouse, settings.clickhouse_database) == expected_counts(events), 30, "written"
            )
    finally:
        await producer.stop()
    held_fetches = math.ceil(sent_in * 1000 / HELD_MS) + 1  # at most one answer per held wait
    if min_bytes == 1:
        assert fetches > held_fetches  # the contrast: answered at once, the trickle is many fetches
    else:
        assert fetches <= held_fetches
