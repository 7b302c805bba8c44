"""Operator actions, published to the same topics the workers and nodes follow:
manual block / unblock on the decisions topic, limit overrides on the limits topic."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from common import kafka_clients
from schemas.decisions import Decision, DecisionAction, Window
from schemas.limits import LimitOverride, LimitPolicy, OverrideScope
from worker.control_topics import latest_decisions
from worker.refusals import ActionRefused, problems
from worker.settings import Settings

M = TypeVar("M", bound=BaseModel)


async def _send(settings: Settings, topic: str, key: str, value: bytes | None) -> None:
    producer = kafka_clients.producer(settings, enable_idempotence=True, acks="all")
    try:
        await producer.start()  # inside: a failed start must still stop the producer
        await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


async def manual_decision(
    settings: Settings, key_id: str, action: DecisionAction, until: datetime | None, reason: str
) -> Decision:
    now = datetime.now(UTC)
    if action is DecisionAction.block and until is not None and until <= now:
        raise ActionRefused(f"--until {until.isoformat()} is not in the future")
    fields = {
        "key_id": key_id,
        "action": action,
        "window": Window.manual,
        "until": until if action is DecisionAction.block else None,
        "reason": reason or f"operator {action.value}",
        "decided_at": now,
        "source": "operator",
    }
    _checked(Decision, version=1, **fields)  # before asking the topic for the key's version
    # Above anything the topic holds for the key: a CLI host whose clock is behind the
    # workers' must not issue a decision the nodes would ignore as stale.
    decision = Decision(version=max(time.time_ns() // 1000, await _latest_version(settings, key_id) + 1), **fields)
    await _send(settings, settings.decisions_topic, key_id, decision.model_dump_json().encode())
    return decision


def _checked(model: type[M], **fields: Any) -> M:
    """The record, or ``ActionRefused`` naming every field out of its bounds (one line, exit 2)."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise ActionRefused(problems(exc)) from None


async def _latest_version(settings: Settings, key_id: str) -> int:
    held = (await latest_decisions(settings)).get(key_id)
    return held.version if held is not None else 0


async def set_override(
    settings: Settings,
    scope: OverrideScope,
    subject: str,
    policy: LimitPolicy | None,
    note: str = "",
    route: str | None = None,
) -> LimitOverride:
    override = _checked(
        LimitOverride, scope=scope, subject=subject, policy=policy, updated_at=datetime.now(UTC), note=note, route=route
    )
    await _send(settings, settings.limits_topic, override.topic_key, override.model_dump_json().encode())
    return override
