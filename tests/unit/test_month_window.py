"""The calendar-month quota: UTC month boundaries, live counters and the engine (injected clock)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.decisions import (
    DecisionAction,
    Window,
    month_bounds,
    window_end,
    window_seconds,
    window_start,
)
from schemas.limits import LimitOverride, LimitPolicy, OverrideScope, PolicyBook
from tests.clock import Clock
from worker.limits.counters import WindowCounters
from worker.limits.engine import LimitEngine


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


# -- calendar logic ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "start", "end"),
    [
        (ts(2026, 12, 31, 23, 59, 59), ts(2026, 12, 1), ts(2027, 1, 1)),  # December -> January
        (ts(2027, 1, 1), ts(2027, 1, 1), ts(2027, 2, 1)),  # the first second of January is January
        (ts(2028, 2, 29, 12), ts(2028, 2, 1), ts(2028, 3, 1)),  # leap February: 29 days
        (ts(2027, 2, 28, 23, 59, 59), ts(2027, 2, 1), ts(2027, 3, 1)),  # non-leap February: 28 days
        (ts(2100, 2, 15), ts(2100, 2, 1), ts(2100, 3, 1)),  # 2100 is not a leap year
        (ts(2026, 4, 30, 23, 59, 59), ts(2026, 4, 1), ts(2026, 5, 1)),  # a 30-day month
    ],
)
def test_month_bounds(at: int, start: int, end: int) -> None:
    assert month_bounds(at) == (start, end)
    assert month_bounds(at + 0.5) == (start, end)  # fractions of a second stay in their month
    assert window_start(Window.month, at) == start
    assert window_end(Window.month, at) == end
    assert window_end(Window.month, start) == end  # the end of the window a start opens


def test_month_lengths() -> None:
    assert window_seconds(Window.month, ts(2028, 2, 10)) == 29 * 86400
    assert window_seconds(Window.month, ts(2027, 2, 10)) == 28 * 86400
    assert window_seconds(Window.month, ts(2026, 12, 10)) == 31 * 86400
    assert window_seconds(Window.month, ts(2026, 11, 10)) == 30 * 86400
    # The cache of the last month never answers for another one.
    assert month_bounds(ts(2026, 11, 30, 23, 59, 59))[1] == ts(2026, 12, 1)
    assert month_bounds(ts(2026, 12, 1))[0] == ts(2026, 12, 1)
    assert month_bounds(ts(2026, 11, 30, 23, 59, 59))[0] == ts(2026, 11, 1)


def test_fixed_windows_unchanged() -> None:
    at = ts(2026, 12, 31, 23, 59, 59)
    assert window_start(Window.day, at) == ts(2026, 12, 31)
    assert window_end(Window.day, at) == ts(2027, 1, 1)
    assert window_end(Window.minute, at) == ts(2027, 1, 1)
    assert window_seconds(Window.hour, at) == 3600


def test_policy_month_is_optional() -> None:
    assert LimitPolicy().per_month is None
    assert LimitPolicy.model_validate({"per_minute": 1}).limit(Window.month) is None  # old records
    assert LimitPolicy(per_month=7).limit(Window.month) == 7
    assert LimitPolicy(per_month=7).limit_tuple() == (100, 1_000, 5_000)  # the node_counts windows only


# -- live counters ---------------------------------------------------------------------------


def test_counters_roll_the_month_over() -> None:
    c = WindowCounters()
    last = ts(2026, 12, 31, 23, 59)
    c.add("k", "a", ts(2026, 12, 1), 5)
    kw = c.add("k", "a", last, 3)
    assert (kw.month, kw.month_n) == (ts(2026, 12, 1), 8)
    assert kw.count(Window.month, last + 30) == 8
    assert kw.count(Window.month, ts(2027, 1, 1)) == 0  # January: December's count is not January's
    kw = c.add("k", "a", ts(2027, 1, 1), 2)
    assert (kw.month, kw.month_n, kw.day_n) == (ts(2027, 1, 1), 2, 2)
    c.add("k", "a", last, 4)  # a late December event: only ClickHouse gets it
    assert kw.month_n == 2
    assert kw.start(Window.month) == ts(2027, 1, 1)


def test_counters_expire_keeps_what_keep_holds() -> None:
    c = WindowCounters()
    c.add("quota", "a", ts(2026, 12, 1), 5)
    c.add("plain", "a", ts(2026, 12, 1), 5)
    assert c.expire(ts(2026, 12, 2), keep=lambda k, kw: k == "quota") == 1
    assert list(c.keys) == ["quota"]


# -- the engine, with an injected clock ------------------------------------------------------


def make(policy: LimitPolicy, now: float) -> tuple[LimitEngine, Clock]:
    clock = Clock(now)
    engine = LimitEngine(PolicyBook(policy), clock)
    engine.assign(0, [])
    return engine, clock


def hit(engine: LimitEngine, key: str, n: int, at: float) -> list:  # type: ignore[type-arg]
    return engine.observe({(0, key, "acct", int(at) // 60 * 60): n}).decisions


def test_month_quota_blocks_until_the_month_end_then_unblocks_at_rollover() -> None:
    policy = LimitPolicy(per_minute=None, per_hour=None, per_day=None, per_month=50)
    start = ts(2026, 12, 31, 23, 58)
    engine, clock = make(policy, start)
    assert hit(engine, "k", 30, ts(2026, 12, 3)) == []  # earlier in the month (a late batch)
    assert hit(engine, "k", 19, start) == []
    [block] = hit(engine, "k", 1, start)
    assert (block.action, block.window, block.limit, block.count) == (DecisionAction.block, Window.month, 50, 50)
    assert block.until == datetime(2027, 1, 1, tzinfo=UTC)
    assert "current month" in block.reason
    assert hit(engine, "k", 5, start + 30) == []  # edge-triggered
    clock.now = ts(2027, 1, 1) - 0.1
    assert engine.tick() == []
    clock.now = ts(2027, 1, 1)
    [unblock] = engine.tick()
    assert (unblock.action, unblock.window) == (DecisionAction.unblock, Window.month)
    assert hit(engine, "k", 49, ts(2027, 1, 1)) == []  # January starts from zero


def test_month_and_day_exceeded_the_month_ends_last() -> None:
    engine, _ = make(LimitPolicy(per_minute=None, per_hour=None, per_day=10, per_month=10), ts(2026, 11, 10, 12))
    [block] = hit(engine, "k", 10, ts(2026, 11, 10, 12))
    assert (block.window, block.until) == (Window.month, datetime(2026, 12, 1, tzinfo=UTC))


def test_february_quota_in_a_leap_year() -> None:
    engine, clock = make(LimitPolicy(per_minute=None, per_hour=None, per_day=None, per_month=3), ts(2028, 2, 28, 12))
    [block] = hit(engine, "k", 3, ts(2028, 2, 28, 12))
    assert block.until == datetime(2028, 3, 1, tzinfo=UTC)
    clock.now = ts(2028, 2, 29, 23, 59)
    assert engine.tick() == []  # the 29th is still February
    clock.now = ts(2028, 3, 1)
    [unblock] = engine.tick()
    assert unblock.action is DecisionAction.unblock


def test_rebuild_loads_the_month_and_evaluates_it() -> None:
    now = ts(2026, 12, 20, 8)
    engine, _ = make(LimitPolicy(per_month=100), now)
    engine.assign(
        0,
        [
            ("k", "acct", Window.month, ts(2026, 12, 1), 100),
            ("k", "acct", Window.day, ts(2026, 12, 20), 4),
            ("idle-today", "acct", Window.month, ts(2026, 12, 1), 7),
        ],
    )
    [block] = engine.evaluate_all([0])
    assert (block.key_id, block.window, block.count) == ("k", Window.month, 100)
    assert engine.partitions[0].keys["idle-today"].month_n == 7  # a monthly quota applies: kept live
    assert engine.expire_idle() == 0  # both have a count this month under a monthly quota


def test_without_a_monthly_quota_nothing_changes() -> None:
    now = ts(2026, 12, 20, 8)
    engine, clock = make(LimitPolicy(), now)
    engine.assign(0, [("idle-today", "acct", Window.month, ts(2026, 12, 1), 7)])
    assert "idle-today" not in engine.partitions[0].keys  # month rows alone load no key
    hit(engine, "k", 1, now)
    clock.now = now + 86400
    assert engine.expire_idle() == 1  # idle keys go as before
    # An override with a monthly quota keeps its keys through the day's expiry.
    engine.policies.apply(
        LimitOverride(scope=OverrideScope.key, subject="q", policy=LimitPolicy(per_month=5), updated_at=clock.now)
    )
    hit(engine, "q", 1, clock.now)
    clock.now += 86400
    assert engine.expire_idle() == 0
    assert engine.partitions[0].keys["q"].month_n == 1


# -- the node guard ----------------------------------------------------------------------------


def test_node_guard_counts_the_month_and_refuses_until_its_end() -> None:
    from node.guard import LocalGuard, RefusedBy

    g = LocalGuard(
        PolicyBook(LimitPolicy(per_minute=None, per_hour=None, per_day=None, per_month=3)), "n1", burst_share=0.1
    )
    near_end = ts(2026, 12, 31, 23, 59, 30)
    for i in range(3):
        assert g.admit("k", "a", near_end + i) is None  # no wait for a division: the month is never divided
    refusal = g.admit("k", "a", near_end + 5)
    assert refusal is not None
    assert (refusal.by, refusal.window, refusal.until) == (RefusedBy.local_limit, Window.month, ts(2027, 1, 1))
    assert g.counts("k", near_end + 5) == [3, 3, 3]  # node_counts stay minute/hour/day
    room = g.headroom("k", near_end + 5)
    assert room is not None
    assert (room.window, room.remaining, room.reset_s, room.window_s) == (Window.month, 0, 25, 31 * 86400)
    assert g.admit("k", "a", ts(2027, 1, 1)) is None  # January: a fresh month


def test_month_refusal_and_block_headers_point_to_the_month_end() -> None:
    from node.decision_cache import Block
    from node.guard import Refusal, RefusedBy
    from node.middleware import _refused

    now = ts(2027, 2, 27, 0, 0)
    denial = _refused(Refusal(RefusedBy.local_limit, Window.month, 10, 10, ts(2027, 3, 1)), now)
    headers = dict(denial.headers)
    assert headers[b"retry-after"] == str(2 * 86400).encode()
    assert headers[b"ratelimit-policy"] == f"10;w={28 * 86400}".encode()
    block = Block("k", Window.month, 10, 10, datetime(2027, 3, 1, tzinfo=UTC), "", 1, "worker", False)
    assert block.seconds_left(datetime.fromtimestamp(now, UTC)) == 2 * 86400


def test_cli_sets_a_monthly_quota() -> None:
    from worker.cli import build_parser

    args = build_parser().parse_args(["limits", "set", "--key", "k", "--per-month", "100000"])
    assert args.per_month == 100_000
    assert build_parser().parse_args(["limits", "set", "--key", "k", "--per-month", "unlimited"]).per_month is None


def test_month_setting_defaults_to_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from node.settings import NodeSettings

    monkeypatch.delenv("METER_LIMIT_PER_MONTH", raising=False)
    assert NodeSettings().default_policy().per_month is None
    monkeypatch.setenv("METER_LIMIT_PER_MONTH", "250000")
    assert NodeSettings().default_policy().per_month == 250_000
