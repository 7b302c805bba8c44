"""Usage reporter without a broker: never blocks or raises, bounded buffer, retry and resend."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from node.reporter import UsageReporter
from schemas.events import RequestEvent, make_event, parse_event
from worker.settings import Settings

DEAD = Settings(kafka_bootstrap="127.0.0.1:1", events_topic="ev")


def event(i: int, key: str = "short_000000000000000000000000") -> RequestEvent:
    return make_event(
        request_id=f"r{i}",
        key_id=key,
        node_id="n1",
        method="GET",
        endpoint="/v0/rates",
        status=200,
        ts=datetime(2025, 3, 1, tzinfo=UTC),
    )


class Broker:
    """Scripted stand-in for Kafka: the next `fail_starts` starts and `fail_sends` deliveries fail."""

    def __init__(self, fail_starts: int = 0, fail_sends: int = 0) -> None:
        self.fail_starts = fail_starts
        self.fail_sends = fail_sends
        self.log: list[tuple[bytes, bytes]] = []
        self.configs: list[dict[str, Any]] = []

    def factory(self, **config: Any) -> FakeProducer:
        self.configs.append(config)
        return FakeProducer(self)


class FakeProducer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def start(self) -> None:
        if self.broker.fail_starts > 0:
            self.broker.fail_starts -= 1
            raise KafkaConnectionError("scripted: broker down")

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.broker.fail_sends > 0:
            self.broker.fail_sends -= 1
            fut.set_exception(KafkaTimeoutError("scripted: batch expired"))
        else:
            self.broker.log.append((key, value))
            fut.set_result(None)
        return fut

    async def stop(self) -> None:
        pass


async def wait_until(cond: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_kafka_down_keeps_buffering(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node")
    reporter = UsageReporter(DEAD, backoff_initial_s=0.02, backoff_max_s=0.05)
    await reporter.start()
    t0 = time.perf_counter()
    for i in range(1_000):
        reporter.report(event(i))
    assert time.perf_counter() - t0 < 0.5  # never waits on Kafka
    await wait_until(lambda: reporter.state().last_error is not None)
    await asyncio.sleep(0.1)
    state = reporter.state()
    assert (state.connected, state.buffered, state.sent, state.dropped) == (False, 1_000, 0, 0)
    assert "unreachable" in caplog.text
    t0 = time.perf_counter()
    await reporter.stop(flush_timeout_s=2)
    assert time.perf_counter() - t0 < 2.5
    assert "unsent=1000" in caplog.text


async def test_bound_exceeded_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    reporter = UsageReporter(DEAD, max_buffer=50)
    for i in range(80):
        reporter.report(event(i))  # not even started: still fine
    state = reporter.state()
    assert (state.buffered, state.dropped) == (50, 30)
    assert "usage reporter buffer full: 1 events dropped" in caplog.text
    # one warning per interval, not one per event
    assert caplog.text.count("usage reporter buffer full") == 1


async def test_resend_after_outage_in_order() -> None:
    broker = Broker(fail_starts=3, fail_sends=5)
    reporter = UsageReporter(DEAD, producer_factory=broker.factory, backoff_initial_s=0.01, max_batch=20)
    await reporter.start()
    for i in range(100):
        reporter.report(event(i, key=f"short_{i % 3:024d}"))
    await wait_until(lambda: reporter.state().sent == 100)
    state = reporter.state()
    assert state.connected
    assert state.buffered == 0
    assert state.retried >= 5
    # every event delivered exactly once here (order is not kept across a resend: counts do
    # not depend on it, each event carries its own time)
    ids = [parse_event(v)["request_id"] for _, v in broker.log]
    assert sorted(ids, key=lambda r: int(r[1:])) == [f"r{i}" for i in range(100)]
    assert all(key == parse_event(v)["key_id"].encode() for key, v in broker.log)
    config = broker.configs[-1]
    assert config["enable_idempotence"] is True
    assert config["acks"] == "all"
    assert config["linger_ms"] == 5
    await reporter.stop()


async def test_stop_flushes() -> None:
    broker = Broker()
    reporter = UsageReporter(DEAD, producer_factory=broker.factory)
    await reporter.start()
    for i in range(500):
        reporter.report(event(i))
    await reporter.stop()
    assert len(broker.log) == 500
    assert reporter.state().sent == 500


async def test_stop_retries_a_failed_send_within_its_flush_time() -> None:
    # One delivery fails while stop() flushes: it gave up at the first failure (91 of 100 events
    # lost, logged at INFO only); it retries within its flush time now.
    broker = Broker(fail_sends=1)
    reporter = UsageReporter(DEAD, producer_factory=broker.factory, backoff_initial_s=10.0, max_batch=10)
    for i in range(100):
        reporter.report(event(i))
    await reporter.start()
    await reporter.stop(flush_timeout_s=5)
    assert (len(broker.log), reporter.state().sent, reporter.state().buffered) == (100, 100, 0)


async def test_events_lost_at_stop_are_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    reporter = UsageReporter(DEAD, backoff_initial_s=0.02, backoff_max_s=0.05)
    await reporter.start()
    for i in range(10):
        reporter.report(event(i))
    await reporter.stop(flush_timeout_s=0.5)
    [stopped] = [r for r in caplog.records if "usage reporter stopped" in r.getMessage()]
    assert stopped.levelno == logging.WARNING
    assert "unsent=10" in stopped.getMessage()


async def test_drain_does_not_starve_the_loop() -> None:
    broker = Broker()
    reporter = UsageReporter(DEAD, producer_factory=broker.factory, max_batch=50_000, max_buffer=200_000)
    for i in range(50_000):
        reporter.report(event(i))
    ticks = 0
    gaps: list[float] = []

    async def ticker() -> None:
        nonlocal ticks
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            ticks += 1

    task = asyncio.create_task(ticker())
    await reporter.start()
    await wait_until(lambda: reporter.state().sent == 50_000, within=30)
    task.cancel()
    await reporter.stop()
    assert ticks > 50  # the loop kept turning while the backlog was fed to the producer
    logging.getLogger(__name__).info("max loop gap while draining 50k: %.1f ms", max(gaps) * 1000)
