"""The limit side of a worker: follows overrides, decisions and allowances, rebuilds counters
on assignment, counts the fast lane's batches, publishes what the engine decides, unblocks at
rollover, audits."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from common.follower import TopicFollower, valid_records
from common.retry import cancel_and_wait, retry_forever
from schemas.allowances import AllowanceVersion
from schemas.decisions import Decision, DecisionAction, Window
from schemas.limits import LimitOverride
from schemas.notifications import Notification
from worker.limits.audit_buffer import AuditBuffer
from worker.limits.engine import AllowancePolicy, LimitEngine, Verdicts, partition_of
from worker.limits.fastlane import FastBatch, FastLane
from worker.limits.publisher import KeyedPublisher, Outcome, Send
from worker.limits.thresholds import ThresholdTracker
from worker.records import Validator
from worker.settings import Settings
from worker.store.decisions import DecisionStore
from worker.store.notifications import NotificationStore
from worker.store.rollup import RollupStore

log = logging.getLogger(__name__)

FOLLOWERS_READY_TIMEOUT = 30.0
# How long a revoke or a stop waits for the queued notifications to be published and recorded
# (the next owner reads the record; what is not in it yet may be notified again, same id).
NOTIFICATIONS_FLUSH_TIMEOUT = 10.0
# How long a stop waits for the decisions and allowances queued to land (the broker away: not
# for ever; the next owner of their partitions decides again from the stored counts).
PUBLISH_FLUSH_TIMEOUT_S = 10.0
# How long the fast lane waits, at most, for the decisions and allowances of a fetch to be
# acknowledged before its next fetch (p50 ~3 ms, p99 ~25 ms at 5,000 events/s).
FAST_LANE_PUBLISH_WAIT_S = 0.1
# Audit rows (decisions, notifications) go to the store at most this often, each kind in one
# insert: every insert is a part for the engine to merge, and one per decisions batch or per
# notifying fast-lane batch cost the worker more CPU than its rollup inserts at 5,000 events/s
# (bench/results.md, Decisions). Notifications are published together with their insert.
AUDIT_INTERVAL_S = 0.5
# Past this many decisions waiting for the audit (the store down), the decisions reader waits
# for the insert itself instead of queueing more: memory stays bounded, as when it always waited.
MAX_UNAUDITED = 100_000


ACCOUNT_CHANGES_LOGGED = 10  # per batch: a flood of changes must not flood the log


def still_matters(decision: Decision, now: float, unblock_memory_s: float) -> bool:
    """Whether a key's newest decision still means something to a worker: a block in force
    (an operator's without end included), or an unblock younger than ``unblock_memory_s``
    (the guards leave a key an operator unblocked alone for a guard block's length). A
    forgotten key behaves as one never decided on: nothing to restore, nothing to respect."""
    if decision.action is DecisionAction.block:
        return decision.blocks_at(now)
    return now - decision.decided_at.timestamp() < unblock_memory_s


def _keep_newest(newest: dict[str, Decision], decision: Decision) -> None:
    held = newest.get(decision.key_id)
    if held is None or held.version < decision.version:
        newest[decision.key_id] = decision


def _forget_settled(newest: dict[str, Decision], now: float, unblock_memory_s: float) -> int:
    settled = [k for k, d in newest.items() if not still_matters(d, now, unblock_memory_s)]
    for key_id in settled:
        del newest[key_id]
    return len(settled)


async def _finish_within(
    work: Coroutine[Any, Any, None], unfinished: Callable[[], str], timeout_s: float | None = None
) -> None:
    """``work`` for up to ``timeout_s`` (default NOTIFICATIONS_FLUSH_TIMEOUT), else a warning
    saying what is left (``unfinished``, read when the time is up): a stop must not wait on
    Kafka or the store."""
    try:
        await asyncio.wait_for(work, NOTIFICATIONS_FLUSH_TIMEOUT if timeout_s is None else timeout_s)
    except TimeoutError:
        log.warning("%s", unfinished())


async def _stop_then_finish(recorder: asyncio.Task[None] | None, buffer: AuditBuffer[Any], then: str) -> None:
    """Stop a recording loop (None: not started), then give the last insert the bounded time;
    past it, a warning says how many rows are left and ``then`` what becomes of them."""
    if recorder is not None:
        await cancel_and_wait(recorder)
        await _finish_within(
            buffer.record(),
            lambda: f"{len(buffer)} {buffer.what} not recorded within {NOTIFICATIONS_FLUSH_TIMEOUT:.0f}s: {then}",
        )


class LimitService:
    """The limit side of one worker: wires the ``LimitEngine`` to Kafka and ClickHouse.

    Follows the decisions, limits and allowances topics; rebuilds the counters of assigned
    partitions from ClickHouse; counts the fast lane's batches; publishes what the engine
    decides (and records decisions for audit); unblocks at rollover on a timer.
    """

    # long: the wiring of the limit side's parts (followers, fast lane, publishers, audit state)
    def __init__(
        self,
        settings: Settings,
        rollups: RollupStore,
        audit: DecisionStore,
        send: Send,
        partition_count: Callable[[], int],
        stored_offsets: Callable[[], Mapping[int, int]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.rollups = rollups
        self.audit = audit
        self.send = send
        self.partition_count = partition_count
        self.stored_offsets = stored_offsets
        self.policies = settings.policy_book()
        allowance = AllowancePolicy(
            settings.allowance_threshold,
            settings.allowance_lag_ms / 1000.0,
            settings.allowance_pooled,
            burst_share=settings.node_burst_share,
            settle_s=settings.allowance_settle_ms / 1000.0,
        )
        self.engine = LimitEngine(self.policies, clock, allowance, ThresholdTracker(settings.notify_thresholds()))
        self.decisions = TopicFollower(settings, settings.decisions_topic, self._on_decisions, "limits")
        self.overrides = TopicFollower(settings, settings.limits_topic, self._on_overrides, "limits")
        self.allowances = TopicFollower(settings, settings.allowances_topic, self._on_allowances, "limits")
        self.fast_lane = FastLane(
            settings,
            settings.events_topic,
            Validator.from_settings(settings),
            self._on_fast_batch,
            recent_max=settings.fast_lane_recent_requests,
            clock=clock,
            consumer_options={
                "fetch_min_bytes": settings.fast_lane_fetch_min_bytes,
                "fetch_max_wait_ms": settings.fast_lane_fetch_max_wait_ms,
            },
        )
        self._ticker: asyncio.Task[None] | None = None
        self._redivider: asyncio.Task[None] | None = None
        self.publisher = KeyedPublisher(send, owns=self._owns)
        self._paced = True  # the fast lane waits for its publishes' acks (see _on_fast_batch)
        self._latest: dict[str, Decision] = {}  # newest decision per key seen on the topic
        # Newest operator decision per key: the guards respect an operator's unblock even after
        # the key's own limits blocked and unblocked it since (newer decisions, not the operator's).
        self._by_operator: dict[str, Decision] = {}
        # Notifications are sent like decisions, in the background, each key's in order, but
        # none superseded: one the broker refuses holds back only its own key's later ones.
        # Once landed they wait here to be recorded (for audit and the next owner of the key).
        self.notifier = KeyedPublisher(send, owns=self._owns, supersede=False, what="notifications")
        self._landed: AuditBuffer[Notification] = AuditBuffer(
            lambda batch: self._notifications_audit().record(batch), "notifications"
        )
        self._notification_recorder: asyncio.Task[None] | None = None
        self._notification_store: NotificationStore | None = None
        # Decisions read from the topic, not yet in the audit table (a worker that stops without
        # recording them records them when it reads the topic again from its start).
        self._unaudited: AuditBuffer[Decision] = AuditBuffer(lambda batch: self.audit.record(batch), "decisions")
        self._auditor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.decisions.start()
        await self.overrides.start()
        await self.allowances.start()
        await self.fast_lane.start()
        self._ticker = asyncio.create_task(self._tick_forever(), name="limits-tick")
        self._redivider = asyncio.create_task(self._redivide_forever(), name="limits-redivide")
        self._notification_recorder = asyncio.create_task(
            self._record_notifications_forever(), name="limits-notifications-record"
        )
        self._auditor = asyncio.create_task(self._audit_forever(), name="limits-audit")

    async def stop(self) -> None:
        """Idempotent: the worker stops the limits before the broker, and again at the end."""
        ticker, self._ticker = self._ticker, None
        await cancel_and_wait(ticker)
        redivider, self._redivider = self._redivider, None
        await cancel_and_wait(redivider)
        # The readers first: what their last batches queue is flushed below, not left behind.
        await self.fast_lane.stop()
        await self.decisions.stop()
        await self.overrides.stop()
        await self.allowances.stop()
        await asyncio.gather(
            self.publisher.close(PUBLISH_FLUSH_TIMEOUT_S), self.notifier.close(NOTIFICATIONS_FLUSH_TIMEOUT)
        )
        recorder, self._notification_recorder = self._notification_recorder, None
        await _stop_then_finish(recorder, self._landed, "the next owner of their keys may publish them again (same id)")
        auditor, self._auditor = self._auditor, None
        await _stop_then_finish(auditor, self._unaudited, "recorded when the topic is read again")

    # hooks of the ingest consumer ------------------------------------------------------
    async def on_assigned(self, partitions: set[int]) -> None:
        """Rebuild the counters from ClickHouse, then count on from the offsets they cover.

        Called by the ingest consumer while it holds its lock with no write in flight, so
        the counts read now cover exactly the records up to the stored offsets."""
        await self._followers_ready()
        for p in partitions:
            self.engine.assign(p, [])  # counting starts now even if the rebuild has to wait
        counts = await retry_forever(
            lambda: asyncio.to_thread(self.rollups.current_window_counts, self.engine.clock()),
            f"rebuilding the limit counters of partitions {sorted(partitions)}",
        )
        total = self.partition_count()
        mine: dict[int, list[tuple[str, str, Window, int, int]]] = {p: [] for p in partitions}
        for key_id, account, level, start, n in counts:
            p = partition_of(key_id, total)
            if p in mine:
                mine[p].append((key_id, account, Window(level), start, n))
        for p, rows in mine.items():
            self.engine.assign(p, rows)
        # Thresholds notified in the current windows (by a previous owner too) do not fire again.
        fired = await retry_forever(
            lambda: asyncio.to_thread(self._notifications_audit().fired, self.engine.clock()),
            f"reading the notified thresholds of partitions {sorted(partitions)}",
        )
        if self.engine.thresholds is not None:
            self.engine.thresholds.restore(f for f in fired if partition_of(f[0], total) in mine)
        stored = self.stored_offsets()
        for p in partitions:
            self.fast_lane.assign(p, stored.get(p))
        # Blocks issued before the rebuild (by the previous owner) are known from the topic.
        for decision in self._latest.values():
            self.engine.restore(decision)
        published = self.engine.evaluate_all(partitions)
        self._publish(Verdicts(published, notifications=self.engine.notify_all(partitions)))
        log.info(
            "limit counters rebuilt for partitions %s: %d keys live, %d blocks issued on rebuild",
            sorted(partitions),
            sum(len(r) for r in mine.values()),
            len(published),
        )

    def _owns(self, key_id: str) -> bool:
        return partition_of(key_id, self.partition_count()) in self.engine.partitions

    async def on_revoked(self, partitions: set[int]) -> None:
        self.fast_lane.revoke(partitions)
        for p in partitions:
            self.engine.revoke(p)
        await self.publisher.forget()
        # The next owner learns from the audit what was notified: the revoked keys'
        # notifications get their attempt and what landed is recorded before letting go, each
        # step in half the time a stop has (the recording must not be starved by a slow send).
        half = NOTIFICATIONS_FLUSH_TIMEOUT / 2
        await _finish_within(
            self.notifier.settle_disowned(),
            lambda: f"notifications of revoked partitions {sorted(partitions)} still being sent after {half:.0f}s",
            half,
        )
        await self.notifier.forget()  # stops what is left: the next owner notifies it (same id)
        await _finish_within(
            self._landed.record(),
            lambda: (
                f"published notifications not all recorded within {half:.0f}s of a revoke: "
                "the next owner of their keys may publish them again (same id)"
            ),
            half,
        )

    # the fast lane ---------------------------------------------------------------------
    async def _on_fast_batch(self, batch: FastBatch) -> None:
        verdicts = self.engine.observe(batch.counts, batch.nodes)
        self._report_account_changes()
        if not verdicts:
            return
        # Paced on the broker as when it waited for every ack (without it, interleaved runs of
        # bench.decisions put the worker at 1-10 points of a core more for the same decisions),
        # but not held by a record that cannot land: once a wait runs out, the pacing stops
        # until everything published has landed.
        paced = self._paced or self.publisher.idle()
        outcomes = self._publish(verdicts)
        if paced and outcomes:
            _, pending = await asyncio.wait(outcomes, timeout=FAST_LANE_PUBLISH_WAIT_S)
            self._paced = not pending

    def _report_account_changes(self) -> None:
        """A key's events naming another account: a move in the key store, or nodes that
        disagree (a stale key store, a forged event). Either way an operator should see it."""
        changes = self.engine.take_account_changes()
        for c in changes[:ACCOUNT_CHANGES_LOGGED]:
            log.warning(
                "key %s: events now name account %r (was %r; partition %d); its limits follow the new account",
                c.key_id,
                c.after,
                c.before,
                c.partition,
            )
        if len(changes) > ACCOUNT_CHANGES_LOGGED:
            log.warning("%d more keys changed account in the same batch", len(changes) - ACCOUNT_CHANGES_LOGGED)

    # topics ----------------------------------------------------------------------------
    async def _on_decisions(self, records: list[Any]) -> None:
        batch = []
        for decision in valid_records(records, Decision):
            batch.append(decision)
            _keep_newest(self._latest, decision)
            if decision.source == "operator":
                _keep_newest(self._by_operator, decision)
            self.engine.seen(decision)
        self._unaudited.add(batch)
        if len(self._unaudited) >= MAX_UNAUDITED:
            await self._unaudited.record()

    async def _on_overrides(self, records: list[Any]) -> None:
        for override in valid_records(records, LimitOverride):
            self.policies.apply(override)
            log.info("limit override %s: %s", override.topic_key, override.policy or "removed")

    async def _on_allowances(self, records: list[Any]) -> None:
        for allowance in valid_records(records, AllowanceVersion):
            self.engine.seen_allowance(allowance)

    def latest_decision(self, key_id: str) -> Decision | None:
        """The newest decision of ``key_id`` seen on the decisions topic (while it matters)."""
        return self._latest.get(key_id)

    def operator_decision(self, key_id: str) -> Decision | None:
        """The newest operator decision on ``key_id`` seen on the decisions topic (while it matters)."""
        return self._by_operator.get(key_id)

    def forget_settled(self) -> int:
        """Drop the newest decisions (and operator decisions) that no longer matter
        (``still_matters``): one entry per key ever decided on would grow without end under a
        long abuse wave. Returns how many keys' newest decisions were dropped."""
        now = self.engine.clock()
        memory_s = self.settings.guard_block_minutes * 60
        _forget_settled(self._by_operator, now, memory_s)
        return _forget_settled(self._latest, now, memory_s)

    async def publish_decisions(self, decisions: list[Decision]) -> None:
        """Publish decisions made outside the engine's own evaluation (the abuse guards'):
        queued, sent in the background like the engine's own."""
        self._publish(Verdicts(decisions))

    def _publish(self, verdicts: Verdicts) -> list[Outcome]:
        """Queue what the engine decided; the publisher sends it in the background, in order
        per key and topic (``KeyedPublisher``). The records' outcomes, for a caller that paces
        itself on them."""
        topics = self.settings
        if notifications := verdicts.notifications:
            sent = self.notifier.submit(
                (topics.notifications_topic, n.key_id, n.model_dump_json().encode()) for n in notifications
            )
            for notification, outcome in zip(notifications, sent, strict=True):
                outcome.add_done_callback(functools.partial(self._notification_sent, notification))
        return self.publisher.submit(
            [(topics.decisions_topic, d.key_id, d.model_dump_json().encode()) for d in verdicts.decisions]
            + [(topics.allowances_topic, a.key_id, a.model_dump_json().encode()) for a in verdicts.allowances]
        )

    @property
    def allowances_published(self) -> int:
        return self.publisher.published[self.settings.allowances_topic]

    async def _audit_forever(self) -> None:
        while True:
            await asyncio.sleep(AUDIT_INTERVAL_S)
            await self._unaudited.record()  # the decisions read meanwhile, in one insert

    # notifications ---------------------------------------------------------------------
    def _notifications_audit(self) -> NotificationStore:
        if self._notification_store is None:
            self._notification_store = NotificationStore(self.rollups.client, self.settings.clickhouse_database)
        return self._notification_store

    @property
    def notifications_published(self) -> int:
        return self.notifier.published[self.settings.notifications_topic]

    def _notification_sent(self, notification: Notification, outcome: Outcome) -> None:
        if not outcome.cancelled() and outcome.result():
            n = notification
            log.debug("notified %s: %s %s of %s >= %s", n.key_id, n.window.value, n.count, n.limit, n.threshold)
            self._landed.add([n])

    async def _record_notifications_forever(self) -> None:
        while True:
            # The ones landed meanwhile, in one insert. Published before recorded: a crash in
            # between makes the next owner publish them again (same id), never lose them.
            await asyncio.sleep(AUDIT_INTERVAL_S)
            await self._landed.record()

    async def _followers_ready(self) -> None:
        try:
            await asyncio.wait_for(
                asyncio.gather(self.decisions.ready.wait(), self.overrides.ready.wait(), self.allowances.ready.wait()),
                FOLLOWERS_READY_TIMEOUT,
            )
        except TimeoutError:
            log.warning(
                "decisions/limits/allowances topics not caught up in %.0fs; evaluating with what is known",
                FOLLOWERS_READY_TIMEOUT,
            )

    async def _redivide_forever(self) -> None:
        """Every propagation lag: hand out what a division held back and no longer needs to."""
        interval = max(0.005, self.settings.allowance_lag_ms / 1000.0)
        while True:
            await asyncio.sleep(interval)
            try:
                self._publish(Verdicts(allowances=self.engine.redivide()))
            except Exception:
                log.exception("re-division failed")

    async def _tick_forever(self) -> None:
        idle_check = 0
        while True:
            await asyncio.sleep(0.25)
            try:
                self._publish(Verdicts(self.engine.tick()))
                idle_check += 1
                if idle_check >= 240:  # once a minute
                    idle_check = 0
                    self.engine.expire_idle()
                    self.forget_settled()
            except Exception:
                log.exception("limit tick failed")
