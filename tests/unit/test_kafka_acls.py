"""The ACL set per role (issue 9, item 2; DESIGN.md "Security model"), without a broker:
tests/integration/test_kafka_security.py applies it to a secured broker."""

from __future__ import annotations

import pytest

from worker.cli import main
from worker.kafka_acls import Acl, Operation, Resource, Role, kafka_acls_commands, role_acls
from worker.settings import Settings
from worker.topics import topic_specs

S = Settings()
CONTROL = (S.decisions_topic, S.limits_topic, S.allowances_topic)


def allowed(role: Role) -> set[tuple[Resource, str, Operation]]:
    return {(a.resource, a.name, a.operation) for a in role_acls(role, S)}


def test_a_node_writes_events_and_reads_the_control_topics_only() -> None:
    acls = allowed(Role.node)
    assert (Resource.topic, S.events_topic, Operation.write) in acls
    for topic in CONTROL:
        assert (Resource.topic, topic, Operation.read) in acls
        assert (Resource.topic, topic, Operation.write) not in acls
    assert not any(r is Resource.group for r, _, _ in acls)  # it assigns partitions by hand
    assert (Resource.topic, S.events_topic, Operation.read) not in acls


def test_the_worker_cannot_change_limits() -> None:
    acls = allowed(Role.worker)
    assert (Resource.topic, S.limits_topic, Operation.write) not in acls
    for topic in (S.decisions_topic, S.allowances_topic, S.dlq_topic):
        assert (Resource.topic, topic, Operation.write) in acls
    assert (Resource.group, S.consumer_group, Operation.read) in acls
    # Its start checks each topic's cleanup policy (worker.topics): it reads the topics' configs.
    assert {(Resource.topic, spec.name, Operation.describe_configs) for spec in topic_specs(S)} <= acls


def test_operators_write_limits_and_decisions_not_events() -> None:
    acls = allowed(Role.operator)
    assert (Resource.topic, S.limits_topic, Operation.write) in acls
    assert (Resource.topic, S.decisions_topic, Operation.write) in acls
    assert not any(name == S.events_topic for _, name, _ in acls)


def test_analytics_has_nothing_on_kafka() -> None:
    assert role_acls(Role.analytics, S) == []


def test_kafka_acls_commands() -> None:
    acls = [
        Acl(Resource.topic, "usage.events", Operation.write),
        Acl(Resource.topic, "usage.events", Operation.describe),
        Acl(Resource.topic, "usage.events", Operation.describe_configs),
    ]
    assert kafka_acls_commands("User:node", acls, "kafka:9093") == [
        "kafka-acls.sh --bootstrap-server kafka:9093 --command-config admin.properties --add "
        "--allow-principal User:node --operation Write --operation Describe --operation DescribeConfigs "
        "--topic usage.events"
    ]


def test_meter_kafka_acls_prints_every_role(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kafka-acls"]) == 0
    out = capsys.readouterr().out
    for role in Role:
        assert f"# {role.value} (User:{role.value})" in out
    assert "# analytics (User:analytics): no Kafka access" in out
    assert main(["kafka-acls", "--role", "node", "--principal", "User:edge"]) == 0
    assert "--allow-principal User:edge" in capsys.readouterr().out
