"""Each record of a fetch is checked once: the limits' fast lane checks it and the row goes to
the ingest path with the record, and neither side's outcome (rows, counts, duplicates, dead
letters and their reasons) differs from each checking every record itself."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from tests.unit.test_validate_and_aggregate import NOW, VALIDATOR, Rec, record
from worker.ingest.pipeline import scan
from worker.limits.fastlane import FastBatch, FastLane, RecentRequests, group_batch
from worker.records import EventRow, RecordChecker, Rejection


class CountingValidator:
    """The real validator, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def check(self, record: object, now: float) -> object:
        self.calls += 1
        return VALIDATOR.check(record, now)  # type: ignore[arg-type]


def mixed_records() -> list[Rec]:
    records = [record(0, i, request_id=f"r{i}", ts=NOW + timedelta(seconds=i), cost=1 + i % 3) for i in range(6)]
    records.append(record(0, 6, request_id="r0", ts=NOW))  # a retry of r0: a duplicate for both
    records.append(Rec(b"{not json", b"k1", 0, 7))  # dead-lettered with its reason, by the ingest path
    records.append(record(0, 8, request_id="r8", ts=NOW - timedelta(days=3)))  # too old
    records.append(record(1, 0, request_id="p1", ts=NOW, route="statements", cost=10, node_counts=[1, 2, 3]))
    return records


async def test_each_record_is_validated_once_and_outcomes_are_unchanged() -> None:
    records = mixed_records()
    now = NOW.timestamp() + 10
    counting = CountingValidator()
    alone = RecordChecker(counting)  # type: ignore[arg-type]
    alone_scan = scan(records, alone, {}, (), now)
    checked_alone: list[EventRow | Rejection] = [alone.row(r, now) for r in records]
    alone_lane = group_batch(
        (r for r in checked_alone if not isinstance(r, Rejection)), RecentRequests(100), len(records)
    )
    assert counting.calls == 2 * len(records)

    counting = CountingValidator()
    batches: list[FastBatch] = []

    async def on_batch(batch: FastBatch) -> None:
        batches.append(batch)

    lane = FastLane(VALIDATOR, on_batch, clock=lambda: now)
    lane.checker = RecordChecker(counting)  # type: ignore[arg-type]
    lane.assign(0, None)
    lane.assign(1, None)
    rows = await lane.count(records)
    shared_scan = scan(records, RecordChecker(counting), {}, (), now, rows)  # type: ignore[arg-type]
    # Valid records once; the two invalid ones again by the ingest path (it dead-letters them).
    assert counting.calls == len(records) + 2
    assert [row is None for row in rows] == [False] * 7 + [True, True, False]
    for field in ("hash", "cost", "route", "minute", "key_id", "account_id", "endpoint"):
        assert shared_scan.aggregate.column(field) == alone_scan.aggregate.column(field)
    assert shared_scan.duplicates == alone_scan.duplicates == 1
    assert [(r.offset, r.reason) for r in shared_scan.rejections] == [
        (r.offset, r.reason) for r in alone_scan.rejections
    ]
    assert [r.reason for r in shared_scan.rejections] == ["invalid_json", "ts_too_old"]
    (shared_lane,) = batches
    assert shared_lane.counts == alone_lane.counts
    assert shared_lane.duplicates == alone_lane.duplicates == 1
    assert shared_lane.records == alone_lane.records == len(records)
    assert shared_lane.nodes[(1, "k1")]["n1"].counts == (1, 2, 3)


async def test_the_fast_lane_counts_each_owned_record_once_and_from_its_position() -> None:
    records = mixed_records()
    now = NOW.timestamp() + 10
    batches: list[Any] = []

    async def on_batch(batch: FastBatch) -> None:
        batches.append(batch)

    lane = FastLane(VALIDATOR, on_batch, clock=lambda: now)
    lane.assign(0, 2)  # counted up to offset 2 (the stored offset its counters were rebuilt from)
    rows = await lane.count(records)  # partition 1 not owned
    assert [i for i, row in enumerate(rows) if row is not None] == [3, 4, 5, 6]
    assert lane.records == 6  # offsets 3..8 of partition 0, the two invalid ones included
    again = await lane.count(records)  # read again (a seek back): counted already
    assert again == [None] * len(records)
    assert lane.records == 6
    assert len(batches) == 1
