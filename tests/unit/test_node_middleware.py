"""The metering middleware over the demo routes, with an in-memory reporter and block table."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import node.middleware
from node.decision_cache import Block
from node.demo_api import ROUTE_SCOPES, build_node_app, demo_key_store, demo_keys
from node.guard import LocalGuard, Refusal, RefusedBy
from node.in_flight import InFlight
from node.keys import InMemoryKeyStore, derive_key_id
from node.middleware import UNMATCHED_ENDPOINT, MeterMiddleware, RouteScope, starlette_route_resolver
from schemas.allowances import MAX_DIVISION_WAIT_S, Allowance, NodeGrant, WindowAllowance
from schemas.decisions import Decision, DecisionAction, Window
from schemas.events import MAX_LATENCY_MS, RequestEvent, dump_event
from tests.node_secret import NODE_SECRET
from worker.settings import Settings

SECRET = NODE_SECRET
SETTINGS = Settings(node_secret=SECRET, node_id="node-unit", kafka_bootstrap="127.0.0.1:1")
RAW = demo_keys("unit-seed")
NOW = datetime(2025, 3, 1, 12, 0, 30, 250_000, tzinfo=UTC)


def kid(name: str) -> str:
    return derive_key_id(RAW[name], SECRET.encode())


class FakeReporter:
    def __init__(self) -> None:
        self.events: list[RequestEvent] = []

    def report(self, event: RequestEvent) -> None:
        self.events.append(event)


class FakeCache:
    def __init__(self) -> None:
        self.blocks: dict[str, Block] = {}
        self.available = True
        self.clock = NOW

    def check(self, key_id: str) -> Block | None:
        block = self.blocks.get(key_id)
        if block is None or (block.until is not None and self.clock >= block.until):
            return None
        return block

    def now(self) -> datetime:
        return self.clock

    async def wait_change(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)  # nothing is ever applied here

    def block(
        self, name: str, window: Window = Window.minute, limit: int | None = 100, seconds: float | None = 29.75
    ) -> None:
        until = None if seconds is None else NOW + timedelta(seconds=seconds)
        self.blocks[kid(name)] = Block(kid(name), window, limit, limit, until, "test", 1, "worker")


seen_headers: list[list[tuple[bytes, bytes]]] = []


async def ok(request: Request) -> JSONResponse:
    seen_headers.append(list(request.scope["headers"]))
    return JSONResponse({"ok": True, "request_id": request.state.request_id, "account": request.state.account_id})


async def payment(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["payment_id"]})


async def boom(request: Request) -> JSONResponse:
    raise RuntimeError("handler bug")


async def health(request: Request) -> JSONResponse:
    seen_headers.append(list(request.scope["headers"]))
    return JSONResponse({"status": "ok"})


ROUTES = [
    Route("/v0/payments", ok, methods=["GET", "POST"]),
    Route("/v0/payments/{payment_id}", payment),
    Route("/v0/rates", ok),
    Route("/v0/boom", boom),
    Route("/v0/status", ok),  # no RouteScope covers it
    Route("/health", health),
]


def make_app(
    reporter: FakeReporter,
    cache: FakeCache,
    *,
    fail_open: bool = True,
    settings: Settings = SETTINGS,
    routes: list[Route] | None = None,
    keys: InMemoryKeyStore | None = None,
    **more: Any,
) -> Starlette:
    """The middleware over ``routes`` (default ``ROUTES`` with their scopes); ``more``: its other
    arguments (a guard, a clock, ...)."""
    if routes is None:
        routes = ROUTES
        more = {
            "route_scopes": (*ROUTE_SCOPES, RouteScope("/v0/boom", None)),  # public in code
            "route_resolver": starlette_route_resolver(ROUTES),
            **more,
        }
    keys = keys or demo_key_store(RAW, SECRET.encode())
    options = {"settings": settings, "keys": keys, "reporter": reporter, "cache": cache, "fail_open": fail_open}
    return Starlette(routes=routes, middleware=[Middleware(MeterMiddleware, **options, **more)])


@pytest.fixture
def reporter() -> FakeReporter:
    return FakeReporter()


@pytest.fixture
def cache() -> FakeCache:
    return FakeCache()


@pytest.fixture
async def client(reporter: FakeReporter, cache: FakeCache) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(reporter, cache), client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        yield c


def assert_error(resp: httpx.Response, status: int, error: str) -> dict[str, str]:
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    refusal = {"window", "limit", "count", "refused_by", "version"} if status == 429 else set()
    assert set(body) == {"error", "message", "request_id"} | refusal
    assert body["error"] == error
    assert body["message"]
    assert body["request_id"] == resp.headers["x-request-id"]
    return body  # type: ignore[no-any-return]


async def test_missing_key_401(client: httpx.AsyncClient, reporter: FakeReporter) -> None:
    for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": "   "}):
        body = assert_error(await client.get("/v0/payments", headers=headers), 401, "missing_api_key")
        assert "X-API-Key" in body["message"]
    assert [e["key_id"] for e in reporter.events] == ["anonymous"] * 3
    assert all(e["status"] == 401 and e.get("account_id") is None for e in reporter.events)


@pytest.mark.parametrize(
    "raw",
    ["cf_nobody_00000000000000000000000000000000", "has spaces in it", "short", "x" * 300, RAW["revoked"]],
)
async def test_invalid_key_401(client: httpx.AsyncClient, reporter: FakeReporter, raw: str) -> None:
    assert_error(await client.get("/v0/rates", headers={"X-API-Key": raw}), 401, "invalid_api_key")
    (event,) = reporter.events
    # never the key itself: a revoked key under its own id, anything unknown under one of 256
    # bucket ids (a spray of made-up keys must not create a counter per guess)
    expected = kid("revoked") if raw == RAW["revoked"] else "invalid-" + derive_key_id(raw, SECRET.encode())[-2:]
    assert event["key_id"] == expected
    assert raw not in str(event)
    assert event["status"] == 401


async def test_permission_403(client: httpx.AsyncClient, reporter: FakeReporter) -> None:
    headers = {"X-API-Key": RAW["reader"]}
    body = assert_error(await client.post("/v0/payments", headers=headers, json={}), 403, "forbidden")
    assert "payments:write" in body["message"]
    assert (await client.get("/v0/payments", headers=headers)).status_code == 200
    assert (await client.post("/v0/payments", headers={"X-API-Key": RAW["alice"]}, json={})).status_code == 200
    assert [(e["method"], e["status"], e["account_id"]) for e in reporter.events] == [
        ("POST", 403, "acct-alice"),
        ("GET", 200, "acct-alice"),
        ("POST", 200, "acct-alice"),
    ]


async def test_allowed_request_event(client: httpx.AsyncClient, reporter: FakeReporter) -> None:
    resp = await client.get("/v0/payments", headers={"X-API-Key": RAW["bob"]})
    assert resp.status_code == 200
    assert resp.json()["account"] == "acct-bob"
    (event,) = reporter.events
    assert event["request_id"] == resp.headers["x-request-id"] == resp.json()["request_id"]
    assert len(event["request_id"]) == 32
    assert event["key_id"] == kid("bob")
    assert event["node_id"] == "node-unit"
    assert event["endpoint"] == "/v0/payments"
    assert event["method"] == "GET"
    assert event["status"] == 200
    assert event["ts"] == NOW
    assert event.get("client_ip") == "203.0.113.7"
    assert event.get("bytes_out") == len(resp.content)
    assert (event.get("latency_ms") or -1) >= 0


async def test_a_request_longer_than_the_latency_bound_is_reported_at_the_bound(
    client: httpx.AsyncClient, reporter: FakeReporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Served and counted by the node's guard, but its event failed the contract (latency_ms at
    # most an hour) and was never reported: the worker never counted it.
    readings = iter([1000.0, 1000.0 + MAX_LATENCY_MS / 1000 + 1])
    # Its own clock only (the middleware reads time.perf_counter alone), not the process's.
    monkeypatch.setattr(node.middleware, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    resp = await client.get("/v0/payments", headers={"X-API-Key": RAW["bob"]})
    assert resp.status_code == 200
    (event,) = reporter.events
    assert event.get("latency_ms") == MAX_LATENCY_MS


async def test_request_ids_unique_and_not_from_client(client: httpx.AsyncClient, reporter: FakeReporter) -> None:
    for _ in range(20):
        await client.get("/v0/rates", headers={"X-API-Key": RAW["bob"], "X-Request-Id": "client-chosen"})
    ids = {e["request_id"] for e in reporter.events}
    assert len(ids) == 20
    assert "client-chosen" not in ids


async def test_templated_endpoint_allowed_and_denied(client: httpx.AsyncClient, reporter: FakeReporter) -> None:
    await client.get("/v0/payments/pay_123", headers={"X-API-Key": RAW["carol"]})
    await client.get("/v0/payments/pay_456", headers={"X-API-Key": "cf_nobody_00000000000000000000000000"})
    await client.get("/v0/unknown/route")
    assert [e["endpoint"] for e in reporter.events] == [
        "/v0/payments/{payment_id}",
        "/v0/payments/{payment_id}",
        UNMATCHED_ENDPOINT,
    ]


async def test_unmatched_paths_are_recorded_under_one_constant(
    client: httpx.AsyncClient, reporter: FakeReporter
) -> None:
    """No raw path reaches an event: each would be a rollup row kept for years, and some carry tokens."""
    alice = {"X-API-Key": RAW["alice"]}
    responses = [
        await client.get("/v0/payments/pay_1/refunds/tok_live_a1b2c3", headers=alice),  # covered, no route: 404
        await client.get("/v0/password-reset/tok_live_d4e5f6", headers=alice),  # no rule: 403
        await client.get("/v0/password-reset/tok_live_g7h8i9"),  # no key: 401
        await client.delete("/v0/rates", headers=alice),  # a route, not this method: its template
    ]
    assert [r.status_code for r in responses] == [404, 403, 401, 405]
    assert [e["endpoint"] for e in reporter.events] == [UNMATCHED_ENDPOINT] * 3 + ["/v0/rates"]
    assert "tok_live" not in repr(reporter.events)


async def test_blocked_429(client: httpx.AsyncClient, reporter: FakeReporter, cache: FakeCache) -> None:
    cache.block("alice", seconds=29.75)  # until = 12:01:00 -> 30 s, rounded up
    resp = await client.get("/v0/payments", headers={"X-API-Key": RAW["alice"]})
    body = assert_error(resp, 429, "rate_limited")
    assert resp.headers["retry-after"] == "30"
    assert resp.headers["ratelimit-limit"] == "100"
    assert resp.headers["ratelimit-remaining"] == "0"
    assert resp.headers["ratelimit-reset"] == "30"
    assert resp.headers["ratelimit-policy"] == "100;w=60"
    assert "100 requests per minute" in body["message"]
    assert [(e["key_id"], e["status"]) for e in reporter.events] == [(kid("alice"), 429)]
    # other keys unaffected
    assert (await client.get("/v0/payments", headers={"X-API-Key": RAW["bob"]})).status_code == 200


@pytest.mark.parametrize(
    ("window", "limit", "seconds", "retry_after", "words"),
    [
        (Window.minute, 100, 0.2, "1", "100 requests per minute"),
        # This node's clock 10 s behind the worker's: the block still ends with its minute.
        (Window.minute, 100, 70, "60", "100 requests per minute"),
        (Window.hour, 1000, 1799.01, "1800", "1000 requests per hour"),
        (Window.day, 5000, 40_000, "40000", "5000 requests per day"),
        (Window.manual, None, 3600, "3600", "blocked by an operator."),
        (Window.manual, None, None, "60", "blocked by an operator."),
    ],
)
async def test_retry_after_per_window(
    client: httpx.AsyncClient,
    cache: FakeCache,
    window: Window,
    limit: int | None,
    seconds: float | None,
    retry_after: str,
    words: str,
) -> None:
    cache.block("dave", window=window, limit=limit, seconds=seconds)
    resp = await client.get("/v0/rates", headers={"X-API-Key": RAW["dave"]})
    body = assert_error(resp, 429, "rate_limited")
    assert resp.headers["retry-after"] == retry_after == resp.headers["ratelimit-reset"]
    assert words in body["message"]
    assert "test" not in body["message"]  # an operator's reason stays in the audit
    assert (body["refused_by"], body["window"], body["limit"]) == ("decision", window.value, limit)
    assert ("ratelimit-limit" in resp.headers) is (limit is not None)


async def test_expired_block_admits(client: httpx.AsyncClient, cache: FakeCache) -> None:
    cache.block("alice", seconds=10)
    assert (await client.get("/v0/rates", headers={"X-API-Key": RAW["alice"]})).status_code == 429
    cache.clock = NOW + timedelta(seconds=10)
    assert (await client.get("/v0/rates", headers={"X-API-Key": RAW["alice"]})).status_code == 200


async def test_fail_open_and_fail_closed(reporter: FakeReporter, cache: FakeCache) -> None:
    cache.available = False
    for fail_open, expected in ((True, 200), (False, 503)):
        transport = httpx.ASGITransport(app=make_app(reporter, cache, fail_open=fail_open))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
            resp = await c.get("/v0/rates", headers={"X-API-Key": RAW["bob"]})
        assert resp.status_code == expected
        if expected == 503:
            assert_error(resp, 503, "meter_unavailable")
            assert resp.headers["retry-after"] == "5"
    # known blocks are still enforced while the meter is unreachable
    cache.block("bob")
    transport = httpx.ASGITransport(app=make_app(reporter, cache, fail_open=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        assert (await c.get("/v0/rates", headers={"X-API-Key": RAW["bob"]})).status_code == 429
    assert [e["status"] for e in reporter.events] == [200, 503, 429]
    # The 503 spent nothing of the key's limits: the worker does not count it (the 429 is skipped
    # by its status).
    assert [e["cost"] for e in reporter.events] == [1, 0, 1]


async def test_fail_closed_refusals_use_up_nothing_of_the_guard(reporter: FakeReporter, cache: FakeCache) -> None:
    """A client retrying through an outage finds its whole minute once the meter is back."""
    guard = LocalGuard(SETTINGS.policy_book(), SETTINGS.node_id)
    app = make_app(reporter, cache, fail_open=False, guard=guard, now=lambda: NOW)
    headers = {"X-API-Key": RAW["bob"]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as c:
        cache.available = False
        assert {(await c.get("/v0/rates", headers=headers)).status_code for _ in range(150)} == {503}
        cache.available = True
        served = await c.get("/v0/rates", headers=headers)
    assert served.status_code == 200
    assert served.headers["ratelimit-remaining"] == "99"
    assert [e["cost"] for e in reporter.events] == [0] * 150 + [1]


async def test_health_unmetered(client: httpx.AsyncClient, reporter: FakeReporter) -> None:
    resp = await client.get("/health")
    assert resp.status_code == 200
    assert resp.headers["x-request-id"]
    assert reporter.events == []


async def test_an_exempt_path_never_sees_the_key_header(client: httpx.AsyncClient) -> None:
    seen_headers.clear()
    assert (await client.get("/health", headers={"X-API-Key": RAW["alice"]})).status_code == 200
    assert seen_headers
    assert all(name != b"x-api-key" for name, _ in seen_headers[0])


async def test_a_websocket_is_refused_not_let_through_unauthenticated(reporter: FakeReporter, cache: FakeCache) -> None:
    reached: list[object] = []

    async def app(scope: object, receive: object, send: object) -> None:
        reached.append(scope)

    middleware = MeterMiddleware(
        app, settings=SETTINGS, keys=demo_key_store(RAW, SECRET.encode()), reporter=reporter, cache=cache
    )
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "websocket.connect"}

    headers = [(b"x-api-key", RAW["alice"].encode())]
    await middleware({"type": "websocket", "path": "/v0/rates", "headers": headers}, receive, send)
    assert reached == []
    assert [(m["type"], m["code"]) for m in sent] == [("websocket.close", 1008)]
    assert reporter.events == []


async def test_handler_error_reported_as_500(client: httpx.AsyncClient, reporter: FakeReporter) -> None:
    with pytest.raises(RuntimeError, match="handler bug"):
        await client.get("/v0/boom", headers={"X-API-Key": RAW["alice"]})
    assert [(e["endpoint"], e["status"]) for e in reporter.events] == [("/v0/boom", 500)]


async def test_raw_key_never_leaves(
    client: httpx.AsyncClient, reporter: FakeReporter, cache: FakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen_headers.clear()
    cache.block("carol")
    sent = [RAW["alice"], RAW["reader"], RAW["carol"], RAW["revoked"], "cf_nobody_00000000000000000000000000"]
    responses = [
        await client.get("/v0/payments", headers={"X-API-Key": RAW["alice"]}),
        await client.post("/v0/payments", headers={"X-API-Key": RAW["reader"]}, json={}),
        await client.get("/v0/rates", headers={"X-API-Key": RAW["carol"]}),
        await client.get("/v0/rates", headers={"X-API-Key": RAW["revoked"]}),
        await client.get("/v0/rates", headers={"X-API-Key": sent[-1]}),
    ]
    assert [r.status_code for r in responses] == [200, 403, 429, 401, 401]
    wire = b"".join(dump_event(e) for e in reporter.events)
    text = "\n".join(
        [caplog.text, repr(reporter.events)]
        + [r.text + repr(r.headers) for r in responses]
        + [repr(h) for h in seen_headers]
    )
    assert len(reporter.events) == 5
    for raw in sent:
        assert raw.encode() not in wire
        assert raw not in text
    # the app behind the middleware never sees the key header
    assert seen_headers
    assert all(name != b"x-api-key" for hs in seen_headers for name, _ in hs)


async def test_demo_app_wiring() -> None:
    """build_node_app with the real reporter and cache (not started: no broker involved)."""
    token = NODE_SECRET[::-1]
    settings = SETTINGS.model_copy(update={"node_health_token": SecretStr(token)})
    app = build_node_app(settings, demo_key_store(RAW, SECRET.encode()), now=lambda: NOW)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        assert (await c.get("/health")).status_code == 503  # cache not bootstrapped
        alice = {"X-API-Key": RAW["alice"]}
        assert (await c.get("/v0/payments", headers=alice)).status_code == 200  # fail-open
        created = await c.post("/v0/payments", headers=alice, json={"amount": "12.5", "currency": "USDT"})
        assert created.status_code == 201
        assert created.json()["amount"] == "12.5"
        assert (await c.post("/v0/payments", headers={"X-API-Key": RAW["reader"]}, json={})).status_code == 403
        assert (await c.get("/v0/payments/pay_1", headers=alice)).json()["id"] == "pay_1"
        assert (await c.get("/v0/rates", headers=alice)).status_code == 200
        app.state.cache.apply(
            Decision(
                key_id=kid("alice"),
                action=DecisionAction.block,
                window=Window.minute,
                limit=100,
                count=100,
                until=datetime(2025, 3, 1, 12, 1, tzinfo=UTC),
                version=1,
                decided_at=NOW,
            )
        )
        resp = await c.get("/v0/rates", headers=alice)
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "30"
        health = (await c.get("/health/details", headers={"Authorization": f"Bearer {token}"})).json()
        assert health["status"] == "starting"
        assert health["reporter"]["buffered"] == 6


async def test_one_node_alone_admits_exactly_the_limit_and_explains_the_refusal() -> None:
    """The node's own guard: 300 requests of one key on one node, default 100/min -> 100 admitted."""
    app = build_node_app(SETTINGS, demo_key_store(RAW, SECRET.encode()), now=lambda: NOW)
    transport = httpx.ASGITransport(app=app)
    carol = {"X-API-Key": RAW["carol"]}
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        responses = [await c.get("/v0/rates", headers=carol) for _ in range(300)]
    statuses = [r.status_code for r in responses]
    assert (statuses.count(200), statuses.count(429)) == (100, 200)
    assert statuses[:100] == [200] * 100  # the first hundred, then none
    first, last = responses[0], responses[99]
    assert (first.headers["ratelimit-limit"], first.headers["ratelimit-remaining"]) == ("100", "99")
    assert last.headers["ratelimit-remaining"] == "0"
    refused = responses[100]
    body = assert_error(refused, 429, "rate_limited")
    assert (body["refused_by"], body["window"], body["limit"], body["count"]) == ("local_limit", "minute", 100, 100)
    assert refused.headers["retry-after"] == "30"  # NOW is 12:00:30.25
    # events carry the node's own counts; refusals count nothing
    events = app.state.reporter._buffer
    assert [e["node_counts"] for e in list(events)[:2]] == [[1, 1, 1], [2, 2, 2]]
    assert (list(events)[-1]["status"], list(events)[-1]["node_counts"]) == (429, [100, 100, 100])


