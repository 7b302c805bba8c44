"""Abuse guards: rules over recent activity, plain-words reasons, one block at a time, and
an operator's unblock respected."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.decisions import Decision, DecisionAction, Window
from schemas.limits import LimitPolicy, PolicyBook
from tests.clock import Clock
from worker.limits.engine import LimitEngine
from worker.limits.guards import GuardRules, findings, lifted_by_operator

T0 = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC).timestamp()
RULES = GuardRules(max_client_ips_per_hour=50, max_auth_failures=100, block_minutes=60, shadow=False)


def test_each_key_gets_one_finding_with_the_rule_it_broke_in_plain_words() -> None:
    found = findings(RULES, [("leaky", 51), ("both", 80)], [("guesser", 101), ("both", 500)])
    by_key = {f.key_id: f for f in found}
    assert set(by_key) == {"leaky", "both", "guesser"}
    assert by_key["leaky"].rule == "client_ips"
    assert "51 client IPs this hour (more than 50)" in by_key["leaky"].reason
    assert by_key["both"].rule == "client_ips"  # one block per key, whichever rule came first
    assert "101 responses 401/403 in 10 min (more than 100)" in by_key["guesser"].reason


def test_a_rule_is_off_until_its_threshold_is_set() -> None:
    assert not GuardRules().enabled
    assert GuardRules(max_auth_failures=1).enabled
    assert GuardRules().shadow  # shadow first


def _operator_unblock(at: float) -> Decision:
    return Decision(
        key_id="k",
        action=DecisionAction.unblock,
        window=Window.manual,
        version=9,
        decided_at=datetime.fromtimestamp(at, UTC),
        source="operator",
    )


def test_an_operator_unblock_keeps_the_guard_off_the_key_for_a_block_length() -> None:
    assert lifted_by_operator(_operator_unblock(T0), T0 + 59 * 60, RULES)
    assert not lifted_by_operator(_operator_unblock(T0), T0 + 61 * 60, RULES)
    assert not lifted_by_operator(None, T0, RULES)


def test_the_engine_blocks_an_owned_key_once_until_the_block_ends() -> None:
    clock = Clock(T0)
    engine = LimitEngine(PolicyBook(LimitPolicy()), clock)
    engine.assign(0, [])
    engine.observe({(0, "k", "acct", int(T0) // 60 * 60): 1})
    assert engine.guard_block("not-mine", T0 + 3600, "why", shadow=False) is None
    block = engine.guard_block("k", T0 + 3600, "guard: why", shadow=True)
    assert block is not None
    assert (block.source, block.window, block.shadow, block.reason) == ("guard", Window.manual, True, "guard: why")
    assert engine.guard_block("k", T0 + 7200, "again", shadow=True) is None  # not extended while in force
    clock.now = T0 + 3600
    [unblock] = engine.tick()
    assert unblock.action is DecisionAction.unblock
