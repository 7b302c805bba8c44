"""Cost per request and route limits end to end on the real broker and chDB: demo nodes ->
Kafka -> worker (fast lane, rollups, rebuild) -> decisions on key x route -> every node."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from node.demo_api import STATEMENT_COST
from schemas.analytics import KeyState, WindowState
from schemas.decisions import DecisionAction, Window
from schemas.limits import LimitPolicy, OverrideScope, route_subject
from tests.integration.helpers import RAW, SECRET, blocked_everywhere, kid, node, wait_for, window_count
from worker.analytics.queries import key_state
from worker.app import WorkerRuntime
from worker.limits.control import manual_decision, set_override
from worker.settings import Settings
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

STATEMENT = "/v0/payments/statement"
# 3 statements a day per key (each costs STATEMENT_COST; a day: no window ends during the test).
ROUTE_DAILY = 3 * STATEMENT_COST


def _day(state: KeyState) -> WindowState:
    return next(w for w in state.windows if w.window is Window.day)


@pytest.fixture
def route_settings(topics: Settings) -> Settings:
    return topics.model_copy(
        update={
            "node_secret": SecretStr(SECRET),
            "batch_timeout_ms": 20,
            "route_limits": {"statements": {"per_day": ROUTE_DAILY}},
            "limit_per_minute": 1_000,  # the key's own limits stay out of the way
        }
    )


async def test_a_route_limit_spread_over_two_nodes_blocks_the_route_only_and_survives_a_restart(
    route_settings: Settings, clickhouse: Any
) -> None:
    settings = route_settings
    store = RollupStore(clickhouse, settings.clickhouse_database)
    carol = {"X-API-Key": RAW["carol"]}
    subject = route_subject(kid("carol"), "statements")
    async with node(settings, "node-1") as (a1, c1), node(settings, "node-2") as (a2, c2):
        first = WorkerRuntime(settings, store=store)
        async with first.running():
            # Each node alone stays under the route's 30 (2 x 10 each): the nodes admit all four,
            # the worker counts 40 across them and blocks the key on that route, on both nodes.
            for client in (c1, c2, c1, c2):
                assert (await client.get(STATEMENT, headers=carol)).status_code == 200
            for _ in range(5):
                assert (await c1.get("/v0/rates", headers=carol)).status_code == 200
            await blocked_everywhere([a1, a2], subject)
            assert window_count(first, subject, Window.day) == 4 * STATEMENT_COST
            # The key's own count is in cost too: 4 statements x 10 + 5 cheap requests.
            assert window_count(first, kid("carol"), Window.day) == 4 * STATEMENT_COST + 5

            # The key state of the key on the route (`meter key-state KEY_ID@statements`, the
            # API's) counts that route's rows only, against the route's limit, with its block.
            def route_state() -> KeyState:
                return key_state(clickhouse, settings.clickhouse_database, subject, settings.policy_book().resolve)

            # (the rollup rows and the decision's audit row are written after the block is pushed)
            await wait_for(
                lambda: (_day(state := route_state()).count, state.blocked) == (4 * STATEMENT_COST, True),
                20,
                "route rows and decision stored",
            )
            state = route_state()
            assert (_day(state).limit, _day(state).over, state.key_id) == (ROUTE_DAILY, True, subject)

            def own_state() -> KeyState:
                return key_state(clickhouse, settings.clickhouse_database, kid("carol"), settings.policy_book().resolve)

            await wait_for(lambda: _day(own_state()).count == 4 * STATEMENT_COST + 5, 20, "key rows stored")
            assert not own_state().blocked

            refused = await c2.get(STATEMENT, headers=carol)
            assert refused.status_code == 429
            body = refused.json()
            assert body["route"] == "statements"
            assert "on route 'statements'" in body["message"]
            assert body["limit"] == ROUTE_DAILY
            # Only the route is blocked: the key's other requests are served.
            assert (await c2.get("/v0/rates", headers=carol)).status_code == 200
            assert a1.state.cache.check(kid("carol")) is None
            # An operator lifts the route's block like a key's: the subject is the decision's key.
            await manual_decision(settings, subject, DecisionAction.unblock, None, "support ticket 7")
            await wait_for(
                lambda: a1.state.cache.check(subject) is None and a2.state.cache.check(subject) is None,
                10,
                "route unblocked on both nodes",
            )
            await manual_decision(settings, subject, DecisionAction.block, None, "blocked again")
            await blocked_everywhere([a1, a2], subject)

        # A new worker knows the route's count from the rollups alone (cost and route columns).
        second = WorkerRuntime(settings, store=store)
        async with second.running():
            await wait_for(lambda: window_count(second, subject, Window.day) == 4 * STATEMENT_COST, 20, "rebuilt")
            await wait_for(
                lambda: window_count(second, kid("carol"), Window.day) == 4 * STATEMENT_COST + 6, 20, "key rebuilt"
            )
            assert (await c1.get(STATEMENT, headers=carol)).status_code == 429


async def test_one_node_refuses_a_route_on_its_own_count_and_an_override_targets_key_x_route(
    route_settings: Settings, clickhouse: Any
) -> None:
    settings = route_settings
    store = RollupStore(clickhouse, settings.clickhouse_database)
    dave = {"X-API-Key": RAW["dave"]}
    worker = WorkerRuntime(settings, store=store)
    async with worker.running(), node(settings, "node-1") as (app, client):
        # Without waiting for the worker: the node's own count refuses the 4th statement.
        answers = [await client.get(STATEMENT, headers=dave) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        # The headers show the tighter limit: the route's (30 a day), not the key's.
        assert [a.headers["ratelimit-remaining"] for a in answers[:3]] == ["20", "10", "0"]
        assert answers[0].headers["ratelimit-limit"] == str(ROUTE_DAILY)

        # An operator gives alice's key a statement allowance of its own (key x route).
        await set_override(
            settings,
            OverrideScope.key,
            kid("alice"),
            LimitPolicy.unlimited().model_copy(update={"per_day": STATEMENT_COST}),
            "one statement an hour",
            route="statements",
        )
        alice_subject = route_subject(kid("alice"), "statements")
        await wait_for(
            lambda: app.state.cache.guard.policies.resolve(alice_subject).per_day == STATEMENT_COST, 10, "override"
        )
        alice = {"X-API-Key": RAW["alice"]}
        assert (await client.get(STATEMENT, headers=alice)).status_code == 200
        second = await client.get(STATEMENT, headers=alice)
        assert second.status_code == 429
        assert second.json()["route"] == "statements"
        assert (await client.get("/v0/payments", headers=alice)).status_code == 200
        # The events carried the cost: the rollups sum it per route (and the 429s count nothing).
        await wait_for(lambda: worker.consumer is not None and worker.consumer.stats.counted >= 7, 15, "counted")
        rows = clickhouse.query(
            f"SELECT key_id, route, sum(cost), sum(requests) FROM `{settings.clickhouse_database}`.usage_rollup "
            "WHERE level = 'minute' AND status != 429 GROUP BY key_id, route ORDER BY key_id, route"
        ).result_rows
        found = {(k, r): (int(c), int(n)) for k, r, c, n in rows}
        assert found[(kid("dave"), "statements")] == (3 * STATEMENT_COST, 3)
        assert found[(kid("alice"), "statements")] == (STATEMENT_COST, 1)
        assert found[(kid("alice"), "")] == (1, 1)
