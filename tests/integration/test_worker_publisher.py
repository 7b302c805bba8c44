"""The worker's publisher (decisions, allowances, notifications, dead letters) against the real
broker: acknowledged by every in-sync replica, so min.insync.replicas holds for it."""

from __future__ import annotations

import pytest

from worker.app import WorkerRuntime
from worker.settings import Settings

pytestmark = [pytest.mark.kafka]


async def test_the_worker_publishes_with_acks_all(topics: Settings) -> None:
    runtime = WorkerRuntime(topics)
    await runtime.broker.start()
    try:
        await runtime.broker.publish(b"{}", topics.dlq_topic, key=b"probe")
        producer = runtime.broker.config.producer._producer.producer  # FastStream's aiokafka producer
        assert producer._sender._acks == -1  # "all"; FastStream's default is 1 (the leader alone)
    finally:
        await runtime.broker.stop()
