"""The Kafka ACLs of each role, from the topic and group names in the settings.

Kafka is the control plane: whoever may write the decisions or limits topic steers every node.
So each principal gets exactly what its role does (DESIGN.md, "Security model"):

- node: writes events; reads decisions, allowances and limits (no consumer group: it assigns
  partitions by hand).
- worker: reads events (its consumer group) and limits, decisions and allowances (it follows
  them); writes decisions, allowances, notifications and the DLQ; creates its topics when they
  are missing. With the webhook deliverer inside (``METER_NOTIFY_IN_WORKER``) it also needs
  the notifier's ACLs: give its principal both roles.
- notifier (``meter notify``): reads notifications (its consumer group), writes their DLQ.
- operator: writes and reads limits and decisions (``meter block``, ``meter limits``), reads
  allowances (``meter why``).
- analytics: nothing on Kafka (ClickHouse only).

``meter kafka-acls`` prints them as ``kafka-acls.sh`` commands, or applies them with
``--apply`` through the configured connection (an admin principal: it needs Alter on the
cluster). Applying is idempotent: Kafka keeps one copy of an ACL.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from aiokafka.errors import for_code
from aiokafka.protocol.admin import CreateAclsRequest

from common import kafka_clients
from worker.settings import Settings


class Role(StrEnum):
    node = "node"
    worker = "worker"
    notifier = "notifier"
    operator = "operator"
    analytics = "analytics"


class Resource(IntEnum):  # Kafka's ResourceType codes
    topic = 2
    group = 3
    cluster = 4


class Operation(IntEnum):  # Kafka's AclOperation codes
    read = 3
    write = 4
    create = 5
    describe = 8
    describe_configs = 10


_LITERAL = 3  # PatternType.LITERAL
_ALLOW = 3  # AclPermissionType.ALLOW


@dataclass(frozen=True, order=True)
class Acl:
    resource: Resource
    name: str
    operation: Operation


def _topic(name: str, *operations: Operation) -> list[Acl]:
    return [Acl(Resource.topic, name, op) for op in operations]


def role_acls(role: Role, s: Settings) -> list[Acl]:
    """The ALLOW ACLs (literal names, any host) a principal of ``role`` needs, nothing more."""
    r, w, c, d = Operation.read, Operation.write, Operation.create, Operation.describe
    if role is Role.node:
        return [
            *_topic(s.events_topic, w, d),
            *_topic(s.decisions_topic, r, d),
            *_topic(s.allowances_topic, r, d),
            *_topic(s.limits_topic, r, d),
        ]
    if role is Role.worker:
        dc = Operation.describe_configs  # at start: a topic's cleanup.policy is checked (worker.topics)
        return [
            *_topic(s.events_topic, r, d, c, dc),
            *_topic(s.decisions_topic, r, w, d, c, dc),
            *_topic(s.allowances_topic, r, w, d, c, dc),
            *_topic(s.limits_topic, r, d, c, dc),
            *_topic(s.dlq_topic, w, d, c, dc),
            *_topic(s.notifications_topic, w, d, c, dc),
            *_topic(s.notifications_dlq_topic, w, d, c, dc),
            Acl(Resource.group, s.consumer_group, r),
        ]
    if role is Role.notifier:
        return [
            *_topic(s.notifications_topic, r, d),
            *_topic(s.notifications_dlq_topic, w, d),
            Acl(Resource.group, s.notify_consumer_group, r),
        ]
    if role is Role.operator:
        return [
            *_topic(s.decisions_topic, r, w, d),
            *_topic(s.limits_topic, r, w, d),
            *_topic(s.allowances_topic, r, d),
        ]
    return []  # analytics: ClickHouse only


def default_principal(role: Role) -> str:
    return f"User:{role.value}"


def kafka_acls_commands(principal: str, acls: list[Acl], bootstrap: str) -> list[str]:
    """The same ACLs as ``kafka-acls.sh`` commands (one per resource), for operators' own tooling."""
    by_resource: dict[tuple[Resource, str], list[Operation]] = {}
    for acl in acls:
        by_resource.setdefault((acl.resource, acl.name), []).append(acl.operation)
    lines = []
    for (resource, name), operations in by_resource.items():
        ops = " ".join(f"--operation {''.join(w.capitalize() for w in op.name.split('_'))}" for op in operations)
        target = "--cluster" if resource is Resource.cluster else f"--{resource.name} {name}"
        lines.append(
            f"kafka-acls.sh --bootstrap-server {bootstrap} --command-config admin.properties "
            f"--add --allow-principal {principal} {ops} {target}"
        )
    return lines


async def apply_acls(kafka: kafka_clients.KafkaTarget, principal: str, acls: list[Acl]) -> int:
    """Create ``acls`` for ``principal`` (idempotent) through an admin client; return how many.

    aiokafka's admin client has no create_acls, so this sends Kafka's CreateAcls request."""
    admin: Any = kafka_clients.admin(kafka, request_timeout_ms=15_000)
    try:
        await admin.start()  # inside: a failed start must still close the client
        for acl in acls:
            request = CreateAclsRequest(
                int(acl.resource), acl.name, _LITERAL, principal, "*", int(acl.operation), _ALLOW
            )
            response = await admin._send_request(request)
            for error_code, error_message in response.creation_responses:
                if error_code:
                    error = for_code(error_code)
                    raise error(f"creating ACL {acl} for {principal}: {error_message or error.__name__}")
    finally:
        await admin.close()
    return len(acls)
