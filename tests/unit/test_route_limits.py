"""Cost per request and route limits in the pure parts: the policy book's resolution of a key on
a route, the node's guard (cost in every window, the route counted apart), the worker's engine
(cost-weighted counts, a block on key x route, no allowance divided for a route)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from node.guard import LocalGuard, RefusedBy
from schemas.decisions import DecisionAction, Window
from schemas.limits import (
    LimitOverride,
    LimitPolicy,
    OverrideScope,
    PolicyBook,
    route_subject,
    split_subject,
)
from worker.limits.engine import LimitEngine, partition_of

T0 = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC).timestamp()
MINUTE = int(T0) // 60 * 60
NOW = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC)
REPORTS = LimitPolicy(per_minute=None, per_hour=None, per_day=30)


def book(**routes: LimitPolicy) -> PolicyBook:
    return PolicyBook(LimitPolicy(per_minute=100, per_hour=1_000, per_day=5_000), routes=routes)


def override(scope: OverrideScope, subject: str, policy: LimitPolicy | None, route: str | None) -> LimitOverride:
    return LimitOverride(scope=scope, subject=subject, policy=policy, updated_at=NOW, route=route)


def test_subjects_join_and_split_one_way() -> None:
    assert route_subject("cf_abc_0123", "reports") == "cf_abc_0123@reports"
    assert split_subject("cf_abc_0123@reports") == ("cf_abc_0123", "reports")
    assert split_subject("cf_abc_0123") == ("cf_abc_0123", None)
    # A key on a route lives in its key's partition (its events are keyed by the key).
    assert partition_of("cf_abc_0123@reports", 12) == partition_of("cf_abc_0123", 12)


def test_a_route_resolves_key_override_then_account_override_then_route_default_then_nothing() -> None:
    policies = book(reports=REPORTS)
    subject = route_subject("k1", "reports")
    assert policies.resolve(subject, "acct") == REPORTS
    assert policies.source(subject, "acct") == "route default on route reports"
    # A route without limits of its own limits nothing: the key's limits still hold.
    assert policies.resolve(route_subject("k1", "other"), "acct").limit_tuple() == (None, None, None)

    per_account = LimitPolicy(per_minute=None, per_hour=None, per_day=50)
    policies.apply(override(OverrideScope.account, "acct", per_account, "reports"))
    assert policies.resolve(subject, "acct") == per_account
    assert policies.resolve(subject, "other-acct") == REPORTS
    per_key = LimitPolicy(per_minute=None, per_hour=None, per_day=10)
    policies.apply(override(OverrideScope.key, "k1", per_key, "reports"))
    assert policies.resolve(subject, "acct") == per_key
    assert policies.source(subject, "acct") == "key override k1 on route reports"
    # A route override never changes the key's own limits, and a reset removes it.
    assert policies.resolve("k1", "acct") == policies.default
    policies.apply(override(OverrideScope.key, "k1", None, "reports"))
    assert policies.resolve(subject, "acct") == per_account


def test_route_overrides_have_their_own_topic_keys() -> None:
    base = override(OverrideScope.key, "k1", REPORTS, None)
    routed = override(OverrideScope.key, "k1", REPORTS, "reports")
    assert base.topic_key == "key:k1"
    assert routed.topic_key == "key:k1@reports"  # compacted apart: both survive


def test_the_guard_spends_the_cost_in_every_window_and_refuses_what_would_overshoot() -> None:
    guard = LocalGuard(book(), "n1")
    for _ in range(9):
        assert guard.admit("k", "", T0, cost=10) is None
    assert guard.counts("k", T0) == [90, 90, 90]
    refusal = guard.admit("k", "", T0, cost=20)  # 90 + 20 > 100: refused, nothing spent
    assert refusal is not None
    assert refusal.by is RefusedBy.local_limit
    assert refusal.window is Window.minute
    assert guard.counts("k", T0) == [90, 90, 90]
    assert guard.admit("k", "", T0, cost=10) is None  # exactly the limit
    assert guard.admit("k", "", T0) is not None


def test_the_guard_refuses_a_route_on_its_own_count_and_names_it() -> None:
    guard = LocalGuard(book(reports=REPORTS), "n1")
    for _ in range(3):
        assert guard.admit("k", "", T0, cost=10, route="reports") is None
    refusal = guard.admit("k", "", T0, cost=10, route="reports")
    assert refusal is not None
    assert refusal.route == "reports"
    assert refusal.window is Window.day
    assert refusal.limit == 30
    # Refused by the route: nothing spent, and the key's other routes still admitted.
    assert guard.counts("k", T0) == [30, 30, 30]
    assert guard.admit("k", "", T0, cost=1) is None
    # A route without limits is not counted apart (no state kept for it).
    assert guard.admit("k", "", T0, route="unlimited-route") is None
    assert len(guard) == 2  # k and k@reports


def test_a_shadow_route_limit_admits_and_says_what_it_would_have_refused() -> None:
    guard = LocalGuard(book(reports=REPORTS.model_copy(update={"shadow": True})), "n1")
    for _ in range(3):
        assert guard.admit("k", "", T0, cost=10, route="reports") is None
    refusal = guard.admit("k", "", T0, cost=10, route="reports")
    assert refusal is not None
    assert refusal.shadow
    assert refusal.route == "reports"
    assert guard.counts("k", T0) == [40, 40, 40]  # served, so counted


@pytest.mark.parametrize("cost", [1, 7])
def test_the_engine_blocks_a_key_on_a_route_and_divides_no_allowance_for_it(cost: int) -> None:
    engine = LimitEngine(book(reports=LimitPolicy(per_minute=10, per_hour=None, per_day=None)), clock=lambda: T0)
    engine.assign(0, [])
    subject = route_subject("k", "reports")
    n = -(-10 // cost)  # requests until the route's 10 are spent
    verdicts = engine.observe({(0, "k", "", MINUTE): n * cost, (0, subject, "", MINUTE): n * cost})
    assert [(d.key_id, d.action, d.window, d.limit) for d in verdicts.decisions] == [
        (subject, DecisionAction.block, Window.minute, 10)
    ]
    assert "on route reports" in verdicts.decisions[0].reason
    assert not verdicts.allowances
    assert engine._allot(subject, engine._find(subject), {}, T0) is None
