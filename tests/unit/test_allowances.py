"""Dividing a hot key's remainder among nodes (pure ``divide``/``NodeUse``) and the engine's allowances."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from node.guard import LocalGuard
from schemas.allowances import Allowance, AllowanceVersion
from schemas.decisions import Window
from schemas.limits import LimitPolicy, PolicyBook
from tests.clock import Clock
from tests.unit.event_records import NOW, VALIDATOR, Rec, record
from worker.limits.allowances import FIRST_SIGHT_S, IDLE_TAU_S, NodeUse, divide
from worker.limits.engine import AllowancePolicy, HotKey, LimitEngine, NodeReport
from worker.limits.fastlane import RecentRequests, group_batch
from worker.records import RecordChecker

T0 = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC).timestamp()
MINUTE = int(T0) // 60 * 60  # 12:00:00
TAU = 0.1
LAG = 0.03


# -- divide ------------------------------------------------------------------------------


@pytest.mark.parametrize("pooled", [True, False])
def test_one_node_alone_gets_exactly_the_limit(pooled: bool) -> None:
    division = divide(100, 40, {"n1": (15, 50.0)}, LAG, pooled)
    grant = division.grants["n1"]
    assert grant.used == 15
    assert grant.cap == 15 + 60  # used + everything that remains: exact for one node
    # a node the traffic moves to: the remainder less n1's expected in-flight (50/s x 30 ms)
    assert division.others == (60 - 1 if pooled else 60 // 2)


def test_caps_are_absolute_used_plus_share() -> None:
    division = divide(100, 40, {"n1": (25, 300.0), "n2": (10, 100.0)}, LAG, pooled=False)
    # remaining 60, split 3:1 by rate -> shares 45 and 15, added to what each node used
    assert division.grants["n1"].used == 25
    assert division.grants["n1"].cap == 25 + 45
    assert division.grants["n2"].used == 10
    assert division.grants["n2"].cap == 10 + 15


@pytest.mark.parametrize(
    ("limit", "count", "rates"),
    [
        (100, 40, (3.0, 2.0, 1.0)),
        (100, 90, (1.0, 1.0, 1.0)),  # 10 among 3: rounding must not hand out 12
        (1000, 1, (7.0, 13.0, 0.5, 101.0)),
        (100, 97, (5.0, 5.0, 5.0, 5.0, 5.0)),
    ],
)
def test_unpooled_shares_add_up_to_at_most_the_remainder(limit: int, count: int, rates: tuple[float, ...]) -> None:
    nodes = {f"n{i}": (i * 3, rate) for i, rate in enumerate(rates)}
    division = divide(limit, count, nodes, LAG, pooled=False)
    shares = [division.grants[n].cap - used for n, (used, _) in nodes.items()]
    assert all(s >= 0 for s in shares)
    assert sum(shares) <= limit - count
    assert sum(shares) >= limit - count - len(nodes)  # only rounding is lost


def test_unpooled_shares_follow_the_rates() -> None:
    division = divide(100, 40, {"a": (0, 300.0), "b": (0, 200.0), "c": (0, 100.0)}, LAG, pooled=False)
    assert {n: g.cap for n, g in division.grants.items()} == {"a": 30, "b": 20, "c": 10}


def test_no_rate_at_all_splits_the_remainder_equally() -> None:
    division = divide(100, 40, {"a": (1, 0.0), "b": (2, 0.0), "c": (3, 0.0)}, LAG, pooled=False)
    assert {n: g.cap - g.used for n, g in division.grants.items()} == {"a": 20, "b": 20, "c": 20}


def test_pooled_gives_the_active_node_what_the_idle_node_does_not_use() -> None:
    nodes = {"a": (5, 0.0), "b": (30, 1000.0)}  # a is idle, b carries the traffic
    pooled = divide(100, 50, nodes, LAG, pooled=True)
    assert pooled.grants["b"].cap == 30 + 50  # used_B + all that remains
    # The idle node may still take over: everything but b's in-flight admissions (1000/s x 30 ms).
    assert pooled.grants["a"].cap == 5 + 50 - 30
    unpooled = divide(100, 50, nodes, LAG, pooled=False)
    assert unpooled.grants["a"].cap == 5  # proportional: an idle node gets nothing


def test_pooled_lets_each_of_two_equal_nodes_use_nearly_everything() -> None:
    nodes = {"a": (10, 100.0), "b": (10, 100.0)}  # each expected to admit 3 before it hears
    assert {n: g.cap for n, g in divide(100, 50, nodes, LAG, pooled=False).grants.items()} == {"a": 35, "b": 35}
    assert {n: g.cap for n, g in divide(100, 50, nodes, LAG, pooled=True).grants.items()} == {"a": 57, "b": 57}


@pytest.mark.parametrize("n_nodes", [0, 1, 2, 3, 7])
def test_others_is_an_equal_part_of_the_remainder_when_not_pooled(n_nodes: int) -> None:
    nodes = {f"n{i}": (0, 1.0) for i in range(n_nodes)}
    assert divide(100, 37, nodes, LAG, pooled=False).others == 63 // (n_nodes + 1)


def test_pooled_others_is_the_remainder_less_the_listed_nodes_in_flight() -> None:
    nodes = {"busy": (10, 1000.0), "idle": (40, 0.0)}  # 1000/s x 30 ms = 30 expected in flight
    assert divide(100, 50, nodes, LAG, pooled=True).others == 50 - 30


@pytest.mark.parametrize("pooled", [True, False])
def test_nothing_remains_when_the_count_is_past_the_limit(pooled: bool) -> None:
    division = divide(100, 130, {"a": (70, 10.0), "b": (60, 0.0)}, LAG, pooled)
    assert division.others == 0
    assert {n: (g.used, g.cap) for n, g in division.grants.items()} == {"a": (70, 70), "b": (60, 60)}


# -- NodeUse -----------------------------------------------------------------------------


def test_node_rate_is_measured_on_event_time_and_fades_when_the_node_stops() -> None:
    use = NodeUse()
    assert use.rate_at(T0) == 0.0
    use.arrived(11, T0, T0 + 0.010, now=T0 + 0.030)  # 10 gaps in 10 ms of the node's clock
    assert use.rate_at(T0 + 0.030) == pytest.approx(1000.0)
    use.arrived(20, T0 + 0.011, T0 + 0.030, now=T0 + 0.050)  # 20 more over the next 20 ms
    assert use.rate_at(T0 + 0.050) == pytest.approx(1000.0)
    assert use.rate_at(T0 + 0.050 + IDLE_TAU_S) == pytest.approx(1000.0 / math.e, rel=1e-4)
    assert use.rate_at(T0 + 1.0) < 1e-6  # silent for a second: its traffic has moved
    assert use.rate_at(T0) == pytest.approx(1000.0)  # no growth for a time before the last batch


def test_a_node_seen_once_gets_a_small_rate() -> None:
    use = NodeUse()
    use.arrived(1, T0, T0, now=T0)
    assert use.rate_at(T0) == pytest.approx(1 / FIRST_SIGHT_S)


def test_node_report_keeps_the_highest_count_of_the_newest_window() -> None:
    use = NodeUse()
    use.report(Window.minute, MINUTE, 5)
    use.report(Window.minute, MINUTE, 3)  # an event that left the node earlier: counts only grow
    assert use.used(Window.minute, MINUTE) == 5
    use.report(Window.minute, MINUTE, 7)
    assert use.used(Window.minute, MINUTE) == 7
    use.report(Window.minute, MINUTE - 60, 100)  # a late event of the previous minute
    assert use.used(Window.minute, MINUTE) == 7
    use.report(Window.minute, MINUTE + 60, 1)  # a new minute starts again from its own count
    assert use.used(Window.minute, MINUTE + 60) == 1


def test_node_used_is_none_for_another_window() -> None:
    use = NodeUse()
    use.report(Window.minute, MINUTE, 5)
    assert use.used(Window.minute, MINUTE - 60) is None
    assert use.used(Window.minute, MINUTE + 60) is None
    assert use.used(Window.hour, MINUTE) is None  # nothing reported for the hour


# -- the engine's allowances -------------------------------------------------------------


class Harness:
    def __init__(self, pooled: bool = False) -> None:
        self.clock = Clock(T0)
        self.engine = LimitEngine(
            # No settling: these tests are about the steady division (settling has its own below).
            PolicyBook(LimitPolicy()),
            self.clock,
            AllowancePolicy(threshold=0.5, lag_s=LAG, pooled=pooled, settle_s=0.0),
        )
        self.engine.assign(0, [])

    def observe(self, n: int, reports: dict[str, NodeReport], key: str = "k") -> list[Allowance]:
        counts = {(0, key, "acct", int(self.clock.now) // 60 * 60): n} if n else {}
        return self.engine.observe(counts, {(0, key): reports}).allowances


def report(arrivals: int, minute_count: int, at: float = T0) -> NodeReport:
    return NodeReport(
        arrivals=arrivals, counts=(minute_count, minute_count, minute_count), epoch=at, first_ts=at, last_ts=at
    )


def three_nodes() -> dict[str, NodeReport]:
    return {"n1": report(30, 20), "n2": report(20, 20), "n3": report(10, 20)}


def caps(allowance: Allowance) -> dict[str, int]:
    [window] = allowance.windows
    return {n: g.cap for n, g in window.grants.items()}


def test_no_allowance_below_the_threshold() -> None:
    h = Harness()
    assert h.observe(30, {"n1": report(10, 15), "n2": report(10, 15)}) == []
    assert h.observe(19, {"n1": report(10, 25), "n2": report(10, 24)}) == []  # 49 of 100
    assert "k" not in h.engine.hot
    assert h.engine.allowances_issued == 0


def test_crossing_the_threshold_divides_the_minute_remainder_among_the_nodes() -> None:
    h = Harness(pooled=False)
    assert h.observe(49, {"n1": report(10, 20)}) == []
    [allowance] = h.observe(11, three_nodes())  # 60 of 100: hot
    assert allowance.key_id == "k"
    assert allowance.version >= int(T0 * 1_000_000)
    [window] = allowance.windows  # only the minute is hot (60 of 1000 in the hour)
    assert window.window is Window.minute
    assert (window.start, window.until) == (
        datetime.fromtimestamp(MINUTE, UTC),
        datetime.fromtimestamp(MINUTE + 60, UTC),
    )
    assert (window.limit, window.count) == (100, 60)
    assert set(window.grants) == {"n1", "n2", "n3"}
    assert all(g.used == 20 for g in window.grants.values())
    assert sum(g.cap for g in window.grants.values()) == 100  # the whole remainder, no more
    # 40 left, 3:2:1 -> 20, 13.3, 6.7: the unit lost to rounding goes to the largest fraction
    assert caps(allowance) == {"n1": 20 + 20, "n2": 20 + 13, "n3": 20 + 7}
    assert window.others == 40 // 4
    assert "k" in h.engine.hot


def test_a_node_heard_only_in_an_earlier_window_is_not_listed() -> None:
    h = Harness()
    [allowance] = h.observe(60, {"n1": report(10, 30), "old": report(10, 30, at=T0 - 60)})
    assert set(allowance.windows[0].grants) == {"n1"}


def test_unchanged_caps_are_not_published_again() -> None:
    h = Harness(pooled=False)
    [first] = h.observe(60, three_nodes())
    assert h.observe(0, three_nodes()) == []  # same traffic, same shares: nothing new
    assert h.engine.allowances_issued == 1
    assert h.engine.allowance_versions["k"] == first.version


def test_moved_caps_of_a_strict_division_go_out_only_to_a_node_that_needs_them() -> None:
    """Three nodes carry the key (divided strictly): the caps they hold add up to the limit, so
    a division that only moves caps (the count grew, the rates shifted) is kept back until a
    node may reach its cap within ``renew_s``; then it goes out, and what the engine remembers
    of the caps (for the floors and the starved nodes) is what the nodes hold."""

    def steady(arrivals: int, count: int, at: float) -> NodeReport:  # over the second before ``at``
        return NodeReport(arrivals=arrivals, counts=(count,) * 3, epoch=at, first_ts=at - 1.0, last_ts=at)

    h = Harness(pooled=False)
    [first] = h.observe(60, {"n1": steady(31, 20, T0), "n2": steady(21, 20, T0), "n3": steady(11, 20, T0)})
    assert caps(first) == {"n1": 40, "n2": 33, "n3": 27}
    for i in range(1, 4):  # n1 at 30 req/s: 21, 22, 23 of its cap 40, not within renew_s of it
        h.clock.now = at = T0 + i / 30
        assert h.observe(1, {"n1": steady(1, 20 + i, at)}) == []
    assert h.engine.hot["k"].caps[(Window.minute, MINUTE)] == caps(first)
    h.clock.now = at = T0 + 0.2
    # n3 (10 req/s) at 27 of its 27, still sending: the next division goes out
    [second] = h.observe(7, {"n3": steady(7, 27, at)})
    assert caps(second)["n3"] > 27
    assert sum(caps(second).values()) <= 100
    assert h.engine.hot["k"].caps[(Window.minute, MINUTE)] == caps(second)


def test_a_node_joining_is_always_published() -> None:
    h = Harness(pooled=False)
    h.observe(60, three_nodes())
    h.clock.now = T0 + 0.01
    [joined] = h.observe(1, {"n4": report(1, 1, at=T0 + 0.01)})  # nobody near a cap: a new node
    assert set(joined.windows[0].grants) == {"n1", "n2", "n3", "n4"}


def test_versions_strictly_increase() -> None:
    h = Harness(pooled=False)
    [first] = h.observe(60, three_nodes())
    [second] = h.observe(5, {**three_nodes(), "n4": report(5, 5)})  # same instant, a node joined
    assert second.version > first.version
    h.clock.now = T0 + 1
    [third] = h.observe(5, {"n5": report(5, 5, at=T0 + 1)})
    assert third.version > second.version
    assert third.version >= int((T0 + 1) * 1_000_000)
    h.engine.seen_allowance(third.model_copy(update={"version": third.version + 10**9}))  # a previous owner's
    [fourth] = h.observe(5, {"n6": report(5, 5, at=T0 + 1)})
    assert fourth.version > third.version + 10**9


def test_refusals_alone_redivide_a_hot_key() -> None:
    h = Harness(pooled=False)
    [first] = h.observe(60, three_nodes())
    h.clock.now = T0 + 0.05
    # A batch of 429s only: nothing counted, but n3 now carries most of the traffic.
    [second] = h.observe(0, {"n3": report(200, 20, at=T0 + 0.05)})
    assert second.version > first.version
    assert second.windows[0].count == 60  # refusals count nothing
    assert caps(second)["n3"] > caps(first)["n3"]
    assert caps(second)["n1"] < caps(first)["n1"]
    assert sum(caps(second).values()) <= 100


def test_refusals_of_a_key_that_is_not_hot_give_no_allowance() -> None:
    h = Harness()
    h.observe(10, {"n1": report(10, 10)})
    assert h.observe(0, {"n1": report(500, 10)}) == []
    assert "k" not in h.engine.hot


def test_revoke_drops_the_hot_state() -> None:
    h = Harness()
    assert h.observe(60, three_nodes())
    assert "k" in h.engine.hot
    h.engine.revoke(0)
    assert "k" not in h.engine.hot
    assert h.observe(0, three_nodes()) == []  # not ours any more


def test_tick_after_the_window_ends_drops_the_hot_key() -> None:
    h = Harness()
    assert h.observe(60, three_nodes())
    h.clock.now = MINUTE + 59.9
    h.engine.tick()
    assert "k" in h.engine.hot
    h.clock.now = MINUTE + 60
    h.engine.tick()
    assert "k" not in h.engine.hot


def test_the_last_request_of_the_remainder_is_not_stranded_by_rounding() -> None:
    division = divide(100, 99, {"a": (33, 30.0), "b": (33, 30.0), "c": (33, 30.0)}, LAG, pooled=False)
    assert sum(g.cap - g.used for g in division.grants.values()) == 1


def settling_engine(clock: Clock) -> LimitEngine:
    policy = AllowancePolicy(threshold=0.3, lag_s=LAG, pooled=True, burst_share=0.34, settle_s=0.06)
    engine = LimitEngine(PolicyBook(LimitPolicy()), clock, policy)
    engine.assign(0, [])
    engine.nodes_seen.update({"n1": T0, "n2": T0, "n3": T0})  # the cluster: three nodes
    return engine


def test_while_a_division_settles_the_silent_nodes_burst_shares_are_held_back() -> None:
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    [first] = engine.observe({(0, "k", "acct", minute): 30}, {(0, "k"): {"n1": report(30, 30)}}).allowances
    # n2 and n3 may each have admitted 34 unseen, and n1 its own 34 before this reaches it:
    # 100 - 30 - 68 - 4 < 0, nothing more to give; n1 keeps its burst share
    assert caps(first) == {"n1": 34}
    assert engine.hot["k"].held_back
    clock.now = T0 + 0.1  # settled, and nobody else spoke: the rest is n1's after all
    [second] = engine.redivide()
    assert caps(second) == {"n1": 100}
    assert second.version > first.version
    assert engine.redivide() == []  # nothing held back any more, nothing changed


def test_nodes_heard_from_are_not_held_back_for() -> None:
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    reports = {"n1": report(34, 34), "n2": report(34, 34), "n3": report(34, 34)}
    [allowance] = engine.observe({(0, "k", "acct", minute): 102}, {(0, "k"): reports}).allowances
    assert caps(allowance) == {"n1": 34, "n2": 34, "n3": 34}  # over the limit: nothing more for anyone


def test_a_burst_on_every_node_at_once_is_held_to_the_limit_or_the_burst_shares() -> None:
    """All at once (enforcement scenario d): each node reported part of its burst share when the
    division is made, and may admit the rest of it before the division reaches it; strict parts
    of what is left after those, no pooling, so the nodes cannot each take the same remainder."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    reports = {"n1": report(32, 32), "n2": report(21, 21), "n3": report(34, 34)}
    [allowance] = engine.observe({(0, "k", "acct", minute): 87}, {(0, "k"): reports}).allowances
    [window] = allowance.windows
    assert window.settling
    assert caps(allowance) == {"n1": 34, "n2": 34, "n3": 34}  # 102: the shares, nothing pooled
    # Later in the window (settled), the division pools again.
    clock.now = T0 + 0.1
    [later] = engine.observe({(0, "k", "acct", minute): 3}, {(0, "k"): {"n1": report(3, 34)}}).allowances
    assert not later.windows[0].settling


