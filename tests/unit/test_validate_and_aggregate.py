from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from schemas.events import RequestEvent, dump_event, make_event
from tests.unit.event_records import NOW, VALIDATOR, Rec, event, rec, record
from worker.ingest.aggregate import BatchAggregate, renders_typical_event, unrenderable
from worker.ingest.pipeline import IngestPipeline, PreparedBatch, scan
from worker.limits.fastlane import RecentRequests, group_batch
from worker.records import KafkaRecord, RecordChecker, Rejection, Validator, request_hash
from worker.settings import Settings
from worker.store import rollup
from worker.store.rollup import LEVELS, ROLLUP_SCHEMA


def check(r: Rec) -> tuple[object, float] | Rejection:
    return VALIDATOR.check(r, NOW.timestamp())


def test_valid_record() -> None:
    result = check(rec())
    assert not isinstance(result, Rejection)
    event, epoch = result
    assert event["key_id"] == "k1"
    assert epoch == (NOW - timedelta(seconds=30)).timestamp()


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (Rec(None, b"k1"), "empty_value"),
        (Rec(b"{" * 3000, b"k1"), "oversized"),
        (Rec(b"{not json", b"k1"), "invalid_json"),
        (Rec(b'{"request_id": 1}', b"k1"), "schema_violation"),
        (Rec(dump_event(make_event(**event())), None), "missing_key"),
        (Rec(dump_event(make_event(**event())), b"other"), "key_mismatch"),
        (rec(ts=NOW - timedelta(hours=25)), "ts_too_old"),
        (rec(ts=NOW + timedelta(minutes=6)), "ts_in_future"),
        # cost 0 on a served request: a producer's bug, not a request that spent nothing
        (Rec(dump_event(make_event(**event()))[:-1] + b',"cost":0}', b"k1"), "schema_violation"),
    ],
)
def test_rejections_name_their_reason(record: Rec, reason: str) -> None:
    result = check(record)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.detail
    assert result.value == record.value  # the original bytes travel to the DLQ


def test_clock_skew_within_bound_is_accepted() -> None:
    assert not isinstance(check(rec(ts=NOW + timedelta(minutes=4))), Rejection)


def test_request_hash_is_stable_and_key_scoped() -> None:
    assert request_hash("k1", "r1") == request_hash("k1", "r1")
    assert request_hash("k1", "r1") != request_hash("k2", "r1")
    assert 0 <= request_hash("k1", "r1") < 2**64


class FakeStore:
    """No stored dedup memory: every hash is new (the ClickHouse side has its own tests)."""

    def seen_hashes(self, minutes: object, hashes: object) -> set[int]:
        return set()


def pipeline_with(validator: Validator | None = None, now: datetime = NOW) -> tuple[IngestPipeline, list[Rejection]]:
    """The production pipeline with a fake store, and the list its dead letters go to."""
    dead: list[Rejection] = []

    async def sink(rejection: Rejection, value: bytes, headers: object) -> None:
        dead.append(rejection)

    settings = Settings(events_topic="events", dedup_horizon_hours=72)
    pipeline = IngestPipeline(settings, FakeStore(), sink, clock=now.timestamp)  # type: ignore[arg-type]
    if validator is not None:
        pipeline.checker = RecordChecker(validator, None, None)
    return pipeline, dead


def prepare(records: list[Rec], now: datetime = NOW) -> PreparedBatch:
    """The production path up to the insert: IngestPipeline.prepare with a fake store."""
    pipeline, _ = pipeline_with(now=now)
    return asyncio.run(pipeline.prepare(records, {}, lambda p: True))


