"""Every text field of the event contract refuses control characters; the control-topic
contracts bound every number a column or a clock must hold."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.decisions import Decision
from schemas.events import make_event
from schemas.limits import LimitOverride

NOW = datetime.now(UTC)
GOOD: dict[str, Any] = {
    "request_id": "r-1",
    "key_id": "cf_0123",
    "node_id": "node-1",
    "method": "GET",
    "endpoint": "/v0/payments",
    "status": 200,
    "ts": NOW,
    "account_id": "acct_1",
}
FORGERIES = ["\x1b[2J", "\x07", "\x7f", "\x9b31m", "\u202e", "\u2066", "\u200f", "a\nb"]


@pytest.mark.parametrize("field", ["request_id", "key_id", "node_id", "method", "endpoint", "account_id"])
@pytest.mark.parametrize("forgery", FORGERIES, ids=[repr(f) for f in FORGERIES])
def test_event_text_refuses_control_characters(field: str, forgery: str) -> None:
    value = ("/v0/" if field == "endpoint" else "x") + forgery
    with pytest.raises(ValidationError):
        make_event(**(GOOD | {field: value}))


def test_event_text_keeps_ordinary_unicode() -> None:
    assert make_event(**(GOOD | {"endpoint": "/v0/café/ünïcode"}))["endpoint"] == "/v0/café/ünïcode"


DECISION: dict[str, Any] = {"key_id": "k", "action": "block", "window": "manual", "version": 7, "decided_at": NOW}


@pytest.mark.parametrize(
    "bad",
    [
        {"version": -1},
        {"version": 0},
        {"version": 2**63},
        {"version": 2**64},
        {"limit": -5},
        {"count": 2**64},
        {"reason": "x" * 513},
        {"reason": "call \x1b[31m"},
        {"key_id": ""},
        {"source": "\u202eoperator"},
        {"until": datetime(1, 1, 1, tzinfo=UTC)},
        {"decided_at": datetime(9999, 1, 1, tzinfo=UTC)},
    ],
)
def test_decision_bounds(bad: dict[str, Any]) -> None:
    Decision.model_validate(DECISION)
    with pytest.raises(ValidationError):
        Decision.model_validate(DECISION | bad)


@pytest.mark.parametrize(
    "bad",
    [{"policy": {"per_minute": -1}}, {"policy": {"per_day": 10**13}}, {"subject": "x" * 65}, {"note": "\x00"}],
)
def test_override_bounds(bad: dict[str, Any]) -> None:
    good = {"scope": "key", "subject": "k", "policy": {"per_minute": 5}, "updated_at": NOW}
    LimitOverride.model_validate(good)
    with pytest.raises(ValidationError):
        LimitOverride.model_validate(good | bad)
