"""The events consumer's fetches cut into ingest batches (``worker.ingest.batcher``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from worker.ingest.batcher import IngestBatcher
from worker.records import EventRow, KafkaRecord


@dataclass(frozen=True)
class Rec:
    partition: int
    offset: int
    value: bytes | None = b"x" * 10
    key: bytes | None = b"k"
    topic: str = "events"


ROW: EventRow = (0, "k", "", 0, "/", 200, "n", "", 0, 0.0, 1, 1, "", 0.0, None)


class Log:
    """A consumer over fixed partition logs: ``fetch`` reads from each partition's position."""

    def __init__(self, partitions: int, length: int) -> None:
        self.length = length
        self.position = dict.fromkeys(range(partitions), 0)
        self.seeks: list[tuple[int, int]] = []

    def seek(self, partition: int, offset: int) -> None:
        self.seeks.append((partition, offset))
        self.position[partition] = offset

    def fetch(self, per_partition: int) -> list[KafkaRecord]:
        out: list[KafkaRecord] = []
        for p, at in self.position.items():
            end = min(at + per_partition, self.length)
            out += [Rec(p, o) for o in range(at, end)]
            self.position[p] = end
        return out


class Writer:
    def __init__(self) -> None:
        self.batches: list[list[KafkaRecord]] = []
        self.rows: list[list[EventRow | None]] = []
        self.open = asyncio.Event()
        self.open.set()
        self.fail_next = False

    async def __call__(self, batch: list[KafkaRecord], rows: list[EventRow | None]) -> None:
        await self.open.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        self.batches.append(batch)
        self.rows.append(rows)

    def written(self) -> list[tuple[int, int]]:
        return [(r.partition, r.offset) for b in self.batches for r in b]