def minute_allowance(key_id: str, node_id: str, used: int, cap: int, version: int = 1) -> Allowance:
    start = NOW.replace(second=0, microsecond=0)
    window = WindowAllowance(
        window=Window.minute,
        start=start,
        until=start + timedelta(minutes=1),
        limit=100,
        count=used,
        grants={node_id: NodeGrant(used=used, cap=cap)},
    )
    return Allowance(key_id=key_id, version=version, decided_at=NOW, windows=[window])


@pytest.fixture
async def client_of() -> AsyncIterator[Callable[[Starlette], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(app: Starlette) -> httpx.AsyncClient:
        clients.append(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node"))
        return clients[-1]

    yield make
    for c in clients:
        await c.aclose()


def burst_node(wait_ms: int) -> Starlette:
    """A node (real guard and cache, not started: nothing arrives unless a test applies it)."""
    settings = SETTINGS.model_copy(update={"node_burst_share": 0.34, "node_burst_wait_ms": wait_ms})
    return build_node_app(settings, demo_key_store(RAW, SECRET.encode()), now=lambda: NOW)


async def burst(client: httpx.AsyncClient, name: str, n: int) -> list[asyncio.Task[httpx.Response]]:
    headers = {"X-API-Key": RAW[name]}
    tasks = [asyncio.create_task(client.get("/v0/rates", headers=headers)) for _ in range(n)]
    await asyncio.sleep(0.05)  # the requests past the burst share are now waiting
    return tasks


async def test_past_its_burst_share_a_request_waits_for_the_division_then_is_admitted(
    client_of: Callable[[Starlette], httpx.AsyncClient],
) -> None:
    """One node bursting alone is delayed, not refused: it waits for the worker's allowance."""
    app = burst_node(wait_ms=10_000)
    tasks = await burst(client_of(app), "alice", 60)
    assert sum(t.done() for t in tasks) == 34  # the share: ceil(0.34 x 100)
    cache = app.state.cache
    assert cache.guard.apply(minute_allowance(kid("alice"), "node-unit", used=34, cap=100), NOW.timestamp())
    cache._notify()  # what the follower does after applying a record
    statuses = [r.status_code for r in await asyncio.wait_for(asyncio.gather(*tasks), 5)]
    assert statuses == [200] * 60


async def test_a_block_arriving_while_requests_wait_refuses_them(
    client_of: Callable[[Starlette], httpx.AsyncClient],
) -> None:
    app = burst_node(wait_ms=10_000)
    tasks = await burst(client_of(app), "bob", 40)
    app.state.cache.apply(
        Decision(
            key_id=kid("bob"),
            action=DecisionAction.block,
            window=Window.minute,
            limit=100,
            count=100,
            until=NOW + timedelta(seconds=29),
            version=1,
            decided_at=NOW,
        )
    )
    responses = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert [r.status_code for r in responses].count(429) == 6
    assert {r.json()["refused_by"] for r in responses if r.status_code == 429} == {"decision"}


async def test_without_any_word_from_the_worker_the_wait_ends_and_the_limit_still_holds() -> None:
    app = burst_node(wait_ms=50)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        statuses = [(await c.get("/v0/rates", headers={"X-API-Key": RAW["dave"]})).status_code for _ in range(120)]
    assert (statuses.count(200), statuses.count(429)) == (100, 20)  # one wait, then the share is waived


@pytest.mark.parametrize("served", ["mount", "root_path"])
async def test_scopes_hold_under_a_root_path(reporter: FakeReporter, cache: FakeCache, served: str) -> None:
    """Rules match the path the router routes on, not the raw path: under /api a read-only key
    still cannot create a payment."""
    inner = make_app(reporter, cache)
    if served == "mount":
        transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/api", app=inner)]))
    else:  # uvicorn --root-path /api
        transport = httpx.ASGITransport(app=inner, root_path="/api")
    reader, alice = {"X-API-Key": RAW["reader"]}, {"X-API-Key": RAW["alice"]}
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        body = assert_error(await c.post("/api/v0/payments", headers=reader, json={}), 403, "forbidden")
        assert "payments:write" in body["message"]
        assert (await c.get("/api/v0/payments", headers=reader)).status_code == 200
        assert (await c.post("/api/v0/payments", headers=alice, json={})).status_code == 200
        assert (await c.get("/api/health")).status_code == 200  # exempt under the prefix as well
    assert [(e["endpoint"], e["status"]) for e in reporter.events] == [
        ("/v0/payments", 403),
        ("/v0/payments", 200),
        ("/v0/payments", 200),
    ]


async def test_a_route_no_rule_covers_is_closed_unless_public(reporter: FakeReporter, cache: FakeCache) -> None:
    alice = {"X-API-Key": RAW["alice"]}  # every scope there is
    transport = httpx.ASGITransport(app=make_app(reporter, cache))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        assert_error(await c.get("/v0/status", headers=alice), 403, "forbidden")
        assert_error(await c.get("//v0/payments", headers=alice), 403, "forbidden")  # no prefix trick
    public = SETTINGS.model_copy(update={"node_public_routes": ("/v0/status",)})
    transport = httpx.ASGITransport(app=make_app(reporter, cache, settings=public))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        assert (await c.get("/v0/status", headers=alice)).status_code == 200
        assert (await c.get("/v0/status", headers={"X-API-Key": RAW["reader"]})).status_code == 200
        assert_error(await c.get("/v0/status"), 401, "missing_api_key")  # public = any valid key
    assert [e["status"] for e in reporter.events] == [403, 403, 200, 200, 401]


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "recorded"),
    [
        ((), "127.0.0.1", "198.51.100.1", "127.0.0.1"),  # default: no proxy is trusted, loopback neither
        (("127.0.0.0/8",), "127.0.0.1", "198.51.100.1", "198.51.100.1"),
        # the client prepends what it likes: the first address from the right that is not ours counts
        (("127.0.0.0/8", "10.0.0.0/8"), "127.0.0.1", "6.6.6.6, 203.0.113.50, 10.1.2.3", "203.0.113.50"),
        (("127.0.0.0/8",), "203.0.113.7", "198.51.100.1", "203.0.113.7"),  # not a proxy of ours
        (("127.0.0.0/8",), "127.0.0.1", "198.51.100.1, not-an-ip", None),  # garbage: unknown, not the proxy
        (("127.0.0.0/8",), "127.0.0.1", None, "127.0.0.1"),
        (("::1/128",), "::1", "2001:DB8::7", "2001:db8::7"),
        ((), "not-an-ip", None, None),
        # a zone names an interface of this host, not the client: dropped (a long one made the
        # event refused by the contract: served, never counted)
        ((), "fe80::2%eth0", None, "fe80::2"),
        (("127.0.0.0/8",), "127.0.0.1", "fe80::1%" + "z" * 60, "fe80::1"),
    ],
)
async def test_forwarded_for_only_from_trusted_proxies(
    reporter: FakeReporter,
    cache: FakeCache,
    trusted: tuple[str, ...],
    peer: str,
    forwarded: str | None,
    recorded: str | None,
) -> None:
    settings = SETTINGS.model_copy(
        update={"node_trusted_proxies": Settings(node_trusted_proxies=trusted).node_trusted_proxies}
    )
    transport = httpx.ASGITransport(app=make_app(reporter, cache, settings=settings), client=(peer, 40000))
    headers = {"X-API-Key": RAW["bob"]} | ({"X-Forwarded-For": forwarded} if forwarded else {})
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        assert (await c.get("/v0/rates", headers=headers)).status_code == 200
    (event,) = reporter.events
    assert event.get("client_ip") == recorded


async def test_a_describing_field_the_contract_refuses_does_not_unmeter_the_request(
    reporter: FakeReporter, cache: FakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    keys = demo_key_store(RAW, SECRET.encode())
    bob = keys.lookup(kid("bob"))
    assert bob is not None
    keys.add(dataclasses.replace(bob, account_id="a" * 100))  # a key store's account id past the bound
    transport = httpx.ASGITransport(app=make_app(reporter, cache, keys=keys))
    with caplog.at_level(logging.WARNING, logger="node.middleware"):
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
            for _ in range(3):
                assert (await c.get("/v0/rates", headers={"X-API-Key": RAW["bob"]})).status_code == 200
    assert len(reporter.events) == 3  # before: none, and an ERROR with a traceback per request
    event = reporter.events[-1]
    assert (event["key_id"], event["status"], event.get("account_id")) == (kid("bob"), 200, None)
    assert event.get("client_ip") is not None  # only the refused field is left out
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # not one per request
    assert "reported without their account_id" in warnings[0]
    assert not any("a" * 100 in r.getMessage() for r in caplog.records)


OPERATOR_REASON = "fraud team FR-991: chargeback ring, do not tell customer"


@pytest.mark.parametrize(
    ("window", "limit"), [(Window.manual, None), (Window.manual, 100), (Window.minute, 100), (Window.day, 5000)]
)
async def test_an_operator_reason_never_reaches_the_client(
    client: httpx.AsyncClient, cache: FakeCache, window: Window, limit: int | None
) -> None:
    until = NOW + timedelta(hours=1)
    cache.blocks[kid("dave")] = Block(kid("dave"), window, limit, limit, until, OPERATOR_REASON, 7, "operator")
    resp = await client.get("/v0/rates", headers={"X-API-Key": RAW["dave"]})
    assert_error(resp, 429, "rate_limited")
    assert (resp.json()["refused_by"], resp.json()["version"]) == ("decision", 7)
    text = resp.text + repr(resp.headers)
    assert "FR-991" not in text
    assert "customer" not in text


async def test_public_health_is_liveness_only_details_need_the_token() -> None:
    token = NODE_SECRET[::-1]  # generated for this run, like the node secret
    settings = SETTINGS.model_copy(update={"node_health_token": SecretStr(token)})
    app = build_node_app(settings, demo_key_store(RAW, SECRET.encode()), now=lambda: NOW)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        public = await c.get("/health")
        assert (public.status_code, public.json()) == (503, {"status": "starting"})  # cache not bootstrapped
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}, {"X-API-Key": RAW["alice"]}):
            assert_error(await c.get("/health/details", headers=headers), 401, "unauthorized")
        details = await c.get("/health/details", headers={"Authorization": f"Bearer {token}"})
        assert details.status_code == 503
        assert {"status", "node_id", "fail_open", "cache", "reporter", "guard"} <= set(details.json())
        assert details.json()["status"] == "starting"
    assert list(app.state.reporter._buffer) == []  # health is not metered
    # without a token configured the details route is not served at all
    app = build_node_app(SETTINGS, demo_key_store(RAW, SECRET.encode()), now=lambda: NOW)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as c:
        assert (await c.get("/health/details", headers={"Authorization": "Bearer "})).status_code == 404


