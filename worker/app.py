"""FastStream wiring of the metering worker: one batch subscriber on the events topic,
publishers for the DLQ and decisions, clients opened in the lifespan."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import uvicorn
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from faststream import AckPolicy, FastStream
from faststream.kafka.annotations import KafkaMessage
from starlette.routing import Mount

from common import kafka_clients
from common.listen import listening_socket
from worker.analytics.api import build_query_app
from worker.dsn import redact_dsn
from worker.faststream_batch import raw_batch_parser, raw_decoder
from worker.ingest.consumer import PartitionWriter
from worker.ingest.dlq import dead_letter_key, record_id, send_or_skip
from worker.ingest.pipeline import IngestPipeline
from worker.ingest.recent_hashes import RecentHashes
from worker.kafka_ready import wait_for_group_coordinator
from worker.limits.guard_runner import GuardRunner
from worker.limits.guards import GuardRules
from worker.limits.service import LimitService
from worker.listening import WorkerEndpoint, announce, withdraw
from worker.notify.deliver import WebhookDeliverer
from worker.observability import HealthCheck, WorkerMetrics, build_health_app
from worker.records import Rejection, RowExchange
from worker.settings import Settings
from worker.store.client import connect
from worker.store.decisions import DecisionStore
from worker.store.migrations import migrate
from worker.store.retention import ensure_dedup_memory
from worker.store.rollup import RollupStore
from worker.topics import ensure_topics

log = logging.getLogger("worker")


# After start-up: objects alive then (modules, clients, settings) are frozen out of the cyclic
# GC, and gen0 runs every 500k net allocations instead of 700. A 20k-record batch holds ~100k
# tracked objects; with the defaults the collector rescanned them (and everything else)
# dozens of times per batch: ~9 s per 1M events, a quarter of the worker's time; at 50k it
# still caught each batch alive (~1.5 s per 1M; 500k: 0.1-0.3 s, bench/results.md). Only
# cyclic garbage waits for it: the rest is freed by reference counting.
GC_THRESHOLDS = (500_000, 20, 100)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class WorkerRuntime:
    """Everything one worker process holds; built once from settings."""

    def __init__(
        self, settings: Settings, store: RollupStore | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.clock = clock
        # acks=all: a block, an allowance or a dead letter is acknowledged once every in-sync
        # replica has it (min.insync.replicas holds); acks=1, FastStream's default, loses it with
        # the leader. Not idempotent: its batches would never expire while the broker is away
        # (stop would hang); one request in flight per broker keeps each partition in order.
        self.broker = kafka_clients.broker(settings, logger=log, log_level=logging.DEBUG, acks="all")
        self._store = store
        self.consumer: PartitionWriter | None = None
        self.limits: LimitService | None = None
        self.guards: GuardRunner | None = None
        self.dead_letters_dropped = 0  # records the DLQ refused (logged with their place)
        self._http_server: uvicorn.Server
        self.subscriber = self.broker.subscriber(
            settings.events_topic,
            group_id=settings.consumer_group,
            batch=True,
            max_records=settings.batch_max_records,
            batch_timeout_ms=settings.batch_timeout_ms,
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.MANUAL,
            listener=_DeferredListener(self),
            decoder=raw_decoder,
            parser=raw_batch_parser(self.kafka_consumer),
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            fetch_min_bytes=settings.ingest_fetch_min_bytes,
            fetch_max_wait_ms=settings.ingest_fetch_max_wait_ms,
            max_poll_interval_ms=600_000,
            session_timeout_ms=settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
        )
        self.subscriber(self._on_batch)
        self.app = FastStream(self.broker, lifespan=self._lifespan, logger=log, on_shutdown=[self._flush])

    @property
    def store(self) -> RollupStore:
        if self._store is None:
            raise RuntimeError("store not open yet")
        return self._store

    def kafka_consumer(self) -> AIOKafkaConsumer | None:
        return getattr(self.subscriber, "consumer", None)

    async def _flush(self) -> None:
        """Let the write in flight land (and be committed) before the consumer stops, and stop
        the limits while the broker can still publish (a decision being published when the
        broker is gone would be retried for ever)."""
        if self.consumer is not None:
            await self.consumer.flush()
        if self.guards is not None:
            await self.guards.stop()  # they publish through the limits
        if self.limits is not None:
            await self.limits.stop()

    async def _on_batch(self, body: Any, message: KafkaMessage) -> None:
        assert self.consumer is not None
        await self.consumer.handle(message.raw_message)

    async def _dead_letter(self, rejection: Rejection, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        place = record_id(rejection.topic, rejection.partition, rejection.offset)

        async def publish() -> None:
            key, text_headers = dead_letter_key(rejection), {k: v.decode() for k, v in headers}
            await self.broker.publish(value, self.settings.dlq_topic, key=key, headers=text_headers)

        if not await send_or_skip(publish, place, rejection.reason):
            self.dead_letters_dropped += 1

    async def _send(self, topic: str, key: str, value: bytes) -> None:
        await self.broker.publish(value, topic, key=key.encode())

    def _stored_offsets(self) -> dict[int, int]:
        return dict(self.consumer.stored_offsets) if self.consumer is not None else {}

    def _partition_count(self) -> int:
        consumer = self.kafka_consumer()
        found = consumer.partitions_for_topic(self.settings.events_topic) if consumer is not None else None
        return len(found) if found else self.settings.events_partitions

    def open(self) -> None:
        """Open ClickHouse, apply migrations, build the pipeline (sync: before the loop consumes)."""
        s = self.settings
        if self._store is None:
            client = connect(s.clickhouse_dsn, s.clickhouse_database)
            migrate(client, s)
            ensure_dedup_memory(client, s)  # it must live as long as the horizon this worker accepts
            # A second client for the dedup lookups: they overlap the insert in flight.
            lookups = connect(s.clickhouse_dsn, s.clickhouse_database)
            self._store = RollupStore(client, s.clickhouse_database, lookup_client=lookups)
        audit = DecisionStore(self.store.client, s.clickhouse_database)
        self.limits = LimitService(
            s, self.store, audit, self._send, self._partition_count, self._stored_offsets, self.clock
        )
        pipeline = IngestPipeline(s, self.store, self._dead_letter, clock=self.clock)
        if s.dedup_cache_max_hashes:
            pipeline.recent = RecentHashes(s.dedup_cache_max_hashes)
        if s.fast_lane_handoff_rows:
            # Both read every record: whichever checks one first spares the other a second parse
            # and validation. Set before the fast lane's first fetch (it starts with the limits).
            exchange = RowExchange(s.fast_lane_handoff_rows)
            pipeline.use_exchange(exchange)
            self.limits.fast_lane.use_exchange(exchange)
        self.consumer = PartitionWriter(
            s.events_topic,
            pipeline,
            self.store,
            self.kafka_consumer,
            self._partition_count,
            s.dedup_horizon_hours * 3600,
        )
        self.consumer.on_assigned.append(self.limits.on_assigned)
        self.consumer.on_revoked.append(self.limits.on_revoked)
        self.metrics = WorkerMetrics(self)
        self.health = HealthCheck(self)
        self.consumer.on_batch.append(self.metrics.observe)
        rules = GuardRules.from_settings(s)
        self.guards = GuardRunner(
            rules,
            self.limits.engine,
            # Its own client: the guards' reads run in a thread beside the inserts.
            connect(s.clickhouse_dsn, s.clickhouse_database) if rules.enabled else self.store.client,
            s.clickhouse_database,
            self.limits.operator_decision,
            self.limits.publish_decisions,
            s.guard_interval_seconds,
            self.clock,
        )

    async def _serve_http(self, sock: socket.socket) -> asyncio.Task[None]:
        """/metrics and /health/* on ``sock`` (METER_HTTP_HOST:METER_HTTP_PORT), and the query API
        and dashboard when an admin key is configured: on the embedded store no other process
        can read the data while the worker holds it."""
        s = self.settings
        app = build_health_app(self, self.metrics, self.health)
        serves_api = bool(s.admin_api_key.get_secret_value())
        if serves_api:
            assert self.limits is not None
            # Its own client: queries run in threads beside the inserts, never on their client.
            queries = await asyncio.to_thread(connect, s.clickhouse_dsn, s.clickhouse_database)
            app.router.routes.append(Mount("", app=build_query_app(s, queries, self.limits.policies.resolve)))
        server = uvicorn.Server(
            uvicorn.Config(
                app, host=s.http_host, port=s.http_port, log_level="warning", access_log=False, lifespan="off"
            )
        )
        self._http_server = server
        task = asyncio.create_task(server.serve(sockets=[sock]), name="worker-http")
        for _ in range(100):
            if server.started or task.done():
                break
            await asyncio.sleep(0.05)
        if task.done():
            raise RuntimeError(f"cannot serve /metrics on {s.http_host}:{s.http_port}: {task.exception()}")
        url = f"http://{_local_host(s.http_host)}:{_bound_port(server, s.http_port)}"
        announce(s.clickhouse_dsn, WorkerEndpoint(os.getpid(), url, serves_api))
        if serves_api:
            log.info("query API on %s/v1, dashboard %s/dashboard, metrics and health beside them", url, url)
        else:
            log.info(
                "metrics and health on %s (/metrics, /health/live, /health/ready); no query API: "
                "METER_ADMIN_API_KEY is not set",
                url,
            )
        return task

    async def _stop_http(self, task: asyncio.Task[None]) -> None:
        withdraw(self.settings.clickhouse_dsn)
        self._http_server.should_exit = True
        await task

    @asynccontextmanager
    async def running(self) -> AsyncIterator[WorkerRuntime]:
        """Run the worker inside the caller's event loop (tests, benchmarks, embedding)."""
        async with self._lifespan():
            await self.broker.start()
            try:
                yield self
            finally:
                await self._flush()
                await self.broker.stop()

    @asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        """Start the parts in order; whatever started is stopped, in reverse, on the way out,
        also when a later part fails to start (no consumer left open)."""
        s = self.settings
        # Bound first: a port in use is one error before topics, migrations or consumers exist.
        sock = listening_socket(s.http_host, s.http_port) if s.http_port else None
        async with AsyncExitStack() as started:
            if sock is not None:
                started.callback(sock.close)  # not served yet (uvicorn closes it when it stops)
            await ensure_topics(s)
            await wait_for_group_coordinator(s, s.consumer_group)
            await asyncio.to_thread(self.open)
            log.info(
                "worker starting: kafka %s, topic %s, group %s, clickhouse %s/%s",
                kafka_clients.describe(s),
                s.events_topic,
                s.consumer_group,
                redact_dsn(s.clickhouse_dsn),
                s.clickhouse_database,
            )
            assert self.limits is not None
            assert self.guards is not None
            started.callback(self._log_stopped)
            await self.limits.start()
            started.push_async_callback(self.limits.stop)
            await self.guards.start()
            started.push_async_callback(self.guards.stop)
            # The webhook deliverer beside the worker (METER_NOTIFY_IN_WORKER; else `meter notify`).
            if s.notify_in_worker:
                notifier = WebhookDeliverer(s)
                await notifier.start()
                started.push_async_callback(notifier.stop)
            if sock is not None:
                started.push_async_callback(self._stop_http, await self._serve_http(sock))
            started.push_async_callback(self._flush)  # a write still in flight after the consumer stopped
            tune_gc()
            yield

    def _log_stopped(self) -> None:
        if self.consumer is not None and self.limits is not None:
            log.info(
                "worker stopped: %s; %d decisions published",
                self.consumer.stats.summary(),
                self.limits.engine.decisions_published,
            )


def _local_host(host: str) -> str:
    """How a process on this machine reaches a listener bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else host


def _bound_port(server: uvicorn.Server, configured: int) -> int:
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    return configured


class _DeferredListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Rebalance callbacks forwarded to the runtime's consumer once it exists."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        if self.runtime.consumer is not None:
            await self.runtime.consumer.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        if self.runtime.consumer is not None:
            await self.runtime.consumer.on_partitions_assigned(assigned)
