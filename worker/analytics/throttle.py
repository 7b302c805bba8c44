"""Failed admin logins per client: a token bucket each, so that guessing the key is slow.

Pure: the caller passes the time (monotonic seconds) and decides what a refusal looks like.
Each failed login costs a token; a client may try while it has one. A client is an
address, and an IPv6 client its /64 (one host usually holds a whole /64).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass


def client_key(host: str | None) -> str:
    """The throttled unit of a peer address: IPv4 as is, IPv6 as its /64, anything else verbatim."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class _Bucket:
    tokens: float
    at: float  # when ``tokens`` was counted


class LoginThrottle:
    """``burst`` failures in a row per client, then ``per_second`` more; at most ``max_clients`` kept.

    A client absent from the table has a full bucket: the least recently failing clients are
    forgotten first, so the table stays bounded whatever the number of addresses.
    """

    def __init__(self, burst: int, per_second: float, max_clients: int = 100_000) -> None:
        if burst < 1 or per_second <= 0 or max_clients < 1:
            raise ValueError("burst and max_clients must be >= 1, per_second > 0")
        self.burst = burst
        self.per_second = per_second
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, client: str, now: float) -> float:
        bucket = self._buckets.get(client)
        if bucket is None:
            return float(self.burst)
        return min(float(self.burst), bucket.tokens + max(0.0, now - bucket.at) * self.per_second)

    def retry_after(self, client: str, now: float) -> float:
        """Seconds until ``client`` may try again; 0 when it may try now."""
        tokens = self._tokens(client, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.per_second

    def failed(self, client: str, now: float) -> None:
        """Count one failed login of ``client`` at ``now``."""
        tokens = max(0.0, self._tokens(client, now) - 1)
        self._buckets[client] = _Bucket(tokens, now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
