"""The limit engine with an injected clock: windows, edge triggers, versions, overrides."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.decisions import Decision, DecisionAction, Window
from schemas.limits import LimitOverride, LimitPolicy, OverrideScope, PolicyBook
from tests.clock import Clock
from worker.limits.counters import WindowCounters
from worker.limits.engine import LimitEngine, partition_of

T0 = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC).timestamp()  # a UTC midnight+12h: minute/hour aligned


class Harness:
    def __init__(self, policy: LimitPolicy | None = None) -> None:
        self.clock = Clock(T0 + 5)
        self.published: list[Decision] = []  # every decision hit() returned, in order
        self.policies = PolicyBook(policy or LimitPolicy())
        self.engine = LimitEngine(self.policies, self.clock)
        self.engine.assign(0, [])

    def hit(self, key: str, n: int, at: float | None = None, account: str = "acct") -> list[Decision]:
        ts = self.clock.now if at is None else at
        decisions = self.engine.observe({(0, key, account, int(ts) // 60 * 60): n}).decisions
        self.published.extend(decisions)
        return decisions


def test_block_exactly_when_the_minute_limit_is_reached_then_unblock_at_rollover() -> None:
    h = Harness()
    assert h.hit("k", 99) == []
    [block] = h.hit("k", 1)
    assert (block.action, block.window, block.limit, block.count) == (DecisionAction.block, Window.minute, 100, 100)
    assert block.until == datetime.fromtimestamp(T0 + 60, UTC)
    assert "100 requests" in block.reason
    assert h.hit("k", 50) == []  # edge-triggered: no decision per event while blocked

    h.clock.now = T0 + 59.9
    assert h.engine.tick() == []
    h.clock.now = T0 + 60
    [unblock] = h.engine.tick()
    assert (unblock.action, unblock.key_id) == (DecisionAction.unblock, "k")
    assert unblock.version > block.version
    assert h.hit("k", 99) == []  # a fresh minute


def test_all_windows_checked_and_the_longest_exceeded_wins() -> None:
    h = Harness(LimitPolicy(per_minute=100, per_hour=150, per_day=5000))
    h.hit("k", 100)  # minute block
    h.clock.now = T0 + 65
    h.engine.tick()  # unblocked: new minute
    [block] = h.hit("k", 50)  # hour total 150: the hour limit now binds
    assert (block.window, block.count, block.limit) == (Window.hour, 150, 150)
    assert block.until == datetime.fromtimestamp(T0 + 3600, UTC)
    h.clock.now = T0 + 120
    assert h.engine.tick() == []  # the minute rolled over, the hour block holds


def test_minute_block_extended_to_day_block_when_the_day_limit_is_crossed() -> None:
    h = Harness(LimitPolicy(per_minute=10, per_hour=None, per_day=12))
    [minute_block] = h.hit("k", 10)
    [day_block] = h.hit("k", 2)  # still in the same minute
    assert minute_block.window is Window.minute
    assert day_block.window is Window.day
    assert day_block.until == datetime.fromtimestamp(T0 - T0 % 86400 + 86400, UTC)
    h.clock.now = T0 + 61
    assert h.engine.tick() == []  # the minute end does not unblock a day block


def test_late_events_count_in_their_own_bucket_not_the_live_window() -> None:
    h = Harness()
    assert h.hit("k", 500, at=T0 - 120) == []  # two minutes ago: the live minute is untouched
    assert h.hit("k", 99) == []


def test_hour_and_day_limits_with_an_injected_clock() -> None:
    h = Harness(LimitPolicy(per_minute=None, per_hour=1000, per_day=5000))
    for minute in range(10):
        h.clock.now = T0 + minute * 60
        h.hit("k", 99)
    assert not h.published
    h.clock.now = T0 + 10 * 60
    [block] = h.hit("k", 10)
    assert (block.window, block.count) == (Window.hour, 1000)
    # Day: 5 hours of 1000 each.
    h2 = Harness(LimitPolicy(per_minute=None, per_hour=None, per_day=5000))
    for hour in range(5):
        h2.clock.now = T0 + hour * 3600
        h2.hit("k", 999 if hour < 4 else 1004)
    [day] = h2.published
    assert (day.window, day.count, day.limit) == (Window.day, 5000, 5000)


def test_overrides_key_beats_account_beats_default_and_unlimited_never_blocks() -> None:
    h = Harness()
    now = datetime.fromtimestamp(T0, UTC)
    h.policies.apply(
        LimitOverride(scope=OverrideScope.account, subject="gold", policy=LimitPolicy(per_minute=300), updated_at=now)
    )
    h.policies.apply(
        LimitOverride(scope=OverrideScope.key, subject="low", policy=LimitPolicy(per_minute=5), updated_at=now)
    )
    h.policies.apply(
        LimitOverride(scope=OverrideScope.key, subject="internal", policy=LimitPolicy.unlimited(), updated_at=now)
    )
    assert h.hit("gold-key", 299, account="gold") == []
    [b] = h.hit("gold-key", 1, account="gold")
    assert b.limit == 300
    assert "account override gold" in b.reason
    [low] = h.hit("low", 5, account="gold")
    assert low.limit == 5
    assert h.hit("internal", 100_000) == []
    h.policies.apply(LimitOverride(scope=OverrideScope.key, subject="low", policy=None, updated_at=now))
    assert h.policies.resolve("low", "gold").per_minute == 300


def decision(key: str, action: DecisionAction, version: int, until: float | None, source: str) -> Decision:
    return Decision(
        key_id=key,
        action=action,
        window=Window.manual if source == "operator" else Window.minute,
        until=datetime.fromtimestamp(until, UTC) if until else None,
        version=version,
        decided_at=datetime.fromtimestamp(T0, UTC),
        source=source,
    )


def test_operator_block_suppresses_automatic_decisions_and_unblock_pardons_the_window() -> None:
    h = Harness()
    h.hit("k", 1)
    h.engine.seen(decision("k", DecisionAction.block, 10**18, None, "operator"))
    assert h.hit("k", 200) == []  # operator block in force: nothing automatic
    h.clock.now = T0 + 30
    assert h.engine.tick() == []
    h.engine.seen(decision("k", DecisionAction.unblock, 10**18 + 1, None, "operator"))
    assert h.hit("k", 50) == []  # pardoned for the rest of this (exceeded) minute
    h.clock.now = T0 + 61
    assert h.engine.tick() == []  # nothing held, nothing to unblock
    [b] = h.hit("k", 100)  # next window: limits apply again
    assert b.version > 10**18 + 1  # versions keep rising above what the topic showed


def test_rebuilt_block_from_previous_owner_is_not_republished_and_unblocks_at_its_end() -> None:
    h = Harness()
    h.engine.assign(0, [("k", "acct", Window.minute, int(T0), 120)])
    h.engine.restore(decision("k", DecisionAction.block, 5, T0 + 60, "worker"))
    assert h.engine.evaluate_all([0]) == []
    h.clock.now = T0 + 60
    [unblock] = h.engine.tick()
    assert unblock.action is DecisionAction.unblock
    assert unblock.version > 5


def test_rebuilt_counts_over_the_limit_without_a_block_publish_one() -> None:
    h = Harness()
    h.engine.assign(0, [("k", "acct", Window.minute, int(T0), 100), ("ok", "acct", Window.minute, int(T0), 3)])
    [block] = h.engine.evaluate_all([0])
    assert (block.key_id, block.count) == ("k", 100)


def test_revoked_partition_forgets_its_keys() -> None:
    h = Harness()
    h.hit("k", 10)
    h.engine.revoke(0)
    assert h.engine.live_keys() == 0
    assert h.hit("k", 500) == []  # not ours any more: the new owner decides


def test_partition_of_matches_kafka_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(6))
    for key in ("a", "cf_liv_0123", "k" * 40):
        assert partition_of(key, 6) == DefaultPartitioner()(key.encode(), parts, parts)


def test_counters_stay_small_per_key() -> None:
    import tracemalloc

    counters = WindowCounters()
    keys = [f"cf_liv_{i:024x}" for i in range(20_000)]  # key strings exist anyway (from events)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i, key in enumerate(keys):
        counters.add(key, "acct-1", int(T0), i % 300)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    per_key = grown / len(keys) + 80  # + the key string itself, which the counters keep alive
    assert per_key <= 300, f"{per_key:.0f} bytes per key"


@pytest.mark.parametrize("window", [Window.minute, Window.hour, Window.day])
def test_counts_outside_their_window_read_as_zero(window: Window) -> None:
    counters = WindowCounters()
    kw = counters.add("k", "", int(T0), 7)
    assert kw.count(window, T0 + 1) == 7
    assert kw.count(window, T0 + 86_401) == 0


def test_an_expired_operator_block_no_longer_suppresses_automatic_blocks() -> None:
    h = Harness()
    h.engine.seen(decision("k", DecisionAction.block, 10**18, T0 + 20, "operator"))
    assert h.hit("k", 100) == []  # the operator block is in force
    h.clock.now = T0 + 21
    [block] = h.hit("k", 1)  # it ran out: the limit applies again within the same minute
    assert (block.window, block.count) == (Window.minute, 101)


def test_operator_blocks_survive_a_rebalance_and_the_rebuild() -> None:
    h = Harness()
    h.hit("k", 1)
    h.engine.seen(decision("k", DecisionAction.block, 10**18, None, "operator"))
    h.engine.revoke(0)
    h.engine.assign(0, [("k", "acct", Window.minute, int(T0), 150)])
    h.engine.restore(decision("k", DecisionAction.block, 10**18, None, "operator"))
    assert h.engine.evaluate_all([0]) == []  # no automatic block/unblock over the operator's
    h.clock.now = T0 + 61
    assert h.engine.tick() == []


def test_events_stamped_in_a_minute_not_yet_begun_count_in_the_live_one() -> None:
    h = Harness()
    assert h.hit("k", 60, at=T0 + 65) == []  # a node clock 60 s ahead
    [block] = h.hit("k", 40)  # the live minute holds all 100
    assert block.count == 100


NOW = datetime.fromtimestamp(T0, UTC)


def _vip_unlimited(h: Harness) -> None:
    h.policies.apply(
        LimitOverride(scope=OverrideScope.account, subject="vip", policy=LimitPolicy.unlimited(), updated_at=NOW)
    )


def test_one_event_claiming_another_account_does_not_pin_the_key_to_it() -> None:
    h = Harness()
    _vip_unlimited(h)
    assert h.hit("k", 1, account="vip") == []  # forged (or stale) first: the key now reads as vip's
    [block] = h.hit("k", 99, account="acct")  # its own nodes say acct: acct's limits count
    assert (block.window, block.count) == (Window.minute, 100)
    [change] = h.engine.take_account_changes()
    assert (change.key_id, change.before, change.after) == ("k", "vip", "acct")
    assert h.engine.account_changes == 1
    assert h.engine.take_account_changes() == []


def test_a_late_event_does_not_move_the_account_back() -> None:
    h = Harness()
    _vip_unlimited(h)
    h.hit("k", 1, account="acct")
    h.clock.now = T0 + 65
    h.hit("k", 1, account="acct")
    h.hit("k", 1, at=T0 + 5, account="vip")  # a minute behind the live one
    assert h.engine.partitions[0].keys["k"].account == "acct"
    assert h.engine.take_account_changes() == []


def test_rebuild_keeps_the_account_of_the_most_recent_window() -> None:
    h = Harness()
    h.engine.assign(
        1,
        [
            ("k", "old", Window.minute, int(T0), 5),
            ("k", "new", Window.hour, int(T0), 50),
            ("k", "older", Window.day, int(T0) - int(T0) % 86400, 500),
        ],
    )
    # Rows of one key may name several accounts when it moved today: the minute's is current.
    assert h.engine.partitions[1].keys["k"].account == "old"


def test_a_shadow_override_decides_and_unblocks_marked_shadow_and_divides_nothing() -> None:
    h = Harness()
    h.policies.apply(
        LimitOverride(
            scope=OverrideScope.key, subject="k", policy=LimitPolicy(per_minute=10, shadow=True), updated_at=NOW
        )
    )
    verdicts = h.engine.observe({(0, "k", "acct", int(T0)): 9})
    assert verdicts.allowances == []  # nodes refuse nothing under it: no caps to divide
    [block] = h.hit("k", 1)
    assert (block.action, block.count, block.shadow) == (DecisionAction.block, 10, True)
    assert "shadow" in block.reason
    h.clock.now = T0 + 60
    [unblock] = h.engine.tick()
    assert (unblock.action, unblock.shadow) == (DecisionAction.unblock, True)
    assert h.hit("other", 100)[0].shadow is False  # the enforced default is unchanged


def test_idle_keys_versions_are_forgotten_and_later_versions_still_rise() -> None:
    h = Harness()
    [block] = h.hit("k", 100)
    h.clock.now = T0 + 61
    [unblock] = h.engine.tick()
    assert "k" in h.engine.versions
    h.clock.now = T0 + 86_400 + 5  # the next day: k has been idle all day
    h.engine.expire_idle()
    assert "k" not in h.engine.versions  # one entry per key ever decided would grow without end
    [again] = h.hit("k", 100)
    assert again.version > unblock.version > block.version
