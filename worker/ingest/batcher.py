"""The events consumer's fetches cut into ingest batches, written in order on a task of their own.

The worker reads the events topic once: each fetch is counted for the limits as it arrives
(by the caller, before ``receive``) and held here until it is part of a batch worth an insert
(``max_records``, ``max_bytes``, or its first record ``max_wait_s`` old). One task hands the
batches to the writer (``PartitionWriter.handle``) in order, so the limits never wait for a
dedup lookup or an insert.

Memory is bounded: at most one cut batch waits while the writer handles the one before it;
past that ``receive`` waits for the writer. A writer stuck longer than ``stall_s`` (a store
outage: the insert is retried until it lands) must not stop the limits either: what is held
is then dropped, and each partition it came from is read again from its first dropped record
once the writer moves again (a seek; what a fetch from before it still brings is not held).
Nothing is lost: a record
is written only from a batch, and the offsets stored with the counts say where each partition
resumes; the limits skip what they counted already (``FastLane.positions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence

from common.retry import cancel_and_wait
from worker.records import EventRow, KafkaRecord

log = logging.getLogger(__name__)

Held = tuple[KafkaRecord, EventRow | None]  # a record, and its row if the limits checked it valid
Write = Callable[[list[KafkaRecord], list[EventRow | None]], Awaitable[object]]
Seek = Callable[[int, int], None]  # (partition, offset): where the consumer reads it next
MAX_WAITING = 1  # cut batches waiting while the writer handles one


class IngestBatcher:
    """Fetches in, ordered batches out (see the module docstring)."""

    def __init__(
        self,
        write: Write,
        seek: Seek,
        *,
        max_records: int,
        max_bytes: int,
        max_wait_s: float,
        stall_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write = write
        self.seek = seek
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_wait_s = max_wait_s
        self.stall_s = stall_s
        self.clock = clock
        self._pending: list[Held] = []
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._waiting: deque[list[Held]] = deque()
        self._handling_since: float | None = None  # the writer's current batch started then
        # Partition -> first offset not held: read again from there once the writer moves.
        self._reread: dict[int, int] = {}
        # Partition -> offset it was sought to, whose record has not arrived yet.
        self._expect: dict[int, int] = {}
        self._work = asyncio.Event()  # a batch waits for the writer
        self._progress = asyncio.Event()  # the writer took or finished a batch
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0  # records dropped while the writer was stuck (read again later)
        self.batches = 0

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="ingest-batches"),
            asyncio.create_task(self._cut_when_old(), name="ingest-batch-timer"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await cancel_and_wait(task)

    async def receive(self, records: Sequence[KafkaRecord], rows: Sequence[EventRow | None] | None = None) -> None:
        """Hold one fetch, already counted for the limits, with the rows they checked (None: not
        checked, or not valid; aligned with ``records``); may wait for the writer to catch up."""
        self._apply_rereads()
        pairs: list[Held] = list(zip(records, rows, strict=True)) if rows is not None else [(r, None) for r in records]
        held = self._not_stale(pairs) if self._reread or self._expect else pairs
        if held:
            if not self._pending:
                self._pending_since = self.clock()
            self._pending.extend(held)
            self._pending_bytes += sum(len(v) for r, _ in held if (v := r.value) is not None)
            if len(self._pending) >= self.max_records or self._pending_bytes >= self.max_bytes:
                self._cut()
        await self._make_room()

    def discard(self, partitions: Collection[int]) -> None:
        """Partitions revoked: what is held of them is not this worker's to write any more."""
        parts = set(partitions)
        for p in parts:
            self._reread.pop(p, None)
            self._expect.pop(p, None)
        self._pending = [h for h in self._pending if h[0].partition not in parts]
        self._pending_bytes = sum(len(v) for r, _ in self._pending if (v := r.value) is not None)
        kept = ([h for h in batch if h[0].partition not in parts] for batch in self._waiting)
        self._waiting = deque(batch for batch in kept if batch)

    def reread(self, offsets: Mapping[int, int]) -> None:
        """Read these partitions again from these offsets (the writer gave a batch up to read it
        again): what is held of them is dropped; the seeks follow when the writer moves."""
        self.discard(offsets)
        for p, offset in offsets.items():
            self._reread[p] = min(offset, self._reread.get(p, offset))

    async def flush(self) -> None:
        """Hand everything held to the writer and wait until it has handled it (shutdown)."""
        if self._pending:
            self._cut()
        while self._tasks and (self._waiting or self._handling_since is not None):
            await self._wait_for_progress(None)

    def held(self) -> int:
        """Records held (pending and cut), not yet handed to the writer."""
        return len(self._pending) + sum(len(b) for b in self._waiting)

    def _cut(self) -> None:
        self._waiting.append(self._pending)
        self._pending = []
        self._pending_bytes = 0
        self._work.set()

    def _stalled(self) -> bool:
        since = self._handling_since
        return since is not None and self.clock() - since > self.stall_s

    def _apply_rereads(self) -> None:
        """Seek the partitions to be read again, unless the writer is still stuck (they would
        only be dropped again). Records of a partition fetched before its seek may still arrive:
        they are not held until the record it was sought to does (``_not_stale``)."""
        if not self._reread or self._stalled():
            return
        for p, offset in sorted(self._reread.items()):
            self.seek(p, offset)
            self._expect[p] = offset
        log.info("reading partitions %s again from offsets %s", sorted(self._reread), self._reread)
        self._reread.clear()

    def _not_stale(self, pairs: list[Held]) -> list[Held]:
        """``records`` but those of a partition waiting to be read again: not sought yet, or
        sought to an offset whose record has not come yet (a fetch from before the seek)."""
        held = []
        for pair in pairs:
            r = pair[0]
            p = r.partition
            if p in self._reread:
                continue
            at = self._expect.get(p)
            if at is not None:
                if r.offset != at:
                    continue
                del self._expect[p]
            held.append(pair)
        return held

    async def _make_room(self) -> None:
        while len(self._waiting) > MAX_WAITING:
            if self._stalled():
                self._drop_held()
                return
            since = self._handling_since
            left = self.stall_s - (self.clock() - since) if since is not None else self.stall_s
            await self._wait_for_progress(max(left, 0.001))

    def _drop_held(self) -> None:
        """The writer is stuck: drop what is held (bounded memory, the limits go on counting),
        to be read again from each partition's first dropped record."""
        count = self.held()
        first = first_offsets(r for batch in (*self._waiting, self._pending) for r, _ in batch)
        self._waiting.clear()
        self._pending = []
        self._pending_bytes = 0
        for p, offset in first.items():
            self._reread[p] = min(offset, self._reread.get(p, offset))
        self.dropped += count
        log.warning(
            "the ClickHouse write has not finished a batch for %.1fs: %d records dropped, to be read again "
            "from %s once it does; the limits go on counting",
            self.clock() - (self._handling_since or self.clock()),
            count,
            dict(sorted(first.items())),
        )

    async def _wait_for_progress(self, timeout: float | None) -> None:
        self._progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), timeout)

    async def _write_forever(self) -> None:
        while True:
            while not self._waiting:
                self._work.clear()
                await self._work.wait()
            batch = self._waiting.popleft()
            self._handling_since = self.clock()
            self._progress.set()
            records = [r for r, _ in batch]
            try:
                await self.write(records, [row for _, row in batch])
                self.batches += 1
            except Exception:
                # Not written: read it again (the writer's own failures rewind it themselves).
                log.exception("an ingest batch failed; reading its partitions again from its first records")
                self.reread(first_offsets(records))
            finally:
                self._handling_since = None
                self._progress.set()
            self._apply_rereads()  # the writer moves: no need to wait for the next fetch

    async def _cut_when_old(self) -> None:
        tick = min(self.max_wait_s / 4, 0.05)
        while True:
            await asyncio.sleep(tick)
            if self._pending and self.clock() - self._pending_since >= self.max_wait_s:
                self._cut()


def first_offsets(records: Iterable[KafkaRecord]) -> dict[int, int]:
    """The first offset of each partition among ``records``."""
    first: dict[int, int] = {}
    for r in records:
        if r.offset < first.get(r.partition, r.offset + 1):
            first[r.partition] = r.offset
    return first
