"""The published contracts (docs/contracts/*.schema.json) are the ones the code validates with:
regenerated here and compared, and records our own code produces pass them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.allowances import Allowance, NodeGrant, WindowAllowance
from schemas.decisions import Decision, DecisionAction, Window
from schemas.events import dump_event, make_event
from schemas.json_schemas import CONTRACTS, json_schema, render
from schemas.limits import LimitOverride, LimitPolicy, OverrideScope
from schemas.notifications import Notification
from tests.integration.helpers import REPO_ROOT

CONTRACTS_DIR = REPO_ROOT / "docs" / "contracts"
REGENERATE = ".venv/bin/python -m schemas.json_schemas docs/contracts"
NOW = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)
EVENT: dict[str, Any] = {
    "request_id": "r1",
    "key_id": "k1",
    "node_id": "n1",
    "method": "GET",
    "endpoint": "/v0/rates",
    "ts": NOW,
}


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_published_schema_is_current(name: str) -> None:
    path = CONTRACTS_DIR / f"{name}.schema.json"
    assert path.is_file(), f"{path} is missing: run {REGENERATE}"
    assert path.read_text(encoding="utf-8") == render(name), f"{path} is out of date: run {REGENERATE}"


def test_no_stale_schema_files() -> None:
    published = {p.name for p in CONTRACTS_DIR.glob("*.schema.json")}
    assert published == {f"{name}.schema.json" for name in CONTRACTS}


def _samples() -> dict[str, tuple[bytes, bytes]]:
    """(valid, invalid) wire records per contract, the valid ones as our code writes them."""
    event = make_event(**EVENT, status=200)
    decision = Decision(
        key_id="k1",
        action=DecisionAction.block,
        window=Window.minute,
        limit=100,
        count=101,
        until=NOW + timedelta(seconds=30),
        version=7,
        decided_at=NOW,
    )
    window = WindowAllowance(
        window=Window.minute,
        start=NOW,
        until=NOW + timedelta(minutes=1),
        limit=100,
        count=40,
        grants={"n1": NodeGrant(used=20, cap=50)},
    )
    allowance = Allowance(key_id="k1", version=3, decided_at=NOW, windows=[window])
    override = LimitOverride(scope=OverrideScope.key, subject="k1", policy=LimitPolicy(per_minute=5), updated_at=NOW)
    start = NOW.replace(second=0)
    notification = Notification(
        id="ntf_0123456789abcdef0123456789abcdef",
        key_id="k1",
        window=Window.minute,
        window_start=start,
        window_end=start + timedelta(minutes=1),
        threshold="80%",
        threshold_percent=80,
        threshold_count=80,
        limit=100,
        count=81,
        version=9,
        decided_at=NOW,
    )

    def bad(record: bytes, **change: Any) -> bytes:
        return json.dumps({**json.loads(record), **change}).encode()

    return {
        "request-event": (wire := dump_event(event), bad(wire, status=700)),
        "decision": (wire := decision.model_dump_json().encode(), bad(wire, version=0)),
        "allowance": (wire := allowance.model_dump_json().encode(), bad(wire, key_id="")),
        "limit-override": (wire := override.model_dump_json().encode(), bad(wire, scope="planet")),
        "notification": (wire := notification.model_dump_json().encode(), bad(wire, count=-1)),
    }


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_records_we_write_pass_the_published_schema_and_bad_ones_do_not(name: str) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json_schema(name))
    good, bad = _samples()[name]
    assert validator.is_valid(json.loads(good)), list(validator.iter_errors(json.loads(good)))
    assert not validator.is_valid(json.loads(bad))


def test_the_published_event_schema_carries_the_zero_cost_rule() -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json_schema("request-event"))
    wire = json.loads(dump_event(make_event(**EVENT, status=503, cost=0)))
    assert validator.is_valid(wire)
    assert not validator.is_valid({**wire, "status": 200})
    assert not validator.is_valid({**wire, "route": "statements"})
    assert validator.is_valid({**wire, "status": 200, "cost": 2})
