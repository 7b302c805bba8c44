"""A secured Kafka (issue 9, item 2), against the real broker: SASL_PLAINTEXT with the PLAIN
mechanism and ACLs enforced (KRaft StandardAuthorizer, nothing allowed without an ACL), started
by ``KAFKA_SECURITY=sasl infra/kafka/kafka.sh`` next to the plain test broker.

Topics are created by the admin principal, the ACLs applied by ``meter kafka-acls --apply``
(as admin); then each role's real clients, all built by ``common.kafka_clients``, do what the
role may do and are refused what it may not: a node writes events and reads decisions and
limits but cannot write decisions or limits; the worker writes decisions through its FastStream
broker and consumes events in its group; analytics reads nothing; a wrong password is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)

from common import kafka_clients
from common.follower import TopicUnavailable, read_to_end, valid_records
from node.decision_cache import DecisionCache
from node.reporter import UsageReporter
from schemas.decisions import Decision, DecisionAction, Window
from schemas.events import make_event
from schemas.limits import LimitOverride, LimitPolicy, OverrideScope
from tests.integration.helpers import REPO_ROOT, until_fresh_minute, wait_for
from worker.app import WorkerRuntime
from worker.limits.control import manual_decision, set_override
from worker.limits.publisher import KeyedPublisher
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.client import connect, quote_identifier
from worker.topics import ensure_topics

pytestmark = pytest.mark.kafka

SECURED_PORT = 19192  # the plain test broker is on 19092
KAFKA_SH = REPO_ROOT / "infra" / "kafka" / "kafka.sh"


def password(user: str) -> str:
    """The secured development broker's password of ``user`` (as infra/kafka/kafka.sh sets it)."""
    return os.environ.get(f"KAFKA_SASL_{user.upper()}_PASSWORD", f"{user}-secret")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def secured_bootstrap() -> Iterator[str]:
    """The secured broker: reused if one answers, else started here and stopped at the end."""
    if not _answers(SECURED_PORT) and shutil.which("java") is None:
        pytest.skip("java not found: the secured broker (KAFKA_SECURITY=sasl infra/kafka/kafka.sh) needs Java 17+")
    env = {**os.environ, "KAFKA_SECURITY": "sasl", "KAFKA_PORT": str(SECURED_PORT), "KAFKA_HEAP": "256m"}
    env.pop("KAFKA_DATA_DIR", None)  # its own folder, never the plain broker's
    started = False
    if not _answers(SECURED_PORT):
        subprocess.run([str(KAFKA_SH), "start"], check=True, env=env, timeout=300)
        started = True
    try:
        yield f"127.0.0.1:{SECURED_PORT}"
    finally:
        if started and os.environ.get("KEEP_KAFKA") != "1":
            subprocess.run([str(KAFKA_SH), "stop"], check=False, env=env, timeout=120)


