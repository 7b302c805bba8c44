"""Partition ownership and offsets: seek to what ClickHouse holds, commit after the write.

Kafka's committed offsets are advisory here (lag monitoring, tooling); the offsets stored
in ClickHouse with the counts are the truth, so a worker killed between the write and the
commit resumes exactly after the last written record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from common.retry import retry_forever
from schemas.decisions import WINDOW_SECONDS, Window, window_start
from worker.ingest.commits import OffsetCommitter
from worker.ingest.pipeline import BatchAbandoned, BatchOutcome, IngestPipeline, PreparedBatch
from worker.records import KafkaRecord
from worker.store.rollup import RollupStore

log = logging.getLogger(__name__)

AssignedHook = Callable[[set[int]], Awaitable[None]]
RevokedHook = Callable[[set[int]], Awaitable[None]]
BatchHook = Callable[[BatchOutcome], Awaitable[None]]
PRUNE_INTERVAL_S = 60.0


@dataclass
class IngestStats:
    """Running totals of the batches one worker handled (metrics, health, the shutdown line)."""

    batches: int = 0
    consumed: int = 0
    counted: int = 0
    duplicates: int = 0
    skipped_replayed: int = 0  # read again: written already, or in the write in flight
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> records dead-lettered
    handed_over_batches: int = 0  # handed over: their partitions moved to another worker first
    last_batch_at: float = 0.0  # monotonic time the last batch landed (readiness: progress)

    def summary(self) -> str:
        dlq = sum(self.rejected.values())
        return (
            f"{self.batches} batches, {self.consumed} records: {self.counted} counted, "
            f"{self.duplicates} duplicates, {dlq} dead-lettered {dict(self.rejected) or ''}, "
            f"{self.skipped_replayed} already-written skipped, {self.handed_over_batches} batches handed over"
        )


class PartitionWriter(ConsumerRebalanceListener):  # type: ignore[misc]
    """The ingest side of one consumer-group member: not a consumer itself (FastStream's
    aiokafka consumer reads), but its rebalance listener and the sequencer of its writes.

    On assignment it seeks each partition to the offset stored in ClickHouse; each batch is
    prepared by the ``IngestPipeline`` while the previous batch's insert is in flight, and
    written after it; ``stored_offsets`` (last stored offset per partition) and the Kafka commit
    advance when an insert lands, in batch order.
    """

    def __init__(
        self,
        topic: str,
        pipeline: IngestPipeline,
        store: RollupStore,
        get_consumer: Callable[[], AIOKafkaConsumer | None],
        partition_count: Callable[[], int],
        dedup_horizon_seconds: int = 86_400,
    ) -> None:
        self.dedup_horizon_seconds = dedup_horizon_seconds
        self.topic = topic
        self.pipeline = pipeline
        self.store = store
        self.get_consumer = get_consumer
        self.partition_count = partition_count  # of the topic, for Kafka's partitioner
        self.stored_offsets: dict[int, int] = {}
        self.owned: set[int] = set()
        self.stats = IngestStats()
        self.on_assigned: list[AssignedHook] = []
        self.on_revoked: list[RevokedHook] = []
        self.on_batch: list[BatchHook] = []
        # Held while a batch is prepared and its write started, and by the rebalance callbacks,
        # which first wait for the write in flight to land: the next owner never reads stored
        # offsets that are about to move.
        self._lock = asyncio.Lock()
        # The one insert that may be in flight while the next batch is prepared, and the
        # request hashes it adds to the dedup memory (not stored until it lands).
        self._in_flight: asyncio.Task[bool] | None = None
        self._in_flight_hashes: Collection[int] = ()
        # Last offset per partition taken into a batch whose write started (stored, or in
        # flight): a record at or before it is a replay. Records aiokafka fetched from Kafka's
        # lagging commit before an assignment's seek come as a batch of their own and are read
        # again after the seek; the second copies are skipped here instead of deduplicated
        # (and a bad record among them is not dead-lettered twice).
        self._taken: dict[int, int] = {}
        self._revoking: set[int] = set()
        self.commits = OffsetCommitter(topic, get_consumer)
        self._pruned_at = 0.0  # pipeline clock of the last pruning of the recent-hash cache

    def _still_owned(self, partition: int) -> bool:
        return partition in self.owned and partition not in self._revoking

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        parts = {tp.partition for tp in revoked if tp.topic == self.topic}
        # Marked before waiting for the lock: a write stuck retrying against a failing store
        # gives its batch up instead of holding the partition (the next owner resumes from
        # the stored offsets), so a store outage cannot turn a rebalance into a double count.
        self._revoking |= parts
        async with self._lock:
            await self._land()  # the write in flight lands (or is given up) before the partitions go
            self._revoking -= parts
            self.commits.forget(parts)
            for p in parts:
                self.owned.discard(p)
                self.stored_offsets.pop(p, None)
                self._taken.pop(p, None)
                if self.pipeline.recent is not None:
                    self.pipeline.recent.revoke(p)
            if self.pipeline.exchange is not None:
                self.pipeline.exchange.forget(parts)
            if parts:
                log.info("revoked partitions %s of %s", sorted(parts), self.topic)
                for hook in self.on_revoked:
                    await hook(parts)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._lock:
            await self._land()  # stored offsets are read next: nothing may be about to move them
            parts = {tp.partition for tp in assigned if tp.topic == self.topic}
            if not parts:
                log.info("no partitions of %s assigned to this worker", self.topic)
                return
            stored = await self._stored_offsets(parts)
            stored = await self._check_against_the_log(stored)
            await self._load_recent(parts)
            await self._load_addresses(parts)
            if self.pipeline.exchange is not None:
                self.pipeline.exchange.forget(parts)  # a fresh start: nothing handed over before
            consumer = self.get_consumer()
            for p in sorted(parts):
                self._taken.pop(p, None)
                if p in stored and consumer is not None:
                    consumer.seek(TopicPartition(self.topic, p), stored[p] + 1)
                    self.stored_offsets[p] = self._taken[p] = stored[p]
            self.owned |= parts
            # Kafka's committed offsets lag the stored ones when a worker was killed between its
            # write and its commit; with no newer record on the partition nothing would commit
            # again and the lag would show forever. From a task: a commit inside aiokafka's
            # rebalance callback can wait on the rebalance it is part of.
            self.commits.forget(parts)
            self.commits.level_soon(lambda: self.stored_offsets)
            log.info(
                "assigned partitions %s of %s; resuming after stored offsets %s",
                sorted(parts),
                self.topic,
                {p: stored.get(p, "none (committed/earliest)") for p in sorted(parts)},
            )
            for hook in self.on_assigned:
                await hook(parts)

    async def _check_against_the_log(self, stored: dict[int, int]) -> dict[int, int]:
        """``stored`` where the log agrees with it. A stored offset at or past the end of its
        partition's log means the topic was recreated (or the log truncated) under the store:
        resuming there would take every new record for one already written, silently. Such a
        partition starts again from its first record inside the dedup horizon (older ones are
        refused as too old anyway; the dedup memory keeps a record counted before from counting
        twice), and its stored offsets are deleted so that no later owner resumes past the log."""
        consumer = self.get_consumer()
        if consumer is None or not stored:
            return stored
        tps = [TopicPartition(self.topic, p) for p in sorted(stored)]
        try:
            ends = await consumer.end_offsets(tps)
            past = {tp.partition: end for tp, end in ends.items() if stored[tp.partition] >= end}
            if not past:
                return stored
            horizon_ms = int((time.time() - self.dedup_horizon_seconds) * 1000)
            found = await consumer.offsets_for_times({TopicPartition(self.topic, p): horizon_ms for p in past})
            firsts = await consumer.beginning_offsets([TopicPartition(self.topic, p) for p in past])
        except Exception:  # a safeguard: the assignment must go on (its seeks) without it
            log.warning("could not compare the stored offsets with the log's end; resuming after them", exc_info=True)
            return stored
        await retry_forever(
            lambda: asyncio.to_thread(self.store.forget_offsets, self.topic, past),
            f"deleting the stored offsets of partitions {sorted(past)}, which are past their log",
        )
        fixed = dict(stored)
        for tp, first in firsts.items():
            at = found.get(tp)
            start = max(first, at.offset) if at is not None else past[tp.partition]
            log.error(
                "partition %d of %s: stored offset %d is past the end of its log (%d): the topic was recreated "
                "or its log truncated; counting it again from offset %d (its first record inside the dedup "
                "horizon), stored offsets deleted",
                tp.partition,
                self.topic,
                stored[tp.partition],
                past[tp.partition],
                start,
            )
            fixed[tp.partition] = start - 1
        return fixed

    async def _load_recent(self, parts: set[int]) -> None:
        """Which minutes of these partitions already have stored dedup rows (those keep
        going to the store; the others this worker will write from scratch)."""
        recent = self.pipeline.recent
        if recent is None:
            return
        since = int(time.time()) - self.dedup_horizon_seconds - 3600
        stored = await retry_forever(
            lambda: asyncio.to_thread(self.store.dedup_minutes, parts, since),
            f"reading the stored dedup minutes of partitions {sorted(parts)}",
        )
        for p in parts:
            recent.assign(p, stored.get(p, set()))

    async def _load_addresses(self, parts: set[int]) -> None:
        """The address counts start over from the stored client addresses of every owned
        partition's keys on the days counted; the counts of 2+ are written back (rows stored
        without them: before the migration that added them, or by a bulk import).

        Started over, not added to: a batch given up when its partitions were revoked left
        its addresses in the counts but not in the store, and the next owner (maybe this
        worker again) must write their counts when it writes those events."""
        owned = self.owned | parts
        total = self.partition_count()
        counts = self.pipeline.addresses
        counts.clear()
        since = window_start(Window.day, self.pipeline.clock()) - (counts.days_kept - 1) * WINDOW_SECONDS[Window.day]
        stored = await retry_forever(
            lambda: asyncio.to_thread(self.store.client_addresses, since, owned, total),
            f"reading the stored client addresses of partitions {sorted(owned)}",
        )
        grew = counts.observe(*_triples(stored))
        if grew:
            await retry_forever(
                lambda: asyncio.to_thread(self.store.write_client_ips, grew),
                f"writing the client address counts of partitions {sorted(owned)}",
            )
        log.info(
            "client addresses loaded for partitions %s: %d key-days, %d with 2+", sorted(owned), len(stored), len(grew)
        )

    async def _stored_offsets(self, parts: set[int]) -> dict[int, int]:
        # The store is down: we cannot know where to resume, so we wait for it.
        return await retry_forever(
            lambda: asyncio.to_thread(self.store.stored_offsets, self.topic, parts),
            f"reading the stored offsets of partitions {sorted(parts)}",
        )

    async def handle(self, records: Sequence[KafkaRecord]) -> BatchOutcome | None:
        """Prepare this batch while the previous one's insert is still in flight, then start its own.

        At most one write is in flight; each starts only after the one before it landed, so
        writes, ``written`` and the Kafka commits advance strictly in batch order.
        """
        async with self._lock:
            mine = [r for r in records if r.partition in self.owned]
            if not mine:
                return None
            try:
                prepared = await self.pipeline.prepare(mine, self._taken, self._still_owned, self._in_flight_hashes)
            except BatchAbandoned as exc:
                self.stats.handed_over_batches += 1
                log.warning("batch handed over to the new owner: %s", exc)
                return None
            except Exception:
                # Not written, so it must be read again: aiokafka's position is already past it.
                log.exception("batch failed before its write; reading it again from the last written offsets")
                self._rewind(mine)
                await asyncio.sleep(1.0)
                return None
            if not await self._land():
                # The batch before was given up; this one was deduplicated against it.
                self.stats.handed_over_batches += 1
                log.warning("batch handed over to the new owner: the batch before it was")
                return None
            self._in_flight_hashes = prepared.hashes
            advance(self._taken, prepared.outcome.offsets)
            self._in_flight = asyncio.create_task(self._write_and_land(prepared, len(mine)), name="ingest-write")
            return prepared.outcome

    def _rewind(self, records: Sequence[KafkaRecord]) -> None:
        consumer = self.get_consumer()
        if consumer is None:
            return
        first: dict[int, int] = {}
        for r in records:
            first[r.partition] = min(first.get(r.partition, r.offset), r.offset)
        for p, offset in first.items():
            if self._still_owned(p):
                consumer.seek(TopicPartition(self.topic, p), self.stored_offsets.get(p, offset - 1) + 1)

    async def flush(self) -> None:
        """Wait for the write in flight, if any, to land (shutdown)."""
        async with self._lock:
            await self._land()
        await self.commits.close(lambda: self.stored_offsets)  # bounded by its timeout, never raises

    async def _land(self) -> bool:
        """Wait for the write in flight; False if that batch was abandoned. Caller holds the lock."""
        task = self._in_flight
        if task is None:
            return True
        try:
            # Shielded: a cancelled handler must not cancel an insert that is running anyway.
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._in_flight = None
                self._in_flight_hashes = ()

    async def _write_and_land(self, prepared: PreparedBatch, consumed: int) -> bool:
        try:
            outcome = await self.pipeline.write(prepared, self._still_owned)
        except BatchAbandoned as exc:
            self.stats.handed_over_batches += 1
            log.warning("batch handed over to the new owner: %s", exc)
            return False
        self._account(consumed, outcome)
        if outcome.written:
            if self.pipeline.recent is not None:
                self.pipeline.recent.add(*prepared.entries)
                self._prune_recent()
            advance(self.stored_offsets, outcome.offsets)
            if not await self.commits.level(self.stored_offsets):
                self.commits.level_soon(lambda: self.stored_offsets)
        for hook in self.on_batch:
            try:
                await hook(outcome)
            except Exception:  # a metrics hook must not stop the landing of later writes
                log.exception("batch hook failed")
        return True

    def _prune_recent(self) -> None:
        """At most once a minute (of the pipeline's clock): minutes past the dedup horizon and an
        hour more (no event of theirs is accepted) leave the recent-hash cache's records."""
        recent = self.pipeline.recent
        now = self.pipeline.clock()
        if recent is None or now - self._pruned_at < PRUNE_INTERVAL_S:
            return
        self._pruned_at = now
        recent.forget_before(int(now) - self.dedup_horizon_seconds - 3600)

    def _account(self, consumed: int, outcome: BatchOutcome) -> None:
        stats = self.stats
        stats.batches += 1
        stats.consumed += consumed
        stats.counted += outcome.counted
        stats.duplicates += outcome.duplicates
        stats.skipped_replayed += outcome.skipped_replayed
        for reason, n in outcome.rejected.items():
            stats.rejected[reason] = stats.rejected.get(reason, 0) + n
        stats.last_batch_at = time.monotonic()
        if outcome.rejected:
            log.warning("dead-lettered %s", outcome.rejected)
        log.debug(
            "batch: %d records, %d counted, %d duplicates, write %.3fs",
            consumed,
            outcome.counted,
            outcome.duplicates,
            outcome.write_seconds,
        )


def advance(held: dict[int, int], offsets: Mapping[int, int]) -> None:
    """Move ``held`` (last offset per partition) up to ``offsets``, never back: a batch read
    before an assignment's seek and the same records read after it could otherwise end a
    partition lower than the batch before them (and commit that to Kafka)."""
    for p, offset in offsets.items():
        if offset > held.get(p, -1):
            held[p] = offset


def _triples(stored: list[tuple[str, int, list[str]]]) -> tuple[list[str], list[int], list[str]]:
    """(keys, days, addresses) of (key, day, addresses) rows, one triple per address."""
    keys: list[str] = []
    days: list[int] = []
    addresses: list[str] = []
    for key, day, ips in stored:
        keys.extend([key] * len(ips))
        days.extend([day] * len(ips))
        addresses.extend(ips)
    return keys, days, addresses