def test_a_listed_node_past_its_burst_share_gets_a_strict_part_while_settling() -> None:
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    # n1 has had 45 (moved there at full speed); n2, n3 silent: 34 each held back for them.
    [allowance] = engine.observe({(0, "k", "acct", minute): 45}, {(0, "k"): {"n1": report(45, 45)}}).allowances
    assert caps(allowance) == {"n1": 45}  # 100 - 45 - 2 x 34 < 0: nothing more while it settles
    assert engine.hot["k"].held_back
    clock.now = T0 + 0.1  # settled, nobody else spoke: the rest is n1's
    [settled] = engine.redivide()
    assert caps(settled) == {"n1": 100}


def spread(at: float, **used: int) -> dict[str, NodeReport]:
    """Each node's latest report: ``used`` of the minute, requests arriving at 200/s."""
    return {
        n: NodeReport(arrivals=4, counts=(u, u, u), epoch=at, first_ts=at - 0.015, last_ts=at) for n, u in used.items()
    }


BURST_SHARES = 3 * 34  # what three nodes may admit on their own (burst share 0.34 of 100)


def test_once_a_node_reached_its_cap_the_window_is_divided_strictly() -> None:
    """Enforcement scenario c as measured (300 spread at ~600 req/s, a busy machine): the
    settling caps were 34 each; 60 ms later n2 had used all 34 (and held more requests),
    the worker had seen 75 of the 100. Pooled, each node could take the remainder less the
    others' 30 ms of traffic: caps 42 / 56 / 38, and the nodes released what they held at
    once (123 admitted). Strict, and with the caps of nodes still sending kept for them (they
    may have used them unseen), no cap grows past what the nodes may already have taken."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    [settling] = engine.observe({(0, "k", "acct", minute): 42}, {(0, "k"): spread(T0, n1=13, n2=16, n3=13)}).allowances
    assert caps(settling) == {"n1": 34, "n2": 34, "n3": 34}
    clock.now = T0 + 0.08  # settled; n2 has reached its cap
    reports = spread(clock.now, n1=21, n2=34, n3=20)
    [divided] = engine.observe({(0, "k", "acct", minute): 33}, {(0, "k"): reports}).allowances
    assert not divided.windows[0].settling
    assert (Window.minute, minute) in engine.hot["k"].contended
    assert sum(caps(divided).values()) <= BURST_SHARES  # was 132 pooled
    # ... and stays strict for the rest of the window, even once no node is at its cap.
    clock.now = T0 + 0.2
    later = engine.observe({(0, "k", "acct", minute): 5}, {(0, "k"): spread(clock.now, n1=26, n2=34, n3=20)})
    assert sum(caps(later.allowances[0]).values() if later.allowances else caps(divided).values()) <= BURST_SHARES


def test_several_nodes_carrying_a_key_are_divided_strictly_even_below_their_caps() -> None:
    """Also measured in scenario c: 60 ms after the settling caps of 34, the worker had seen
    28 of each node (84); the nodes had really admitted 38, 34 and 36 and held the rest. Pooled
    (no node seen at its cap yet), the caps were 43 / 44 / 43 and 123 were admitted. Several
    nodes carrying the key is contention enough: strict parts of what the count holds."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    engine.observe({(0, "k", "acct", minute): 42}, {(0, "k"): spread(T0, n1=13, n2=13, n3=16)})
    clock.now = T0 + 0.11
    [divided] = engine.observe(
        {(0, "k", "acct", minute): 42}, {(0, "k"): spread(clock.now, n1=28, n2=28, n3=28)}
    ).allowances
    assert not divided.windows[0].settling
    assert sum(caps(divided).values()) <= BURST_SHARES  # what they may have taken on their own, no more


