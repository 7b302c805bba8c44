"""Limit evaluation for the keys of the partitions this worker owns.

Edge-triggered: one decision per transition (not blocked -> blocked, a block extended to a
longer window, blocked -> unblocked at rollover), never one per event. All windows of a
key are checked before deciding, and the block lasts until the latest end among the
exceeded windows. Versions rise per key: max(now in µs, last known version + 1).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from aiokafka.partitioner import murmur2

from schemas.decisions import WINDOW_SECONDS, Decision, DecisionAction, Window
from schemas.limits import LimitPolicy
from worker.limits.counters import KeyWindows, WindowCounters
from worker.limits.policies import PolicyBook
from worker.limits.windows import AUTOMATIC_WINDOWS, to_datetime

log = logging.getLogger(__name__)

Publish = Callable[[list[Decision]], Awaitable[None]]
# (partition, key_id, account_id, minute epoch) -> requests
LimitCounts = Mapping[tuple[int, str, str, int], int]


def partition_of(key_id: str, partitions: int) -> int:
    """Kafka's default partitioner (murmur2 of the key), as the nodes' producers use it."""
    return int(murmur2(key_id.encode()) & 0x7FFFFFFF) % partitions


def limit_of(policy: LimitPolicy, window: Window) -> int | None:
    if window is Window.minute:
        return policy.per_minute
    if window is Window.hour:
        return policy.per_hour
    return policy.per_day


@dataclass(slots=True)
class ActiveBlock:
    window: Window
    until: float  # epoch seconds; inf for an open-ended operator block
    operator: bool = False


class LimitEngine:
    def __init__(self, policies: PolicyBook, publish: Publish, clock: Callable[[], float] = time.time) -> None:
        self.policies = policies
        self.publish = publish
        self.clock = clock
        self.partitions: dict[int, WindowCounters] = {}
        self.blocks: dict[str, ActiveBlock] = {}
        self.pardons: dict[str, float] = {}  # operator unblocked: no automatic block until then
        self.versions: dict[str, int] = {}
        self._expiry: list[tuple[float, str]] = []
        self.decisions_published = 0
        self.published_by_action: dict[str, int] = {"block": 0, "unblock": 0}

    # -- ownership ---------------------------------------------------------------------
    def assign(self, partition: int, counts: Iterable[tuple[str, str, Window, int, int]]) -> None:
        """Own ``partition`` with counts rebuilt from ClickHouse: (key, account, window, start, n)."""
        counters = self.partitions.setdefault(partition, WindowCounters())
        for key_id, account, window, start, n in counts:
            counters.set(key_id, account, window, start, n)

    def revoke(self, partition: int) -> None:
        counters = self.partitions.pop(partition, None)
        if counters is not None:
            for key_id in counters.keys:
                held = self.blocks.get(key_id)
                if held is not None and not held.operator:  # operator blocks hold whoever owns the key
                    del self.blocks[key_id]

    def live_keys(self) -> int:
        return sum(len(c) for c in self.partitions.values())

    # -- events ------------------------------------------------------------------------
    async def observe(self, counts: LimitCounts) -> list[Decision]:
        """Add a batch's counts and publish the blocks they trigger."""
        now = self.clock()
        this_minute = int(now) // 60 * 60
        touched: dict[str, tuple[int, KeyWindows]] = {}
        for (partition, key_id, account, minute), n in counts.items():
            counters = self.partitions.get(partition)
            if counters is None:  # a partition being revoked: its new owner counts it
                continue
            # A node clock a little ahead stamps events into a minute that has not begun:
            # count them in the live one, or they would move the window early and the
            # current minute's requests would escape the limit.
            touched[key_id] = (partition, counters.add(key_id, account, min(minute, this_minute), n))
        decisions = [d for key_id, (_, kw) in touched.items() if (d := self._evaluate(key_id, kw, now))]
        await self._emit(decisions)
        return decisions

    def retract(self, counts: LimitCounts) -> None:
        """Undo counts that proved to be duplicates. A block already published stays: it
        ends at its window's end like any other (erring towards the limit, never past it)."""
        for (partition, key_id, _account, minute), n in counts.items():
            counters = self.partitions.get(partition)
            if counters is not None:
                counters.subtract(key_id, minute, n)

    async def evaluate_all(self, partitions: Iterable[int]) -> list[Decision]:
        """After a rebuild: block keys already over a limit that hold no block yet."""
        now = self.clock()
        decisions = []
        for p in partitions:
            for key_id, kw in self.partitions.get(p, WindowCounters()).keys.items():
                if d := self._evaluate(key_id, kw, now):
                    decisions.append(d)
        await self._emit(decisions)
        return decisions

    async def tick(self) -> list[Decision]:
        """Unblock (or re-block for a longer window) the keys whose block has run out."""
        now = self.clock()
        decisions = []
        while self._expiry and self._expiry[0][0] <= now:
            until, key_id = heapq.heappop(self._expiry)
            block = self.blocks.get(key_id)
            if block is None or block.operator or block.until != until:
                continue  # superseded by a longer block, an operator decision or a revoke
            del self.blocks[key_id]
            kw = self._find(key_id)
            follow_up = self._evaluate(key_id, kw, now) if kw is not None else None
            decisions.append(follow_up or self._decision(key_id, DecisionAction.unblock, block.window, now))
        for key_id in [k for k, t in self.pardons.items() if t <= now]:
            del self.pardons[key_id]
        await self._emit(decisions)
        return decisions

    def expire_idle(self) -> int:
        now = self.clock()
        return sum(c.expire(now) for c in self.partitions.values())

    # -- decisions seen on the topic (ours, other workers', operators') ----------------
    def seen(self, decision: Decision) -> None:
        key_id = decision.key_id
        if decision.version <= self.versions.get(key_id, 0):
            return
        self.versions[key_id] = decision.version
        until = decision.until.timestamp() if decision.until else float("inf")
        if decision.source == "operator":
            if decision.action is DecisionAction.block:
                self.blocks[key_id] = ActiveBlock(Window.manual, until, operator=True)
            else:
                self.blocks.pop(key_id, None)
                kw = self._find(key_id)
                if kw is not None:
                    self.pardons[key_id] = self._exceeded_until(key_id, kw, self.clock()) or 0.0
        else:
            self.restore(decision)

    def restore(self, decision: Decision) -> None:
        """Take over a worker-made block still in force for an owned key (after a rebuild),
        so it is not published again and its unblock comes at its end."""
        key_id = decision.key_id
        if decision.source == "operator":
            if decision.action is DecisionAction.block:
                until = decision.until.timestamp() if decision.until else float("inf")
                if until > self.clock():
                    self.blocks[key_id] = ActiveBlock(Window.manual, until, operator=True)
            return
        if self._find(key_id) is None:
            return
        self.versions[key_id] = max(self.versions.get(key_id, 0), decision.version)
        until = decision.until.timestamp() if decision.until else float("inf")
        held = self.blocks.get(key_id)
        if decision.action is DecisionAction.block:
            if until > self.clock() and (held is None or held.until < until):
                self._hold(key_id, ActiveBlock(decision.window, until))
        elif held is not None and not held.operator:
            del self.blocks[key_id]

    # -- internals ---------------------------------------------------------------------
    def _find(self, key_id: str) -> KeyWindows | None:
        for counters in self.partitions.values():
            kw = counters.keys.get(key_id)
            if kw is not None:
                return kw
        return None

    def _exceeded(self, key_id: str, kw: KeyWindows, now: float) -> tuple[Window, int, int, float] | None:
        """The exceeded window that ends last: (window, limit, count, end), if any."""
        policy = self.policies.resolve(key_id, kw.account)
        # Fast path for the common key far from its limits: a counter holds the count of its
        # window (or of an older one, which ``count`` reads as 0), so raw counts all below
        # their limits mean no current window is exceeded either.
        per_minute, per_hour, per_day = policy.per_minute, policy.per_hour, policy.per_day
        if (
            (per_minute is None or kw.minute_n < per_minute)
            and (per_hour is None or kw.hour_n < per_hour)
            and (per_day is None or kw.day_n < per_day)
        ):
            return None
        for window in AUTOMATIC_WINDOWS:  # longest first
            limit = limit_of(policy, window)
            if limit is None:
                continue
            count = kw.count(window, now)
            if count >= limit:
                return window, limit, count, kw.start(window) + WINDOW_SECONDS[window]
        return None

    def _exceeded_until(self, key_id: str, kw: KeyWindows, now: float) -> float | None:
        hit = self._exceeded(key_id, kw, now)
        return hit[3] if hit else None

    def _evaluate(self, key_id: str, kw: KeyWindows, now: float) -> Decision | None:
        hit = self._exceeded(key_id, kw, now)
        if hit is None:
            return None
        window, limit, count, until = hit
        held = self.blocks.get(key_id)
        if held is not None and held.until > now and (held.operator or held.until >= until):
            return None  # already blocked at least that long (an operator block while it lasts)
        if self.pardons.get(key_id, 0.0) >= until:
            return None  # an operator lifted this block for the rest of the window
        self._hold(key_id, ActiveBlock(window, until))
        return self._decision(
            key_id,
            DecisionAction.block,
            window,
            now,
            limit=limit,
            count=count,
            until=until,
            reason=f"{count} requests in the current {window.value} >= limit {limit} "
            f"({self.policies.source(key_id, kw.account)})",
        )

    def _hold(self, key_id: str, block: ActiveBlock) -> None:
        self.blocks[key_id] = block
        heapq.heappush(self._expiry, (block.until, key_id))

    def _decision(
        self,
        key_id: str,
        action: DecisionAction,
        window: Window,
        now: float,
        limit: int | None = None,
        count: int | None = None,
        until: float | None = None,
        reason: str = "",
    ) -> Decision:
        version = max(int(now * 1_000_000), self.versions.get(key_id, 0) + 1)
        self.versions[key_id] = version
        return Decision(
            key_id=key_id,
            action=action,
            window=window,
            limit=limit,
            count=count,
            until=to_datetime(until) if until is not None else None,
            reason=reason or ("window rolled over" if action is DecisionAction.unblock else ""),
            version=version,
            decided_at=to_datetime(now),
            source="worker",
        )

    async def _emit(self, decisions: list[Decision]) -> None:
        if decisions:
            await self.publish(decisions)
            self.decisions_published += len(decisions)
            for d in decisions:
                self.published_by_action[d.action.value] += 1
                log.info(
                    "%s %s (%s window, until %s): %s",
                    d.action.value,
                    d.key_id,
                    d.window.value,
                    d.until.isoformat() if d.until else "-",
                    d.reason,
                )
