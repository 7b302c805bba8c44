"""Records fetched before an assignment's seek reach the writer as a batch of their own and are
read again after the seek: the offsets a worker holds, and what it commits to Kafka, never move
backwards, and the records read again are neither counted nor dead-lettered twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from aiokafka import TopicPartition

from schemas.events import dump_event, make_event
from worker.ingest.consumer import PartitionWriter
from worker.ingest.pipeline import BatchOutcome, IngestPipeline, PreparedBatch
from worker.records import Rejection
from worker.settings import Settings


@dataclass
class Record:
    partition: int
    offset: int
    topic: str = "events"
    key: bytes | None = None
    value: bytes | None = None


class FakePipeline:
    """Each batch 'ends' at the highest offset of its records per partition, except records at
    or before the stored offset (replays), as the real scan does."""

    recent = None
    exchange = None

    async def prepare(self, records: list[Record], stored: dict[int, int], *_: Any) -> PreparedBatch:
        offsets: dict[int, int] = {}
        for r in records:
            if r.offset > stored.get(r.partition, -1):
                offsets[r.partition] = max(offsets.get(r.partition, -1), r.offset)
        outcome = BatchOutcome(counted=len(offsets), offsets=offsets)
        return PreparedBatch(outcome, None if not offsets else object(), "t", set(), ((), (), ()))  # type: ignore[arg-type]

    async def write(self, prepared: PreparedBatch, still_owned: Any) -> BatchOutcome:
        await asyncio.sleep(0.01)  # the insert is in flight while the next batch is prepared
        prepared.outcome.written = prepared.rows is not None
        return prepared.outcome


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[int, int]] = []

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append({tp.partition: meta.offset for tp, meta in offsets.items()})


async def test_a_batch_read_before_the_seek_does_not_pull_offsets_back() -> None:
    consumer = FakeConsumer()
    writer = PartitionWriter("events", FakePipeline(), None, lambda: consumer, lambda: 1)  # type: ignore[arg-type]
    writer.owned = {0}
    writer.stored_offsets = {0: 99}
    # Fetched from Kafka's (lagging) committed offset before the seek: 90..159.
    await writer.handle([Record(0, o) for o in range(90, 160)])
    # After the seek to 100: read again from there, a shorter batch, then one all replays.
    await writer.handle([Record(0, o) for o in range(100, 130)])
    await writer.handle([Record(0, o) for o in range(130, 160)])
    await writer.flush()
    assert writer.stored_offsets == {0: 159}
    assert consumer.commits[-1] == {0: 160}
    seen = [c[0] for c in consumer.commits]
    assert seen == sorted(seen), f"commits went backwards: {seen}"


class MemoryStore:
    """The store side of the real pipeline, in memory: what was written, nothing stored before."""

    def __init__(self) -> None:
        self.written: list[pa.Table] = []

    def seen_hashes(self, minutes: object, hashes: object) -> set[int]:
        return set()

    def write(self, rows: pa.Table, token: str) -> None:
        self.written.append(rows)


def event_record(offset: int, now: datetime) -> Record:
    ev = make_event(
        request_id=f"r{offset}", key_id="k1", node_id="n1", method="GET", endpoint="/v0/x", status=200, ts=now
    )
    return Record(0, offset, key=b"k1", value=dump_event(ev))


async def test_records_read_again_after_the_seek_are_neither_counted_nor_dead_lettered_twice() -> None:
    now = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)
    dead: list[Rejection] = []

    async def sink(rejection: Rejection, value: bytes, headers: object) -> None:
        dead.append(rejection)

    store = MemoryStore()
    pipeline = IngestPipeline(Settings(events_topic="events"), store, sink, clock=now.timestamp)  # type: ignore[arg-type]
    consumer = FakeConsumer()
    writer = PartitionWriter("events", pipeline, store, lambda: consumer, lambda: 1)  # type: ignore[arg-type]
    writer.owned = {0}
    writer.stored_offsets = {0: 99}
    writer._taken = {0: 99}  # as the assignment leaves them

    def fetched(first: int, last: int) -> list[Record]:
        return [
            Record(0, 120, key=b"k1", value=b"{not json") if o == 120 else event_record(o, now)
            for o in range(first, last + 1)
        ]

    await writer.handle(fetched(90, 159))  # from Kafka's lagging commit, before the seek
    await writer.handle(fetched(100, 129))  # after the seek to 100: the same records again
    await writer.handle(fetched(130, 170))
    await writer.flush()

    assert [(r.offset, r.reason) for r in dead] == [(120, "invalid_json")]
    assert writer.stats.counted == 70  # 100..170 less the bad one, each once
    assert writer.stats.duplicates == 0
    assert writer.stored_offsets == {0: 170}
    assert consumer.commits[-1] == {0: 171}
