"""One batch, start to end: validate, dedup, aggregate, dead-letter, write atomically.

Exactly-once comes from three things together: the batch's counts, its dedup memory and
the offsets it covers are one insert (one part, atomic); the consumer seeks to the stored
offsets on assignment; and the insert carries a token derived from the offsets it covers,
so a retry of the same batch after an unknown outcome is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import pyarrow as pa

from common.retry import retry_forever
from worker.ingest.aggregate import BatchAggregate, renders_typical_event, unrenderable
from worker.ingest.client_ips import ClientAddressCounts
from worker.ingest.dlq import dead_letter
from worker.ingest.recent_hashes import RecentHashes
from worker.records import ROW_HASH, EventRow, KafkaRecord, RecordChecker, Rejection, RowExchange, Validator
from worker.settings import Settings
from worker.store.rollup import CLIENT_IPS_CAP, RollupStore

log = logging.getLogger(__name__)

T = TypeVar("T")

DeadLetterSink = Callable[[Rejection, bytes, list[tuple[str, bytes]]], Awaitable[None]]
StillOwned = Callable[[int], bool]


class BatchAbandoned(Exception):
    """The batch was not written and must not be: its partitions belong to another worker now."""


@dataclass
class BatchOutcome:
    """What one batch did; the caller commits ``offsets``."""

    counted: int = 0
    duplicates: int = 0
    skipped_replayed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)
    write_seconds: float = 0.0
    written: bool = False  # the insert landed (False: nothing new to write)


@dataclass
class PreparedBatch:
    """A batch ready to be written: its outcome (counts, offsets) and its one insert."""

    outcome: BatchOutcome
    rows: pa.Table | None  # None: no record of the batch was new, nothing to write
    token: str
    # Request hashes the batch adds to the dedup memory (a superset is harmless: any hash
    # here is counted in this batch or already stored).
    hashes: Collection[int]
    # (partitions, minutes, hashes) of the events counted: the recent-hash cache takes them
    # once the write has landed.
    entries: tuple[Sequence[int], Sequence[int], Sequence[int]]


@dataclass
class ScannedBatch:
    """One pass over a batch's records (no I/O): what is new, what is not, what is refused."""

    aggregate: BatchAggregate
    rejections: list[Rejection]
    duplicates: int  # repeated within the batch or in the write still in flight
    replayed: int  # read again: written already, or in the write in flight
    hashes: set[int]  # request hashes of the events kept
    rows: list[EventRow]  # the events kept, as scanned (the aggregate's until it drops any)
    kept: list[KafkaRecord]  # the record of each of them


def scan(
    records: Sequence[KafkaRecord],
    checker: RecordChecker,
    stored_offsets: Mapping[int, int],
    in_flight: Collection[int],
    now: float,
) -> ScannedBatch:
    """Sort every record of a batch: replayed, refused, duplicate, or counted (into the
    aggregate). ``checker``: each record's row (taken from the fast lane if it checked the
    record first); ``stored_offsets``: last stored offset per partition; ``in_flight``: request
    hashes of the write that has not landed yet (not in the stored dedup memory for sure)."""
    row_of = checker.row  # looked up once: this loop runs once per event
    last: dict[int, int] = {}
    first: dict[int, int] = {}
    rows: list[EventRow] = []
    kept: list[KafkaRecord] = []
    rejections: list[Rejection] = []
    seen: set[int] = set()
    duplicates = replayed = 0
    for record in records:
        partition = record.partition
        offset = record.offset
        if offset <= stored_offsets.get(partition, -1):
            replayed += 1
            continue
        if offset > last.get(partition, -1):
            last[partition] = offset
        if offset < first.get(partition, offset + 1):
            first[partition] = offset
        row = row_of(record, now)
        if isinstance(row, Rejection):
            rejections.append(row)
            continue
        digest = row[ROW_HASH]
        if digest in seen or digest in in_flight:
            duplicates += 1
            continue
        seen.add(digest)
        rows.append(row)
        kept.append(record)
    return ScannedBatch(BatchAggregate(rows, last, first), rejections, duplicates, replayed, seen, rows, kept)