def test_aggregate_rolls_minutes_into_hours_and_days() -> None:
    times = [
        datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC),  # late, previous day
        datetime(2026, 11, 27, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 11, 27, 0, 0, 59, tzinfo=UTC),
        datetime(2026, 11, 27, 1, 15, 0, tzinfo=UTC),
    ]
    records = [
        record(3, 10 + i, request_id=f"r{i}", ts=ts, client_ip="198.51.100.1", bytes_out=100)
        for i, ts in enumerate(times)
    ]
    records.append(Rec(b"{not json", b"k1", partition=3, offset=20))  # dead-lettered: still moves the offset
    prepared = prepare(records)

    table = prepared.rows
    assert table is not None
    assert table.schema == ROLLUP_SCHEMA
    rows = table.to_pylist()
    by_level: dict[int, dict[int, int]] = {}
    for r in rows:
        by_level.setdefault(r["level"], {})
        by_level[r["level"]][r["bucket"]] = by_level[r["level"]].get(r["bucket"], 0) + r["requests"]

    def epoch(*args: int) -> int:
        return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]

    assert by_level[LEVELS["minute"]] == {
        epoch(2026, 11, 26, 23, 59): 1,
        epoch(2026, 11, 27, 0, 0): 2,
        epoch(2026, 11, 27, 1, 15): 1,
    }
    assert by_level[LEVELS["hour"]] == {
        epoch(2026, 11, 26, 23): 1,
        epoch(2026, 11, 27, 0): 2,
        epoch(2026, 11, 27, 1): 1,
    }
    assert by_level[LEVELS["day"]] == {epoch(2026, 11, 26): 1, epoch(2026, 11, 27): 3}
    assert sum(by_level[LEVELS["client_hour"]].values()) == 4
    offsets = [r for r in rows if r["level"] == LEVELS["offset"]]
    assert [(r["kafka_partition"], r["last_offset"], r["key_id"]) for r in offsets] == [(3, 20, "events")]
    dedup = [r for r in rows if r["level"] == LEVELS["dedup"]]
    assert sorted(h for r in dedup for h in r["request_hashes"]) == sorted(
        request_hash("k1", f"r{i}") for i in range(4)
    )
    assert prepared.token == "events|3:10-20"
    assert prepared.outcome.rejected == {"invalid_json": 1}
    assert sum(r["bytes_out"] for r in rows if r["level"] == LEVELS["day"]) == 400


def test_address_counts_of_a_batch_go_into_its_insert() -> None:
    """A key seen from a second and third address on a day gets a ``client_ips`` row in the
    batch's one insert (count 3, bucket = the UTC day); a key with one address gets none."""
    at = datetime(2026, 11, 27, 10, 0, 5, tzinfo=UTC)
    records = [record(0, i, request_id=f"r{i}", key_id="k1", ts=at, client_ip=f"198.51.100.{i % 3}") for i in range(6)]
    records += [record(0, 6 + i, request_id=f"s{i}", key_id="k2", ts=at, client_ip="203.0.113.9") for i in range(3)]
    table = prepare(records).rows
    assert table is not None
    counts = [
        (r["key_id"], r["bucket"], r["client_ips"]) for r in table.to_pylist() if r["level"] == LEVELS["client_ips"]
    ]
    assert counts == [("k1", int(datetime(2026, 11, 27, tzinfo=UTC).timestamp()), 3)]


