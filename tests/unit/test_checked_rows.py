"""Rows handed between the two readers of the events topic (the fast lane, the ingest path):
each record validated once, whichever reads it first, and neither reader's outcome (rows,
counts, duplicates, dead letters and their reasons) changed by it."""

from __future__ import annotations

from datetime import timedelta

from tests.unit.event_records import NOW, VALIDATOR, Rec, record
from worker.ingest.pipeline import scan
from worker.limits.fastlane import RecentRequests, group_batch
from worker.records import CheckedRows, EventRow, RecordChecker, RowExchange


def row(n: int) -> EventRow:
    return (0, f"k{n}", "", 0, "/", 200, "n", "", 0, 0.0, n, 1, "", 0.0, None)


def test_take_returns_the_row_of_that_offset_and_drops_the_ones_before() -> None:
    rows = CheckedRows(10)
    for offset in (3, 4, 6):
        rows.put(0, offset, row(offset))
    assert rows.take(0, 2) is None  # never handed over
    assert rows.take(0, 4) == row(4)  # 3 was skipped (a replayed record): dropped on the way
    assert rows.size == 1
    assert rows.take(0, 5) is None
    assert rows.take(0, 6) == row(6)
    assert rows.size == 0
    assert (rows.hits, rows.misses) == (2, 2)


def test_puts_behind_the_ingest_path_or_out_of_order_or_past_the_bound_are_ignored() -> None:
    rows = CheckedRows(2)
    rows.put(0, 10, row(10))
    assert rows.take(0, 10) == row(10)
    rows.put(0, 9, row(9))  # the ingest path is past it already
    rows.put(0, 12, row(12))
    rows.put(0, 11, row(11))  # a re-read after a seek: the first copy stays
    rows.put(1, 1, row(1))
    rows.put(1, 2, row(2))  # full: not held (the ingest path checks it itself)
    assert rows.size == 2
    assert rows.take(1, 2) is None
    rows.forget([0])
    assert rows.size == 0
    assert rows.take(0, 12) is None


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


def readers(exchange: RowExchange | None) -> tuple[RecordChecker, RecordChecker, CountingValidator]:
    counting = CountingValidator()
    lane = RecordChecker(counting, exchange.to_fast_lane, exchange.to_ingest) if exchange else None  # type: ignore[arg-type]
    ingest = RecordChecker(counting, exchange.to_ingest, exchange.to_fast_lane) if exchange else None  # type: ignore[arg-type]
    alone = RecordChecker(counting, None, None)  # type: ignore[arg-type]
    return lane or alone, ingest or alone, counting


def test_each_record_is_validated_once_whichever_reader_comes_first_and_outcomes_are_unchanged() -> None:
    records = mixed_records()
    now = NOW.timestamp() + 10
    lane, ingest, counting = readers(None)
    alone_scan = scan(records, ingest, {}, (), now)
    alone_lane = group_batch(records, lane, RecentRequests(100), now)
    assert counting.calls == 2 * len(records)

    for lane_first in (True, False):
        lane, ingest, counting = readers(RowExchange(100))
        if lane_first:
            shared_lane = group_batch(records, lane, RecentRequests(100), now)
            shared_scan = scan(records, ingest, {}, (), now)
        else:
            shared_scan = scan(records, ingest, {}, (), now)
            shared_lane = group_batch(records, lane, RecentRequests(100), now)
        # Valid records once; the two invalid ones by both readers (a rejection is not handed over).
        assert counting.calls == len(records) + 2
        for field in ("hash", "cost", "route", "minute", "key_id", "account_id", "endpoint"):
            assert shared_scan.aggregate.column(field) == alone_scan.aggregate.column(field)
        assert shared_scan.duplicates == alone_scan.duplicates == 1
        assert [(r.offset, r.reason) for r in shared_scan.rejections] == [
            (r.offset, r.reason) for r in alone_scan.rejections
        ]
        assert [r.reason for r in shared_scan.rejections] == ["invalid_json", "ts_too_old"]
        assert shared_lane.counts == alone_lane.counts
        assert shared_lane.duplicates == alone_lane.duplicates == 1
        assert shared_lane.nodes[(1, "k1")]["n1"].counts == (1, 2, 3)