class IngestPipeline:
    """One batch of the events topic to one atomic insert, in two calls the consumer sequences.

    ``prepare``: sort the records (``scan``, no I/O), then the two waits of a batch: its
    dead letters are published, and its request hashes are checked against the stored dedup
    memory (unless the recent-hash cache can answer) while its rows are rendered.
    ``write``: the insert, retried until it lands or the batch's partitions move away.
    """

    def __init__(
        self,
        settings: Settings,
        store: RollupStore,
        dead_letters: DeadLetterSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.recent: RecentHashes | None = None
        self.addresses = ClientAddressCounts(CLIENT_IPS_CAP)  # loaded on assignment (PartitionWriter)
        self.exchange: RowExchange | None = None  # rows the limits' fast lane checked first, and for it
        self.topic = settings.events_topic
        self.store = store
        self.dead_letters = dead_letters
        self.clock = clock
        self.validator = Validator.from_settings(settings)
        self.checker = RecordChecker(self.validator, None, None)  # see ``use_exchange``
        self.retry_max_seconds = settings.store_retry_max_seconds
        self.store_errors = 0  # failed store calls (each retried), for metrics and readiness

    async def prepare(
        self,
        records: Sequence[KafkaRecord],
        stored_offsets: Mapping[int, int],
        still_owned: StillOwned,
        in_flight: Collection[int] = (),
    ) -> PreparedBatch:
        """Everything up to the insert: sort, dead-letter, dedup against the store, render rows.

        ``stored_offsets``: last offset per partition already written or in the write in flight;
        records at or before it are replays.
        ``in_flight``: request hashes of the batch whose write has not landed yet; they are
        not in the stored dedup memory for sure, so they are checked here as well (a retry
        split across two consecutive batches is counted once).
        """
        scanned = scan(records, self.checker, stored_offsets, in_flight, self.clock())
        outcome = BatchOutcome(duplicates=scanned.duplicates, skipped_replayed=scanned.replayed)
        batch = scanned.aggregate
        rows, stored = await self._render(scanned, still_owned) if not batch.empty else (None, 0)
        # Dead letters after the rendering: a batch that fails before its write is read again,
        # and its rejections would be published again each time.
        for rejection in scanned.rejections:
            outcome.rejected[rejection.reason] = outcome.rejected.get(rejection.reason, 0) + 1
        await self._dead_letter(scanned.rejections)
        if rows is None:
            return PreparedBatch(outcome, None, "", scanned.hashes, ((), (), ()))
        outcome.duplicates += stored
        outcome.counted = batch.events
        outcome.offsets = dict(batch.offsets)
        return PreparedBatch(outcome, rows, batch.token(self.topic), scanned.hashes, batch.dedup_keys())

    def use_exchange(self, exchange: RowExchange) -> None:
        """Rows the fast lane checked first come from it; rows checked here go to it."""
        self.exchange = exchange
        self.checker = RecordChecker(self.validator, exchange.to_ingest, exchange.to_fast_lane)

    async def _dead_letter(self, rejections: list[Rejection]) -> None:
        for rejection in rejections:
            value, headers = dead_letter(rejection)
            await self.dead_letters(rejection, value, headers)

    async def _render(self, scanned: ScannedBatch, still_owned: StillOwned) -> tuple[pa.Table, int]:
        """``_render_new``; if that fails, the rows that cannot be rendered are dead-lettered
        (``render_failed``) and the rest rendered: a bug some input trips must not stall the
        partition, its batch read again for ever. A failure no row explains is raised, and so
        is one every row trips while a typical valid event fails too: that is the code's (or
        the schema's), not the input's, and the traffic must wait for the fix rather than all
        go to the DLQ. (A batch of nothing but bad rows, e.g. one poison record in a quiet
        moment, is dead-lettered: the typical event renders.)"""
        batch = scanned.aggregate
        try:
            return await self._render_new(batch, still_owned)
        except BatchAbandoned:
            raise
        except Exception:
            bad = unrenderable(batch.rows, self.topic)
            if not bad or (len(bad) == batch.events and not renders_typical_event(self.topic)):
                raise
            log.exception("rendering a batch failed; dead-lettering the %d records that trip it", len(bad))
        record_of = {row[ROW_HASH]: record for row, record in zip(scanned.rows, scanned.kept, strict=True)}
        for row, error in bad:
            scanned.rejections.append(Validator.reject(record_of[row[ROW_HASH]], "render_failed", error))
        dropped = {row[ROW_HASH] for row, _ in bad}
        batch.drop(dropped)
        scanned.hashes -= dropped  # not counted: a retry of the request is not a duplicate of it
        return await self._render_new(batch, still_owned)

    async def _render_new(self, batch: BatchAggregate, still_owned: StillOwned) -> tuple[pa.Table, int]:
        """The batch's rows without the events the dedup memory holds already, and how many
        those were. The store lookup (for what the recent-hash cache cannot answer) runs in a
        thread while the rows are rendered; they are rendered again only if it finds any."""
        if self.recent is not None:
            # Minutes this worker wrote from scratch are answered from memory; only the
            # others (stored before it owned the partition, or forgotten) go to the store.
            known, minutes, hashes = self.recent.split(*batch.dedup_keys())
        else:
            known, minutes, hashes = set(), batch.minutes_by_partition(), list(batch.column("hash"))
        lookup: asyncio.Task[set[int]] | None = None
        if hashes:
            call = partial(self.store.seen_hashes, minutes, hashes)
            lookup = asyncio.create_task(self._store_call(call, "dedup lookup", batch.offsets, still_owned))
            await asyncio.sleep(0)  # let the lookup reach its thread before the CPU work below
        try:
            # Counted once, before the dedup drop: a dropped event's address is stored already.
            client_ips = self.addresses.observe(*batch.addresses())
            rows = batch.to_arrow(self.topic, client_ips)
            stored = known | (await lookup if lookup is not None else set())
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
        dropped = batch.drop(stored)
        if dropped:
            rows = batch.to_arrow(self.topic, client_ips)
        return rows, dropped

    async def write(self, prepared: PreparedBatch, still_owned: StillOwned) -> BatchOutcome:
        """The one atomic insert of a prepared batch, retried until it lands (or is abandoned)."""
        outcome = prepared.outcome
        rows = prepared.rows
        if rows is None:
            return outcome
        token = prepared.token
        started = time.perf_counter()
        await self._store_call(partial(self.store.write, rows, token), f"insert {token}", outcome.offsets, still_owned)
        outcome.written = True
        outcome.write_seconds = time.perf_counter() - started
        return outcome

    async def _store_call(
        self, call: Callable[[], T], what: str, partitions: Collection[int], still_owned: StillOwned
    ) -> T:
        """Run a store call in a thread until it succeeds (``common.retry``).

        The batch is given up (``BatchAbandoned``) only when one of its partitions was
        revoked meanwhile: the new owner resumes from the stored offsets, and writing our
        copy as well would count the batch twice.
        """

        def lost() -> list[int]:
            return sorted(p for p in partitions if not still_owned(p))

        async def attempt() -> T:
            try:
                return await asyncio.to_thread(call)
            except Exception:
                self.store_errors += 1
                raise

        try:
            return await retry_forever(
                attempt, f"clickhouse {what}", 0.2, self.retry_max_seconds, permanent=lambda exc: bool(lost())
            )
        except Exception as exc:
            if lost():
                raise BatchAbandoned(f"partitions {lost()} were revoked while the store was failing") from exc
            raise
