"""Hypothesis strategies for hostile input to the worker: every kind of bad message."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

NOW = datetime.now(UTC)

GOOD: dict[str, Any] = {
    "v": 1,
    "request_id": "fuzz",
    "key_id": "cf_fuz_0123456789abcdef01234567",
    "node_id": "node-1",
    "method": "GET",
    "endpoint": "/v0/payments",
    "status": 200,
    "ts": NOW.isoformat(),
}

odd_text = st.text(alphabet=st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S", "Z", "C"]), max_size=40)


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


not_a_string = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.lists(odd_text, max_size=2)
not_an_int = (
    st.none()
    | odd_text
    | st.floats(allow_nan=False).filter(lambda f: f != int(f) if f == f and abs(f) < 1e18 else True)
    | st.lists(st.integers(), max_size=2)
)


@st.composite
def wrong_field(draw: st.DrawFn) -> bytes:
    """A field of the wrong JSON type (the contract is strict: no coercion)."""
    field = draw(st.sampled_from(sorted(GOOD)))
    body = dict(GOOD)
    body[field] = draw(not_an_int if field in ("v", "status") else not_a_string)
    return _dump(body)


@st.composite
def missing_field(draw: st.DrawFn) -> bytes:
    field = draw(st.sampled_from([k for k in GOOD if k != "v"]))
    return _dump({k: v for k, v in GOOD.items() if k != field})


@st.composite
def bad_status(draw: st.DrawFn) -> bytes:
    return _dump({**GOOD, "status": draw(st.integers(max_value=99) | st.integers(min_value=600))})


@st.composite
def bad_time(draw: st.DrawFn) -> bytes:
    days = draw(st.integers(min_value=2, max_value=3_000_000))
    sign = draw(st.sampled_from([-1, 1]))
    try:
        when = NOW + sign * timedelta(days=days)
        text = when.isoformat()
    except OverflowError:
        text = "9999-12-31T23:59:59+00:00" if sign > 0 else "0001-01-01T00:00:00+00:00"
    naive = draw(st.booleans())
    return _dump({**GOOD, "ts": text.replace("+00:00", "") if naive else text})


@st.composite
def huge_string(draw: st.DrawFn) -> bytes:
    field = draw(st.sampled_from(["request_id", "endpoint", "node_id", "method", "key_id"]))
    size = draw(st.integers(min_value=300, max_value=20_000))  # past every field's bound
    return _dump({**GOOD, field: "/" + "x" * size})


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    whole = _dump(GOOD)
    return whole[: draw(st.integers(min_value=0, max_value=len(whole) - 1))]


@st.composite
def with_nul_or_odd_unicode(draw: st.DrawFn) -> bytes:
    weird = draw(st.sampled_from(["\x00", "\u202e", "\ud800", "\ufeff", "😀" * 50, "\u0000\u0000"]))
    field = draw(st.sampled_from(["request_id", "endpoint", "node_id"]))
    body = {**GOOD, field: (GOOD[field] if field != "endpoint" else "/") + weird}
    if field == "endpoint" and draw(st.booleans()):
        body[field] = weird  # no leading slash either
    return _dump(body)


bad_messages = st.one_of(
    st.binary(max_size=300).filter(lambda b: not b.strip().startswith(b"{")),
    truncated(),
    st.integers(min_value=1, max_value=5_000).map(_nested),
    wrong_field(),
    missing_field(),
    bad_status(),
    bad_time(),
    huge_string(),
    st.just(b"[]"),
    st.just(b"null"),
    st.just(b'"just a string"'),
)

# NUL bytes and odd Unicode inside otherwise valid fields may be legitimate (and are then
# counted); they must never crash the worker, and if refused, refused with a reason.
any_messages = st.one_of(bad_messages, with_nul_or_odd_unicode())
