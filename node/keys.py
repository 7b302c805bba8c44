"""Key ids: what the raw API key becomes before anything leaves the process.

``key_id = {display_prefix}_{HMAC-SHA256(node_secret, raw_key) hex[:24]}``. The HMAC is keyed
so that a leaked event stream cannot be matched against a list of candidate keys, and the
prefix gives operators something to recognise a key by without revealing it. The raw key is
never stored: the key store holds key ids only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from node.errors import MissingSecretError, WeakSecretError

# 24 hex chars = 96 bits: collision-free for any realistic number of keys, short in rows.
_HASH_HEX_CHARS = 24
_PREFIX_CHARS = 6
# Below this length 6 chars would be a large share of the key, so no prefix is shown.
_MIN_LEN_FOR_PREFIX = 20
_SHORT_PREFIX = "short"
# The longest key id: prefix, "_", hash (what an operator may type; anything longer is no key id).
MAX_KEY_ID_CHARS = max(_PREFIX_CHARS, len(_SHORT_PREFIX)) + 1 + _HASH_HEX_CHARS
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")

# What a well-formed raw key looks like (anything else is refused before the store is asked).
MIN_KEY_LEN = 8
MAX_KEY_LEN = 256
_WELL_FORMED = re.compile(rf"[\x21-\x7e]{{{MIN_KEY_LEN},{MAX_KEY_LEN}}}")

# Anyone holding one key id and its raw key (their own key, a demo key) can try secrets
# offline; 32 bytes (of random hex: 128 bits and more) puts that out of reach.
MIN_SECRET_BYTES = 32


def check_secret(secret: bytes, setting: str = "METER_NODE_SECRET") -> None:
    """Raise ``WeakSecretError`` for a secret under ``MIN_SECRET_BYTES``, saying how to make one."""
    if len(secret) < MIN_SECRET_BYTES:
        raise WeakSecretError(
            f"{setting} must be at least {MIN_SECRET_BYTES} bytes (got {len(secret)}); generate one with "
            "python3 -c 'import secrets; print(secrets.token_hex(32))'"
        )


def display_prefix(raw_key: str) -> str:
    """The non-secret part shown to people: first 6 chars (alphanumerics only) of a long key."""
    if len(raw_key) < _MIN_LEN_FOR_PREFIX:
        return _SHORT_PREFIX
    return _NOT_ALNUM.sub("x", raw_key[:_PREFIX_CHARS])


def is_well_formed(raw_key: str) -> bool:
    """Printable ASCII without spaces, 8..256 chars; malformed keys are never looked up."""
    return _WELL_FORMED.fullmatch(raw_key) is not None


class KeyIdDeriver:
    """Derives key ids with one node secret; keeps a pre-keyed HMAC so each call only hashes the key."""

    __slots__ = ("_mac",)

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise MissingSecretError(
                "node secret is empty: set METER_NODE_SECRET (the same value on every node) so key ids are keyed hashes"
            )
        check_secret(secret)
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def __call__(self, raw_key: str) -> str:
        if not raw_key:
            raise ValueError("cannot derive a key id from an empty key")
        mac = self._mac.copy()
        # surrogateescape: header values are latin-1 decoded bytes; never fail on odd input.
        mac.update(raw_key.encode("utf-8", "surrogateescape"))
        return f"{display_prefix(raw_key)}_{mac.hexdigest()[:_HASH_HEX_CHARS]}"


def derive_key_id(raw_key: str, secret: bytes) -> str:
    """``{display_prefix}_{hmac hex[:24]}``: stable for one secret, at most 31 chars."""
    return KeyIdDeriver(secret)(raw_key)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What a node knows about a key: no raw key, only its id."""

    key_id: str
    account_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    active: bool = True
    name: str = ""

    def allows(self, scope: str | None) -> bool:
        return scope is None or scope in self.scopes


class KeyStore(Protocol):
    """Where the middleware looks keys up; synchronous because it sits on every request."""

    def lookup(self, key_id: str) -> KeyRecord | None: ...


class InMemoryKeyStore:
    """A dict of key id -> record. Raw keys given to it are hashed at once and not kept."""

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self._records: dict[str, KeyRecord] = {r.key_id: r for r in records}

    def lookup(self, key_id: str) -> KeyRecord | None:
        return self._records.get(key_id)

    def add(self, record: KeyRecord) -> None:
        self._records[record.key_id] = record

    def add_raw(
        self,
        raw_key: str,
        derive: KeyIdDeriver,
        *,
        account_id: str,
        scopes: Iterable[str] = (),
        active: bool = True,
        name: str = "",
    ) -> KeyRecord:
        """Register a key given in clear (demo, provisioning); only its id is stored."""
        record = KeyRecord(derive(raw_key), account_id, frozenset(scopes), active, name)
        self.add(record)
        return record

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[KeyRecord]:
        return iter(list(self._records.values()))
