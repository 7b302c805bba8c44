"""Runs the abuse guards (``worker.limits.guards``) on a schedule inside the worker: reads the
activity of the last hour / minutes, blocks the keys this worker owns that break a rule, and
publishes the blocks as ordinary decisions (audited by every worker's decisions follower)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from clickhouse_connect.driver.client import Client

from common.retry import cancel_and_wait, keep_running
from schemas.decisions import Decision
from worker.limits.engine import LimitEngine
from worker.limits.guards import GuardRules, findings, lifted_by_operator
from worker.store.activity import keys_with_auth_failures, keys_with_many_client_ips

log = logging.getLogger(__name__)

MAX_FINDINGS = 10_000  # per rule and round: a bound on what one round reads and publishes

Publish = Callable[[list[Decision]], Awaitable[None]]


class GuardRunner:
    def __init__(
        self,
        rules: GuardRules,
        engine: LimitEngine,
        client: Client,
        database: str,
        latest: Callable[[str], Decision | None],  # a key's newest operator decision
        publish: Publish,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = rules
        self.engine = engine
        self.client = client
        self.database = database
        self.latest = latest
        self.publish = publish
        self.interval_s = interval_s
        self.clock = clock
        self.blocks_issued = 0  # handed to the publisher, which sends them in the background
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.rules.enabled:
            self._task = asyncio.create_task(
                keep_running(self._forever, "abuse guards", 1.0, 30.0), name="abuse-guards"
            )
            log.info("abuse guards on (%s): %s", "shadow" if self.rules.shadow else "enforcing", self.rules)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _forever(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval_s)

    async def run_once(self) -> list[Decision]:
        """One round: the blocks it issued (queued for publishing)."""
        rules, now = self.rules, self.clock()
        ips: list[tuple[str, int]] = []
        auth: list[tuple[str, int]] = []
        if rules.max_client_ips_per_hour > 0:
            hour = int(now) // 3600 * 3600
            ips = await asyncio.to_thread(
                keys_with_many_client_ips, self.client, self.database, hour, rules.max_client_ips_per_hour, MAX_FINDINGS
            )
        if rules.max_auth_failures > 0:
            until = int(now) // 60 * 60 + 60  # the current minute included
            since = until - rules.auth_failures_minutes * 60
            auth = await asyncio.to_thread(
                keys_with_auth_failures, self.client, self.database, since, until, rules.max_auth_failures, MAX_FINDINGS
            )
        blocks = []
        for found in findings(rules, ips, auth):
            if lifted_by_operator(self.latest(found.key_id), now, rules):
                continue
            decision = self.engine.guard_block(found.key_id, now + rules.block_minutes * 60, found.reason, rules.shadow)
            if decision is not None:
                blocks.append(decision)
        if blocks:
            await self.publish(blocks)
            self.blocks_issued += len(blocks)
            log.warning("abuse guards blocked %d keys%s", len(blocks), " (shadow)" if rules.shadow else "")
        return blocks
