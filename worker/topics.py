"""Topic definitions and their creation: explicit partition counts, the control topics compacted,
the replication factor and ``min.insync.replicas`` from the settings.

Replication 1 is for a single development broker: on a cluster of several brokers the worker
refuses to create topics with it (one broker lost = those topics lost), and it always warns
when it creates topics with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

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
        # Not compacted: every crossing is delivered, even when a key crosses several
        # thresholds before the deliverer reads them.
        TopicSpec(
            settings.notifications_topic, settings.notifications_partitions, {"retention.ms": str(7 * 86_400_000)}
        ),
        TopicSpec(settings.notifications_dlq_topic, 1, {"retention.ms": str(30 * 86_400_000)}),
    ]


class TopicsRefused(Exception):
    """The worker will not create or use the topics with these settings, or the cluster refused to
    create one (the message says why, in one line)."""


@dataclass(frozen=True)
class TopicsVerdict:
    refuse: str | None  # why the worker must not go on with the topics, or None
    warn: str | None  # what to log, or None


def replication_verdict(replication_factor: int, min_insync_replicas: int, brokers: int) -> TopicsVerdict:
    """Whether topics may be created with this replication on a cluster of ``brokers`` brokers."""
    if min_insync_replicas > replication_factor:
        return TopicsVerdict(
            f"METER_KAFKA_MIN_INSYNC_REPLICAS={min_insync_replicas} is above METER_KAFKA_REPLICATION_FACTOR="
            f"{replication_factor}: no write could ever be acknowledged",
            None,
        )
    if replication_factor > brokers:
        return TopicsVerdict(
            f"METER_KAFKA_REPLICATION_FACTOR={replication_factor} but the cluster has {brokers} broker(s)", None
        )
    if replication_factor == 1 and brokers > 1:
        return TopicsVerdict(
            f"refusing to create topics with replication factor 1 on a cluster of {brokers} brokers (one lost "
            "broker loses them): set METER_KAFKA_REPLICATION_FACTOR=3 and METER_KAFKA_MIN_INSYNC_REPLICAS=2",
            None,
        )
    if replication_factor == 1:
        return TopicsVerdict(
            None,
            "creating topics with replication factor 1 (METER_KAFKA_REPLICATION_FACTOR=1): for a single "
            "development broker only; production: 3 with METER_KAFKA_MIN_INSYNC_REPLICAS=2",
        )
    if min_insync_replicas < 2:
        return TopicsVerdict(
            None,
            f"creating topics with METER_KAFKA_MIN_INSYNC_REPLICAS={min_insync_replicas}: an acknowledged write "
            "may be held by one replica only (production: 2 with replication factor 3)",
        )
    return TopicsVerdict(None, None)


def existing_topic_verdict(
    specs: list[TopicSpec], partitions: dict[str, int], cleanup_policies: dict[str, str]
) -> TopicsVerdict:
    """Whether topics that exist already (created by hand, by a broker's auto-creation, by an
    older version) can be used as they are. Another cleanup policy loses records: a control
    topic that is not compacted deletes the blocks and overrides nodes rebuild from; an events
    topic that is compacted keeps one event per key. Fewer partitions than configured work,
    with less parallelism than the settings say."""
    refuse: list[str] = []
    warn: list[str] = []
    for spec in specs:
        want = ",".join(sorted(spec.config.get("cleanup.policy", "delete").split(",")))
        have = cleanup_policies.get(spec.name)
        if have is not None and set(have.split(",")) != set(want.split(",")):
            refuse.append(
                f"topic {spec.name} has cleanup.policy={have}, not {want} (records would be lost): "
                f"kafka-configs.sh --alter --entity-type topics --entity-name {spec.name} "
                f"--add-config cleanup.policy={want}"
            )
        count = partitions.get(spec.name)
        if count is not None and count < spec.partitions:
            warn.append(f"topic {spec.name} has {count} partition(s), the settings say {spec.partitions}")
    return TopicsVerdict("; ".join(refuse) or None, "; ".join(warn) or None)


# How long a topic the controller knows may take to reach the brokers' metadata (KRaft applies
# it asynchronously): until then it cannot be described, and its cleanup policy is unknown.
VISIBLE_WITHIN_S = 10.0
# Unknown topic or partition, leader not available: what a broker answers for a topic it has
# not applied yet (or one deleted meanwhile: the controller tells the two apart).
_NOT_YET = frozenset({3, 5})
_TOPIC_AUTHORIZATION_FAILED = 29


def _kafka_error(code: int, message: str | None = None) -> str:
    return f"{message or for_code(code).__name__} (Kafka error {code})"


@dataclass
class _Existing:
    """What the check of existing topics found: their partition counts and cleanup policies,
    and the topics that turned out not to exist (deleted meanwhile: to be created)."""

    partitions: dict[str, int] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)


async def _read_configs(admin: AIOKafkaAdminClient, names: list[str], found: _Existing) -> set[str]:
    """Record the cleanup policies of ``names`` in ``found``; return those not visible yet. A
    topic this principal may not read the configs of is a warning (the check cannot run)."""
    not_yet: set[str] = set()
    denied: list[str] = []
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    for response in responses:
        for error, message, _kind, name, entries, *_ in response.resources:
            if error in _NOT_YET:
                not_yet.add(name)
            elif error == _TOPIC_AUTHORIZATION_FAILED:
                denied.append(name)
            elif error:
                raise TopicsRefused(f"cannot read the configs of topic {name}: {_kafka_error(error, message)}")
            for entry in entries:
                if entry[0] == "cleanup.policy":
                    found.policies[name] = entry[1]
    if denied:
        log.warning(
            "cannot check the cleanup.policy of topic(s) %s: not authorized (grant the worker "
            "DescribeConfigs on its topics: `meter kafka-acls`)",
            ", ".join(denied),
        )
    return not_yet


async def _read_existing(admin: AIOKafkaAdminClient, specs: list[TopicSpec], settings: Settings) -> _Existing:
    """Describe the topics of ``specs`` and read their cleanup policies, waiting up to
    ``VISIBLE_WITHIN_S`` for ones a broker has not applied yet; ones the controller does not know
    (deleted meanwhile) are ``gone``. Any other error stops the start (``TopicsRefused``)."""
    found = _Existing()
    pending = {spec.name: spec for spec in specs}
    deadline = time.monotonic() + VISIBLE_WITHIN_S
    while pending:
        not_yet: set[str] = set()
        for topic in await kafka_clients.describe_topics(admin, list(pending)):
            name, code = topic["topic"], topic["error_code"]
            if code in _NOT_YET:
                not_yet.add(name)
            elif code:
                raise TopicsRefused(f"cannot describe topic {name}: {_kafka_error(code)}")
            else:
                found.partitions[name] = len(topic["partitions"])
        described = [name for name in pending if name not in not_yet]
        if described:
            not_yet |= await _read_configs(admin, described, found)
        pending = {name: spec for name, spec in pending.items() if name in not_yet}
        if not pending:
            break
        known = await _known_to_controller(admin, list(pending.values()), settings)
        found.gone |= set(pending) - known
        pending = {name: spec for name, spec in pending.items() if name in known}
        if pending and time.monotonic() >= deadline:
            raise TopicsRefused(
                f"topic(s) {', '.join(pending)} exist on the controller but a broker could not describe "
                f"them within {VISIBLE_WITHIN_S:.0f} s: their settings cannot be checked"
            )
        await asyncio.sleep(0.1)
    return found


async def _check_existing(admin: AIOKafkaAdminClient, specs: list[TopicSpec], settings: Settings) -> set[str]:
    """Refuse (``TopicsRefused``) or warn about topics that exist as ``existing_topic_verdict``
    says; return those that turned out not to exist."""
    if not specs:
        return set()
    found = await _read_existing(admin, specs, settings)
    present = [spec for spec in specs if spec.name not in found.gone]
    verdict = existing_topic_verdict(present, found.partitions, found.policies)
    if verdict.refuse is not None:
        raise TopicsRefused(verdict.refuse)
    if verdict.warn is not None:
        log.warning("%s", verdict.warn)
    return found.gone


def _new_topic(spec: TopicSpec, settings: Settings) -> NewTopic:
    config = {**spec.config, "min.insync.replicas": str(settings.kafka_min_insync_replicas)}
    return NewTopic(spec.name, spec.partitions, settings.kafka_replication_factor, topic_configs=config)


def _topic_errors(response: Any) -> dict[str, tuple[int, str]]:
    """A CreateTopics response's errors by topic (aiokafka returns them; it does not raise)."""
    return {name: (code, message or "") for name, code, message, *_ in response.topic_errors if code != 0}


