"""Topics that exist before the worker starts (a broker's auto-creation, made by hand) are
checked on the real broker: a cleanup policy that would lose records stops the start."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from worker.settings import Settings
from worker.topics import TopicsRefused, ensure_topics

pytestmark = [pytest.mark.kafka]


async def test_a_decisions_topic_that_is_not_compacted_is_refused(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        # As a broker with auto.create.topics.enable leaves it after a node's first read.
        await admin.create_topics(
            [NewTopic(settings.decisions_topic, 1, 1, topic_configs={"cleanup.policy": "delete"})]
        )
        with pytest.raises(TopicsRefused, match=f"topic {settings.decisions_topic} has cleanup.policy=delete"):
            await ensure_topics(settings)
        assert settings.events_topic not in await admin.list_topics()  # refused before creating any
    finally:
        await admin.delete_topics([settings.decisions_topic])
        await admin.close()
