"""Read a (compacted) topic from the beginning without a consumer group, then follow it.

Used by the worker for the decisions topic (audit, operator blocks, versions) and the
limits topic (overrides). ``ready`` is set once the end offsets seen at start are reached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from aiokafka import TopicPartition
from pydantic import BaseModel, ValidationError

from common import kafka_clients
from common.kafka_clients import KafkaTarget
from worker.retry import cancel_and_wait, keep_running

log = logging.getLogger(__name__)

OnRecords = Callable[[list[Any]], Awaitable[None]]
M = TypeVar("M", bound=BaseModel)


def valid_records(records: Iterable[Any], model: type[M]) -> Iterator[M]:
    """The records' values as ``model``: tombstones skipped, bad ones logged with where they are."""
    for record in records:
        if record.value is None:
            continue
        try:
            yield model.model_validate_json(record.value)
        except ValidationError as exc:
            log.error("bad %s at %s[%d]@%d: %s", model.__name__, record.topic, record.partition, record.offset, exc)


class TopicFollower:
    def __init__(self, kafka: KafkaTarget, topic: str, on_records: OnRecords, name: str, quiet: bool = False) -> None:
        self.quiet = quiet
        self.kafka = kafka
        self.topic = topic
        self.on_records = on_records
        self.name = name
        self.ready = asyncio.Event()
        self.records_seen = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"follow-{self.topic}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        await keep_running(self._follow, f"{self.name}: following {self.topic}", 0.5, 10.0)

    async def _follow(self) -> None:
        consumer = kafka_clients.consumer(
            self.kafka,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            isolation_level="read_committed",
        )
        try:
            await consumer.start()
            consumer._client.add_topic(self.topic)
            await consumer._client.force_metadata_update()
            parts = sorted(consumer._client.cluster.partitions_for_topic(self.topic) or set())
            if not parts and self.topic in consumer._client.cluster.unauthorized_topics:
                raise RuntimeError(f"topic {self.topic}: not authorized for this principal (Kafka ACLs)")
            if not parts:
                raise RuntimeError(f"topic {self.topic} not found")
            tps = [TopicPartition(self.topic, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            pending = {tp for tp in tps if end[tp] > 0}
            if not pending:
                self._mark_ready()
            while True:
                batches = await consumer.getmany(timeout_ms=100, max_records=5000)
                for tp, records in batches.items():
                    self.records_seen += len(records)
                    await self.on_records(records)
                    if tp in pending and records[-1].offset + 1 >= end[tp]:
                        pending.discard(tp)
                if pending and not batches:
                    pending = {tp for tp in pending if await consumer.position(tp) < end[tp]}
                if not pending and not self.ready.is_set():
                    self._mark_ready()
        finally:
            await consumer.stop()

    def _mark_ready(self) -> None:
        self.ready.set()
        level = logging.DEBUG if self.quiet else logging.INFO
        log.log(level, "%s: caught up with %s (%d records)", self.name, self.topic, self.records_seen)


class TopicUnavailable(Exception):
    """A one-shot read could not reach a topic (missing, or the broker is unreachable)."""


async def read_to_end(kafka: KafkaTarget, topic: str, timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic`` up to its end now (for one-shot readers such as the CLI).

    One attempt, no retries: a missing topic or an unreachable broker is ``TopicUnavailable``
    at once (or after ``timeout_s``), for the caller to say in one line."""
    records: list[Any] = []

    async def collect(batch: list[Any]) -> None:
        records.extend(batch)

    follower = TopicFollower(kafka, topic, collect, "reader", quiet=True)
    reading = asyncio.create_task(follower._follow())
    caught_up = asyncio.create_task(follower.ready.wait())
    try:
        await asyncio.wait({reading, caught_up}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        read = caught_up.done()
        failure = reading.exception() if reading.done() else None
    finally:
        for task in (reading, caught_up):
            if not task.done():
                await cancel_and_wait(task)
    if read:
        return records
    where = kafka_clients.bootstrap(kafka)
    raise TopicUnavailable(f"cannot read topic {topic} on {where}: {failure or f'not caught up within {timeout_s:g}s'}")