async def test_a_request_that_ends_in_the_next_minute_does_not_undo_that_minutes_count() -> None:
    """A request started at 12:00:59.9 ends after five others filled 12:01 (limit 5). Before, its
    event's node counts rolled the guard back to 12:00 and the next request to 12:01 again, from
    zero: the node admitted 10 in 12:01. A clock stepped back did the same."""
    settings = SETTINGS.model_copy(update={"limit_per_minute": 5})
    guard = LocalGuard(settings.policy_book(), settings.node_id)
    clock = [NOW.replace(second=59, microsecond=900_000)]
    release = asyncio.Event()

    async def slow(request: Request) -> JSONResponse:
        await release.wait()
        return JSONResponse({})

    reporter = FakeReporter()
    app = make_app(
        reporter,
        FakeCache(),
        settings=settings,
        routes=[Route("/slow", slow), Route("/fast", ok)],
        guard=guard,
        route_scopes=(RouteScope("/", None),),
        now=lambda: clock[0],
    )
    alice = {"X-API-Key": RAW["alice"]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as c:
        started = asyncio.create_task(c.get("/slow", headers=alice))
        await wait_until(lambda: len(guard) == 1)  # admitted and counted in 12:00
        clock[0] = NOW.replace(minute=1, second=0, microsecond=100_000)
        before = [(await c.get("/fast", headers=alice)).status_code for _ in range(6)]
        release.set()
        assert (await started).status_code == 200
        after = [(await c.get("/fast", headers=alice)).status_code for _ in range(6)]
        clock[0] = NOW.replace(second=59, microsecond=950_000)  # the clock steps back into 12:00
        stepped = (await c.get("/fast", headers=alice)).status_code
    assert before == [200] * 5 + [429]
    assert after == [429] * 6
    assert stepped == 429
    slow_event = next(e for e in reporter.events if e["endpoint"] == "/slow")
    assert "node_counts" not in slow_event or slow_event["node_counts"] is None  # its minute's counts are gone
    fast_admitted = [e for e in reporter.events if e["endpoint"] == "/fast" and e["status"] == 200]
    assert fast_admitted[-1].get("node_counts") == [5, 6, 6]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_a_local_refusals_retry_after_never_exceeds_its_window() -> None:
    """The node counted the minute ending at ``until``, then its clock stepped back 10 s."""
    until = 1_700_000_040.0  # a minute's end
    refusal = Refusal(RefusedBy.local_limit, Window.minute, limit=100, count=100, until=until)
    headers = dict(node.middleware._refused(refusal, now=until - 70).headers)
    assert headers[b"retry-after"] == headers[b"ratelimit-reset"] == b"60"
    assert headers[b"ratelimit-policy"] == b"100;w=60"
    assert dict(node.middleware._refused(refusal, now=until - 29.5).headers)[b"retry-after"] == b"30"


async def test_events_say_what_of_the_nodes_counts_is_still_being_served() -> None:
    """METER_DEMO_SERVING_MS: a call takes that long behind the meter, so the node has counted
    requests whose events are not reported yet. Each event carries the node's counts as the
    request ends (all 5 here) and what of them is still being served (``node_in_flight``): the
    worker has not counted those and must not give their share out again."""
    reporter = FakeReporter()
    settings = SETTINGS.model_copy(update={"demo_serving_ms": 1_500})
    app = build_node_app(settings, demo_key_store(RAW, SECRET.encode()), reporter=reporter, now=lambda: NOW)
    guard = app.state.cache.guard
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        calls = [asyncio.create_task(c.get("/v0/rates", headers={"X-API-Key": RAW["bob"]})) for _ in range(5)]
        for _ in range(100):
            if guard.counts(kid("bob"), NOW.timestamp()) == [5, 5, 5]:
                break
            await asyncio.sleep(0.01)
        assert guard.counts(kid("bob"), NOW.timestamp()) == [5, 5, 5]
        assert reporter.events == []  # admitted, counted, still being served
        assert [r.status_code for r in await asyncio.gather(*calls)] == [200] * 5
    assert [e["node_counts"] for e in reporter.events] == [[5, 5, 5]] * 5
    assert [e["node_in_flight"] for e in reporter.events] == [4, 3, 2, 1, 0]


def test_in_flight_keeps_each_keys_cost_being_served_per_minute_and_forgets_it_at_zero() -> None:
    minute = NOW.timestamp() // 60 * 60
    served = InFlight()
    first, second = served.start("k1", 1, minute + 59.5), served.start("k1", 10, minute + 60.5)
    other = served.start("k2", 1, minute + 1)
    # Each event says what is being served of its own minute: the counts it carries are that minute's.
    assert (served.of("k1", minute + 30), served.of("k1", minute + 61), served.of("k2", minute)) == (1, 10, 1)
    served.end(first)
    served.end(other)
    assert (served.of("k1", minute), served.of("k1", minute + 61), served.of("k2", minute), len(served)) == (
        0,
        10,
        0,
        1,
    )
    served.end(second)
    assert len(served) == 0


def test_a_request_waits_longer_for_a_division_while_its_keys_requests_are_being_served() -> None:
    clock = [1000.0]
    served = InFlight(lambda: clock[0])
    assert served.deadline("k1", 1000.0, 0.25) == 1000.25
    serving = served.start("k1", 1, NOW.timestamp())
    # The worker has not heard of it: as long as it is served, up to the bound.
    assert served.deadline("k1", 1000.0, 0.25) == 1000.0 + MAX_DIVISION_WAIT_S
    assert served.deadline("k2", 1000.0, 0.25) == 1000.25  # other keys' requests change nothing
    clock[0] = 1000.4
    served.end(serving)
    # Ended: the worker hears of it now, the division follows within the burst wait.
    assert served.deadline("k1", 1000.0, 0.25) == pytest.approx(1000.65)
    assert served.deadline("k1", 1000.5, 0.25) == 1000.75
    # A division that settles (the worker waits to hear from other nodes): up to the bound too.
    assert served.deadline("k1", 1000.5, 0.25, settling=True) == 1000.5 + MAX_DIVISION_WAIT_S


async def test_a_held_request_gets_its_answer_a_burst_wait_after_its_keys_last_request_ended() -> None:
    """A request past its burst share waits 250 ms from when it came or from when the node's
    latest request of the key ended (longer only while the node still serves some). No word
    from the worker here: the 34 admitted calls (300 ms each) end at ~0.3 s, so the 35th has its
    final answer by ~0.55 s, then takes its own 300 ms (it waited for the 2 s bound before)."""
    settings = SETTINGS.model_copy(update={"node_burst_share": 0.34, "node_burst_wait_ms": 250, "demo_serving_ms": 300})
    app = build_node_app(settings, demo_key_store(RAW, SECRET.encode()), now=lambda: NOW)
    headers = {"X-API-Key": RAW["alice"]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as c:
        first = [asyncio.create_task(c.get("/v0/rates", headers=headers)) for _ in range(34)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        held = await c.get("/v0/rates", headers=headers)
        took = time.monotonic() - started
        assert [r.status_code for r in await asyncio.gather(*first)] == [200] * 34
    assert held.status_code == 200  # the share waived after the wait
    # ~0.8 s expected; the 2 s bound (what it waited before) plus its own 0.3 s would be 2.3.
    assert took < 1.6, f"held {took:.2f} s: woke only at its 2 s bound, not 250 ms after the key's last end"
