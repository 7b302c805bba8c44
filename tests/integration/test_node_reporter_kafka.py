"""Usage reporter against the real broker: every event arrives, as produced, keyed by key id."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from node.reporter import UsageReporter
from schemas.events import RequestEvent, dump_event, make_event, parse_event
from tests.integration.helpers import BrokerProxy, read_topic, route_through
from worker.settings import Settings

pytestmark = pytest.mark.kafka


def events(n: int, keys: int = 37) -> list[RequestEvent]:
    t0 = datetime.now(UTC).replace(microsecond=0)
    return [
        make_event(
            request_id=f"req-{i:06d}",
            key_id=f"cfxkey_{i % keys:024x}",
            node_id="node-it",
            method="GET" if i % 4 else "POST",
            endpoint="/v0/payments",
            status=200 if i % 10 else 429,
            ts=t0 + timedelta(milliseconds=i),
            account_id=f"acct-{i % 5}",
            latency_ms=1.25,
            client_ip="198.51.100.4",
            bytes_out=512,
        )
        for i in range(n)
    ]


async def test_delivers_every_event_as_produced(topics: Settings) -> None:
    produced = events(5_000)
    reporter = UsageReporter(topics)
    await reporter.start()
    t0 = time.perf_counter()
    for ev in produced:
        reporter.report(ev)
    assert time.perf_counter() - t0 < 1.0  # report() is only an append
    records = await read_topic(topics, topics.events_topic, len(produced), timeout=30)
    await reporter.stop()

    assert len(records) == len(produced)
    assert sorted(r.value for r in records) == sorted(dump_event(e) for e in produced)
    partitions_of_key: dict[bytes, set[int]] = defaultdict(set)
    for r in records:
        assert r.key == parse_event(r.value)["key_id"].encode()
        partitions_of_key[r.key].add(r.partition)
    assert all(len(p) == 1 for p in partitions_of_key.values())  # one key, one partition
    assert len({p for ps in partitions_of_key.values() for p in ps}) > 1  # spread over partitions
    state = reporter.state()
    assert (state.sent, state.dropped, state.buffered, state.invalid) == (5_000, 0, 0, 0)


async def test_buffers_through_an_outage_then_delivers(topics: Settings) -> None:
    """The first producers cannot reach Kafka (as if it were down); events wait, then all arrive."""
    attempts = 0

    def flaky_factory(**config: Any) -> AIOKafkaProducer:
        nonlocal attempts
        attempts += 1
        if attempts <= 3:
            config = {**config, "bootstrap_servers": "127.0.0.1:1"}
        return AIOKafkaProducer(**config)

    produced = events(300)
    reporter = UsageReporter(topics, producer_factory=flaky_factory, backoff_initial_s=0.05)
    await reporter.start()
    for ev in produced[:200]:
        reporter.report(ev)
    await asyncio.sleep(0.05)
    assert not reporter.state().connected
    assert reporter.state().buffered == 200
    for ev in produced[200:]:
        reporter.report(ev)
    records = await read_topic(topics, topics.events_topic, len(produced), timeout=30)
    await reporter.stop()
    assert attempts == 4
    assert sorted(r.value for r in records) == sorted(dump_event(e) for e in produced)


async def test_stop_flushes_pending(make_settings: Any, topics: Settings) -> None:
    reporter = UsageReporter(topics)
    await reporter.start()
    produced = events(1_000)
    for ev in produced:
        reporter.report(ev)
    await reporter.stop()  # must not lose what was queued
    assert reporter.state().sent == 1_000
    records = await read_topic(topics, topics.events_topic, len(produced), timeout=10)
    assert len(records) == 1_000


@pytest.mark.parametrize("outage", ["cut", "partition"])
async def test_a_broker_gone_after_the_connection_shows_in_the_health_and_stop_returns(
    topics: Settings, monkeypatch: pytest.MonkeyPatch, outage: str
) -> None:
    """An idempotent producer retries a batch until it is acknowledged (aiokafka never expires
    it). Before: with the broker gone after the connection, the health said connected with no
    error for as long as the outage lasted, and stop(flush_timeout_s=2) hung until it ended."""
    host, port = topics.kafka_bootstrap.rsplit(":", 1)
    proxy = await BrokerProxy((host, int(port))).start()
    route_through(monkeypatch, proxy)
    through = topics.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{proxy.port}"})
    reporter = UsageReporter(through, request_timeout_ms=1_000, backoff_max_s=0.5)
    produced = events(20)
    await reporter.start()
    try:
        for event in produced[:10]:
            reporter.report(event)
        for _ in range(100):
            if reporter.state().sent == 10:
                break
            await asyncio.sleep(0.1)
        assert reporter.state().sent == 10
        if outage == "cut":  # connections reset, new ones refused
            await proxy.cut()
        else:  # connections open, nothing gets through (found by a review: the close had no bound)
            proxy.frozen = True
        for event in produced[10:]:
            reporter.report(event)
        await asyncio.sleep(4.0)  # two request timeouts, and some
        state = reporter.state()
        assert not state.connected
        assert state.last_error is not None
        assert state.buffered == 10  # kept, to be sent again
    finally:
        started = time.monotonic()
        await asyncio.wait_for(reporter.stop(flush_timeout_s=2.0), 30)
        stopped_in = time.monotonic() - started
        await proxy.cut()
    assert stopped_in < 2.0 + 3 * 2.0 + 1.0  # the flush time, the producer's close steps
    assert reporter.state().buffered == 10  # reported as unsent, not lost without a word
