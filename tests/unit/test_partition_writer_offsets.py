"""The stored offsets a worker holds, and what it commits to Kafka, never move backwards.

Records fetched before an assignment's seek reach the writer as a batch of their own and are
read again after the seek, so a later batch can end lower in a partition than the one before.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from worker.ingest.consumer import PartitionWriter
from worker.ingest.pipeline import BatchOutcome, PreparedBatch


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
