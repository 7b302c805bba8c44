"""Key id derivation and the in-memory key store."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.demo_api import DEMO_KEY_SPECS, demo_key_store, demo_keys
from node.errors import MissingSecretError, WeakSecretError
from node.keys import InMemoryKeyStore, KeyIdDeriver, KeyRecord, derive_key_id, display_prefix, is_well_formed
from schemas.events import make_event
from tests.node_secret import NODE_SECRET

SECRET = NODE_SECRET.encode()
KEY_ID = re.compile(r"^(?:[A-Za-z0-9]{6}|short)_[0-9a-f]{24}$")


def test_stable_and_shaped() -> None:
    raw = "sk_live_4f9a8b7c6d5e4f3a2b1c0d9e"
    key_id = derive_key_id(raw, SECRET)
    assert key_id == derive_key_id(raw, SECRET)
    assert key_id == KeyIdDeriver(SECRET)(raw)
    expected = hmac.new(SECRET, raw.encode(), hashlib.sha256).hexdigest()[:24]
    assert key_id == f"skxliv_{expected}"
    assert raw not in key_id


def test_keyed_by_the_secret() -> None:
    raw = "sk_live_4f9a8b7c6d5e4f3a2b1c0d9e"
    assert derive_key_id(raw, SECRET) != derive_key_id(raw, NODE_SECRET[::-1].encode())
    # and not the plain hash of the key: without the secret nobody can match key ids to keys
    assert hashlib.sha256(raw.encode()).hexdigest()[:24] not in derive_key_id(raw, SECRET)


def test_distinct_keys_distinct_ids() -> None:
    ids = {derive_key_id(f"cf_live_{i:032d}", SECRET) for i in range(2_000)}
    assert len(ids) == 2_000


@pytest.mark.parametrize(
    ("raw", "prefix"),
    [
        ("abcdefghijklmnopqrstuvwxyz", "abcdef"),
        ("sk-live_0123456789abcdef", "skxliv"),
        ("ключ-ключ-ключ-ключ-ключ", "xxxxxx"),
        ("exactly-19-chars-ab", "short"),
        ("x", "short"),
    ],
)
def test_display_prefix(raw: str, prefix: str) -> None:
    assert display_prefix(raw) == prefix
    assert derive_key_id(raw, SECRET).startswith(prefix + "_")


def test_empty_secret_refused() -> None:
    with pytest.raises(MissingSecretError, match="METER_NODE_SECRET"):
        derive_key_id("sk_live_4f9a8b7c6d5e4f3a2b1c0d9e", b"")
    with pytest.raises(MissingSecretError):
        KeyIdDeriver(b"")


@pytest.mark.parametrize("secret", [b"x", b"s" * 31, "é".encode() * 15])
def test_short_secret_refused(secret: bytes) -> None:
    """A short HMAC key can be brute-forced from one leaked key id and its known demo key."""
    with pytest.raises(WeakSecretError, match=r"METER_NODE_SECRET.*at least 32 bytes"):
        KeyIdDeriver(secret)
    assert KeyIdDeriver(b"s" * 32)("sk_live_4f9a8b7c6d5e4f3a2b1c0d9e")


def test_empty_key_refused() -> None:
    with pytest.raises(ValueError, match="empty key"):
        derive_key_id("", SECRET)


@given(st.text(min_size=1, max_size=400))
def test_any_key_gives_a_valid_event_key_id(raw: str) -> None:
    key_id = derive_key_id(raw, SECRET)
    assert len(key_id) <= 64
    assert KEY_ID.match(key_id)
    event = make_event(
        request_id="r1", key_id=key_id, node_id="n1", method="GET", endpoint="/x", status=200, ts="2025-01-01T00:00:00Z"
    )
    assert event["key_id"] == key_id


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("cf_alice_0123456789", True),
        ("short", False),
        ("has space inside key", False),
        ("é" * 10, False),
        ("a" * 257, False),
    ],
)
def test_well_formed(raw: str, ok: bool) -> None:
    assert is_well_formed(raw) is ok


def test_store_holds_only_key_ids() -> None:
    raw = "cf_alice_0123456789abcdef0123"
    store = InMemoryKeyStore()
    record = store.add_raw(raw, KeyIdDeriver(SECRET), account_id="acct-1", scopes={"a", "b"}, name="alice")
    assert store.lookup(derive_key_id(raw, SECRET)) == record
    assert store.lookup(raw) is None
    assert raw not in repr(list(store))
    assert raw not in repr(vars(store))
    assert record.allows("a")
    assert record.allows(None)
    assert not record.allows("c")
    store.add(KeyRecord("k2", "acct-2", active=False))
    assert len(store) == 2


def test_demo_keys_deterministic_per_seed() -> None:
    a, b, other = demo_keys("seed-1"), demo_keys("seed-1"), demo_keys("seed-2")
    assert a == b
    assert set(a) == set(DEMO_KEY_SPECS)
    assert not set(a.values()) & set(other.values())
    assert all(is_well_formed(raw) for raw in a.values())
    store = demo_key_store(a, SECRET)
    reader = store.lookup(derive_key_id(a["reader"], SECRET))
    assert reader is not None
    assert not reader.allows("payments:write")
    assert reader.allows("payments:read")
    revoked = store.lookup(derive_key_id(a["revoked"], SECRET))
    assert revoked is not None
    assert not revoked.active
    with pytest.raises(ValueError, match="seed"):
        demo_keys("")
