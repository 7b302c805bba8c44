"""Partitions added to a topic while it is followed (real broker). A follower assigns partitions
by hand, so before it never read the new ones: a block published to one was not enforced by any
running node, whose health said available with no lag."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from common.follower import TopicFollower
from tests.integration.helpers import wait_for
from worker.settings import Settings

pytestmark = [pytest.mark.kafka]


async def test_partitions_added_while_followed_are_read_from_their_start(
    topics: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topic = topics.limits_topic  # one partition
    seen: list[tuple[int, bytes]] = []

    async def on_records(records: list[Any]) -> None:
        seen.extend((r.partition, r.value) for r in records)

    follower = TopicFollower(topics, topic, on_records, "test", metadata_max_age_ms=500)
    producer = AIOKafkaProducer(bootstrap_servers=topics.kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=topics.kafka_bootstrap)
    await producer.start()
    await admin.start()
    await follower.start()
    try:
        await producer.send_and_wait(topic, b"first", key=b"a", partition=0)
        await wait_for(lambda: seen == [(0, b"first")], what="the record of the first partition")
        await admin.create_partitions({topic: NewPartitions(total_count=3)})

        async def producer_knows_them() -> bool:
            # To send there the producer's metadata must list them; right after a broker start
            # the broker can take seconds to apply the change (one slow first run: 19.6 s).
            await producer.client.force_metadata_update()
            return len(producer.client.cluster.partitions_for_topic(topic) or ()) == 3

        await wait_for(producer_knows_them, timeout=30, what="the producer's metadata of the added partitions")
        with caplog.at_level(logging.INFO, logger="common.follower"):
            for partition in (1, 2):
                await producer.send_and_wait(topic, b"new-%d" % partition, key=b"b", partition=partition)
            await wait_for(lambda: len(seen) == 3, timeout=15, what="the records of the added partitions")
        assert sorted(seen) == [(0, b"first"), (1, b"new-1"), (2, b"new-2")]
        assert any("partitions added" in r.getMessage() for r in caplog.records)
        assert follower.connected
        assert follower.last_error is None
    finally:
        await follower.stop()
        await admin.close()
        await producer.stop()
