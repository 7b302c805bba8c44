from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.events import EVENT_SCHEMA_VERSION, MAX_COST, dump_event, make_event, parse_event

BASE = {
    "request_id": "req-1",
    "key_id": "cf_liv_0123456789abcdef01234567",
    "node_id": "node-1",
    "method": "GET",
    "endpoint": "/v0/payments",
    "status": 200,
    "ts": datetime(2026, 11, 27, 12, 0, 0, 123000, tzinfo=UTC),
}


def test_round_trip_keeps_every_field_and_drops_none() -> None:
    event = make_event(**BASE, account_id="acct-1", latency_ms=12.5, client_ip="203.0.113.7", bytes_out=10)
    wire = dump_event(event)
    assert parse_event(wire) == event
    assert b"null" not in dump_event(make_event(**BASE, account_id=None))


def test_version_field_defaults_and_unknown_fields_are_ignored() -> None:
    event = parse_event(dump_event(make_event(**BASE))[:-1] + b',"future_field":{"x":1}}')
    assert event["v"] == EVENT_SCHEMA_VERSION
    assert "future_field" not in event


def test_a_version_1_event_without_cost_or_route_is_still_accepted() -> None:
    """Events of nodes not yet upgraded: no cost (counted 1 by the worker), no route."""
    wire = dump_event(make_event(**BASE, v=1))
    event = parse_event(wire)
    assert event["v"] == 1
    assert "cost" not in event
    assert "route" not in event


@pytest.mark.parametrize(("cost", "route"), [(1, None), (10, "statements"), (MAX_COST, "a.b-c_9")])
def test_cost_and_route_round_trip(cost: int, route: str | None) -> None:
    event = make_event(**BASE, cost=cost, route=route)
    assert parse_event(dump_event(event)) == {k: v for k, v in event.items() if v is not None}


def test_cost_0_is_only_a_503_without_a_route() -> None:
    """A fail-closed node's refusal spent nothing; anything else at cost 0 is a producer's bug
    (a cost left at its zero value), refused rather than silently uncounted."""
    refusal = make_event(**{**BASE, "status": 503}, cost=0)
    assert parse_event(dump_event(refusal))["cost"] == 0
    for status, route in ((200, None), (429, None), (503, "statements")):
        with pytest.raises(ValidationError, match="cost 0 is only for a 503 without a route"):
            make_event(**{**BASE, "status": status}, cost=0, route=route)
        wire = dump_event(make_event(**{**BASE, "status": status}, route=route))[:-1] + b',"cost":0}'
        with pytest.raises(ValidationError, match="zero_cost"):
            parse_event(wire)


def test_offset_timestamps_are_normalised_to_the_same_instant() -> None:
    plus_two = BASE["ts"].astimezone(timezone(timedelta(hours=2)))  # type: ignore[attr-defined]
    event = make_event(**{**BASE, "ts": plus_two.isoformat()})
    assert event["ts"].timestamp() == BASE["ts"].timestamp()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", 99),
        ("status", 600),
        ("status", "200 OK"),
        ("ts", "2026-11-27T12:00:00"),  # no offset: refused, never guessed
        ("ts", "not a time"),
        ("endpoint", "v0/payments"),  # a route starts with /
        ("request_id", ""),
        ("request_id", "x" * 129),
        ("key_id", "k" * 65),
        ("method", ""),
        ("v", EVENT_SCHEMA_VERSION + 1),  # a version this build does not know
        ("cost", -1),
        ("cost", MAX_COST + 1),
        ("route", "Reports"),  # route names are lower case
        ("route", "a@b"),  # the mark that joins key and route never occurs in one
        ("route", "r" * 33),
    ],
)
def test_contract_violations_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        make_event(**{**BASE, field: value})


@pytest.mark.parametrize("missing", ["request_id", "key_id", "node_id", "method", "endpoint", "status", "ts"])
def test_required_fields(missing: str) -> None:
    with pytest.raises(ValidationError):
        make_event(**{k: v for k, v in BASE.items() if k != missing})


@pytest.mark.parametrize(
    "ip", ["not-an-ip", "999.1.1.1", "01.2.3.4", "1.2.3.4\x1b[31m", "1.2.3.4, 5.6.7.8", "", "2001:db8::1::2"]
)
def test_client_ip_must_be_an_ip_address(ip: str) -> None:
    with pytest.raises(ValidationError, match="client_ip"):
        make_event(**BASE, client_ip=ip)
    wire = dump_event(make_event(**BASE))[:-1] + b',"client_ip":' + json.dumps(ip).encode() + b"}"
    with pytest.raises(ValidationError, match="client_ip"):
        parse_event(wire)


@pytest.mark.parametrize(
    ("ip", "stored"),
    [("203.0.113.7", "203.0.113.7"), ("2001:DB8:0::7", "2001:db8::7"), ("::ffff:192.0.2.1", "192.0.2.1")],
)
def test_client_ip_is_stored_in_its_canonical_form(ip: str, stored: str) -> None:
    assert make_event(**BASE, client_ip=ip)["client_ip"] == stored


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=4, max_size=4), st.lists(st.booleans(), min_size=4, max_size=4))
def test_the_native_ipv4_check_agrees_with_ipaddress(octets: list[int], zero_padded: list[bool]) -> None:
    """The dotted-quad fast path accepts exactly what ``ipaddress`` accepts, already canonical."""
    text = ".".join(f"0{o}" if pad else str(o) for o, pad in zip(octets, zero_padded, strict=True))
    try:
        expected: str | None = str(ipaddress.ip_address(text))
    except ValueError:
        expected = None
    try:
        got: str | None = make_event(**(BASE | {"client_ip": text}))["client_ip"]
    except ValidationError:
        got = None
    assert got == expected
