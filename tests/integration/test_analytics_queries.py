"""The analytics queries, abuse signals and CLI against the real engine, on a known sample."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.analytics import Breakdown, SignalKind, Subject, TopDimension, TopMetric
from schemas.decisions import Decision, DecisionAction, Window
from schemas.limits import LimitPolicy
from schemas.usage import Granularity
from tests.integration.helpers import days_ago
from worker.analytics import queries
from worker.analytics.cli import add_analytics_commands
from worker.analytics.sample import (
    ABUSED_KEY,
    MANUAL_KEY,
    NORMAL_KEY,
    PROBER_KEY,
    STORM_IP,
    SampleFacts,
    seed_sample,
)
from worker.analytics.signals import SignalThresholds, abuse_signals
from worker.cli import run_command
from worker.settings import Settings
from worker.store.decisions import DecisionStore
from worker.store.rollup import rollup_table
from worker.store.usage import LevelsHeld, floor_to

pytestmark = [pytest.mark.clickhouse, pytest.mark.no_kafka]

ROLLUP_COLUMNS = ["level", "key_id", "bucket", "endpoint", "status", "node_id", "account_id", "requests"]


def test_top_keys_last_hour_ranks_by_requests_with_counts(
    clickhouse: Any, settings: Settings, sample: SampleFacts
) -> None:
    result = queries.top(
        clickhouse,
        settings.clickhouse_database,
        TopDimension.key,
        TopMetric.requests,
        sample.now - timedelta(hours=1),
        sample.now,
        3,
    )
    assert result.level is Granularity.minute
    assert [(e.id, e.requests) for e in result.entries] == [(ABUSED_KEY, 3000), (PROBER_KEY, 360), (NORMAL_KEY, 60)]
    first = result.entries[0]
    assert (first.account_id, first.errors, first.rate_limited, first.auth_failures) == ("acct-b", 1200, 1200, 0)


@pytest.mark.parametrize(
    ("dimension", "metric", "expected"),
    [
        (TopDimension.key, TopMetric.rate_limited, [(ABUSED_KEY, 1200)]),
        # then the 150 guessed keys with 1 each: ties go by id, so the first of them
        (TopDimension.key, TopMetric.auth_failures, [(PROBER_KEY, 300), ("cf_liv_guess00000000000", 1)]),
        (TopDimension.endpoint, TopMetric.errors, [("/v0/payments", 1350), ("/v0/wallets", 300)]),
        (TopDimension.account, TopMetric.requests, [("acct-b", 3000), ("acct-c", 360), ("acct-a", 60)]),
    ],
)
def test_top_by_dimension_and_metric(
    clickhouse: Any,
    settings: Settings,
    sample: SampleFacts,
    dimension: TopDimension,
    metric: TopMetric,
    expected: list[tuple[str, int]],
) -> None:
    result = queries.top(
        clickhouse,
        settings.clickhouse_database,
        dimension,
        metric,
        sample.now - timedelta(hours=1),
        sample.now,
        2 if dimension is TopDimension.key else 5,
    )
    value = {
        TopMetric.requests: lambda e: e.requests,
        TopMetric.errors: lambda e: e.errors,
        TopMetric.auth_failures: lambda e: e.auth_failures,
        TopMetric.rate_limited: lambda e: e.rate_limited,
    }[metric]
    assert [(e.id, value(e)) for e in result.entries] == expected


def test_top_over_days_reads_hour_rows_and_counts_the_baseline(
    clickhouse: Any, settings: Settings, sample: SampleFacts
) -> None:
    since = sample.now.replace(hour=0, minute=0, second=0) - timedelta(days=7)
    result = queries.top(
        clickhouse, settings.clickhouse_database, TopDimension.key, TopMetric.requests, since, sample.now, 5
    )
    assert result.level is Granularity.hour
    by_id = {e.id: e.requests for e in result.entries}
    assert by_id[NORMAL_KEY] == 7 * sample.baseline_per_day[NORMAL_KEY] + 60
    assert by_id[ABUSED_KEY] == 7 * sample.baseline_per_day[ABUSED_KEY] + 3000


def test_top_of_a_day_whose_minutes_are_deleted_reads_the_hour_rows(clickhouse: Any, settings: Settings) -> None:
    # 10 requests 10 days ago (past the minute level's 7 days), at every level as the worker
    # writes them; the minute rows are gone as the TTL would have it. A 24 h window over that day
    # was answered from the minute rows: empty.
    now = days_ago(1, 12)
    at = now - timedelta(days=10)
    key = "cfxold_0123456789abcdef01234567"
    rows = [[level, key, floor_to(at, Granularity(level)), "/v0/x", 200, "n1", "a", 10] for level in ("hour", "day")]
    clickhouse.insert(rollup_table(settings.clickhouse_database), rows, column_names=ROLLUP_COLUMNS)
    since = at - timedelta(hours=12, minutes=30)
    result = queries.top(
        clickhouse,
        settings.clickhouse_database,
        TopDimension.key,
        TopMetric.requests,
        since,
        since + timedelta(days=1),
        held=LevelsHeld(minute_days=7),
        now=now,
    )
    assert [(e.id, e.requests) for e in result.entries] == [(key, 10)]
    # What was counted, said: the hour level's whole buckets.
    assert (result.level, result.since, result.until) == (
        Granularity.hour,
        floor_to(since, Granularity.hour),
        floor_to(since, Granularity.hour) + timedelta(hours=25),
    )


def test_top_refuses_bad_windows(clickhouse: Any, settings: Settings, sample: SampleFacts) -> None:
    db, now = settings.clickhouse_database, sample.now
    with pytest.raises(ValueError, match="before"):
        queries.top(clickhouse, db, TopDimension.key, TopMetric.requests, now, now - timedelta(hours=1))
    with pytest.raises(ValueError, match="at most 93 days"):
        queries.top(clickhouse, db, TopDimension.key, TopMetric.requests, now - timedelta(days=200), now)
    with pytest.raises(ValueError, match="n must be"):
        queries.top(clickhouse, db, TopDimension.key, TopMetric.requests, now - timedelta(hours=1), now, 0)


def test_key_series_by_status_class_fills_gaps(clickhouse: Any, settings: Settings, sample: SampleFacts) -> None:
    since = sample.now - timedelta(minutes=90)
    result = queries.series(
        clickhouse,
        settings.clickhouse_database,
        Subject.key,
        ABUSED_KEY,
        Granularity.minute,
        since,
        sample.now,
        Breakdown.status_class,
    )
    groups = {g.group: g for g in result.groups}
    assert set(groups) == {"2xx", "4xx"}
    assert groups["2xx"].total_requests == 1800
    assert groups["4xx"].total_requests == 1200
    assert result.buckets == 91
    assert result.step_seconds == 60
    four = groups["4xx"]
    assert len(four.requests) == len(four.errors) == len(four.bytes_out) == 91
    assert four.requests[0] == 0
    assert four.requests[-1] == 20
    assert four.errors[-1] == 20
    assert result.bucket_start(90) == sample.now.replace(second=0)


def test_key_series_without_breakdown_by_day(clickhouse: Any, settings: Settings, sample: SampleFacts) -> None:
    today = sample.now.replace(hour=0, minute=0, second=0)
    result = queries.series(
        clickhouse,
        settings.clickhouse_database,
        Subject.key,
        NORMAL_KEY,
        Granularity.day,
        today - timedelta(days=7),
        sample.now,
    )
    assert [g.group for g in result.groups] == ["all"]
    assert result.groups[0].requests == [1440] * 7 + [60]
    assert result.groups[0].bytes_out[0] == 1440 * 512


def test_account_series_by_endpoint(clickhouse: Any, settings: Settings, sample: SampleFacts) -> None:
    result = queries.series(
        clickhouse,
        settings.clickhouse_database,
        Subject.account,
        "acct-c",
        Granularity.hour,
        sample.now - timedelta(hours=2),
        sample.now,
        Breakdown.endpoint,
    )
    # In the day's first two hours, yesterday's last baseline hours are in the window too.
    before = sample.baseline([PROBER_KEY], floor_to(sample.now - timedelta(hours=2), Granularity.hour), sample.now)
    assert {g.group: g.total_requests for g in result.groups} == {"/v0/wallets": 300, "/v0/rates": 60 + before}


def test_series_refuses_too_many_buckets(clickhouse: Any, settings: Settings) -> None:
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="at most 50000"):
        queries.series(
            clickhouse,
            settings.clickhouse_database,
            Subject.key,
            "k",
            Granularity.minute,
            now - timedelta(days=60),
            now,
        )


def test_key_state_counts_windows_against_the_policy(clickhouse: Any, settings: Settings, sample: SampleFacts) -> None:
    state = queries.key_state(clickhouse, settings.clickhouse_database, ABUSED_KEY, LimitPolicy(), sample.now)
    windows = {w.window.value: w for w in state.windows}
    # 20 of the abused key's 50 a minute were refused with 429: they do not use up the allowance.
    assert (windows["minute"].count, windows["hour"].count, windows["day"].count) == (30, 1800, 1800)
    assert windows["hour"].over
    assert not windows["minute"].over
    assert not windows["day"].over
    assert windows["minute"].remaining == 70
    assert windows["hour"].remaining == 0
    assert state.account_id == "acct-b"
    assert state.blocked
    assert state.blocked_until == sample.now + timedelta(minutes=5)
    assert state.active_block is not None
    assert state.active_block.version == 7
    assert [d.version for d in state.history] == [7, 6, 5, 4, 3, 2, 1]


def test_key_state_unlimited_policy_and_released_key(clickhouse: Any, settings: Settings, sample: SampleFacts) -> None:
    state = queries.key_state(clickhouse, settings.clickhouse_database, NORMAL_KEY, LimitPolicy.unlimited(), sample.now)
    assert all(w.limit is None and w.remaining is None and not w.over for w in state.windows)
    assert not state.blocked
    assert state.active_block is None
    assert [d.action.value for d in state.history] == ["unblock", "block"]


def test_blocked_keys_lists_blocks_in_force_only(clickhouse: Any, settings: Settings, sample: SampleFacts) -> None:
    blocked = queries.blocked_keys(clickhouse, settings.clickhouse_database, sample.now)
    assert [b.key_id for b in blocked] == sample.blocked
    manual = blocked[1]
    assert manual.until is None
    assert manual.source == "operator"
    # Once the abused key's block expires, only the manual block is left.
    later = queries.blocked_keys(clickhouse, settings.clickhouse_database, sample.now + timedelta(minutes=6))
    assert [b.key_id for b in later] == [MANUAL_KEY]


def test_an_operators_block_after_a_workers_is_listed_as_itself(clickhouse: Any, settings: Settings) -> None:
    # The operator's block has no until, limit or count: none of the older block's may show through.
    now = days_ago(1, 12)
    DecisionStore(clickhouse, settings.clickhouse_database).record(
        [
            Decision(
                key_id="cfxold_0123456789abcdef01234567",
                action=DecisionAction.block,
                window=Window.minute,
                limit=100,
                count=101,
                until=now + timedelta(seconds=30),
                version=1,
                decided_at=now - timedelta(seconds=30),
                reason="101 requests in the minute window; limit 100",
            ),
            Decision(
                key_id="cfxold_0123456789abcdef01234567",
                action=DecisionAction.block,
                window=Window.manual,
                version=2,
                decided_at=now - timedelta(seconds=10),
                reason="operator: leaked",
                source="operator",
            ),
        ]
    )
    for at in (now, now + timedelta(minutes=5)):  # before and after the worker's block ended
        [listed] = queries.blocked_keys(clickhouse, settings.clickhouse_database, at)
        assert (listed.window, listed.until, listed.limit, listed.count) == (Window.manual, None, None, None)
        assert (listed.version, listed.source) == (2, "operator")


def test_a_keys_signals_are_found_past_the_cap_of_other_keys(clickhouse: Any, settings: Settings) -> None:
    # 60 keys refused 403 on every request; the weakest is the one asked about. The cap (the
    # strongest 50 of a kind) applied before the key filter hid it.
    now = days_ago(1, 12, 0, 30)
    minute = now.replace(second=0) - timedelta(minutes=5)
    rows = [["minute", f"cfxkey_{i:024x}", minute, "/v0/x", 403, "n1", "a", 100 + i] for i in range(60)]
    clickhouse.insert(rollup_table(settings.clickhouse_database), rows, column_names=ROLLUP_COLUMNS)
    weakest = f"cfxkey_{0:024x}"
    report = abuse_signals(
        clickhouse, settings.clickhouse_database, now, kinds={SignalKind.auth_failures}, key_id=weakest
    )
    assert [(s.kind, s.key_id) for s in report.signals] == [(SignalKind.auth_failures, weakest)]
    everyone = abuse_signals(clickhouse, settings.clickhouse_database, now, kinds={SignalKind.auth_failures})
    assert len(everyone.signals) == SignalThresholds().max_per_kind


def test_a_burst_inside_the_recent_window_is_not_its_own_baseline(clickhouse: Any, settings: Settings) -> None:
    # A key silent for weeks sends 5,000 requests yesterday at 12:00; looked at over the last 24 h
    # at 10:00, yesterday's day row was part of the baseline and the jump hid itself.
    now = days_ago(1, 10)
    burst = now - timedelta(hours=22)
    rows = [
        [level, "cfxdor_0123456789abcdef01234567", bucket, "/v0/x", 200, "n1", "a", 5000]
        for level, bucket in (("minute", burst), ("hour", burst), ("day", burst.replace(hour=0)))
    ]
    clickhouse.insert(rollup_table(settings.clickhouse_database), rows, column_names=ROLLUP_COLUMNS)
    for hours in (24, 48):
        th = SignalThresholds(recent=timedelta(hours=hours))
        report = abuse_signals(clickhouse, settings.clickhouse_database, now, th, kinds={SignalKind.rate_jump})
        [jump] = report.signals
        assert jump.evidence["requests"] == 5000
        assert jump.evidence["factor"] == "no baseline"


def test_repeated_shadow_blocks_are_said_to_be_a_dry_run(clickhouse: Any, settings: Settings) -> None:
    now = days_ago(1, 12)
    key = "cfxdry_0123456789abcdef01234567"
    DecisionStore(clickhouse, settings.clickhouse_database).record(
        [
            Decision(
                key_id=key,
                action=DecisionAction.block,
                window=Window.minute,
                limit=100,
                count=100,
                until=now - timedelta(minutes=m) + timedelta(seconds=30),
                version=m,
                decided_at=now - timedelta(minutes=m),
                shadow=m > 1,
            )
            for m in range(1, 5)
        ]
    )
    report = abuse_signals(clickhouse, settings.clickhouse_database, now, kinds={SignalKind.repeated_blocks})
    [signal] = report.signals
    assert (signal.evidence["blocks"], signal.evidence["shadow_blocks"]) == (4, 3)
    assert "3 of them shadow blocks, a dry run the nodes served" in signal.explanation


@pytest.mark.parametrize("hour", [0, 12])
def test_a_rate_jumps_baseline_is_seven_whole_days_at_any_hour(clickhouse: Any, settings: Settings, hour: int) -> None:
    # In the day's first hour the recent window starts yesterday, so the baseline is days -8..-2;
    # CI once ran at 00:59 and read 6 days of the sample's 7 (17.14/hour, not 20.0).
    now = days_ago(1, hour, 59, 30)
    seed_sample(clickhouse, settings.clickhouse_database, now)
    report = abuse_signals(clickhouse, settings.clickhouse_database, now, kinds={SignalKind.rate_jump})
    jump = {s.key_id: s for s in report.signals}[ABUSED_KEY]
    assert jump.evidence["baseline_per_hour"] == 20.0


def test_abuse_signals_find_each_pattern_and_explain_it(
    clickhouse: Any, settings: Settings, sample: SampleFacts
) -> None:
    report = abuse_signals(clickhouse, settings.clickhouse_database, sample.now)
    found = {(s.kind, s.key_id or s.client_ip): s for s in report.signals}
    jump = found[(SignalKind.rate_jump, ABUSED_KEY)]
    assert jump.evidence["requests"] == 3000
    assert jump.evidence["baseline_per_hour"] == 20.0
    assert "3,000 requests" in jump.explanation
    assert "20.0/hour" in jump.explanation
    limited = found[(SignalKind.rate_limited, ABUSED_KEY)]
    assert limited.evidence["rate_limited"] == 1200
    assert "429" in limited.explanation
    auth = found[(SignalKind.auth_failures, PROBER_KEY)]
    assert auth.evidence["auth_failures"] == 300
    assert "83%" in auth.explanation
    leaked = found[(SignalKind.many_sources, ABUSED_KEY)]
    assert leaked.evidence["client_ips"] == sample.abused_ips + 1  # plus the baseline's own address
    assert leaked.evidence["nodes"] == 3
    blocks = found[(SignalKind.repeated_blocks, ABUSED_KEY)]
    assert blocks.evidence["blocks"] == sample.abused_blocks_24h
    assert blocks.evidence["shadow_blocks"] == 0
    assert "shadow" not in blocks.explanation
    storm = found[(SignalKind.invalid_key_storm, STORM_IP)]
    assert storm.evidence == {"status_401": 150, "distinct_keys": sample.storm_keys}
    assert "key guessing" in storm.explanation
    # The normal key keeps to its baseline and is never flagged.
    assert not [s for s in report.signals if s.key_id == NORMAL_KEY]
    assert report.signals[0].severity.value == "high"


def test_abuse_signals_thresholds_kinds_and_key_filter(
    clickhouse: Any, settings: Settings, sample: SampleFacts
) -> None:
    db = settings.clickhouse_database
    only = abuse_signals(clickhouse, db, sample.now, kinds={SignalKind.rate_limited})
    assert [(s.kind, s.key_id) for s in only.signals] == [(SignalKind.rate_limited, ABUSED_KEY)]
    strict = SignalThresholds(rate_jump_factor=500, client_ips_min=100, invalid_key_401_min=1000)
    kinds = {s.kind for s in abuse_signals(clickhouse, db, sample.now, strict).signals}
    assert not kinds & {SignalKind.rate_jump, SignalKind.many_sources, SignalKind.invalid_key_storm}
    mine = abuse_signals(clickhouse, db, sample.now, key_id=PROBER_KEY)
    assert {s.kind for s in mine.signals} == {SignalKind.rate_jump, SignalKind.auth_failures}


# -- CLI handlers ---------------------------------------------------------------------------


@pytest.fixture
def meter(settings: Settings, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    parser = argparse.ArgumentParser(prog="meter")
    add_analytics_commands(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(argv)
        code = run_command(args, settings)
        captured = capsys.readouterr()
        stderr.append(captured.err)
        return code, captured.out

    stderr: list[str] = []
    run.stderr = stderr  # type: ignore[attr-defined]

    return run


def test_cli_top_in_each_format(meter: Callable[..., tuple[int, str]], sample: SampleFacts) -> None:
    until = sample.now.strftime("%Y-%m-%dT%H:%M:%SZ")
    code, out = meter("top", "-n", "2", "--until", until, "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert [e["id"] for e in doc["entries"]] == [ABUSED_KEY, PROBER_KEY]
    assert doc["level"] == "minute"
    code, out = meter("top", "-n", "2", "--until", until, "--format", "csv", "--metric", "rate_limited")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows == [
        {
            "rank": "1",
            "id": ABUSED_KEY,
            "account_id": "acct-b",
            "requests": "3000",
            "errors": "1200",
            "auth_failures": "0",
            "rate_limited": "1200",
        }
    ]
    code, out = meter("top", "--by", "endpoint", "--until", until)
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "id", "requests", "errors", "auth_failures", "rate_limited"]
    assert lines[1].split()[:3] == ["1", "/v0/payments", "3150"]


def test_cli_key_state_blocked_signals_and_usage(meter: Callable[..., tuple[int, str]], sample: SampleFacts) -> None:
    code, out = meter("key-state", "--key", MANUAL_KEY)
    assert code == 0
    assert "BLOCKED until an operator unblocks" in out
    code, out = meter("blocked", "--format", "csv")
    assert [r["key_id"] for r in csv.DictReader(io.StringIO(out))] == sample.blocked
    as_of = sample.now.strftime("%Y-%m-%dT%H:%M:%SZ")  # the sample's clock, not the wall clock
    code, out = meter("signals", "--kind", "invalid_key_storm", "--format", "json", "--as-of", as_of)
    assert [s["client_ip"] for s in json.loads(out)["signals"]] == [STORM_IP]
    code, out = meter("signals", "--key", PROBER_KEY, "--as-of", as_of)
    assert "auth_failures" in out
    assert "83%" in out
    since = (sample.now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    code, out = meter(
        "account-usage", "--account", "acct-b", "--granularity", "hour", "--since", since, "--sparse", "--format", "csv"
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    before = sample.baseline([ABUSED_KEY], floor_to(sample.now - timedelta(hours=1), Granularity.hour), sample.now)
    assert sum(int(r["requests"]) for r in rows) == 3000 + before


def test_cli_refuses_bad_input(meter: Callable[..., tuple[int, str]]) -> None:
    code, _ = meter("top", "--window", "200d")
    assert code == 2
    assert "at most 93 days" in meter.stderr[-1]
    with pytest.raises(SystemExit):
        meter("top", "--since", "2026-01-01T00:00:00")  # no offset: refused, not guessed


def test_meter_usage_points_match_the_series_and_the_cli_json_shape(
    clickhouse: Any, settings: Settings, sample: SampleFacts, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import print_points

    db = settings.clickhouse_database
    since, until = sample.now - timedelta(hours=2), sample.now + timedelta(minutes=1)
    points = queries.key_points(clickhouse, db, ABUSED_KEY, Granularity.minute, since, until)
    whole = queries.series(clickhouse, db, Subject.key, ABUSED_KEY, Granularity.minute, since, until)
    assert [p.requests for p in points] == whole.groups[0].requests  # zero-filled, one point per bucket
    assert sum(p.requests for p in points) == whole.groups[0].total_requests > 0
    assert sum(p.errors for p in points) == 1200  # its 429s
    sparse = queries.key_points(clickhouse, db, ABUSED_KEY, Granularity.minute, since, until, sparse=True)
    assert sparse == [p for p in points if p.requests]
    assert all(p.bucket.tzinfo is not None and p.bucket.second == 0 for p in sparse)
    print_points(sparse, "json")
    doc = json.loads(capsys.readouterr().out)
    assert doc[0].keys() >= {"bucket", "requests"}
    assert doc[0]["bucket"].endswith("Z")
    assert sum(d["requests"] for d in doc) == whole.groups[0].total_requests


def test_series_of_a_key_without_traffic_is_all_zeros(clickhouse: Any, settings: Settings, sample: SampleFacts) -> None:
    db = settings.clickhouse_database
    since = sample.now.replace(second=0) - timedelta(hours=1)  # minute-aligned: exactly 60 buckets
    until = since + timedelta(hours=1)
    points = queries.key_points(clickhouse, db, "no-such-key", Granularity.minute, since, until)
    assert len(points) == 60
    assert not any(p.requests for p in points)
    assert queries.key_points(clickhouse, db, "no-such-key", Granularity.minute, since, until, sparse=True) == []
