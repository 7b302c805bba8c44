"""``meter why``: a key's block and allowances in plain words."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.allowances import Allowance, NodeGrant, WindowAllowance
from schemas.decisions import Decision, DecisionAction, Window
from schemas.limits import LimitPolicy
from worker.limits.explain import explain

T0 = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC).timestamp()
MINUTE = int(T0) // 60 * 60


def dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def block(version: int, until: float | None, source: str = "worker") -> Decision:
    return Decision(
        key_id="k",
        action=DecisionAction.block,
        window=Window.minute if source == "worker" else Window.manual,
        limit=100,
        count=100,
        until=dt(until) if until is not None else None,
        reason="100 requests in the current minute >= limit 100 (default policy)",
        version=version,
        decided_at=dt(T0),
        source=source,
    )


def allowance(version: int, start: int = MINUTE) -> Allowance:
    return Allowance(
        key_id="k",
        version=version,
        decided_at=dt(T0),
        windows=[
            WindowAllowance(
                window=Window.minute,
                start=dt(start),
                until=dt(start + 60),
                limit=100,
                count=70,
                grants={"n1": NodeGrant(used=30, cap=30), "n2": NodeGrant(used=10, cap=25)},
                others=7,
            )
        ],
    )


def why(decision: Decision | None, held: Allowance | None, now: float = T0) -> list[str]:
    return explain("k", LimitPolicy(), "default policy", decision, held, now)


def test_the_first_line_gives_the_limits_and_their_source() -> None:
    assert why(None, None)[0] == "key k: limits 100/min, 1000/h, 5000/day (default policy)"
    lines = explain("k", LimitPolicy(per_minute=None), "key override k", None, None, T0)
    assert lines[0] == "key k: limits unlimited/min, 1000/h, 5000/day (key override k)"


def test_an_active_block_says_blocked_with_its_version() -> None:
    lines = why(block(1234567, MINUTE + 60), None)
    [line] = [line for line in lines if "BLOCKED" in line]
    assert "decision 1234567" in line
    assert "the worker that owns the key" in line
    assert dt(MINUTE + 60).isoformat() in line
    assert "100 requests" in line


def test_an_open_ended_operator_block() -> None:
    [line] = [line for line in why(block(99, None, "operator"), None) if "BLOCKED" in line]
    assert "until an explicit unblock" in line
    assert "an operator" in line
    assert "decision 99" in line


def test_a_shadow_guard_block_is_not_reported_as_blocking_the_nodes() -> None:
    # The guards' blocks are shadow by default: nodes serve the key. It was "BLOCKED on every node".
    shadow = block(7, MINUTE + 3600, "guard").model_copy(update={"shadow": True})
    lines = why(shadow, None)
    assert not [line for line in lines if "BLOCKED" in line]
    [line] = [line for line in lines if "SHADOW" in line]
    assert "nodes serve the key" in line
    assert "the abuse guards" in line


def test_a_block_that_ran_out_is_not_reported_as_blocked() -> None:
    lines = why(block(1234567, MINUTE + 60), None, now=MINUTE + 61)
    assert not any("BLOCKED" in line for line in lines)
    assert any("not blocked: its last block has run out (decision 1234567" in line for line in lines)


def test_without_a_decision_or_allowance() -> None:
    lines = why(None, None)
    assert any("no block or unblock decision" in line for line in lines)
    assert not any("BLOCKED" in line for line in lines)
    assert lines[-1].startswith("no allowance in force")


def test_an_allowance_of_a_past_window_is_not_in_force() -> None:
    lines = why(None, allowance(5, start=MINUTE - 60))
    assert lines[-1].startswith("no allowance in force")
    assert not any("cap" in line for line in lines)


def test_an_allowance_lists_each_node_cap_and_which_are_used_up() -> None:
    lines = why(None, allowance(5))
    assert not any("no allowance in force" in line for line in lines)
    assert any(line.startswith("allowance 5 ") for line in lines)
    assert any("70 of 100 counted, 30 left" in line for line in lines)
    assert "    n1: used 30, cap 30 (used up: refusing)" in lines
    assert "    n2: used 10, cap 25 (15 more)" in lines
    assert any("any other node: 7 more" in line for line in lines)