@pytest.fixture(scope="module")
async def as_role(secured_bootstrap: str) -> Callable[..., Settings]:
    """``as_role(user)``: the settings of that principal (the module's own topics and group),
    once the admin has created the topics and applied every role's ACLs."""
    run = uuid.uuid4().hex[:8]
    names = {
        "events_topic": f"sec{run}.events",
        "decisions_topic": f"sec{run}.decisions",
        "dlq_topic": f"sec{run}.dlq",
        "limits_topic": f"sec{run}.limits",
        "allowances_topic": f"sec{run}.allowances",
        "consumer_group": f"sec{run}-workers",
    }

    def build(user: str, secret: str | None = None, **overrides: Any) -> Settings:
        return Settings(
            kafka_bootstrap=secured_bootstrap,
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username=user,
            kafka_sasl_password=password(user) if secret is None else secret,
            **{**names, **overrides},
        )

    await ensure_topics(build("admin"))
    # The operator's tool, as the admin principal: every role's ACLs on these topics and group.
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env.update({f"METER_{k.upper()}": v for k, v in names.items()})
    env.update(
        METER_KAFKA_BOOTSTRAP=secured_bootstrap,
        METER_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        METER_KAFKA_SASL_USERNAME="admin",
        METER_KAFKA_SASL_PASSWORD=password("admin"),
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker.cli", "kafka-acls", "--apply"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "node      User:node: 8 ACL(s) applied" in done.stdout, done.stdout
    assert password("admin") not in done.stdout + done.stderr
    return build


def a_block(key_id: str, version: int) -> Decision:
    now = datetime.now(UTC)
    return Decision(
        key_id=key_id,
        action=DecisionAction.block,
        window=Window.minute,
        limit=100,
        count=101,
        until=now + timedelta(minutes=5),
        reason="limit exceeded",
        version=version,
        decided_at=now,
        source="worker",
    )


async def test_node_writes_events_and_reads_decisions_and_limits(as_role: Callable[..., Settings]) -> None:
    node, operator = as_role("node"), as_role("operator")
    # The operator's real commands write the control topics ...
    await manual_decision(operator, "key-ops", DecisionAction.block, None, "fraud team")
    await set_override(operator, OverrideScope.key, "key-ops", LimitPolicy(per_minute=5, per_hour=50, per_day=500))

    # ... which the node's real decision cache and a node reader follow,
    cache = DecisionCache(node)
    await cache.start()
    try:
        assert await cache.wait_ready(30), cache.state().last_error
        await wait_for(lambda: cache.check("key-ops") is not None, 20)
    finally:
        await cache.stop()
    overrides = list(valid_records(await read_to_end(node, node.limits_topic), LimitOverride))
    assert [o.subject for o in overrides] == ["key-ops"]

    # and the node's real reporter writes events.
    reporter = UsageReporter(node, backoff_initial_s=0.1)
    await reporter.start()
    for i in range(5):
        reporter.report(
            make_event(
                request_id=f"sec-{i}",
                key_id="key-ops",
                node_id="node-1",
                method="GET",
                endpoint="/v0/rates",
                status=200,
                ts=datetime.now(UTC),
            )
        )
    try:
        await wait_for(lambda: reporter.state().sent == 5, 20)
    finally:
        await reporter.stop()
    assert reporter.state().last_error is None


@pytest.mark.parametrize("topic", ["decisions_topic", "limits_topic", "allowances_topic"])
async def test_node_cannot_write_the_control_topics(as_role: Callable[..., Settings], topic: str) -> None:
    """The node's principal cannot block or unblock keys, or change limits or allowances."""
    node = as_role("node")
    producer = kafka_clients.producer(node, enable_idempotence=True, acks="all")
    await producer.start()  # it may write (events), so its idempotent producer starts
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(getattr(node, topic), b'{"forged": true}', key=b"victim-key")
    finally:
        await producer.stop()


async def test_worker_writes_decisions_through_its_broker_and_reads_events_in_its_group(
    as_role: Callable[..., Settings],
) -> None:
    worker, node = as_role("worker"), as_role("node")
    # The worker's FastStream broker (the one WorkerRuntime publishes decisions with).
    broker = kafka_clients.broker(worker)
    await broker.start()
    try:
        decision = a_block("key-hot", version=7)
        await broker.publish(decision.model_dump_json().encode(), worker.decisions_topic, key=b"key-hot")
    finally:
        await broker.stop()
    seen = list(valid_records(await read_to_end(node, node.decisions_topic), Decision))
    assert any(d.key_id == "key-hot" and d.version == 7 for d in seen)

    # The events, consumed in the worker's group (the ingest path's ACLs).
    producer = kafka_clients.producer(node, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(node.events_topic, b"{}", key=b"key-hot")
    finally:
        await producer.stop()
    consumer = kafka_clients.consumer(
        worker, worker.events_topic, group_id=worker.consumer_group, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        got = 0
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            got = sum(len(rs) for rs in (await consumer.getmany(timeout_ms=500)).values())
        assert got > 0
        await consumer.commit()
    finally:
        await consumer.stop()


async def test_a_topic_the_worker_may_not_write_holds_back_its_own_records_only(
    as_role: Callable[..., Settings],
) -> None:
    """The worker's publisher on the real secured broker: an ACL missing (here on the limits
    topic, which the worker role may not write) refuses one record, and the decision of the same
    key queued after it, through the same publisher and FastStream broker, lands. (Unit tests in
    tests/unit/test_keyed_publisher.py and test_latest_decisions.py cover the service's use.)"""
    worker, node = as_role("worker"), as_role("node")
    broker = kafka_clients.broker(worker)
    await broker.start()

    async def send(topic: str, key: str, value: bytes) -> None:
        await broker.publish(value, topic, key=key.encode())

    publisher = KeyedPublisher(send)
    try:
        decision = a_block("key-both", version=9)
        publisher.submit(
            [
                (worker.limits_topic, "key-both", b"{}"),
                (worker.decisions_topic, "key-both", decision.model_dump_json().encode()),
            ]
        )
        await wait_for(lambda: publisher.published[worker.decisions_topic] == 1, timeout=20)
        assert publisher.waiting() == (1, 1)  # the refused record, retried on its own
    finally:
        await publisher.close(0.5)
        await broker.stop()
    seen = list(valid_records(await read_to_end(node, node.decisions_topic), Decision))
    assert any(d.key_id == "key-both" and d.version == 9 for d in seen)


async def test_worker_cannot_change_limits_nor_use_another_group(as_role: Callable[..., Settings]) -> None:
    worker = as_role("worker")
    producer = kafka_clients.producer(worker, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(worker.limits_topic, b"{}", key=b"key:victim")
    finally:
        await producer.stop()
    consumer = kafka_clients.consumer(worker, worker.events_topic, group_id="someone-elses-group")

    async def consume() -> None:
        try:
            await consumer.start()
            await consumer.getmany(timeout_ms=2000)
        finally:
            await consumer.stop()

    with pytest.raises(GroupAuthorizationFailedError):
        await consume()


@pytest.mark.clickhouse
async def test_the_whole_loop_runs_on_the_acls_alone(as_role: Callable[..., Settings], chdb_dir: Path) -> None:
    """Node events -> the real worker (ingest group, fast lane, followers, FastStream publishes)
    -> a block decision -> the node's decision cache, each process with its own principal."""
    database = f"sec_{uuid.uuid4().hex[:8]}"
    limits = {"limit_per_minute": 5, "limit_per_hour": 1_000, "limit_per_day": 5_000}
    node = as_role("node", **limits)
    worker = as_role(
        "worker",
        clickhouse_dsn=f"chdb://{chdb_dir}",
        clickhouse_database=database,
        http_port=0,
        batch_timeout_ms=50,
        **limits,
    )
    runtime = WorkerRuntime(worker)
    cache = DecisionCache(node)
    try:
        async with runtime.running():
            # Started (group joined, partitions owned) before the events are sent: the block is
            # only for the live minute, and a start slowed by a busy machine must not eat it.
            await wait_for(lambda: runtime.consumer is not None and bool(runtime.consumer.owned), 90, "assignment")
            await cache.start()
            assert await cache.wait_ready(30), cache.state().last_error
            await until_fresh_minute(45)
            events = list(generate(12, Traffic(keys=1, nodes=1, spread=timedelta(seconds=1), seed=9)))
            key_id = events[0]["key_id"]
            sent_at = time.monotonic()
            await publish(node, node.events_topic, events)  # as the node principal
            await wait_for(lambda: runtime.consumer is not None and runtime.consumer.stats.consumed >= 12, 30)
            assert runtime.limits is not None
            engine = runtime.limits.engine
            try:
                await wait_for(lambda: cache.check(key_id) is not None, 30, "the block in the node's cache")
            except AssertionError as missing:
                raise AssertionError(
                    f"{missing}: the worker published {engine.decisions_published} decisions, "
                    f"{time.monotonic() - sent_at:.1f}s after the events were sent"
                ) from None
    finally:
        await cache.stop()
        connect(worker.clickhouse_dsn, database).command(f"DROP DATABASE IF EXISTS {quote_identifier(database)}")
    assert runtime.consumer is not None
    assert runtime.consumer.stats.counted == 12


async def test_analytics_reads_nothing_on_kafka(as_role: Callable[..., Settings]) -> None:
    with pytest.raises(TopicUnavailable, match="not authorized for this principal"):
        await read_to_end(as_role("analytics"), as_role("analytics").decisions_topic, timeout_s=15)


async def test_a_wrong_password_is_refused_with_a_clear_error(
    as_role: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-the-node-password-0123"
    node = as_role("node", wrong)
    producer = kafka_clients.producer(node, enable_idempotence=True, acks="all")

    async def connect() -> None:
        try:
            await producer.start()
        finally:
            await producer.stop()

    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError):
        await connect()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Authentication failed: Invalid username or password" in logged
    assert wrong not in logged