def test_one_node_carrying_a_key_still_pools() -> None:
    """Pooling stays where it is safe and useful: one node carries the key, and a node the
    traffic moves to may use what that one is not expected to admit meanwhile."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    engine.observe({(0, "k", "acct", minute): 30}, {(0, "k"): spread(T0, n1=30)})
    clock.now = T0 + 0.1
    [alone] = engine.observe({(0, "k", "acct", minute): 5}, {(0, "k"): spread(clock.now, n1=35)}).allowances
    [window] = alone.windows
    assert caps(alone) == {"n1": 100}
    assert window.others > 65 // 2  # pooled: the remainder less n1's expected admissions


def test_a_node_still_sending_keeps_what_it_may_have_taken_unseen_and_a_silent_one_gives_it_up() -> None:
    """In a contended window, the next division keeps for a node whose traffic is still
    arriving what it may have admitted unseen: its whole cap if it was at that cap (holding
    requests) when the cap was given, since it releases them the moment the cap arrives;
    else what its rate brings before the new division reaches it, up to its cap. Once
    nothing has come from it for ``settle_s``, the part it did not use goes where the
    traffic is."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    engine.observe({(0, "k", "acct", minute): 42}, {(0, "k"): spread(T0, n1=13, n2=16, n3=13)})
    clock.now = T0 + 0.07  # settled; n1 at its cap of 34, n2 and n3 at 20 of theirs, at 200/s
    [first] = engine.observe(
        {(0, "k", "acct", minute): 32}, {(0, "k"): spread(clock.now, n1=34, n2=20, n3=20)}
    ).allowances
    given = caps(first)
    # n2 and n3 were not holding requests: kept for them is what their rate brings until the
    # division reaches them, not their whole 34, and n1, which holds requests at its cap, gets more
    assert 20 + math.ceil(150 * LAG) <= given["n2"] == given["n3"] < 34 < given["n1"]
    assert sum(given.values()) == 100

    clock.now = T0 + 0.2  # only n1 heard from since: n2 and n3 are done
    n1 = NodeReport(arrivals=8, counts=(40, 40, 40), epoch=clock.now, first_ts=clock.now - 0.01, last_ts=clock.now)
    [moved] = engine.observe({(0, "k", "acct", minute): 6}, {(0, "k"): {"n1": n1}}).allowances
    assert caps(moved) == {"n1": 100 - 40, "n2": 20, "n3": 20}  # their unused parts go to n1


