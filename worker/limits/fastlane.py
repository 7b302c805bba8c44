"""The fast decision lane: each fetch of the owned partitions of the events topic, counted
for the limits as soon as it arrives.

The worker reads the events topic on one consumer; every fetch is counted here before the
ingest path holds it for a batch (``worker.ingest.batcher``), so the limits never wait for
the exactly-once path (its dedup lookup, its ClickHouse write), which keeps its own order.
Each partition is counted from right after the offset stored in ClickHouse with the counts
the limit counters were rebuilt from, and a record read again (before an assignment's seek,
or after the ingest path seeks back) is skipped: every event is counted once. Records are
checked by the same ``Validator`` as the ingest path: what the ingest path dead-letters, the
limits do not count; the rows checked here go to the ingest path with the records, so each
record is parsed and validated once. Node retries
are recognised by their request hash within a bounded memory; a retry whose first copy it
never saw (sent before the partition was assigned here) counts twice for the limits only,
erring towards the limit.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from common.recent_set import RecentSet
from schemas.limits import route_subject
from worker.limits.engine import NodeReport
from worker.records import EventRow, KafkaRecord, RecordChecker, Rejection, Validator

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


def group_batch(rows: Iterable[EventRow], recent: RecentRequests, records: int) -> FastBatch:
    """Group a fetch's valid rows for the limit engine (``records``: how many the fetch counted,
    rejections included)."""
    batch = FastBatch(records=records)
    counts = batch.counts
    nodes = batch.nodes
    for row in rows:
        partition, key_id, account, minute, _, status, node_id, _, _, _, digest, cost, route, epoch, node_counts = row
        if not recent.add(digest):
            batch.duplicates += 1
            continue
        if status != REFUSED:
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
        if node_counts is not None and epoch >= report.epoch:
            report.counts = (node_counts[0], node_counts[1], node_counts[2])
            report.epoch = epoch
    return batch


OnBatch = Callable[[FastBatch], Awaitable[None]]


class FastLane:
    """The limits' count of each fetch of the owned partitions of the events topic (see the
    module docstring); ``assign`` / ``revoke`` follow the ingest group."""

    def __init__(
        self,
        validator: Validator,
        on_batch: OnBatch,
        *,
        recent_max: int = 500_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.checker = RecordChecker(validator)
        self.on_batch = on_batch
        self.clock = clock
        self.recent = RecentRequests(recent_max)
        self.positions: dict[int, int | None] = {}  # owned partition -> next offset (None: any)
        self.records = 0
        self.fetches = 0

    def assign(self, partition: int, after_offset: int | None) -> None:
        """Count ``partition`` from just after ``after_offset`` (None: from the first record read)."""
        self.positions[partition] = None if after_offset is None else after_offset + 1

    def revoke(self, partitions: set[int]) -> None:
        for p in partitions:
            self.positions.pop(p, None)

    async def count(self, records: Sequence[KafkaRecord]) -> list[EventRow | None]:
        """Count one fetch of the events consumer: each record of an owned partition once (a
        record read again, before an assignment's seek or after the ingest path's, is skipped).
        Returns the row of each record it checked and found valid, None for the others, in
        the order of ``records``: the ingest path takes them instead of checking again."""
        self.fetches += 1
        rows, fresh = self._check_new(records)
        if fresh:
            self.records += fresh
            await self.on_batch(group_batch(filter(None, rows), self.recent, fresh))
        return rows

    def _check_new(self, records: Sequence[KafkaRecord]) -> tuple[list[EventRow | None], int]:
        positions = self.positions
        row_of = self.checker.row
        now = self.clock()
        rows: list[EventRow | None] = []
        fresh = 0
        for record in records:
            partition = record.partition
            at = positions.get(partition, -1)
            offset = record.offset
            if at == -1 or (at is not None and offset < at):
                rows.append(None)  # not owned (any more), or counted already
                continue
            positions[partition] = offset + 1
            fresh += 1
            row = row_of(record, now)
            rows.append(None if isinstance(row, Rejection) else row)  # the ingest path dead-letters it
        return rows, fresh
