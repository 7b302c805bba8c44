"""Decision cache: the node's local copy of which keys are blocked, fed by the decisions topic.

On start it reads the compacted decisions topic from the beginning (its own consumer, no
group, every partition assigned by hand) up to the end offsets taken at start; then it is
``ready`` and keeps following the topic. ``check()`` is a dict lookup with no I/O, so a
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

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from common import kafka_clients
from node.errors import NodeError, describe
from node.guard import LocalGuard
from node.settings import NodeSettings
from schemas.allowances import Allowance
from schemas.decisions import Decision, DecisionAction, Window
from schemas.limits import LimitOverride

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

    @classmethod
    def from_decision(cls, d: Decision) -> Block:
        return cls(d.key_id, d.window, d.limit, d.count, d.until, d.reason, d.version, d.source)

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
        fetch_max_wait_ms: int = 100,
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
        self._poll_timeout_ms = poll_timeout_ms
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._probe_interval_s = probe_interval_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._consumer_factory = consumer_factory

        # Versions are kept for every key ever seen (unblocked ones too) so an older block
        # arriving late is still recognised as older.
        self._versions: dict[str, int] = {}
        self._blocks: dict[str, Block] = {}
        self._next_offsets: dict[TopicPartition, int] = {}  # next offset to read

        self._ready = asyncio.Event()
        self._change = asyncio.Event()  # set (and replaced) whenever a decision or allowance applies
        self._connected = False
        self._applied = 0
        self._stale = 0
        self._invalid = 0
        self._lag: int | None = None
        self._last_applied_at: float | None = None
        self._started_at: float | None = None
        self._bootstrap_s: float | None = None
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

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
        return self._ready.is_set()

    @property
    def available(self) -> bool:
        """Ready and in touch with the broker: what fail-closed nodes require to serve."""
        return self._ready.is_set() and self._connected

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
        return CacheState(
            ready=self.ready,
            connected=self._connected,
            available=self.available,
            keys_known=len(self._versions),
            keys_blocked=len(self.blocks()),
            applied=self._applied,
            stale_ignored=self._stale,
            invalid=self._invalid,
            lag=self._lag,
            last_offsets={
                tp.partition: o - 1 for tp, o in sorted(self._next_offsets.items()) if tp.topic == self._topic
            },
            last_applied_age_s=(None if self._last_applied_at is None else time.monotonic() - self._last_applied_at),
            bootstrap_s=self._bootstrap_s,
            last_error=self._last_error,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start following the topic in the background; use ``wait_ready()`` to await bootstrap."""
        if self._task is None:
            self._started_at = time.monotonic()
            self._task = asyncio.create_task(self._run(), name="decision-cache")

    async def wait_ready(self, within_s: float | None = None) -> bool:
        """Wait for the bootstrap read; False if it did not finish within ``within_s`` seconds."""
        try:
            await asyncio.wait_for(self._ready.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected = False
        log.info(
            "decision cache stopped: applied=%d stale_ignored=%d invalid=%d keys=%d blocked=%d",
            self._applied,
            self._stale,
            self._invalid,
            len(self._versions),
            len(self.blocks()),
        )

    # -- background follower ------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._backoff_initial_s
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving from memory, reconnect
                message = describe(exc)
                if message != self._last_error:
                    log.warning(
                        "decision cache: %s on %s (%s); serving %d known blocks, retry in %.1fs",
                        self._topic,
                        self._settings.kafka_bootstrap,
                        message,
                        len(self._blocks),
                        backoff,
                    )
                self._connected = False
                self._last_error = message
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max_s)
            else:
                backoff = self._backoff_initial_s

    async def _partitions(self) -> list[TopicPartition]:
        # The admin client answers for a topic the consumer has not yet seen, and does not
        # auto-create it.
        admin = kafka_clients.admin(self._settings, request_timeout_ms=10_000)
        await admin.start()
        try:
            described = await admin.describe_topics(self._topics)
        finally:
            await admin.close()
        tps = []
        for topic, desc in zip(self._topics, described, strict=True):
            if desc["error_code"] != 0 or not desc["partitions"]:
                raise NodeError(f"topic {topic} not available (error {desc['error_code']})")
            tps += [TopicPartition(topic, p["partition"]) for p in desc["partitions"]]
        return sorted(tps)

    async def _follow(self) -> None:
        tps = await self._partitions()
        consumer = kafka_clients.consumer(
            self._settings,
            factory=self._consumer_factory,
            client_id=f"meter-node-{self._settings.node_id}-decisions",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Only decisions from committed transactions; costs nothing for plain producers.
            isolation_level="read_committed",
            fetch_max_wait_ms=self._fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            consumer.assign(tps)
            # Resume where we were after a reconnect; read from the beginning otherwise.
            fresh = [tp for tp in tps if tp not in self._next_offsets]
            for tp in tps:
                if tp in self._next_offsets:
                    consumer.seek(tp, self._next_offsets[tp])
            if fresh:
                await consumer.seek_to_beginning(*fresh)
            pending: dict[TopicPartition, int] = {}
            if not self.ready:
                end = await consumer.end_offsets(tps)
                pending = dict(end)
            self._connected = True
            self._last_error = None
            next_probe = time.monotonic() + self._probe_interval_s
            while True:
                batches = await consumer.getmany(timeout_ms=self._poll_timeout_ms, max_records=10_000)
                received = time.monotonic()
                for tp, records in batches.items():
                    for record in records:
                        self._handle(record, received)
                    if records:
                        self._next_offsets[tp] = records[-1].offset + 1
                if pending:
                    for tp in list(pending):
                        if await consumer.position(tp) >= pending[tp]:
                            del pending[tp]
                if not pending and not self.ready:
                    self._mark_ready()
                if received >= next_probe:
                    await self._probe(consumer, tps)
                    next_probe = time.monotonic() + self._probe_interval_s
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

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

    def _mark_ready(self) -> None:
        if self._started_at is not None:
            self._bootstrap_s = time.monotonic() - self._started_at
        self._ready.set()
        log.info(
            "decision cache ready: %s read in %.3fs, %d keys known, %d blocked",
            self._topic,
            self._bootstrap_s or 0.0,
            len(self._versions),
            len(self.blocks()),
        )

    async def _probe(self, consumer: Any, tps: list[TopicPartition]) -> None:
        """getmany() does not fail when the broker is gone, so ask for end offsets now and then:
        it tells health checks whether we are in touch, and how far behind."""
        self._purge_expired()
        try:
            end = await asyncio.wait_for(consumer.end_offsets(tps), self._probe_interval_s)
        except Exception as exc:  # broker unreachable: stay up, say so
            if self._connected:
                log.warning("decision cache: broker %s unreachable (%r)", self._settings.kafka_bootstrap, exc)
            self._connected = False
            self._last_error = describe(exc)
            return
        if not self._connected:
            log.info("decision cache: broker %s reachable again", self._settings.kafka_bootstrap)
        self._connected = True
        self._last_error = None
        lag = 0
        for tp, off in end.items():
            lag += max(0, off - await consumer.position(tp))
        self._lag = lag

    def _purge_expired(self) -> None:
        now = self._now()
        expired = [k for k, b in self._blocks.items() if b.until is not None and now >= b.until]
        for key_id in expired:
            del self._blocks[key_id]
