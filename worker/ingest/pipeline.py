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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from worker.ingest.aggregate import BatchAggregate, request_hash
from worker.ingest.dlq import dead_letter
from worker.ingest.validate import KafkaRecord, Rejection, Validator, ValidEvent
from worker.settings import Settings
from worker.store.rollup import RollupStore

log = logging.getLogger(__name__)

T = TypeVar("T")

DeadLetterSink = Callable[[Rejection, bytes, list[tuple[str, bytes]]], Awaitable[None]]
StillOwned = Callable[[int], bool]
BeforeWrite = Callable[["BatchOutcome"], Awaitable[None]]


class BatchAbandoned(Exception):
    """The batch was not written and must not be: its partitions belong to another worker now."""


@dataclass
class BatchOutcome:
    """What one batch did; the caller commits ``offsets`` and feeds ``limit_counts`` to the limits."""

    counted: int = 0
    duplicates: int = 0
    skipped_replayed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)
    # (partition, key_id, account_id, minute epoch) -> requests: what the limit counters add
    limit_counts: dict[tuple[int, str, str, int], int] = field(default_factory=dict)
    write_seconds: float = 0.0
    written: bool = False


class IngestPipeline:
    def __init__(
        self,
        settings: Settings,
        store: RollupStore,
        dead_letters: DeadLetterSink,
        clock: Callable[[], float] = time.time,
        before_write: BeforeWrite | None = None,
    ) -> None:
        self.before_write = before_write
        self.topic = settings.events_topic
        self.store = store
        self.dead_letters = dead_letters
        self.clock = clock
        self.validator = Validator(
            settings.max_event_bytes,
            max_age_seconds=settings.dedup_horizon_hours * 3600,
            max_skew_seconds=settings.max_clock_skew_seconds,
        )
        self.retry_max_seconds = settings.store_retry_max_seconds
        self.store_errors = 0  # failed store calls (each retried), for metrics and readiness

    async def process(
        self, records: Sequence[KafkaRecord], written: Mapping[int, int], still_owned: StillOwned
    ) -> BatchOutcome:
        """``written``: last stored offset per partition; records at or before it are replays."""
        outcome = BatchOutcome()
        batch = BatchAggregate()
        now = self.clock()
        accepted: list[tuple[ValidEvent, int]] = []
        seen_in_batch: set[int] = set()
        for record in records:
            if record.offset <= written.get(record.partition, -1):
                outcome.skipped_replayed += 1
                continue
            batch.cover(record.partition, record.offset)
            checked = self.validator.check(record, now)
            if isinstance(checked, Rejection):
                outcome.rejected[checked.reason] = outcome.rejected.get(checked.reason, 0) + 1
                value, headers = dead_letter(checked)
                await self.dead_letters(checked, value, headers)
                continue
            digest = request_hash(checked.event["key_id"], checked.event["request_id"])
            if digest in seen_in_batch:
                outcome.duplicates += 1
                continue
            seen_in_batch.add(digest)
            accepted.append((checked, digest))

        if not batch.offsets:
            return outcome
        minutes: dict[int, set[int]] = {}
        for valid, _ in accepted:
            minutes.setdefault(valid.partition, set()).add(int(valid.epoch) // 60 * 60)
        hashes = [d for _, d in accepted]
        seen = await self._retry(lambda: self.store.seen_hashes(minutes, hashes), batch.offsets, still_owned)
        limit_counts = outcome.limit_counts
        for valid, digest in accepted:
            if digest in seen:
                outcome.duplicates += 1
                continue
            batch.add(valid.partition, valid.event, valid.epoch, digest)
            ev = valid.event
            if ev["status"] != 429:  # a request the limiter refused does not use up the allowance
                lk = (valid.partition, ev["key_id"], ev.get("account_id") or "", int(valid.epoch) // 60 * 60)
                limit_counts[lk] = limit_counts.get(lk, 0) + 1
        outcome.counted = batch.events
        outcome.offsets = dict(batch.offsets)
        if self.before_write is not None:
            # Limits are evaluated before the write: a block derived from these counts is
            # the same whether or not this process lives to see the write land (a replay
            # re-derives it), and the nodes learn it one write sooner.
            await self.before_write(outcome)

        rows = batch.to_arrow(self.topic)
        token = batch.token(self.topic)
        started = time.perf_counter()
        await self._retry(lambda: self.store.write(rows, token), batch.offsets, still_owned)
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
