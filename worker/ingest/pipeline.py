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
from typing import TypeVar

import pyarrow as pa
import xxhash

from worker.ingest.aggregate import BatchAggregate
from worker.ingest.dlq import dead_letter
from worker.ingest.recent_hashes import RecentHashes
from worker.ingest.validate import KafkaRecord, Rejection, Validator
from worker.settings import Settings
from worker.store.rollup import RollupStore

log = logging.getLogger(__name__)

T = TypeVar("T")
_xxh3 = xxhash.xxh3_64_intdigest

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
    written: bool = False


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
    entries: tuple[list[int], list[int], list[int]]


class IngestPipeline:
    def __init__(
        self,
        settings: Settings,
        store: RollupStore,
        dead_letters: DeadLetterSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.recent: RecentHashes | None = None
        self.topic = settings.events_topic
        self.store = store
        self.dead_letters = dead_letters
        self.clock = clock
        self.validator = Validator.from_settings(settings)
        self.retry_max_seconds = settings.store_retry_max_seconds
        self.store_errors = 0  # failed store calls (each retried), for metrics and readiness

    async def process(
        self, records: Sequence[KafkaRecord], written: Mapping[int, int], still_owned: StillOwned
    ) -> BatchOutcome:
        """Prepare and write one batch (no overlap with anything else)."""
        return await self.write(await self.prepare(records, written, still_owned), still_owned)

    async def prepare(
        self,
        records: Sequence[KafkaRecord],
        written: Mapping[int, int],
        still_owned: StillOwned,
        in_flight: Collection[int] = (),
    ) -> PreparedBatch:
        """Everything up to the insert: validate, dedup, aggregate, render rows.

        ``written``: last stored offset per partition; records at or before it are replays.
        ``in_flight``: request hashes of the batch whose write has not landed yet; they are
        not in the stored dedup memory for sure, so they are checked here as well (a retry
        split across two consecutive batches is counted once).
        """
        outcome = BatchOutcome()
        batch = BatchAggregate()
        now = self.clock()
        check = self.validator.check_event
        written_get = written.get
        last, first = batch.offsets, batch.first_offsets
        rejections: list[Rejection] = []
        seen_in_batch: set[int] = set()
        seen_add = seen_in_batch.add
        # One pass per record, appending straight to the batch's column lists.
        c_part, c_key, c_account, c_minute = batch.partition, batch.key_id, batch.account_id, batch.minute
        c_endpoint, c_status, c_node, c_ip = batch.endpoint, batch.status, batch.node_id, batch.client_ip
        c_bytes, c_latency, c_hash = batch.bytes_out, batch.latency_ms, batch.hashes
        duplicates = skipped = 0
        for record in records:
            partition = record.partition
            offset = record.offset
            if offset <= written_get(partition, -1):
                skipped += 1
                continue
            if offset > last.get(partition, -1):
                last[partition] = offset
            if offset < first.get(partition, offset + 1):
                first[partition] = offset
            checked = check(record, now)
            if isinstance(checked, Rejection):
                rejections.append(checked)
                continue
            event, epoch = checked
            key_id = event["key_id"]
            digest = _xxh3(f"{key_id}\x00{event['request_id']}".encode())  # = request_hash(), inlined
            if digest in seen_in_batch or digest in in_flight:
                duplicates += 1
                continue
            seen_add(digest)
            c_part.append(partition)
            c_key.append(key_id)
            c_account.append(event.get("account_id") or "")
            c_minute.append(int(epoch) // 60 * 60)
            c_endpoint.append(event["endpoint"])
            c_status.append(event["status"])
            c_node.append(event["node_id"])
            c_ip.append(event.get("client_ip") or "")
            c_bytes.append(event.get("bytes_out") or 0)
            c_latency.append(event.get("latency_ms") or 0.0)
            c_hash.append(digest)
        batch.changed()
        outcome.duplicates = duplicates
        outcome.skipped_replayed = skipped
        for rejection in rejections:
            outcome.rejected[rejection.reason] = outcome.rejected.get(rejection.reason, 0) + 1
            value, headers = dead_letter(rejection)
            await self.dead_letters(rejection, value, headers)

        if not batch.offsets:
            return PreparedBatch(outcome, None, "", seen_in_batch, ([], [], []))
        lookup: asyncio.Task[set[int]] | None = None
        seen_here: set[int] = set()
        if batch.hashes:
            if self.recent is not None:
                # Minutes this worker wrote from scratch are answered from memory; only the
                # others (stored before it owned the partition, or forgotten) go to the store.
                seen_here, minutes, hashes = self.recent.split(batch.partition, batch.minute, batch.hashes)
            else:
                minutes, hashes = batch.minutes_by_partition(), list(batch.hashes)
            if hashes:
                lookup = asyncio.create_task(
                    self._retry(lambda: self.store.seen_hashes(minutes, hashes), batch.offsets, still_owned)
                )
                await asyncio.sleep(0)  # let the lookup reach its thread before the CPU work below
        try:
            # Rendered while the lookup runs; re-rendered only if it finds stored duplicates.
            rows = batch.to_arrow(self.topic)
            seen = seen_here | (await lookup if lookup is not None else set())
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
        dropped = batch.drop(seen)
        if dropped:
            outcome.duplicates += dropped
            rows = batch.to_arrow(self.topic)
        outcome.counted = batch.events
        outcome.offsets = dict(batch.offsets)
        entries = (list(batch.partition), list(batch.minute), list(batch.hashes))
        return PreparedBatch(outcome, rows, batch.token(self.topic), seen_in_batch, entries)

    async def write(self, prepared: PreparedBatch, still_owned: StillOwned) -> BatchOutcome:
        """The one atomic insert of a prepared batch, retried until it lands (or is abandoned)."""
        outcome = prepared.outcome
        rows = prepared.rows
        if rows is None:
            return outcome
        token = prepared.token
        started = time.perf_counter()
        await self._retry(lambda: self.store.write(rows, token), outcome.offsets, still_owned)
        outcome.written = True
        outcome.write_seconds = time.perf_counter() - started
        return outcome

    async def _retry(self, call: Callable[[], T], offsets: Mapping[int, int], still_owned: StillOwned) -> T:
        """Run a store call in a thread, retrying with backoff until it succeeds.

        The batch is given up (``BatchAbandoned``) only when one of its partitions was
        revoked meanwhile: the new owner resumes from the stored offsets, and writing our
        copy as well would count the batch twice.
        """
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await asyncio.to_thread(call)
                if attempt > 1:
                    log.warning("clickhouse call succeeded after %d attempts", attempt)
                return result
            except Exception as exc:  # any store failure is retried, never skipped
                self.store_errors += 1
                lost = sorted(p for p in offsets if not still_owned(p))
                if lost:
                    raise BatchAbandoned(f"partitions {lost} were revoked while the store was failing") from exc
                log.error("clickhouse call failed (attempt %d, retry in %.1fs): %s", attempt, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_seconds)