def batcher(writer: Writer, log: Log, **kw: float) -> IngestBatcher:
    options: dict[str, float] = {"max_records": 4, "max_bytes": 10_000, "max_wait_s": 60.0, "stall_s": 60.0}
    options.update(kw)
    return IngestBatcher(
        writer,
        log.seek,
        max_records=int(options["max_records"]),
        max_bytes=int(options["max_bytes"]),
        max_wait_s=options["max_wait_s"],
        stall_s=options["stall_s"],
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_fetches_are_cut_into_batches_by_count_and_written_in_order() -> None:
    writer, log = Writer(), Log(1, 100)
    b = batcher(writer, log)
    await b.start()
    try:
        await b.receive(log.fetch(3))
        await settle()
        assert writer.batches == []  # 3 < max_records: held
        fetch = log.fetch(3)
        checked: list[EventRow | None] = [None, ROW, None]  # the rows the limits checked valid
        await b.receive(fetch, checked)
        await settle()
        assert writer.written() == [(0, o) for o in range(6)]  # one batch of both fetches
        assert writer.rows == [[None, None, None, None, ROW, None]]  # each record's row beside it
    finally:
        await b.stop()


async def test_a_batch_is_cut_by_bytes_and_by_the_age_of_its_first_record() -> None:
    writer, log = Writer(), Log(1, 100)
    b = batcher(writer, log, max_bytes=15, max_wait_s=0.05)
    await b.start()
    try:
        await b.receive(log.fetch(2))  # 20 bytes >= 15: cut at once
        await settle()
        assert len(writer.batches) == 1
        await b.receive(log.fetch(1))  # 10 bytes: waits for its age
        await settle()
        assert len(writer.batches) == 1
        await asyncio.sleep(0.15)
        assert writer.written() == [(0, 0), (0, 1), (0, 2)]
    finally:
        await b.stop()


async def test_a_slow_writer_holds_the_reader_back_with_bounded_memory() -> None:
    writer, log = Writer(), Log(1, 1000)
    writer.open.clear()
    b = batcher(writer, log)
    await b.start()
    try:
        await b.receive(log.fetch(4))  # taken by the writer (stuck in it)
        await b.receive(log.fetch(4))  # waiting
        await settle()
        blocked = asyncio.create_task(b.receive(log.fetch(4)))  # a second waiting batch: no room
        await asyncio.sleep(0.05)
        assert not blocked.done()
        assert b.held() == 8
        writer.open.set()
        await asyncio.wait_for(blocked, 1)
        await b.flush()
        assert writer.written() == [(0, o) for o in range(12)]
        assert b.dropped == 0
    finally:
        await b.stop()


async def test_a_stuck_writer_does_not_stop_the_reader_and_nothing_is_lost_or_written_twice() -> None:
    """The store is down: the reader (and the limits before it) goes on; what it held is dropped
    and read again from each partition's first dropped record once the writer moves."""
    writer, log = Writer(), Log(2, 60)
    writer.open.clear()
    b = batcher(writer, log, stall_s=0.05)
    await b.start()
    try:
        for _ in range(6):  # 6 fetches of 2 records per partition while the writer is stuck
            await asyncio.wait_for(b.receive(log.fetch(2)), 1)
            await asyncio.sleep(0.03)
        assert b.dropped > 0
        assert b.held() <= 8  # bounded
        writer.open.set()
        while any(at < log.length for at in log.position.values()) or b.held():
            await asyncio.wait_for(b.receive(log.fetch(2)), 1)
            await b.flush()
        assert log.seeks  # read again from the first dropped records
        written = writer.written()
        for p in (0, 1):
            assert [o for q, o in written if q == p] == list(range(60))
    finally:
        await b.stop()


async def test_revoked_partitions_are_dropped_and_a_writer_rewind_seeks_between_fetches() -> None:
    writer, log = Writer(), Log(2, 100)
    b = batcher(writer, log, max_records=100)
    await b.start()
    try:
        await b.receive(log.fetch(3))
        b.discard({1})
        assert {r.partition for r, _ in b._pending} == {0}
        b.reread({0: 1})  # the writer gave up a batch of partition 0 from offset 1
        assert b.held() == 0
        assert log.seeks == []  # not while a fetch may be under way
        await b.receive(log.fetch(3))  # read before the seek: partition 0 not held
        assert log.seeks == [(0, 1)]
        assert {r.partition for r, _ in b._pending} == {1}
        await b.receive(log.fetch(2))
        assert [r.offset for r, _ in b._pending if r.partition == 0] == [1, 2]
    finally:
        await b.stop()


async def test_a_failed_batch_is_read_again_from_its_first_records() -> None:
    writer, log = Writer(), Log(1, 100)
    writer.fail_next = True
    b = batcher(writer, log)
    await b.start()
    try:
        await b.receive(log.fetch(4))
        await settle()
        assert writer.batches == []
        assert log.seeks == [(0, 0)]  # at once: the writer moves on
        await b.receive([Rec(0, o) for o in range(4, 8)])  # fetched before the seek: not held
        assert b.held() == 0
        await b.receive(log.fetch(4))
        await b.flush()
        assert writer.written() == [(0, o) for o in range(4)]
    finally:
        await b.stop()


async def test_a_stuck_writer_with_no_more_traffic_still_reads_the_dropped_records_again() -> None:
    """The seeks follow the writer, not the next fetch: after the last fetch, nothing else
    would bring them."""
    writer, log = Writer(), Log(1, 12)
    writer.open.clear()
    b = batcher(writer, log, stall_s=0.05)
    await b.start()
    try:
        for _ in range(3):
            await asyncio.wait_for(b.receive(log.fetch(4)), 1)
        assert b.dropped == 8  # the two batches waiting behind the stuck one
        assert log.position[0] == 12  # everything fetched
        writer.open.set()
        await settle()
        assert log.seeks == [(0, 4)]
        await b.receive(log.fetch(4))
        await b.receive(log.fetch(4))
        await b.flush()
        assert writer.written() == [(0, o) for o in range(12)]
    finally:
        await b.stop()