async def _known_to_controller(admin: AIOKafkaAdminClient, specs: list[TopicSpec], settings: Settings) -> set[str]:
    """The topics of ``specs`` that exist on the controller. A topic created a moment ago may not
    be listed by a broker yet; a validate-only creation asks the controller, which knows."""
    if not specs:
        return set()
    response = await admin.create_topics([_new_topic(spec, settings) for spec in specs], validate_only=True)
    exists = TopicAlreadyExistsError.errno
    return {name for name, (code, _) in _topic_errors(response).items() if code == exists}


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the missing topics; return the names created now. Topics that exist already are
    checked (``existing_topic_verdict``), including ones created a moment ago that a broker does
    not list yet and ones another process creates while this one does.

    Raises ``TopicsRefused`` when the replication settings do not fit the cluster (see
    ``replication_verdict``) or a topic that exists would lose records, before creating any, and
    when the cluster refuses a creation."""
    admin = kafka_clients.admin(settings, request_timeout_ms=15_000)
    created: list[str] = []
    try:
        await admin.start()  # inside: a failed start must still close the client
        specs = topic_specs(settings)
        listed = set(await admin.list_topics())
        existing = listed | await _known_to_controller(admin, [s for s in specs if s.name not in listed], settings)
        existing -= await _check_existing(admin, [spec for spec in specs if spec.name in existing], settings)
        missing = [spec for spec in specs if spec.name not in existing]
        if not missing:
            return created
        rf, min_isr = settings.kafka_replication_factor, settings.kafka_min_insync_replicas
        brokers = len((await admin.describe_cluster())["brokers"])
        verdict = replication_verdict(rf, min_isr, brokers)
        if verdict.refuse is not None:
            raise TopicsRefused(verdict.refuse)
        if verdict.warn is not None:
            log.warning("%s; topics %s", verdict.warn, ", ".join(spec.name for spec in missing))
        raced: list[TopicSpec] = []  # created by another process since the check above
        for spec in missing:
            errors = _topic_errors(await admin.create_topics([_new_topic(spec, settings)]))
            code, message = errors.get(spec.name, (0, ""))
            if code == TopicAlreadyExistsError.errno:
                raced.append(spec)
                continue
            if code != 0:
                raise TopicsRefused(f"creating topic {spec.name} failed: {_kafka_error(code, message)}")
            created.append(spec.name)
            log.info(
                "created topic %s (%d partitions, replication %d, min.insync.replicas %d)",
                spec.name,
                spec.partitions,
                rf,
                min_isr,
            )
        if gone := await _check_existing(admin, raced, settings):
            raise TopicsRefused(f"topic(s) {', '.join(gone)} created and deleted by another process meanwhile")
    finally:
        await admin.close()
    return created
