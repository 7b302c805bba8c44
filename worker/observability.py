"""Prometheus metrics and health endpoints of a worker.

Readiness reflects assignment and progress, not just "the process answers": a worker
that lost its partitions, stalls while lag grows, or cannot reach ClickHouse is not ready.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker.ingest.consumer import PartitionWriter
from worker.ingest.pipeline import BatchOutcome
from worker.limits.service import LimitService
from worker.records import RowExchange
from worker.settings import Settings
from worker.store.rollup import RollupStore


class WorkerRuntime(Protocol):
    """What metrics and health read of a running worker (``worker.app.WorkerRuntime``): read
    only, and declared here so this module does not import the app that wires it."""

    settings: Settings
    dead_letters_dropped: int

    @property
    def consumer(self) -> PartitionWriter | None: ...

    @property
    def limits(self) -> LimitService | None: ...

    @property
    def store(self) -> RollupStore: ...

    def kafka_consumer(self) -> AIOKafkaConsumer | None: ...


CLICKHOUSE_PROBE_TIMEOUT_S = 5.0
CLICKHOUSE_CHECK_INTERVAL = 5.0


class WorkerMetrics:
    """One registry per worker runtime (several runtimes can share a test process)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry()
        self.batch_size = Histogram(
            "meter_batch_size",
            "Records per consumed batch",
            buckets=(1, 10, 100, 500, 1000, 5000, 10000, 20000, 50000),
            registry=self.registry,
        )
        self.write_seconds = Histogram(
            "meter_store_write_seconds",
            "Duration of the atomic ClickHouse insert of one batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.registry.register(_StateCollector(runtime))

    async def observe(self, outcome: BatchOutcome) -> None:
        consumed = outcome.counted + outcome.duplicates + sum(outcome.rejected.values()) + outcome.skipped_replayed
        self.batch_size.observe(consumed)
        if outcome.written:
            self.write_seconds.observe(outcome.write_seconds)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


def consumer_lag(runtime: WorkerRuntime) -> dict[int, int]:
    """Per owned partition: records in Kafka after the last written offset."""
    consumer = runtime.kafka_consumer()
    ingest = runtime.consumer
    if consumer is None or ingest is None:
        return {}
    lag = {}
    for p in sorted(ingest.owned):
        high = consumer.highwater(TopicPartition(runtime.settings.events_topic, p))
        if high is not None:
            lag[p] = max(0, high - (ingest.stored_offsets.get(p, -1) + 1))
    return lag


class _StateCollector(Collector):
    """Reads the runtime's counters at scrape time (nothing to keep in sync)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        rt = self.runtime
        ingest = rt.consumer
        if ingest is None:
            return
        s = ingest.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("meter_events_consumed", "Records consumed from the events topic", s.consumed)
        yield counter("meter_events_counted", "Events counted into the rollups", s.counted)
        yield counter("meter_events_duplicate", "Events dropped as duplicate request_id", s.duplicates)
        dlq = CounterMetricFamily("meter_events_dead_lettered", "Records sent to the DLQ", labels=["reason"])
        for reason, n in sorted(s.rejected.items()):
            dlq.add_metric([reason], n)
        yield dlq
        yield counter("meter_batches", "Batches processed", s.batches)
        yield counter(
            "meter_batches_handed_over", "Batches given up after losing their partitions", s.handed_over_batches
        )
        yield counter("meter_store_errors", "Failed ClickHouse calls (each retried)", ingest.pipeline.store_errors)
        lag = GaugeMetricFamily("meter_consumer_lag", "Records not yet written, per partition", labels=["partition"])
        for p, n in consumer_lag(rt).items():
            lag.add_metric([str(p)], n)
        yield lag
        yield GaugeMetricFamily("meter_partitions_assigned", "Partitions this worker owns", value=len(ingest.owned))
        age = time.monotonic() - s.last_batch_at if s.last_batch_at else -1.0
        yield GaugeMetricFamily("meter_last_batch_age_seconds", "Seconds since the last batch (-1: none)", value=age)
        if rt.limits is not None:
            yield from _limit_metrics(rt.limits)
        yield CounterMetricFamily(
            "meter_dead_letters_dropped", "Rejected records the DLQ refused (logged, skipped)", rt.dead_letters_dropped
        )


def _limit_metrics(limits: LimitService) -> Iterator[Any]:
    """The limit side's state: keys, blocks, what was published and what waits."""
    engine = limits.engine
    yield GaugeMetricFamily("meter_live_keys", "Keys with live window counters", value=engine.live_keys())
    yield GaugeMetricFamily("meter_blocked_keys", "Keys this worker holds blocked", value=len(engine.blocks))
    published = CounterMetricFamily("meter_decisions_published", "Decisions published", labels=["action"])
    for action, n in engine.published_by_action.items():
        published.add_metric([action], n)
    yield published
    lane = limits.fast_lane
    yield CounterMetricFamily("meter_fast_lane_records", "Records counted by the limits' fast lane", lane.records)
    if lane.exchange is not None:
        yield from _exchange_metrics(lane.exchange)
    yield CounterMetricFamily("meter_allowances_published", "Allowance records published", limits.allowances_published)
    keys_waiting, records_waiting = limits.publisher.waiting()
    yield GaugeMetricFamily(
        "meter_publish_waiting_records",
        "Decision and allowance records queued or being sent, not acknowledged yet",
        records_waiting,
    )
    yield GaugeMetricFamily("meter_publish_waiting_keys", "Keys with such records", keys_waiting)
    _, notifications_waiting = limits.notifier.waiting()
    yield GaugeMetricFamily(
        "meter_notifications_waiting",
        "Notifications queued or being sent, not acknowledged yet",
        notifications_waiting,
    )
    yield GaugeMetricFamily("meter_hot_keys", "Keys whose remainder is divided among nodes", len(engine.hot))
    yield CounterMetricFamily(
        "meter_key_account_changes", "Keys whose events named another account", engine.account_changes
    )


def _exchange_metrics(exchange: RowExchange) -> Iterator[Any]:
    """Records one reader took checked from the other (found) or checked itself (not found)."""
    taken = CounterMetricFamily(
        "meter_checked_rows_taken", "Records a reader took checked by the other reader", labels=["reader", "found"]
    )
    held = GaugeMetricFamily("meter_checked_rows_held", "Checked rows waiting for a reader", labels=["reader"])
    for reader, rows in (("ingest", exchange.to_ingest), ("fast_lane", exchange.to_fast_lane)):
        taken.add_metric([reader, "yes"], rows.hits)
        taken.add_metric([reader, "no"], rows.misses)
        held.add_metric([reader], rows.size)
    yield taken
    yield held


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass
class Readiness:
    ready: bool
    reasons: list[str]
    partitions: list[int]
    lag: dict[int, int]


class HealthCheck:
    def __init__(self, runtime: WorkerRuntime, clock: Any = time.monotonic) -> None:
        self.runtime = runtime
        self.clock = clock
        self.started = clock()
        self.unassigned_since: float | None = self.started
        self._clickhouse_ok = True
        self._clickhouse_checked = 0.0
        self._probe: asyncio.Task[Any] | None = None

    async def clickhouse_ok(self) -> bool:
        """Whether the store answered ``SELECT 1`` within ``CLICKHOUSE_PROBE_TIMEOUT_S`` (asked at
        most once per ``CLICKHOUSE_CHECK_INTERVAL``). One probe at a time: a thread stuck on a hung
        server cannot be stopped, and one new probe per interval would fill the thread pool the
        inserts run in."""
        now = self.clock()
        if now - self._clickhouse_checked >= CLICKHOUSE_CHECK_INTERVAL:
            self._clickhouse_checked = now
            if self._probe is not None and not self._probe.done():
                self._clickhouse_ok = False  # the last probe still has no answer
                return False
            self._probe = asyncio.create_task(asyncio.to_thread(self.runtime.store.client.command, "SELECT 1"))
            self._probe.add_done_callback(_retrieved)  # a late failure is not "never retrieved"
            try:
                # Shielded: a timeout leaves the probe running (its thread does anyway) until it ends.
                await asyncio.wait_for(asyncio.shield(self._probe), CLICKHOUSE_PROBE_TIMEOUT_S)
                self._clickhouse_ok = True
            except Exception:
                self._clickhouse_ok = False
        return self._clickhouse_ok

    async def readiness(self) -> Readiness:
        rt, s = self.runtime, self.runtime.settings
        now = self.clock()
        reasons = []
        ingest = rt.consumer
        owned = sorted(ingest.owned) if ingest else []
        if owned:
            self.unassigned_since = None
        elif self.unassigned_since is None:
            self.unassigned_since = now
        if not owned and self.unassigned_since is not None:
            idle = now - self.unassigned_since
            if idle > s.ready_unassigned_grace_seconds:
                reasons.append(f"no partitions assigned for {idle:.0f}s")
        lag = consumer_lag(rt)
        if ingest is not None and sum(lag.values()) > 0:
            last = ingest.stats.last_batch_at or self.started
            if now - last > s.ready_stall_seconds:
                reasons.append(f"lag {sum(lag.values())} but no batch for {now - last:.0f}s")
        if not await self.clickhouse_ok():
            reasons.append("ClickHouse unreachable")
        return Readiness(not reasons, reasons, owned, lag)


def build_health_app(runtime: WorkerRuntime, metrics: WorkerMetrics, health: HealthCheck) -> Starlette:
    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> JSONResponse:
        r = await health.readiness()
        body = {"ready": r.ready, "reasons": r.reasons, "partitions": r.partitions, "lag": r.lag}
        return JSONResponse(body, status_code=200 if r.ready else 503)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(
        routes=[
            Route("/health/live", live),
            Route("/health/ready", ready),
            Route("/metrics", prometheus),
        ]
    )