def test_only_a_node_that_was_holding_requests_keeps_its_whole_cap_unseen() -> None:
    """What a listed node still sending may have admitted unseen (``HotKey.floors``): its whole
    cap if it was at it when the cap was given; else its rate from its latest event until the
    next division reaches it, up to its cap; nothing once it has been silent ``hold_s``."""
    now = T0 + 1.0
    here = (Window.minute, int(T0) // 60 * 60)
    hot = HotKey()
    for node in ("n1", "n2", "n3"):
        hot.nodes[node] = NodeUse(rate=100.0, at=now - 0.01, last_ts=now - 0.02)
    hot.nodes["n3"].at = now - 0.5  # silent since
    hot.caps[here] = {"n1": 50, "n2": 50, "n3": 50}
    hot.holding = frozenset({"n1"})
    listed = dict.fromkeys(("n1", "n2", "n3"), (40, 100.0))
    floors = hot.floors(here, listed, now, hold_s=0.06, lag_s=LAG)
    assert floors == {"n1": 50, "n2": 40 + math.ceil(100 * (0.02 + LAG)), "n3": 40}


def test_a_contended_division_leaves_no_node_without_a_part_of_the_last_requests() -> None:
    """Limit 5 over two nodes taking turns (the trial-tier test of test_limits_e2e): 4 used,
    1 left. By rate alone the last request could go to the node that is done, and the one
    waiting for it would be refused; each node at its cap may take it (at most 1 past the
    limit: one unit per other node at its cap)."""
    strict = divide(5, 4, {"a": (2, 100.0), "b": (2, 100.0)}, LAG, pooled=False)
    assert sorted(g.cap for g in strict.grants.values()) == [2, 3]
    division = divide(5, 4, {"a": (2, 100.0), "b": (2, 100.0)}, LAG, pooled=False, starved=["a", "b"])
    assert {n: g.cap for n, g in division.grants.items()} == {"a": 3, "b": 3}
    assert divide(5, 5, {"a": (3, 1.0), "b": (2, 1.0)}, LAG, pooled=False, starved=["b"]).grants["b"].cap == 2
    # A node below its cap has room: only the starved ones get the extra unit.
    three = divide(10, 9, {"a": (3, 100.0), "b": (3, 100.0), "c": (3, 100.0)}, LAG, pooled=False, starved=["a"])
    assert sum(g.cap for g in three.grants.values()) == 10
    assert three.grants["a"].cap == 4


def test_a_previous_owners_allowance_read_from_the_topic_raises_the_versions() -> None:
    """Workers read allowances from the topic as ``AllowanceVersion`` (key and version only):
    the whole record parses to the same key and version, and what is published next is newer."""
    h = Harness(pooled=False)
    [first] = h.observe(60, three_nodes())
    theirs = first.model_copy(update={"version": first.version + 10**9})
    read = AllowanceVersion.model_validate_json(theirs.model_dump_json())
    assert (read.key_id, read.version) == (theirs.key_id, theirs.version)
    h.engine.seen_allowance(read)
    [second] = h.observe(5, {**three_nodes(), "n4": report(5, 5)})
    assert second.version > theirs.version


def test_requests_the_nodes_still_serve_are_not_divided_again() -> None:
    """Each of 3 nodes has admitted 30 (its counts), 10 of which it still serves (its events
    come when they end): the worker has counted 60. Divided from 60, the caps added up to 130."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    engine.observe({(0, "k", "acct", MINUTE): 36}, {(0, "k"): spread(T0, n1=12, n2=12, n3=12)})
    clock.now = T0 + 0.2  # settled
    nodes = spread(clock.now, n1=30, n2=30, n3=30)
    for report in nodes.values():
        report.in_flight = 10
    [divided] = engine.observe({(0, "k", "acct", MINUTE): 24}, {(0, "k"): nodes}).allowances
    [window] = divided.windows
    assert window.count == 90
    # 10 left for three nodes, each at its cap: one unit each (at most 2 past the remainder).
    assert sum(caps(divided).values()) <= 100 + 2


def test_a_key_at_90_percent_on_one_node_is_not_refused_after_its_held_requests_are_released() -> None:
    """One node of three at 300 req/s: it admits its burst share (34), holds the next requests
    for the division, and releases them when the key's whole remainder comes. A fresh request
    happened to be admitted first: its event has the latest start but not the highest count.
    The worker read the node's use from it (35 of its 68) and capped it at 67: the key was
    refused at 68 of 100, though it sends only 90 in the minute."""
    at = NOW + timedelta(seconds=5)
    clock = Clock(at.timestamp())
    engine = LimitEngine(
        PolicyBook(LimitPolicy()), clock, AllowancePolicy(threshold=0.3, lag_s=LAG, burst_share=0.34, settle_s=0.12)
    )
    engine.assign(0, [])
    engine.nodes_seen.update({"n1": clock.now, "n2": clock.now, "n3": clock.now})
    node = LocalGuard(PolicyBook(LimitPolicy()), "n1", burst_share=0.34)
    checker, recent = RecordChecker(VALIDATOR, None, None), RecentRequests(10_000)

    def event_at(i: int, offset: float, count: int) -> Rec:
        ts = at + timedelta(seconds=offset)
        return record(0, i, request_id=f"r{i}", key_id="k", account_id="acct", ts=ts, node_counts=[count] * 3)

    def fetch(records: list[Rec]) -> None:
        batch = group_batch(records, checker, recent, clock.now)
        for allowance in engine.observe(batch.counts, batch.nodes).allowances:
            node.apply(allowance, clock.now)

    start = at.timestamp()
    assert [node.admit("k", "acct", start + i / 300) for i in range(34)] == [None] * 34
    clock.now = start + 0.12
    fetch([event_at(i, i / 300, i + 1) for i in range(34)])  # settling: capped at its share
    clock.now = start + 0.27
    for allowance in engine.redivide():  # settled; the others silent: the remainder is n1's
        node.apply(allowance, clock.now)
    released = [node.admit("k", "acct", start + 0.27)] + [
        node.admit("k", "acct", start + 0.117 + j * 0.0044) for j in range(33)
    ]
    assert released == [None] * 34  # 68 admitted
    clock.now = start + 0.28
    fetch([event_at(100, 0.27, 35)] + [event_at(101 + j, 0.117 + j * 0.0044, 36 + j) for j in range(33)])
    rest = [node.admit("k", "acct", start + 0.28 + j / 300) for j in range(22)]  # up to 90 in the minute
    assert rest == [None] * 22


def serving(arrivals: int, minute_count: int, in_flight: int, started: float, at: float) -> NodeReport:
    """A node's report of requests that started from ``started`` to ``at`` (the first one taking
    ``at - started`` s, the others nothing), with ``in_flight`` of its count still being served."""
    return NodeReport(
        arrivals=arrivals,
        counts=(minute_count, minute_count, minute_count),
        epoch=at,
        in_flight=in_flight,
        first_ts=started,
        last_ts=at,
        fastest_ms=0.0 if arrivals > 1 else (at - started) * 1000.0,
        slowest_ms=(at - started) * 1000.0,
    )


def test_a_key_turns_hot_when_a_node_still_serving_its_requests_passes_the_threshold() -> None:
    """Slow handlers: the worker has counted 4 requests (their events came as they ended), but
    n1's count of 34 holds 30 it still serves. Its figures must not be dropped while the
    worker's count catches up: once the key turns hot through other nodes, n1 would be left
    out of the division (nothing held for what it admitted). Hot once, the window stays hot
    when the next report (another node's) is below the threshold."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    reports = {"n1": serving(4, 34, 30, T0 - 0.2, T0)}
    [first] = engine.observe({(0, "k", "acct", minute): 4}, {(0, "k"): reports}).allowances
    [window] = first.windows
    assert (window.count, caps(first)) == (34, {"n1": 34})  # the 30 in flight counted as taken
    clock.now = T0 + 0.01
    later = engine.observe({(0, "k", "acct", minute): 1}, {(0, "k"): {"n2": serving(1, 1, 0, T0, T0 + 0.01)}})
    assert "k" in engine.hot
    assert set(engine.hot["k"].nodes) == {"n1", "n2"}
    assert all(a.windows[0].settling for a in later.allowances)


def test_below_the_threshold_by_every_count_the_key_is_not_hot() -> None:
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    reports = {"n1": serving(4, 29, 25, T0 - 0.2, T0)}
    assert engine.observe({(0, "k", "acct", minute): 4}, {(0, "k"): reports}).allowances == []
    assert "k" not in engine.hot
    stale = {"n1": serving(4, 90, 25, T0 - 60.2, T0 - 60)}  # a node's count of the minute before
    assert engine.observe({(0, "k", "acct", minute): 1}, {(0, "k"): stale}).allowances == []


def test_the_division_settles_longer_while_the_key_is_served_slowly() -> None:
    """While the listed nodes still serve requests of the key, a node not heard from may be
    serving its burst share too (its events come when they end): the silent nodes' shares stay
    held for as long as the key's requests take to reach the worker (0.5 s here, after 60 ms of
    settling), at most ``serving_settle_s``; settled once, the window stays settled."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    [first] = engine.observe(
        {(0, "k", "acct", minute): 10}, {(0, "k"): {"n1": serving(10, 34, 24, T0 - 0.5, T0)}}
    ).allowances
    assert first.windows[0].settling
    clock.now = T0 + 0.3  # past settle_s (60 ms), within 60 ms + 0.5 s: n2 and n3 still held for
    still = engine.observe({(0, "k", "acct", minute): 10}, {(0, "k"): {"n1": serving(10, 34, 14, T0 - 0.2, clock.now)}})
    assert still.allowances == []  # unchanged: n1 keeps 34, its burst share, n2 and n3 theirs
    clock.now = T0 + 0.6
    [settled] = engine.observe(
        {(0, "k", "acct", minute): 10}, {(0, "k"): {"n1": serving(10, 34, 4, T0 + 0.1, clock.now)}}
    ).allowances
    assert not settled.windows[0].settling
    assert caps(settled)["n1"] > 34


def test_a_key_served_at_once_settles_in_settle_s() -> None:
    """No requests in flight at the listed nodes: silence means nothing is on its way."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    engine.observe({(0, "k", "acct", minute): 30}, {(0, "k"): {"n1": serving(30, 30, 0, T0 - 0.5, T0)}})
    clock.now = T0 + 0.07
    [settled] = engine.observe(
        {(0, "k", "acct", minute): 1}, {(0, "k"): {"n1": serving(1, 31, 0, clock.now, clock.now)}}
    ).allowances
    assert not settled.windows[0].settling
    clock.now = T0 + 0.1  # requests in flight now: settled stays settled
    later = engine.observe({(0, "k", "acct", minute): 1}, {(0, "k"): {"n1": serving(1, 40, 8, T0, clock.now)}})
    assert not any(a.windows[0].settling for a in later.allowances)


def test_how_long_the_keys_requests_take_is_kept_per_minute() -> None:
    """One request held long (or a worker that fell behind) lengthens the settling of that
    minute's divisions only."""
    hot = HotKey()
    hot.took(1.8, T0)
    hot.took(0.2, T0 + 1)
    assert hot.slowest == 1.8
    hot.took(0.2, T0 + 60)
    assert hot.slowest == 0.2


def test_a_division_settles_while_a_silent_node_may_still_be_serving_the_key() -> None:
    """n3's calls (of another key) all take 0.5 s. Silent on this key, it may be serving its
    burst share of it: the division settles for settle_s and that long, not settle_s only."""
    clock = Clock(T0)
    engine = settling_engine(clock)
    minute = int(T0) // 60 * 60
    for step in range(10):  # n3's calls of another key, each 0.5 s old when it reaches the worker
        clock.now = T0 - 1 + step * 0.05
        engine.observe({}, {(0, "other"): {"n3": serving(1, 1, 0, clock.now - 0.5, clock.now)}})
    clock.now = T0
    reports = {"n1": report(30, 30), "n2": report(30, 30)}
    [first] = engine.observe({(0, "k", "acct", minute): 60}, {(0, "k"): reports}).allowances
    assert first.windows[0].settling
    clock.now = T0 + 0.5  # past settle_s: n3 may still be serving its share
    assert engine.redivide() == []  # unchanged: still settling, n3's share held
    clock.now = T0 + 0.57
    [settled] = engine.redivide()
    assert not settled.windows[0].settling


def test_a_nodes_serving_time_is_read_from_the_calls_its_api_served() -> None:
    """A node answers a refusal at once (a blocked key's 429, a 401): read as a call, one would
    make a node whose calls all take 0.5 s pass for fast, and the worker would stop holding its
    burst share while it is silent on a key (137-146 of 100 on the cluster model). An event
    without a duration (an older node) says nothing either."""
    checker, recent = RecordChecker(VALIDATOR, None, None), RecentRequests(1_000)
    records = [
        record(0, 0, request_id="a", key_id="k", node_id="n3", status=200, latency_ms=500.0),
        record(0, 1, request_id="b", key_id="k", node_id="n3", status=429, latency_ms=0.2),
        record(0, 2, request_id="c", key_id="k", node_id="n3", status=401, latency_ms=0.1),
        record(0, 3, request_id="d", key_id="k", node_id="n3", status=200),
        record(0, 4, request_id="e", key_id="k", node_id="n3", status=200, latency_ms=700.0),
    ]
    report = group_batch(records, checker, recent, NOW.timestamp()).nodes[(0, "k")]["n3"]
    assert (report.fastest_ms, report.slowest_ms) == (500.0, 700.0)
