"""A control topic deleted under its follower (real broker): aiokafka then asked for the topic's
metadata without pause, logging an error thousands of times a second for ever, while the
follower said it was connected. Now the follower notices, says so, backs off, and follows the
topic again once it is back."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from common.follower import TopicFollower
from tests.integration.helpers import create_again, delete_topic, wait_for
from worker.settings import Settings

pytestmark = [pytest.mark.kafka]


async def test_a_follower_whose_topic_is_deleted_says_so_and_follows_it_again(
    topics: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topic = topics.limits_topic
    seen: list[bytes] = []

    async def on_records(records: list[Any]) -> None:
        seen.extend(r.value for r in records if r.value is not None)

    follower = TopicFollower(topics, topic, on_records, "test", first_delay=0.2, max_delay=1.0)
    await follower.start()
    try:
        await asyncio.wait_for(follower.ready.wait(), 15)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            await delete_topic(topics, topic)
            await wait_for(lambda: not follower.connected, timeout=10)
            assert "not found" in (follower.last_error or "")
            await asyncio.sleep(2)  # what it logs in the meantime
            flood = [r for r in caplog.records if "not found in cluster metadata" in r.getMessage()]
            assert len(flood) < 1_000, f"{len(flood)} metadata errors logged"
        await create_again(topics, topic)
        producer = AIOKafkaProducer(bootstrap_servers=topics.kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"after", key=b"k")
        finally:
            await producer.stop()
        started = time.monotonic()
        await wait_for(lambda: b"after" in seen, timeout=20)
        assert follower.connected
        assert time.monotonic() - started < 20
    finally:
        await follower.stop()
