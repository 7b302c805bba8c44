"""Calendar-month quotas end to end on the real broker and chDB: a block to the month end that
is lifted at the month boundary, and the month count rebuilt from day rows after a restart.

Time is moved with the worker's clock (``Clock``, an offset on real time) that the nodes share,
so events are stamped, validated and counted in the chosen month.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from node.demo_api import demo_key_store, demo_keys
from node.keys import derive_key_id
from schemas.decisions import Decision, DecisionAction, Window, month_bounds
from tests.integration.helpers import demo_node, read_topic, wait_for
from tests.node_secret import NODE_SECRET
from worker.analytics.queries import key_state
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

RAW = demo_keys("month-seed")
QUOTA = 20


def kid(name: str) -> str:
    return derive_key_id(RAW[name], NODE_SECRET.encode())


class Clock:
    """Real time plus an offset the test sets (the worker's and the nodes' 'now')."""

    def __init__(self, at: float) -> None:
        self.offset = 0.0
        self.set(at)

    def set(self, at: float) -> None:
        self.offset = at - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset


def months_ahead(n: int) -> int:
    """Start (epoch) of the UTC month ``n`` months after the current one."""
    start = month_bounds(time.time())[0]
    for _ in range(n):
        start = month_bounds(start)[1]
    return start


@contextlib.asynccontextmanager
async def node(settings: Settings, node_id: str, clock: Clock) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    keys = demo_key_store(RAW, NODE_SECRET.encode())
    async with demo_node(settings, node_id, keys, lambda: datetime.fromtimestamp(clock(), UTC)) as served:
        yield served


@pytest.fixture
def month_settings(topics: Settings) -> Settings:
    # Only the monthly quota binds (20 < the 100/min default): METER_LIMIT_PER_MONTH on both sides.
    return topics.model_copy(
        update={"node_secret": SecretStr(NODE_SECRET), "batch_timeout_ms": 20, "limit_per_month": QUOTA}
    )


async def test_month_quota_blocks_to_the_month_end_and_unblocks_at_the_boundary(
    month_settings: Settings, clickhouse: Any
) -> None:
    settings = month_settings
    month_end = months_ahead(2)
    clock = Clock(month_end - 120)  # two minutes before a month boundary
    headers = {"X-API-Key": RAW["alice"]}
    worker = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database), clock=clock)
    async with (
        worker.running(),
        node(settings, "node-1", clock) as (a1, c1),
        node(settings, "node-2", clock) as (a2, c2),
    ):
        for i in range(QUOTA):  # 10 on each node: neither node's own count reaches the quota
            r = await (c1, c2)[i % 2].get("/v0/payments", headers=headers)
            assert r.status_code == 200, r.text
        await wait_for(lambda: all(a.state.cache.check(kid("alice")) for a in (a1, a2)), 15, "month block everywhere")
        for client in (c1, c2):
            r = await client.get("/v0/rates", headers=headers)
            assert r.status_code == 429, r.text
            left = month_end - clock()
            assert 1 <= int(r.headers["Retry-After"]) <= math.ceil(left) + 1  # to the month end
            assert int(r.headers["Retry-After"]) >= left - 30
            assert r.headers["RateLimit-Policy"] == f"{QUOTA};w={month_end - month_bounds(month_end - 1)[0]}"
            assert "per month" in r.json()["message"]

        # The month boundary (the shared clock moves past it): one unblock, every node admits.
        clock.set(month_end + 1)
        await wait_for(lambda: all(a.state.cache.state().applied >= 2 for a in (a1, a2)), 15, "the unblock applied")
        for client in (c1, c2):
            assert (await client.get("/v0/payments", headers=headers)).status_code == 200
        decisions = await read_topic(settings.kafka_bootstrap, settings.decisions_topic)

    mine = [Decision.model_validate_json(r.value) for r in decisions if r.key == kid("alice").encode()]
    assert [d.action for d in mine] == [DecisionAction.block, DecisionAction.unblock]
    block, unblock = mine
    assert (block.window, block.limit, block.count) == (Window.month, QUOTA, QUOTA)
    assert block.until == datetime.fromtimestamp(month_end, UTC)
    assert unblock.window is Window.month
    assert unblock.decided_at.timestamp() >= month_end
    # Audited like the other windows.
    rows = clickhouse.query(
        f"SELECT toString(window), toString(action) FROM `{settings.clickhouse_database}`.decisions "
        "WHERE key_id = {k:String} ORDER BY version",
        parameters={"k": kid("alice")},
    ).result_rows
    assert [tuple(r) for r in rows] == [("month", "block"), ("month", "unblock")]


async def test_month_count_is_rebuilt_from_day_rows_after_a_restart(month_settings: Settings, clickhouse: Any) -> None:
    settings = month_settings
    store = RollupStore(clickhouse, settings.clickhouse_database)
    month = months_ahead(3)
    day = 86_400
    clock = Clock(month + day + 12 * 3600)  # the 2nd of the month, noon
    headers = {"X-API-Key": RAW["carol"]}
    first = WorkerRuntime(settings, store=store, clock=clock)
    async with first.running(), node(settings, "node-1", clock) as (_, c1):
        for _ in range(15):
            assert (await c1.get("/v0/payments", headers=headers)).status_code == 200
        await wait_for(lambda: first.consumer is not None and first.consumer.stats.counted >= 15, 15, "15 counted")

    clock.set(month + 4 * day + 12 * 3600)  # the 5th: only the day row of the 2nd holds the 15
    rows = store.current_window_counts(clock())
    assert [(k, lv, b, n) for k, _a, lv, b, n in rows if k == kid("carol")] == [(kid("carol"), "month", month, 15)]
    # `meter key-state` / the query API read the month the same way (its day rows).
    state = key_state(
        clickhouse,
        settings.clickhouse_database,
        kid("carol"),
        settings.default_policy(),
        datetime.fromtimestamp(clock(), UTC),
    )
    windows = {w.window: w for w in state.windows}
    assert (windows[Window.day].count, windows[Window.month].count) == (0, 15)
    assert (windows[Window.month].limit, windows[Window.month].remaining) == (QUOTA, QUOTA - 15)
    assert windows[Window.month].end == datetime.fromtimestamp(month_bounds(month)[1], UTC)
    second = WorkerRuntime(settings, store=store, clock=clock)  # a new process: only ClickHouse remembers
    async with second.running(), node(settings, "node-2", clock) as (a2, c2):  # a fresh node: its own count is 0

        def month_count() -> int:
            assert second.limits is not None
            kw = second.limits.engine._find(kid("carol"))
            return kw.count(Window.month, clock()) if kw is not None else -1

        await wait_for(lambda: month_count() == 15, 15, "the month count rebuilt")
        for _ in range(QUOTA - 15):
            assert (await c2.get("/v0/payments", headers=headers)).status_code == 200
        await wait_for(lambda: a2.state.cache.check(kid("carol")) is not None, 15, "the month block")
        block = a2.state.cache.check(kid("carol"))
        assert (block.window, block.count, block.limit) == (Window.month, QUOTA, QUOTA)
        assert block.until == datetime.fromtimestamp(month_bounds(month)[1], UTC)
        assert (await c2.get("/v0/payments", headers=headers)).status_code == 429
