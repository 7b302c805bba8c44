"""Dividing what remains of a hot key's limit among the nodes that carry its traffic.

Pure: given the key's count, its limit and what each node has used and how fast it is going,
return each node's cap. Caps are absolute counts of the node's own admissions in the window,
so the requests a node admitted before the allowance reached it are charged to it.

Each node's share of the remainder is the larger of
* its part in proportion to its recent rate (the Tyk DRL / Doorman split: the shares add up
  to the remainder, so nodes that keep their traffic steady cannot overshoot together), and
* (``pooled``) everything that remains minus what the *other* nodes are expected to admit
  before they hear of this division (their rate × the propagation lag): gubernator's GLOBAL
  idea, every node answers from the owner's remaining count. This is what lets traffic move
  to another node, or a node that was idle take over, without false refusals.
A node that is not listed (its traffic has not reached the worker since the key turned hot)
may admit an equal part of the remainder (pooled: the remainder minus the listed nodes'
expected admissions), counted from when it first holds the allowance.

The owner pools the listed nodes' parts only while one node carries the key: nodes holding
requests at their caps release them at once when a division arrives, so pooled parts of a key
that several nodes carry let each take nearly the whole remainder (``HotKey.divide``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from schemas.allowances import NodeGrant
from schemas.decisions import WINDOW_SECONDS, Window

MIN_SPAN_S = 0.002  # shorter spans of event time give no usable rate
FIRST_SIGHT_S = 0.1  # a node seen once: its requests are taken as spread over this long
IDLE_TAU_S = 0.02  # how fast a silent node's rate (and so its reserve) fades


@dataclass(slots=True)
class NodeUse:
    """What the owner of a hot key knows of one node's traffic of that key."""

    counts: dict[Window, tuple[int, int]] = field(default_factory=dict)  # window -> (start, node's count)
    rate: float = 0.0  # requests/s of this key at this node (admitted or refused), from event times
    at: float = 0.0  # worker time of the node's latest batch
    last_ts: float = 0.0  # event time of its latest request
    # (minute start, cost): what of its counts of that minute it was still serving at its latest
    # report (events not sent yet: not in the worker's count either)
    in_flight: tuple[int, int] = (0, 0)

    def arrived(self, n: int, first_ts: float, last_ts: float, now: float) -> None:
        """``n`` requests stamped ``first_ts``..``last_ts`` by the node. The rate is measured on
        the node's own clock (event times), so it is right from the first batch on, whatever
        the batching and the lag between the node and the worker."""
        since, between = (self.last_ts, n) if self.last_ts else (first_ts, n - 1)
        span = last_ts - since
        measured = between / span if span >= MIN_SPAN_S and between > 0 else n / FIRST_SIGHT_S
        self.rate = measured if self.rate == 0.0 else (self.rate + measured) / 2
        self.at = now
        self.last_ts = max(self.last_ts, last_ts)

    def rate_at(self, now: float) -> float:
        """The rate now: it fades quickly once the node stops sending (traffic has moved)."""
        if self.rate == 0.0:
            return 0.0
        return self.rate * math.exp(-max(0.0, now - self.at) / IDLE_TAU_S)

    def report(self, window: Window, start: int, count: int) -> None:
        """The node's own count in ``window`` from one of its events (counts only grow)."""
        held = self.counts.get(window)
        if held is None or start > held[0] or (start == held[0] and count > held[1]):
            self.counts[window] = (start, count)

    def serving(self, minute: int, cost: int) -> None:
        """The node's word on its requests of ``minute`` being served (a later minute's replaces it)."""
        if minute >= self.in_flight[0]:
            self.in_flight = (minute, cost)

    def in_flight_in(self, window: Window, start: int) -> int:
        """What the node still serves of its requests counted in ``window`` from ``start``."""
        minute, cost = self.in_flight
        return cost if start <= minute < start + WINDOW_SECONDS[window] else 0

    def used(self, window: Window, start: int) -> int | None:
        held = self.counts.get(window)
        if held is None or held[0] != start:
            return None  # nothing heard from this node in this window
        return held[1]


@dataclass(frozen=True, slots=True)
class Division:
    """One division of a window's remainder: each listed node's grant, and what others get."""

    grants: dict[str, NodeGrant]
    others: int


def divide(
    limit: int,
    count: int,
    nodes: Mapping[str, tuple[int, float]],
    lag_s: float,
    pooled: bool = True,
    unseen: int = 0,
    floors: Mapping[str, int] | None = None,
    starved: Collection[str] = (),
    pool_others: bool | None = None,
) -> Division:
    """Caps for the nodes ``{node_id: (used, rate)}`` of a key that has ``count`` of ``limit``.

    ``unseen``: what nodes not heard from yet may have admitted that the count does not hold
    (their burst shares, while the division settles): held back from every part. ``floors``:
    what each listed node may admit before this division reaches it (its burst share while the
    division settles, the cap a recent division gave it): a node below its floor has
    ``floor - used`` held for it, on top of its part. ``starved``: nodes at the cap they were
    given (likely holding requests): while anything remains, each gets at least one unit (the
    worker cannot see which of them waits for the last requests of a limit, and rounding must
    not give those to one that does not; the caps may then add up to ``len(starved) - 1``
    past the remainder, as pooled parts would).
    ``pool_others`` (default: ``pooled``): whether a node not listed may take the remainder
    less the listed nodes' expected admissions (traffic that moved to it) or an equal part."""
    floors = floors or {}
    held_for = {node: max(0, floors.get(node, 0) - used) for node, (used, _) in nodes.items()}
    remaining = max(0, limit - count - unseen - sum(held_for.values()))
    total_rate = sum(rate for _, rate in nodes.values())
    # Whole requests: a fraction of one expected in flight holds nothing back.
    reserve = {node: math.floor(rate * lag_s) for node, (_, rate) in nodes.items()}
    total_reserve = sum(reserve.values())
    # Proportional parts in whole requests; the units lost to rounding go to the largest
    # fractions, so the parts add up to the remainder exactly (none of it stranded).
    exact = {
        node: remaining * rate / total_rate if total_rate > 0 else remaining / len(nodes)
        for node, (_, rate) in nodes.items()
    }
    parts = {node: math.floor(x) for node, x in exact.items()}
    for node in sorted(exact, key=lambda n: exact[n] - parts[n], reverse=True)[: remaining - sum(parts.values())]:
        parts[node] += 1
    if remaining:
        for node in starved:
            if node in parts:
                parts[node] = max(parts[node], 1)
    grants: dict[str, NodeGrant] = {}
    for node, (used, _) in nodes.items():
        share = parts[node]
        if pooled:
            share = max(share, remaining - (total_reserve - reserve[node]))
        grants[node] = NodeGrant(used=used, cap=used + held_for[node] + max(0, share))
    # A node not listed yet (traffic that just moved to it): an equal part, or when pooled,
    # the remainder minus what the listed nodes are expected to admit meanwhile.
    others = remaining // (len(nodes) + 1)
    if pool_others is None:
        pool_others = pooled
    if pool_others:
        others = max(others, remaining - total_reserve)
    return Division(grants, others)
