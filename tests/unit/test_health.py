"""Readiness rules with a fake runtime: assignment, progress, store reachability."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

from worker import observability
from worker.ingest.consumer import IngestStats
from worker.observability import HealthCheck
from worker.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeKafka:
    def __init__(self, high: int) -> None:
        self.high = high

    def highwater(self, tp: Any) -> int:
        return self.high


def runtime(owned: set[int], stored_offsets: dict[int, int], high: int, last_batch_at: float) -> Any:
    stats = IngestStats()
    stats.last_batch_at = last_batch_at
    consumer = SimpleNamespace(owned=owned, stored_offsets=stored_offsets, stats=stats)
    store = SimpleNamespace(client=SimpleNamespace(command=lambda sql: 1))
    settings = Settings(ready_unassigned_grace_seconds=60, ready_stall_seconds=30)
    rt = SimpleNamespace(settings=settings, consumer=consumer, store=store)
    rt.kafka_consumer = lambda: FakeKafka(high)
    return rt


async def test_ready_when_assigned_and_caught_up() -> None:
    clock = FakeClock()
    health = HealthCheck(runtime({0, 1}, {0: 9, 1: 9}, 10, clock.now), clock)
    r = await health.readiness()
    assert r.ready
    assert r.lag == {0: 0, 1: 0}


async def test_not_ready_without_partitions_past_the_grace_period() -> None:
    clock = FakeClock()
    health = HealthCheck(runtime(set(), {}, 0, 0.0), clock)
    assert (await health.readiness()).ready  # just started: a rebalance may be under way
    clock.now += 61
    r = await health.readiness()
    assert not r.ready
    assert "no partitions assigned" in r.reasons[0]


async def test_not_ready_when_lag_grows_and_nothing_is_written() -> None:
    clock = FakeClock()
    rt = runtime({0}, {0: 9}, 500, clock.now)
    health = HealthCheck(rt, clock)
    clock.now += 31
    r = await health.readiness()
    assert not r.ready
    assert r.lag == {0: 490}
    assert "no batch for 31s" in r.reasons[0]
    rt.consumer.stats.last_batch_at = clock.now  # progress again
    assert (await health.readiness()).ready


async def test_idle_without_lag_is_ready() -> None:
    clock = FakeClock()
    health = HealthCheck(runtime({0}, {0: 9}, 10, clock.now), clock)
    clock.now += 3600
    assert (await health.readiness()).ready


async def test_a_hung_store_is_probed_by_one_thread_at_a_time(monkeypatch: Any) -> None:
    # Each readiness check past the interval started a probe; on a hung server their threads
    # piled up in the pool the inserts run in.
    monkeypatch.setattr(observability, "CLICKHOUSE_PROBE_TIMEOUT_S", 0.05)
    answer = threading.Event()
    probes: list[str] = []

    def hung(sql: str) -> int:
        probes.append(sql)
        answer.wait(5)
        return 1

    clock = FakeClock()
    rt = runtime({0}, {0: 9}, 10, clock.now)
    rt.store = SimpleNamespace(client=SimpleNamespace(command=hung))
    health = HealthCheck(rt, clock)
    for _ in range(5):
        clock.now += observability.CLICKHOUSE_CHECK_INTERVAL
        assert not await health.clickhouse_ok()
    assert probes == ["SELECT 1"]
    answer.set()  # the server answers again: the next interval's probe says so
    await asyncio.sleep(0.1)
    clock.now += observability.CLICKHOUSE_CHECK_INTERVAL
    assert await health.clickhouse_ok()
    assert len(probes) == 2
