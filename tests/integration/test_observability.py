"""/metrics and /health/* of a running worker on the real broker and chDB."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.listen import PortUnavailable, listening_socket
from tests.integration.helpers import free_port, wait_for
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import generate, publish
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_and_health_reflect_what_the_worker_did(topics: Settings, clickhouse: Any) -> None:
    from aiokafka import AIOKafkaProducer

    port = free_port()
    settings = topics.model_copy(update={"http_port": port})
    events = list(generate(500))
    await publish(settings.kafka_bootstrap, settings.events_topic, events)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    await producer.send_and_wait(settings.events_topic, b"{broken", key=b"k")
    await producer.stop()

    runtime = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))
    base = f"http://127.0.0.1:{port}"
    async with runtime.running(), httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/health/live")).status_code == 200
        await wait_for(lambda: runtime.consumer is not None and runtime.consumer.stats.consumed >= 501, 30, "drain")
        ready = await http.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert sorted(ready.json()["partitions"]) == list(range(6))
        assert sum(ready.json()["lag"].values()) == 0

        # The batch hooks (the histograms) run after a batch's Kafka commit, once its counts are in
        # the stats the drain waits on: wait for them too.
        async def histograms_seen() -> bool:
            return samples((await http.get("/metrics")).text).get(("meter_batch_size_count", ()), 0) >= 1

        await wait_for(histograms_seen, 10, "the batch hooks")
        m = samples((await http.get("/metrics")).text)
        assert m[("meter_events_counted_total", ())] == 500
        assert m[("meter_events_consumed_total", ())] == 501
        assert m[("meter_events_dead_lettered_total", (("reason", "invalid_json"),))] == 1
        assert m[("meter_partitions_assigned", ())] == 6
        assert m[("meter_batch_size_count", ())] >= 1
        assert m[("meter_store_write_seconds_count", ())] >= 1
        assert m[("meter_live_keys", ())] > 0
        assert runtime.limits is not None
        limits = runtime.limits
        await wait_for(lambda: limits.publisher.waiting() == (0, 0), 10, "decisions and allowances acknowledged")
        m = samples((await http.get("/metrics")).text)
        assert m[("meter_publish_waiting_records", ())] == m[("meter_publish_waiting_keys", ())] == 0
        assert all(v == 0 for (name, _), v in m.items() if name == "meter_consumer_lag")

        # ClickHouse unreachable: readiness says so, with the reason.
        assert runtime.consumer is not None
        runtime.health._clickhouse_checked = 0.0

        def broken(*args: object, **kwargs: object) -> None:
            raise ConnectionError("store down")

        original = runtime.store.client.command
        runtime.store.client.command = broken  # type: ignore[method-assign]
        try:
            not_ready = await http.get("/health/ready")
        finally:
            runtime.store.client.command = original  # type: ignore[method-assign]
        assert not_ready.status_code == 503
        assert "ClickHouse unreachable" in not_ready.json()["reasons"]


async def test_a_port_in_use_fails_the_start_before_anything_is_started(topics: Settings, clickhouse: Any) -> None:
    taken = listening_socket("127.0.0.1", 0)
    taken.listen()
    try:
        port = taken.getsockname()[1]
        runtime = WorkerRuntime(
            topics.model_copy(update={"http_port": port}), store=RollupStore(clickhouse, topics.clickhouse_database)
        )
        with pytest.raises(PortUnavailable, match="Address already in use"):
            async with runtime.running():
                pass
        assert runtime.limits is None  # not opened: no consumer, producer or task to leave behind
    finally:
        taken.close()


async def test_a_part_that_fails_to_start_stops_the_parts_started_before_it(
    topics: Settings, clickhouse: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuses(self: WorkerRuntime, sock: object = None) -> None:
        raise RuntimeError("cannot serve")

    monkeypatch.setattr(WorkerRuntime, "_serve_http", refuses)
    runtime = WorkerRuntime(
        topics.model_copy(update={"http_port": free_port()}), store=RollupStore(clickhouse, topics.clickhouse_database)
    )
    with pytest.raises(RuntimeError, match="cannot serve"):
        async with runtime.running():
            pass
    assert runtime.limits is not None
    assert runtime.guards is not None
    # Stopped, not left running (before: its consumer was reported "Unclosed AIOKafkaConsumer").
    assert runtime.limits.fast_lane._task is None
    assert runtime.limits._ticker is None
