"""Topics deleted under their follower (real broker): aiokafka then asked for a deleted topic's
metadata without pause, logging an error thousands of times a second for ever, while the
follower said it was connected. Now the follower notices, says so, follows the topics that are
left, and reads a topic created again from its start."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from common.follower import TopicFollower
from tests.integration.helpers import create_again, delete_topic, wait_for
from worker.settings import Settings

pytestmark = [pytest.mark.kafka]


async def _send(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


def _follower(
    settings: Settings, topics: list[str], seen: list[bytes], required: list[str] | None = None
) -> TopicFollower:
    async def on_records(records: list[Any]) -> None:
        seen.extend(r.value for r in records if r.value is not None)

    return TopicFollower(
        settings, topics, on_records, "test", first_delay=0.2, max_delay=1.0, probe_interval_s=0.3, required=required
    )


async def test_a_deleted_topic_is_said_and_read_from_its_start_once_created_again(
    topics: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topic = topics.limits_topic
    seen: list[bytes] = []
    await _send(topics, topic, [b"old-%d" % i for i in range(5)])
    follower = _follower(topics, [topic], seen)
    await follower.start()
    try:
        await asyncio.wait_for(follower.ready.wait(), 15)
        await wait_for(lambda: len(seen) == 5, what="the old records")
        caplog.clear()
        with caplog.at_level(logging.INFO):
            await delete_topic(topics, topic)
            await wait_for(lambda: not follower.connected, timeout=10, what="the follower disconnected")
            assert "not found" in (follower.last_error or "")
            await asyncio.sleep(2)  # what it logs in the meantime
            flood = [r for r in caplog.records if "not found in cluster metadata" in r.getMessage()]
            assert len(flood) < 1_000, f"{len(flood)} metadata errors logged"
        # More records than the old topic had, before the follower is back: none may be skipped.
        await create_again(topics, topic)
        new = [b"new-%d" % i for i in range(8)]
        await _send(topics, topic, new)
        await wait_for(lambda: seen[5:] == new, timeout=20, what="every record of the new topic")
        await wait_for(lambda: follower.connected, what="the follower connected again")
    finally:
        await follower.stop()


async def test_the_other_topics_are_followed_while_one_not_required_is_gone(topics: Settings) -> None:
    kept, deleted = topics.decisions_topic, topics.allowances_topic
    seen: list[bytes] = []
    follower = _follower(topics, [kept, deleted], seen, required=[kept])
    await follower.start()
    try:
        await asyncio.wait_for(follower.ready.wait(), 15)
        await delete_topic(topics, deleted)
        await wait_for(lambda: deleted in (follower.last_error or ""), timeout=10, what="the topic said gone")
        await _send(topics, kept, [b"still followed"])
        await wait_for(lambda: b"still followed" in seen, timeout=10, what="the kept topic's record")
        assert follower.connected
        await asyncio.sleep(1)  # a few probes of the broker: they do not clear what is missing
        assert follower.missing_topics == {deleted}
        assert deleted in (follower.last_error or "")
        await create_again(topics, deleted)
        await _send(topics, deleted, [b"back"])
        await wait_for(lambda: b"back" in seen, timeout=20, what="the record of the topic created again")
        await wait_for(lambda: follower.last_error is None, what="the error cleared")
    finally:
        await follower.stop()


async def test_a_guarded_node_needs_its_decisions_topic_not_the_guards(topics: Settings) -> None:
    """A node's decision cache with a guard follows three topics: without the allowances topic it
    goes on (blocks still arrive); without the decisions topic it is not available (a node that
    fails closed refuses), as it was before it had a guard."""
    from node.decision_cache import DecisionCache
    from node.guard import LocalGuard
    from schemas.limits import PolicyBook

    guard = LocalGuard(PolicyBook(topics.default_policy()), topics.node_id)
    cache = DecisionCache(topics, guard=guard, probe_interval_s=0.3, backoff_initial_s=0.1, backoff_max_s=0.5)
    await cache.start()
    try:
        assert await cache.wait_ready(15)
        await delete_topic(topics, topics.allowances_topic)
        await wait_for(lambda: topics.allowances_topic in (cache.state().last_error or ""), what="allowances gone")
        assert cache.available
        await delete_topic(topics, topics.decisions_topic)
        await wait_for(lambda: not cache.available, timeout=10, what="the cache unavailable")
        await asyncio.sleep(1)  # probes and retries: still unavailable
        assert not cache.available
    finally:
        await cache.stop()
