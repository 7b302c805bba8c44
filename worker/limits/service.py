"""The limit side of a worker: follows overrides and decisions, rebuilds counters on
assignment, evaluates each batch, publishes decisions, unblocks at rollover, audits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from schemas.decisions import Decision, Window
from schemas.limits import LimitOverride
from worker.follower import TopicFollower, valid_records
from worker.ingest.pipeline import BatchOutcome
from worker.limits.engine import LimitEngine, partition_of
from worker.limits.policies import PolicyBook, default_policy
from worker.retry import retry_forever
from worker.settings import Settings
from worker.store.decisions import DecisionStore
from worker.store.rollup import RollupStore

log = logging.getLogger(__name__)

SendDecision = Callable[[Decision], Awaitable[Any]]
FOLLOWERS_READY_TIMEOUT = 30.0


class LimitService:
    def __init__(
        self,
        settings: Settings,
        rollups: RollupStore,
        audit: DecisionStore,
        send: SendDecision,
        partition_count: Callable[[], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.rollups = rollups
        self.audit = audit
        self.send = send
        self.partition_count = partition_count
        self.policies = PolicyBook(default_policy(settings))
        self.engine = LimitEngine(self.policies, self._publish, clock)
        self.decisions = TopicFollower(settings.kafka_bootstrap, settings.decisions_topic, self._on_decisions, "limits")
        self.overrides = TopicFollower(settings.kafka_bootstrap, settings.limits_topic, self._on_overrides, "limits")
        self._ticker: asyncio.Task[None] | None = None
        self._latest: dict[str, Decision] = {}  # newest decision per key seen on the topic

    async def start(self) -> None:
        await self.decisions.start()
        await self.overrides.start()
        self._ticker = asyncio.create_task(self._tick_forever(), name="limits-tick")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.decisions.stop()
        await self.overrides.stop()

    # hooks of the ingest consumer ------------------------------------------------------
    async def before_write(self, outcome: BatchOutcome) -> None:
        await self.engine.observe(outcome.limit_counts)

    async def retract(self, counts: dict[tuple[int, str, str, int], int]) -> None:
        self.engine.retract(counts)

    async def on_assigned(self, partitions: set[int]) -> None:
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
        # Blocks issued before the rebuild (by the previous owner) are known from the topic.
        for decision in self._latest.values():
            self.engine.restore(decision)
        published = await self.engine.evaluate_all(partitions)
        log.info(
            "limit counters rebuilt for partitions %s: %d keys live, %d blocks issued on rebuild",
            sorted(partitions),
            sum(len(r) for r in mine.values()),
            len(published),
        )

    async def on_revoked(self, partitions: set[int]) -> None:
        for p in partitions:
            self.engine.revoke(p)

    # topics ----------------------------------------------------------------------------
    async def _on_decisions(self, records: list[Any]) -> None:
        batch = []
        for decision in valid_records(records, Decision):
            batch.append(decision)
            held = self._latest.get(decision.key_id)
            if held is None or held.version < decision.version:
                self._latest[decision.key_id] = decision
            self.engine.seen(decision)
        await self._audit(batch)

    async def _on_overrides(self, records: list[Any]) -> None:
        for override in valid_records(records, LimitOverride):
            self.policies.apply(override)
            log.info("limit override %s: %s", override.topic_key, override.policy or "removed")

    async def _publish(self, decisions: list[Decision]) -> None:
        # A decision the nodes never hear of would leave a key unlimited: wait for the broker.
        await retry_forever(
            lambda: asyncio.gather(*(self.send(d) for d in decisions)), f"publishing {len(decisions)} decisions"
        )

    async def _audit(self, decisions: list[Decision]) -> None:
        if decisions:  # the audit must not be lost: retry until the store is back
            await retry_forever(
                lambda: asyncio.to_thread(self.audit.record, decisions), f"recording {len(decisions)} decisions"
            )

    async def _followers_ready(self) -> None:
        try:
            await asyncio.wait_for(
                asyncio.gather(self.decisions.ready.wait(), self.overrides.ready.wait()), FOLLOWERS_READY_TIMEOUT
            )
        except TimeoutError:
            log.warning("decisions/limits topics not caught up in %.0fs; evaluating with what is known", 30.0)

    async def _tick_forever(self) -> None:
        idle_check = 0
        while True:
            await asyncio.sleep(0.25)
            try:
                await self.engine.tick()
                idle_check += 1
                if idle_check >= 240:  # once a minute
                    idle_check = 0
                    self.engine.expire_idle()
            except Exception:
                log.exception("limit tick failed")
