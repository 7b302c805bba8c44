"""Decision cache: the node's local copy of which keys are blocked, fed by the decisions topic.

On start it reads the compacted decisions topic from the beginning (``common.follower``: its
own consumer, no group, every partition assigned by hand) up to the end offsets taken at
start; then it is ``ready`` and keeps following the topic. ``check()`` is a dict lookup with no I/O, so a
blocked key costs the request path next to nothing. With a ``LocalGuard`` it follows the
limits topic (overrides, into the guard's policy book) and the allowances topic (into the
guard) on the same consumer, bootstrapped the same way.

Rules: a decision is applied only if its version is newer than the one held for its key
(so replays, compaction leftovers and reordering across restarts never resurrect an old
state), and a block is over at ``until`` even if its unblock is late or lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from common.follower import TopicFollower
from node.guard import LocalGuard
from node.settings import NodeSettings
from schemas.allowances import Allowance
from schemas.decisions import Decision, DecisionAction, Window
from schemas.limits import LimitOverride

# How long the broker may hold the cache's fetch when no decision is new (one arriving is
# answered at once).
FETCH_MAX_WAIT_MS = 100

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
AppliedHook = Callable[[Decision, float], None]
AllowanceHook = Callable[[Allowance, float], None]
ConsumerFactory = Callable[..., Any]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Block:
    """An active block of one key, as the middleware needs it."""

    key_id: str
    window: Window
    limit: int | None
    count: int | None
    until: datetime | None  # None: until an explicit unblock (manual blocks)
    reason: str
    version: int
    source: str
    shadow: bool = False  # a shadow policy's block: noted, never refused on

    @classmethod
    def from_decision(cls, d: Decision) -> Block:
        return cls(d.key_id, d.window, d.limit, d.count, d.until, d.reason, d.version, d.source, d.shadow)

    def seconds_left(self, now: datetime) -> int | None:
        """Whole seconds until ``until``, rounded up and at least 1; None if open-ended."""
        if self.until is None:
            return None
        return max(1, math.ceil((self.until - now).total_seconds()))


@dataclass(frozen=True, slots=True)
class CacheState:
    """Snapshot for health checks: ready = bootstrap done; available = ready and broker reachable."""

    ready: bool
    connected: bool
    available: bool
    keys_known: int
    keys_blocked: int
    applied: int
    stale_ignored: int
    invalid: int
    lag: int | None
    last_offsets: dict[int, int]
    last_applied_age_s: float | None
    bootstrap_s: float | None
    last_error: str | None


class DecisionCache:
    """Follows the decisions topic; answers ``check(key_id)`` from memory."""

    def __init__(
        self,
        settings: NodeSettings,
        *,
        guard: LocalGuard | None = None,
        now: Clock = utc_now,
        on_applied: AppliedHook | None = None,
        on_allowance: AllowanceHook | None = None,
        poll_timeout_ms: int = 200,
        fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
        probe_interval_s: float = 2.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        consumer_factory: ConsumerFactory = AIOKafkaConsumer,
    ) -> None:
        self._settings = settings
        self._topic = settings.decisions_topic
        self.guard = guard
        self._on_allowance = on_allowance
        # The guard needs the overrides and the allowances as well; one consumer follows all.
        self._topics = [self._topic] + ([settings.limits_topic, settings.allowances_topic] if guard is not None else [])
        self._now = now
        self._on_applied = on_applied
        self._purge_interval_s = probe_interval_s
        self._follower = TopicFollower(
            settings,
            self._topics,
            self._on_records,
            "decision cache",
            first_delay=backoff_initial_s,
            max_delay=backoff_max_s,
            poll_timeout_ms=poll_timeout_ms,
            fetch_max_wait_ms=fetch_max_wait_ms,
            probe_interval_s=probe_interval_s,
            client_id=f"meter-node-{settings.node_id}-decisions",
            consumer_factory=consumer_factory,
            # Without the decisions topic the node is not in touch (fail-closed nodes refuse);
            # the guard's topics are followed when they are there.
            required=[self._topic],
        )

        # Versions are kept for every key ever seen (unblocked ones too) so an older block
        # arriving late is still recognised as older.
        self._versions: dict[str, int] = {}
        self._blocks: dict[str, Block] = {}

        self._change = asyncio.Event()  # set (and replaced) whenever a decision or allowance applies
        self._applied = 0
        self._stale = 0
        self._invalid = 0
        self._last_applied_at: float | None = None
        self._last_purge = time.monotonic()

    # -- request path -------------------------------------------------------------------

    def check(self, key_id: str) -> Block | None:
        """The active block of ``key_id``, or None. No I/O; the clock is read only for blocked keys."""
        block = self._blocks.get(key_id)
        if block is None:
            return None
        if block.until is not None and self._now() >= block.until:
            return None  # over at `until`, whether or not the unblock has arrived
        return block

    @property
    def ready(self) -> bool:
        return self._follower.ready.is_set()

    @property
    def available(self) -> bool:
        """Ready and in touch with the broker: what fail-closed nodes require to serve."""
        return self.ready and self._follower.connected

    def now(self) -> datetime:
        return self._now()

    # -- applying decisions -------------------------------------------------------------

    def apply(self, decision: Decision, received: float | None = None) -> bool:
        """Apply one decision if it is newer than what is held for its key; return whether it was."""
        held = self._versions.get(decision.key_id)
        if held is not None and decision.version <= held:
            self._stale += 1
            return False
        self._versions[decision.key_id] = decision.version
        if decision.action is DecisionAction.block:
            self._blocks[decision.key_id] = Block.from_decision(decision)
        else:
            self._blocks.pop(decision.key_id, None)
        self._applied += 1
        self._notify()
        received = time.monotonic() if received is None else received
        self._last_applied_at = received
        if self._on_applied is not None:
            try:
                self._on_applied(decision, received)
            except Exception:  # a faulty hook must not stop the cache
                log.exception("decision cache: on_applied hook failed")
        return True

    async def wait_change(self, timeout_s: float) -> None:
        """Return when the next decision or allowance is applied, or after ``timeout_s``."""
        change = self._change
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(change.wait(), timeout_s)

    def _notify(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    def blocks(self) -> list[Block]:
        """Blocks in force now (for displays and health)."""
        now = self._now()
        return [b for b in self._blocks.values() if b.until is None or now < b.until]

    def state(self) -> CacheState:
        follower = self._follower
        return CacheState(
            ready=self.ready,
            connected=follower.connected,
            available=self.available,
            keys_known=len(self._versions),
            keys_blocked=len(self.blocks()),
            applied=self._applied,
            stale_ignored=self._stale,
            invalid=self._invalid,
            lag=follower.lag,
            last_offsets={
                tp.partition: o - 1 for tp, o in sorted(follower.positions.items()) if tp.topic == self._topic
            },
            last_applied_age_s=(None if self._last_applied_at is None else time.monotonic() - self._last_applied_at),
            bootstrap_s=follower.bootstrap_s,
            last_error=follower.last_error,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start following the topic in the background; use ``wait_ready()`` to await bootstrap."""
        await self._follower.start()

    async def wait_ready(self, within_s: float | None = None) -> bool:
        """Wait for the bootstrap read; False if it did not finish within ``within_s`` seconds."""
        try:
            await asyncio.wait_for(self._follower.ready.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        await self._follower.stop()
        log.info(
            "decision cache stopped: applied=%d stale_ignored=%d invalid=%d keys=%d blocked=%d",
            self._applied,
            self._stale,
            self._invalid,
            len(self._versions),
            len(self.blocks()),
        )

    # -- records of the followed topics -------------------------------------------------

    async def _on_records(self, records: list[Any]) -> None:
        received = time.monotonic()
        for record in records:
            self._handle(record, received)
        if received - self._last_purge >= self._purge_interval_s:
            self._last_purge = received
            self._purge_expired()

    def _handle(self, record: Any, received: float) -> None:
        if record.value is None:
            return  # tombstone: compaction of a key we already hold a version for
        try:
            if self.guard is not None and record.topic in self._topics[1:]:
                self._handle_guard(record, received, self.guard)
                return
            decision = Decision.model_validate_json(record.value)
        except ValidationError as exc:
            self._invalid += 1
            log.error(
                "decision cache: invalid record at %s[%d] offset %d skipped: %s",
                record.topic,
                record.partition,
                record.offset,
                exc.errors(include_url=False, include_input=False),
            )
            return
        self.apply(decision, received)

    def _handle_guard(self, record: Any, received: float, guard: LocalGuard) -> None:
        if record.topic == self._settings.limits_topic:
            override = LimitOverride.model_validate_json(record.value)
            guard.policies.apply(override)
            log.info("limit override %s: %s", override.topic_key, override.policy or "removed")
            return
        allowance = Allowance.model_validate_json(record.value)
        applied = guard.apply(allowance, self._now().timestamp())
        if applied:
            self._notify()
        if applied and self._on_allowance is not None:
            try:
                self._on_allowance(allowance, received)
            except Exception:  # a faulty hook must not stop the cache
                log.exception("decision cache: on_allowance hook failed")

    def _purge_expired(self) -> None:
        """Forget blocks past their ``until`` (``check`` already ignores them: memory only)."""
        now = self._now()
        expired = [k for k, b in self._blocks.items() if b.until is not None and now >= b.until]
        for key_id in expired:
            del self._blocks[key_id]
