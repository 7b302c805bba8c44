"""Topic replication (issue 9, item 7): the replication factor and min.insync.replicas come from
the settings, and the worker never silently creates production topics with replication 1.

Before: every topic was created with replication factor 1, on any cluster, without a word."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from common import kafka_clients
from worker.settings import Settings
from worker.topics import TopicsRefused, ensure_topics, existing_topic_verdict, replication_verdict, topic_specs


def test_defaults_fit_one_development_broker() -> None:
    s = Settings()
    assert (s.kafka_replication_factor, s.kafka_min_insync_replicas) == (1, 1)


@pytest.mark.parametrize(
    ("rf", "min_isr", "brokers", "refused", "warned"),
    [
        (1, 1, 1, None, "replication factor 1"),  # the dev broker: allowed, with a warning
        (1, 1, 3, "METER_KAFKA_REPLICATION_FACTOR=3", None),  # never RF 1 on a real cluster
        (1, 1, 2, "cluster of 2 brokers", None),
        (3, 2, 1, "METER_KAFKA_REPLICATION_FACTOR=3 but the cluster has 1 broker", None),
        (3, 2, 3, None, None),  # production
        (3, 2, 5, None, None),
        (3, 1, 3, None, "METER_KAFKA_MIN_INSYNC_REPLICAS=1"),
        (2, 3, 3, "above METER_KAFKA_REPLICATION_FACTOR=2", None),
    ],
)
def test_replication_verdict(rf: int, min_isr: int, brokers: int, refused: str | None, warned: str | None) -> None:
    verdict = replication_verdict(rf, min_isr, brokers)
    if refused is None:
        assert verdict.refuse is None
    else:
        assert verdict.refuse is not None
        assert refused in verdict.refuse
        assert "\n" not in verdict.refuse  # one line
    if warned is None:
        assert verdict.warn is None
    else:
        assert verdict.warn is not None
        assert warned in verdict.warn


def test_min_insync_above_replication_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="METER_KAFKA_MIN_INSYNC_REPLICAS"):
        Settings(kafka_replication_factor=2, kafka_min_insync_replicas=3)


class FakeAdmin:
    """An admin client of a cluster of ``brokers`` brokers holding ``existing`` topics."""

    def __init__(
        self,
        brokers: int,
        existing: set[str] | None = None,
        unlisted: set[str] | None = None,
        policies: dict[str, str] | None = None,
        refuse: dict[str, tuple[int, str]] | None = None,
        raced: set[str] | None = None,
        denied: set[str] | None = None,
        not_yet: dict[str, int] | None = None,
        configs_not_yet: dict[str, int] | None = None,
        deleted: set[str] | None = None,
        describe_errors: dict[str, int] | None = None,
    ) -> None:
        self.brokers = brokers
        self.existing = existing or set()
        self.unlisted = unlisted or set()  # known to the controller, not yet listed by the broker
        self.policies = policies or {}
        self.refuse = refuse or {}  # what the controller answers a creation of these topics
        self.raced = raced or set()  # created by another process between the check and the creation
        self.denied = denied or set()  # topics whose configs this principal may not describe
        self.not_yet = not_yet or {}  # topic -> how many more describes answer "unknown topic" (3)
        self.configs_not_yet = configs_not_yet or {}  # the same for describe_configs
        self.deleted = deleted or set()  # listed by the broker, deleted on the controller meanwhile
        self.describe_errors = describe_errors or {}  # topic -> the error every describe answers
        self.created: list[Any] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list_topics(self) -> list[str]:
        return sorted(self.existing)

    async def describe_cluster(self) -> dict[str, Any]:
        return {"brokers": [{"node_id": i} for i in range(self.brokers)], "controller_id": 0}

    async def create_topics(self, topics: list[Any], validate_only: bool = False) -> Any:
        errors: list[tuple[str, int, str | None]] = []
        for topic in topics:
            exists = (self.existing | self.unlisted) - self.deleted
            if topic.name in exists or (topic.name in self.raced and not validate_only):
                errors.append((topic.name, 36, f"Topic '{topic.name}' already exists."))
            elif topic.name in self.refuse:
                errors.append((topic.name, *self.refuse[topic.name]))
            else:
                errors.append((topic.name, 0, None))
                if not validate_only:
                    self.created.append(topic)
        return SimpleNamespace(topic_errors=errors)

    @staticmethod
    def _not_yet(counts: dict[str, int], name: str) -> bool:
        if counts.get(name, 0) > 0:
            counts[name] -= 1
            return True
        return False

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        described = []
        for t in topics:
            code = self.describe_errors.get(t, 0)
            if t in self.deleted or self._not_yet(self.not_yet, t):
                code = 3
            described.append({"topic": t, "error_code": code, "partitions": [] if code else [{}] * 64})
        return described

    async def describe_configs(self, resources: list[Any]) -> list[Any]:
        answers: list[Any] = []
        for name in (r.name for r in resources):
            if name in self.denied:
                answers.append((29, "Topic authorization failed.", 2, name, []))
            elif self._not_yet(self.configs_not_yet, name):
                answers.append((3, None, 2, name, []))
            else:
                entries = [("cleanup.policy", self.policies[name])] if name in self.policies else []
                answers.append((0, None, 2, name, entries))
        return [SimpleNamespace(resources=answers)]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> list[FakeAdmin]:
    admins: list[FakeAdmin] = []

    def admin(kafka: Any, **options: Any) -> FakeAdmin:
        return admins[0]

    async def describe_topics(admin: FakeAdmin, topics: list[str]) -> list[dict[str, Any]]:
        return await admin.describe_topics(topics)

    monkeypatch.setattr(kafka_clients, "admin", admin)
    monkeypatch.setattr(kafka_clients, "describe_topics", describe_topics)
    return admins


async def test_production_settings_create_replicated_topics(cluster: list[FakeAdmin]) -> None:
    cluster.append(FakeAdmin(brokers=3))
    s = Settings(kafka_replication_factor=3, kafka_min_insync_replicas=2)
    created = await ensure_topics(s)
    assert created == [spec.name for spec in topic_specs(s)]
    for topic in cluster[0].created:
        assert topic.replication_factor == 3
        assert topic.topic_configs["min.insync.replicas"] == "2"


async def test_replication_1_is_refused_on_a_cluster(cluster: list[FakeAdmin]) -> None:
    cluster.append(FakeAdmin(brokers=3))
    with pytest.raises(TopicsRefused, match="METER_KAFKA_REPLICATION_FACTOR"):
        await ensure_topics(Settings())
    assert cluster[0].created == []


async def test_replication_1_on_one_broker_is_created_with_a_warning(
    cluster: list[FakeAdmin], caplog: pytest.LogCaptureFixture
) -> None:
    cluster.append(FakeAdmin(brokers=1))
    with caplog.at_level(logging.WARNING, logger="worker.topics"):
        created = await ensure_topics(Settings())
    assert len(created) == len(cluster[0].created) > 0
    assert all(t.replication_factor == 1 and t.topic_configs["min.insync.replicas"] == "1" for t in cluster[0].created)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("replication factor 1" in w for w in warnings), warnings


async def test_existing_topics_are_left_alone(cluster: list[FakeAdmin]) -> None:
    s = Settings()
    cluster.append(FakeAdmin(brokers=3, existing={spec.name for spec in topic_specs(s)}))
    assert await ensure_topics(s) == []  # nothing to create: nothing refused either


async def test_a_topic_the_broker_does_not_list_yet_is_checked_before_anything_is_created(
    cluster: list[FakeAdmin],
) -> None:
    # Created a moment ago (a broker's auto-creation on a node's first read): the controller has it,
    # the broker's metadata not yet. Before, the worker took it as missing and used it unchecked.
    s = Settings()
    cluster.append(FakeAdmin(brokers=1, unlisted={s.decisions_topic}, policies={s.decisions_topic: "delete"}))
    with pytest.raises(TopicsRefused, match=f"topic {s.decisions_topic} has cleanup.policy=delete"):
        await ensure_topics(s)
    assert cluster[0].created == []


async def test_a_topic_another_process_creates_meanwhile_is_checked_and_not_reported_created(
    cluster: list[FakeAdmin],
) -> None:
    s = Settings()
    cluster.append(FakeAdmin(brokers=1, raced={s.limits_topic}, policies={s.limits_topic: "compact"}))
    created = await ensure_topics(s)
    assert s.limits_topic not in created
    assert s.events_topic in created
    cluster.append(FakeAdmin(brokers=1, raced={s.limits_topic}, policies={s.limits_topic: "delete"}))
    cluster.pop(0)
    with pytest.raises(TopicsRefused, match=f"topic {s.limits_topic} has cleanup.policy=delete"):
        await ensure_topics(s)


async def test_a_creation_the_cluster_refuses_is_an_error_not_a_created_topic(cluster: list[FakeAdmin]) -> None:
    # aiokafka returns a CreateTopics error; it does not raise. Before, it was logged as created.
    s = Settings()
    cluster.append(FakeAdmin(brokers=1, refuse={s.dlq_topic: (40, "Invalid config value")}))
    with pytest.raises(TopicsRefused, match=f"creating topic {s.dlq_topic} failed: Invalid config value"):
        await ensure_topics(s)
    assert s.dlq_topic not in [t.name for t in cluster[0].created]


async def test_a_policy_that_cannot_be_read_is_a_warning_not_a_silent_pass(
    cluster: list[FakeAdmin], caplog: pytest.LogCaptureFixture
) -> None:
    s = Settings()
    cluster.append(FakeAdmin(brokers=1, existing={s.decisions_topic}, denied={s.decisions_topic}))
    with caplog.at_level(logging.WARNING, logger="worker.topics"):
        await ensure_topics(s)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"cannot check the cleanup.policy of topic(s) {s.decisions_topic}" in w for w in warnings), warnings


async def test_a_topic_a_broker_applies_late_is_waited_for_then_checked(cluster: list[FakeAdmin]) -> None:
    # Its metadata unknown to the broker for two describes, its configs for one more (brokers
    # apply a creation on their own time): waited for, then refused for its policy.
    s = Settings()
    cluster.append(
        FakeAdmin(
            brokers=1,
            unlisted={s.decisions_topic},
            policies={s.decisions_topic: "delete"},
            not_yet={s.decisions_topic: 2},
            configs_not_yet={s.decisions_topic: 1},
        )
    )
    with pytest.raises(TopicsRefused, match=f"topic {s.decisions_topic} has cleanup.policy=delete"):
        await ensure_topics(s)
    assert cluster[0].created == []


async def test_a_listed_topic_deleted_before_it_is_described_is_created(cluster: list[FakeAdmin]) -> None:
    s = Settings()
    cluster.append(FakeAdmin(brokers=1, existing={s.limits_topic}, deleted={s.limits_topic}))
    created = await ensure_topics(s)  # at once: the controller says it is gone, no 10 s wait
    assert s.limits_topic in created


async def test_a_topic_that_cannot_be_described_stops_the_start_at_once_with_the_reason(
    cluster: list[FakeAdmin],
) -> None:
    s = Settings()
    cluster.append(FakeAdmin(brokers=1, existing={s.events_topic}, describe_errors={s.events_topic: 29}))
    with pytest.raises(TopicsRefused, match=rf"cannot describe topic {s.events_topic}: .*Kafka error 29"):
        await ensure_topics(s)
    assert cluster[0].created == []


def test_existing_topics_that_would_lose_records_are_refused_and_fewer_partitions_warned() -> None:
    s = Settings()
    specs = topic_specs(s)
    right = {spec.name: spec.config.get("cleanup.policy", "delete") for spec in specs}
    fine = existing_topic_verdict(specs, {spec.name: spec.partitions for spec in specs}, right)
    assert (fine.refuse, fine.warn) == (None, None)
    # A broker's auto-creation: the decisions topic not compacted (old blocks deleted), the events
    # topic with one partition; and an events topic someone compacted (one event kept per key).
    wrong = {**right, s.decisions_topic: "delete", s.limits_topic: "compact,delete", s.events_topic: "compact"}
    verdict = existing_topic_verdict(specs, {s.events_topic: 1}, wrong)
    assert verdict.refuse is not None
    for topic in (s.decisions_topic, s.limits_topic, s.events_topic):
        assert f"topic {topic} has cleanup.policy=" in verdict.refuse
    assert f"--entity-name {s.decisions_topic} --add-config cleanup.policy=compact" in verdict.refuse
    assert verdict.warn == f"topic {s.events_topic} has 1 partition(s), the settings say {s.events_partitions}"