def test_rollup_columns_are_filled_by_name_whatever_the_schema_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reordered ROLLUP_SCHEMA gets the same values under each column name: same-typed
    columns swapped (where a positional build would misalign silently), the rest reversed."""
    records = [
        record(1, i, request_id=f"r{i}", ts=NOW - timedelta(minutes=i), endpoint=f"/v0/e{i % 3}", bytes_out=10 * i)
        for i in range(12)
    ]
    records += [record(1, 12, request_id="r0"), Rec(b"{not json", b"k1", partition=2, offset=5)]
    before = prepare(records).rows
    assert before is not None
    names = ROLLUP_SCHEMA.names
    swapped = {"endpoint": "node_id", "node_id": "endpoint", "requests": "bytes_out", "bytes_out": "requests"}
    order = [swapped.get(name, name) for name in reversed(names)]
    reordered = pa.schema([ROLLUP_SCHEMA.field(name) for name in order])
    monkeypatch.setattr(rollup, "ROLLUP_SCHEMA", reordered)
    after = prepare(records).rows
    assert after is not None
    assert after.schema == reordered
    assert after.select(names).to_pylist() == before.to_pylist()


def test_the_fast_lane_counts_without_429s_or_duplicates_and_reads_node_counts() -> None:
    records = [
        record(0, i, request_id=f"r{i}", ts=NOW + timedelta(seconds=i), status=200 + i, node_counts=[i + 1, 7, 9])
        for i in range(5)
    ]
    records.append(record(0, 5, request_id="r-refused", ts=NOW, status=429))  # refused: no allowance used
    # A fail-closed node's refusals: cost 0, so no count, not even a slot of 0 for their key.
    records.append(record(0, 8, request_id="r-closed", ts=NOW, status=503, cost=0))
    records.append(record(0, 9, request_id="r-closed-2", key_id="k2", ts=NOW, status=503, cost=0))
    records.append(record(0, 6, request_id="r0", ts=NOW))  # a retry of r0
    records.append(Rec(b"{not json", b"k1", 0, 7))  # dead-lettered by the ingest path, not counted here
    batch = group_batch(records, RecordChecker(VALIDATOR, None, None), RecentRequests(100), NOW.timestamp() + 10)
    minute = int(NOW.timestamp()) // 60 * 60
    assert batch.counts == {(0, "k1", "", minute): 5}
    assert batch.duplicates == 1
    report = batch.nodes[(0, "k1")]["n1"]
    assert report.arrivals == 7  # the refusals say where the traffic is
    assert report.counts == (5, 7, 9)  # from the latest event that carried them


def test_recent_requests_forget_the_oldest_past_the_bound() -> None:
    recent = RecentRequests(3)
    assert all(recent.add(h) for h in (1, 2, 3, 4))
    assert len(recent) == 3
    assert recent.add(1)  # forgotten
    assert not recent.add(4)


class TrippingValidator(Validator):
    """A validator with a bug that one input trips (here: request ids starting with 'boom')."""

    def check(self, record: KafkaRecord, now: float) -> tuple[RequestEvent, float] | Rejection:
        if record.value is not None and b'"boom' in record.value:
            raise KeyError("a bug")
        return super().check(record, now)


def test_a_record_that_trips_a_bug_is_dead_lettered_and_the_batch_goes_on() -> None:
    checker = RecordChecker(TrippingValidator(2048, 24 * 3600, 300), None, None)
    records = [record(2, 40 + i, request_id=rid) for i, rid in enumerate(["r1", "boom-1", "r2"])]
    scanned = scan(records, checker, {}, (), NOW.timestamp())
    assert [(r.offset, r.reason) for r in scanned.rejections] == [(41, "check_failed")]
    assert scanned.rejections[0].detail == "KeyError: 'a bug'"
    assert scanned.rejections[0].value == records[1].value  # the original bytes, to replay once fixed
    assert scanned.aggregate.events == 2
    assert scanned.aggregate.offsets == {2: 42}  # the partition moves past it
    lane = group_batch(records, checker, RecentRequests(100), NOW.timestamp())
    assert lane.counts == {(2, "k1", "", int(NOW.timestamp() - 30) // 60 * 60): 2}


class OverflowingValidator(Validator):
    """A check that lets one input through with a value the insert cannot hold (a bug the
    rendering trips: request ids starting with 'huge' carry 2**70 bytes out)."""

    def check(self, record: KafkaRecord, now: float) -> tuple[RequestEvent, float] | Rejection:
        result = super().check(record, now)
        if not isinstance(result, Rejection) and result[0]["request_id"].startswith("huge"):
            result[0]["bytes_out"] = 2**70
        return result


def test_a_record_the_insert_cannot_hold_is_dead_lettered_and_the_batch_written() -> None:
    pipeline, dead = pipeline_with(OverflowingValidator(2048, 24 * 3600, 300))
    ids = ["r1", "huge-1", "r2", "r3", "huge-2", "r4", "r5"]
    records = [record(3, 10 + i, request_id=rid) for i, rid in enumerate(ids)]
    prepared = asyncio.run(pipeline.prepare(records, {}, lambda p: True))
    assert [(r.offset, r.reason) for r in dead] == [(11, "render_failed"), (14, "render_failed")]
    assert dead[0].detail.startswith("OverflowError")
    assert dead[0].value == records[1].value  # the original bytes, to replay once fixed
    assert prepared.outcome.rejected == {"render_failed": 2}
    assert prepared.outcome.counted == 5
    assert prepared.outcome.offsets == {3: 16}  # the partition moves past them
    assert prepared.rows is not None
    minute = prepared.rows.filter(pa.compute.equal(prepared.rows.column("level"), LEVELS["minute"]))
    assert sum(minute.column("requests").to_pylist()) == 5
    assert request_hash("k1", "huge-1") not in prepared.hashes


def test_rows_that_render_are_not_set_aside() -> None:
    checker = RecordChecker(VALIDATOR, None, None)
    scanned = scan([record(1, i, request_id=f"r{i}") for i in range(9)], checker, {}, (), NOW.timestamp())
    assert scanned.aggregate.events == 9
    assert unrenderable(scanned.aggregate.rows, "events") == []


def test_a_batch_of_nothing_but_bad_rows_is_dead_lettered_and_the_partition_moves_on() -> None:
    # One poison record alone in a quiet moment: every row of its batch fails, but a typical
    # valid event renders, so the input is at fault (it used to be read again until a valid
    # record shared its batch).
    pipeline, dead = pipeline_with(OverflowingValidator(2048, 24 * 3600, 300))
    records = [record(3, 10 + i, request_id=f"huge-{i}") for i in range(2)]
    prepared = asyncio.run(pipeline.prepare(records, {}, lambda p: True))
    assert [(r.offset, r.reason) for r in dead] == [(10, "render_failed"), (11, "render_failed")]
    assert prepared.outcome.counted == 0
    assert prepared.outcome.offsets == {3: 11}
    assert prepared.rows is not None
    assert prepared.rows.column("level").to_pylist() == [LEVELS["offset"]]  # only the offsets move


def test_a_render_failure_every_row_and_a_typical_event_trip_is_not_blamed_on_the_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: BatchAggregate, topic: str, client_ips: object = None) -> pa.Table:
        raise TypeError("a bug in the rendering")

    monkeypatch.setattr(BatchAggregate, "to_arrow", broken)
    pipeline, dead = pipeline_with()
    records = [record(3, 10 + i, request_id=f"r{i}") for i in range(3)]
    with pytest.raises(TypeError):  # the batch is read again (and the code fixed), not dead-lettered
        asyncio.run(pipeline.prepare(records, {}, lambda p: True))
    assert dead == []


def test_the_typical_event_renders() -> None:
    assert renders_typical_event("events")


def test_401_rows_are_written_once_more_as_their_own_level() -> None:
    """The ``client_401`` rows are exactly the batch's ``client_hour`` rows of status 401
    (008_client_401.sql): the invalid-key storm scan reads only them."""
    records = [
        record(0, i, request_id=f"r{i}", key_id=f"k{i % 3}", status=status, client_ip=f"203.0.113.{i % 2}")
        for i, status in enumerate([401, 401, 200, 401, 403, 401, 200])
    ]
    records.append(record(0, 9, request_id="r9", status=401))  # no client address: in neither level
    table = prepare(records).rows
    assert table is not None

    def cells(level: str) -> list[tuple[object, ...]]:
        return sorted(
            (r["key_id"], r["account_id"], r["bucket"], r["client_ip"], r["requests"], r["bytes_out"], r["cost"])
            for r in table.to_pylist()
            if r["level"] == LEVELS[level] and (level != "client_hour" or r["status"] == 401)
        )

    assert cells("client_401") == cells("client_hour")
    assert sum(row[4] for row in cells("client_401")) == 4
    assert {r["status"] for r in table.to_pylist() if r["level"] == LEVELS["client_401"]} == {401}


def test_a_batch_without_401s_has_no_client_401_rows() -> None:
    table = prepare([record(0, i, request_id=f"r{i}", client_ip="198.51.100.7") for i in range(3)]).rows
    assert table is not None
    assert LEVELS["client_401"] not in {r["level"] for r in table.to_pylist()}


def test_429_rows_are_written_once_more_as_their_own_level() -> None:
    """The ``minute_429`` rows are exactly the batch's ``minute`` rows of status 429
    (009_minute_429.sql): "top keys by 429s" finds its candidates in them alone."""
    statuses = [429, 429, 200, 429, 403, 429, 200, 429]
    records = [
        record(0, i, request_id=f"r{i}", key_id=f"k{i % 3}", status=status, endpoint=f"/v0/e{i % 2}")
        for i, status in enumerate(statuses)
    ]
    table = prepare(records).rows
    assert table is not None

    def cells(level: str) -> list[tuple[object, ...]]:
        return sorted(
            (r["key_id"], r["bucket"], r["endpoint"], r["status"], r["route"], r["requests"], r["bytes_out"], r["cost"])
            for r in table.to_pylist()
            if r["level"] == LEVELS[level] and (level != "minute" or r["status"] == 429)
        )

    assert cells("minute_429") == cells("minute")
    assert sum(row[5] for row in cells("minute_429")) == statuses.count(429)
    assert len(cells("minute_429")) == 4  # (k0, e0), (k1, e1) twice, (k0, e1), (k2, e1): grouped as the minutes


def test_the_fast_lane_keeps_a_nodes_highest_counts_of_its_latest_minute() -> None:
    """A node takes its counts as it admits a request, in the windows of the request's start: a
    request held at a cap and admitted late started before one admitted at once and carries the
    higher counts. Within a minute the highest are kept; a later minute replaces them."""
    at = NOW + timedelta(seconds=5)

    def counted(*events: tuple[float, int]) -> tuple[int, int, int] | None:
        records = [
            record(0, i, request_id=f"r{i}", ts=at + timedelta(seconds=s), node_counts=[n, n + 100, n + 200])
            for i, (s, n) in enumerate(events)
        ]
        batch = group_batch(records, RecordChecker(VALIDATOR, None, None), RecentRequests(100), at.timestamp() + 60)
        return batch.nodes[(0, "k1")]["n1"].counts

    # The fresh request (latest start, count 35) first, then the released ones (earlier, 36..40).
    assert counted((0.27, 35), (0.12, 36), (0.13, 40), (0.14, 38)) == (40, 140, 240)
    # The next minute starts the node's counts over: its (lower) counts are the latest.
    assert counted((0.12, 90), (60.0, 3)) == (3, 103, 203)
    # An event of the minute before, fetched after, does not take them back.
    assert counted((60.0, 3), (0.12, 90)) == (3, 103, 203)
