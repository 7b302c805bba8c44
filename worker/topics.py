"""Topic definitions and their creation: explicit partition counts, the decisions topic compacted."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from common import kafka_clients
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    return [
        TopicSpec(settings.events_topic, settings.events_partitions, {"retention.ms": str(7 * 86_400_000)}),
        TopicSpec(
            settings.decisions_topic,
            settings.decisions_partitions,
            # Compacted: the latest decision per key id is kept forever, so a node that
            # starts later rebuilds its block table by reading the topic from the beginning.
            {
                "cleanup.policy": "compact",
                "min.cleanable.dirty.ratio": "0.1",
                "segment.ms": str(3_600_000),
                "delete.retention.ms": str(86_400_000),
            },
        ),
        TopicSpec(settings.dlq_topic, 1, {"retention.ms": str(30 * 86_400_000)}),
        TopicSpec(settings.limits_topic, 1, {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"}),
        TopicSpec(
            settings.allowances_topic,
            settings.decisions_partitions,
            {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": str(3_600_000)},
        ),
    ]


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the missing topics; return the names created now."""
    admin = kafka_clients.admin(settings, request_timeout_ms=15_000)
    await admin.start()
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [spec for spec in topic_specs(settings) if spec.name not in existing]
        for spec in missing:
            try:
                await admin.create_topics(
                    [NewTopic(spec.name, spec.partitions, replication_factor=1, topic_configs=spec.config)]
                )
                created.append(spec.name)
                log.info("created topic %s (%d partitions)", spec.name, spec.partitions)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
    return created
