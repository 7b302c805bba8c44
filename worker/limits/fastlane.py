"""The fast decision lane: the owned partitions of the events topic, read as soon as records
arrive, counted for the limits only.

It has its own consumer (no group: it follows the assignment the ingest consumer gets) and
starts each partition right after the offset stored in ClickHouse with the counts the limit
counters were rebuilt from, so every event is counted once. It never waits for the
exactly-once path (its dedup lookup, its ClickHouse write), which keeps its own order.
Records are checked by the same ``Validator`` as the ingest path: what the ingest path
dead-letters, the limits do not count; whichever of the two reads a record first hands the
row it checked to the other (``worker.records.RowExchange``), so each record is parsed and
validated once. Node retries are recognised by their request hash within a bounded memory; a
retry whose first copy it never saw (sent before the partition was assigned here) counts
twice for the limits only, erring towards the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from common import kafka_clients
from common.follower import TopicWatch
from common.kafka_clients import KafkaTarget
from common.recent_set import RecentSet
from common.retry import cancel_and_wait, keep_running
from schemas.limits import route_subject
from worker.limits.engine import NodeReport
from worker.records import ROW_LATENCY, KafkaRecord, RecordChecker, Rejection, RowExchange, Validator

log = logging.getLogger(__name__)

REFUSED = 429  # refused by the limits: counts nothing, but shows where the traffic is


@dataclass
class FastBatch:
    """One fetch, grouped: what the limit engine needs."""

    # (partition, subject, account, minute) -> cost: subject = key id, or key@route (route limits)
    counts: dict[tuple[int, str, str, int], int] = field(default_factory=dict)
    nodes: dict[tuple[int, str], dict[str, NodeReport]] = field(default_factory=dict)
    records: int = 0
    duplicates: int = 0


class RecentRequests(RecentSet[int]):
    """Request hashes seen lately, oldest forgotten past ``max_size``: ``add`` is True if new."""


def group_batch(
    records: Sequence[KafkaRecord], checker: RecordChecker, recent: RecentRequests, now: float
) -> FastBatch:
    """Group a fetch for the limit engine (rows the ingest path checked first are taken from it)."""
    batch = FastBatch(records=len(records))
    counts = batch.counts
    nodes = batch.nodes
    row_of = checker.row
    for record in records:
        row = row_of(record, now)
        if isinstance(row, Rejection):
            continue  # the ingest path dead-letters it
        partition, key_id, account, minute, _, status, node_id, _, _, _, digest, cost, route, epoch, counted, busy = row
        if not recent.add(digest):
            batch.duplicates += 1
            continue
        if cost and status != REFUSED:  # cost 0: refused by a node that could not check the limits
            slot = (partition, key_id, account, minute)
            counts[slot] = counts.get(slot, 0) + cost
            if route:  # the key on its route: a subject of its own (route limits)
                slot = (partition, route_subject(key_id, route), account, minute)
                counts[slot] = counts.get(slot, 0) + cost
        per_node = nodes.setdefault((partition, key_id), {})
        report = per_node.get(node_id)
        if report is None:
            report = per_node[node_id] = NodeReport()
        report.arrivals += 1
        report.first_ts = min(report.first_ts, epoch)
        report.last_ts = max(report.last_ts, epoch)
        # How long the node takes to serve a call (``LimitEngine.node_serving``): calls its API
        # served only. Refusals are answered at once (a node refusing a blocked key would pass
        # for fast), and an event without a duration (an older node) says nothing.
        took_ms = row[ROW_LATENCY]
        if status < 400 and took_ms > 0:
            if took_ms < report.fastest_ms:
                report.fastest_ms = took_ms
            if took_ms > report.slowest_ms:
                report.slowest_ms = took_ms
        if counted is not None:
            # The node's counts as the request ended, in the windows of the request's start:
            # within one minute the highest are the latest, whatever the event times (a request
            # held at a cap and admitted late started before one admitted at once); a later
            # minute replaces them. ``busy``: what of them it was still serving.
            held = report.counts
            this_minute, held_minute = epoch // 60, report.epoch // 60
            if held is None or this_minute > held_minute:
                report.counts = (counted[0], counted[1], counted[2])
                report.epoch = epoch
                report.in_flight = busy
            elif this_minute == held_minute:
                report.counts = (
                    max(held[0], counted[0]),
                    max(held[1], counted[1]),
                    max(held[2], counted[2]),
                )
                report.epoch = max(report.epoch, epoch)
                report.in_flight = busy  # the node's latest word: events come in the order requests end
    return batch


OnBatch = Callable[[FastBatch], Awaitable[None]]


class FastLane:
    """Its own consumer on the owned partitions of the events topic, for the limits only
    (see the module docstring); ``assign`` / ``revoke`` follow the ingest group."""

    def __init__(
        self,
        kafka: KafkaTarget,
        topic: str,
        validator: Validator,
        on_batch: OnBatch,
        *,
        recent_max: int,
        clock: Callable[[], float] = time.time,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.validator = validator
        self.on_batch = on_batch
        self.clock = clock
        self.recent = RecentRequests(recent_max)
        self.consumer_options = consumer_options or {}
        # Rows it checked go to the ingest path; rows the ingest path checked first come from it.
        self.exchange: RowExchange | None = None
        self.checker = RecordChecker(validator, None, None)
        self.positions: dict[int, int | None] = {}  # owned partition -> next offset (None: from the start)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.records = 0

    def use_exchange(self, exchange: RowExchange) -> None:
        """Rows it checked go to the ingest path; rows the ingest path checked first come from it."""
        self.exchange = exchange
        self.checker = RecordChecker(self.validator, exchange.to_fast_lane, exchange.to_ingest)

    def assign(self, partition: int, after_offset: int | None) -> None:
        """Count ``partition`` from just after ``after_offset`` (None: from its beginning)."""
        self.positions[partition] = None if after_offset is None else after_offset + 1
        self._changed.set()

    def revoke(self, partitions: set[int]) -> None:
        for p in partitions:
            self.positions.pop(p, None)
        self._changed.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="limits-fast-lane")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        await keep_running(self._follow, f"fast lane on {self.topic}", 0.2, 5.0)

    async def _follow(self) -> None:
        # The fetch pacing (wait, min bytes) comes from the settings through consumer_options.
        options: dict[str, Any] = {"max_partition_fetch_bytes": 4 * 1024 * 1024}
        options.update(self.consumer_options)
        consumer = kafka_clients.consumer(self.kafka, enable_auto_commit=False, group_id=None, **options)
        await consumer.start()
        watch = TopicWatch(self.kafka, [self.topic])
        try:
            self._changed.set()  # (re)apply the assignment on this consumer
            while True:
                if self._changed.is_set():
                    self._changed.clear()
                    await self._apply(consumer)
                if not self.positions:
                    await self._changed.wait()
                    continue
                fetched = await consumer.getmany(timeout_ms=50, max_records=20_000)
                await watch.raise_if_gone(consumer)
                if self._changed.is_set():
                    # Revoked and assigned again while the fetch (or the watch) waited: its records
                    # may come from the old position, not the new one. Apply the assignment, fetch
                    # again. No await from here until the positions are taken.
                    continue
                records = [r for tp, rs in fetched.items() if tp.partition in self.positions for r in rs]
                if not records:
                    continue
                for tp, rs in fetched.items():
                    if tp.partition in self.positions and rs:
                        self.positions[tp.partition] = rs[-1].offset + 1
                batch = group_batch(records, self.checker, self.recent, self.clock())
                self.records += len(records)
                await self.on_batch(batch)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _apply(self, consumer: AIOKafkaConsumer) -> None:
        tps = [TopicPartition(self.topic, p) for p in sorted(self.positions)]
        consumer.assign(tps)
        fresh = [tp for tp in tps if self.positions[tp.partition] is None]
        for tp in tps:
            position = self.positions[tp.partition]
            if position is not None:
                consumer.seek(tp, position)
        if fresh:
            await consumer.seek_to_beginning(*fresh)
        if tps:
            log.info("fast lane counting partitions %s", {tp.partition: self.positions[tp.partition] for tp in tps})
