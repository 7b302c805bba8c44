"""The webhook signature: ``X-Meter-Signature: t=<unix seconds>,v1=<hex>``.

``v1`` is HMAC-SHA-256, keyed with ``METER_NOTIFY_WEBHOOK_SECRET``, over ``f"{t}."`` followed by
the exact bytes of the request body. Every attempt is signed anew (a retry carries a fresh
``t``). A receiver recomputes the HMAC over the raw body it received, compares it in constant
time, and refuses a ``t`` too far from its own clock (default tolerance 5 minutes), so a
captured request cannot be replayed later. Several ``v1`` entries may appear (a secret being
rotated): one matching is enough. ``verify`` is the reference implementation.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-Meter-Signature"
TOLERANCE_S = 300


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The header's value for ``body`` sent at ``timestamp`` (unix seconds)."""
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance_s: float = TOLERANCE_S) -> bool:
    """True if ``header`` signs ``body`` with ``secret`` and its time is within ``tolerance_s`` of ``now``."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:  # not "²"
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected.encode(), c.encode()) for c in candidates)
