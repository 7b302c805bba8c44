"""A small Cryptofuse-like API behind the meter, for the demo, the tests and the benchmark.

Routes: ``GET /v0/payments``, ``GET /v0/payments/{payment_id}``, ``POST /v0/payments``,
``GET /v0/rates`` (metered), ``GET /health`` (public: up and ready, nothing else) and
``GET /health/details`` (the caches' and reporter's state, behind ``METER_NODE_HEALTH_TOKEN``;
neither is metered). Demo keys are derived from a seed, so nodes and the load generator agree
on them without any key written in code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from common.listen import listening_socket
from node.decision_cache import DecisionCache
from node.guard import LocalGuard
from node.keys import InMemoryKeyStore, KeyIdDeriver, KeyStore
from node.middleware import MeterMiddleware, RouteScope, starlette_route_resolver
from node.reporter import UsageReporter
from node.settings import NodeSettings

log = logging.getLogger(__name__)

READ_PAYMENTS = "payments:read"
WRITE_PAYMENTS = "payments:write"
READ_RATES = "rates:read"
ALL_SCOPES = frozenset({READ_PAYMENTS, WRITE_PAYMENTS, READ_RATES})

# First match wins: the POST rule must precede the general payments rule. A statement is an
# expensive export: it spends 10 of the key's limits and counts against the "statements" route
# limit (METER_ROUTE_LIMITS='{"statements": {"per_minute": 5}}'; none by default).
STATEMENT_COST = 10
ROUTE_SCOPES = (
    RouteScope("/v0/payments/statement", READ_PAYMENTS, cost=STATEMENT_COST, route="statements"),
    RouteScope("/v0/payments", WRITE_PAYMENTS, frozenset({"POST"})),
    RouteScope("/v0/payments", READ_PAYMENTS),
    RouteScope("/v0/rates", READ_RATES),
)


@dataclass(frozen=True, slots=True)
class DemoKeySpec:
    account_id: str
    scopes: frozenset[str] = ALL_SCOPES
    active: bool = True


DEMO_KEY_SPECS: dict[str, DemoKeySpec] = {
    "alice": DemoKeySpec("acct-alice"),
    "bob": DemoKeySpec("acct-bob"),
    "carol": DemoKeySpec("acct-carol"),
    "dave": DemoKeySpec("acct-dave"),
    "reader": DemoKeySpec("acct-alice", frozenset({READ_PAYMENTS, READ_RATES})),  # POST -> 403
    "revoked": DemoKeySpec("acct-bob", active=False),  # -> 401
}


def demo_keys(seed: str, extra: int = 0) -> dict[str, str]:
    """Deterministic raw demo keys (name -> key) from a shared seed; the seed is the secret.

    ``extra`` adds full-scope keys ``k0000``, ``k0001``, ... (each its own account), for load
    tests that need a fresh key per scenario."""
    if not seed:
        raise ValueError("demo key seed is empty")
    keys: dict[str, str] = {}
    for name in [*DEMO_KEY_SPECS, *(f"k{i:04d}" for i in range(extra))]:
        token = hmac.new(seed.encode(), f"demo-key:{name}".encode(), hashlib.sha256).hexdigest()[:32]
        keys[name] = f"cf_{name}_{token}"
    return keys


def demo_key_store(raw_keys: Mapping[str, str], secret: bytes) -> InMemoryKeyStore:
    """Key store of the demo keys; names without a spec get a full-scope key of their own account."""
    derive = KeyIdDeriver(secret)
    store = InMemoryKeyStore()
    for name, raw in raw_keys.items():
        spec = DEMO_KEY_SPECS.get(name, DemoKeySpec(f"acct-{name}"))
        store.add_raw(raw, derive, account_id=spec.account_id, scopes=spec.scopes, active=spec.active, name=name)
    return store


# -- the API itself ---------------------------------------------------------------------

_RATES = {"BTC-USD": "97250.10", "ETH-USD": "3612.45", "USDT-USD": "1.0001"}


async def list_payments(request: Request) -> JSONResponse:
    account = request.state.account_id
    items = [
        {"id": f"pay_{i:04d}", "account_id": account, "amount": str(10 * i), "currency": "USDT"} for i in range(1, 4)
    ]
    return JSONResponse({"data": items, "has_more": False})


async def get_payment(request: Request) -> JSONResponse:
    payment_id = request.path_params["payment_id"]
    return JSONResponse({"id": payment_id, "account_id": request.state.account_id, "status": "confirmed"})


async def create_payment(request: Request) -> JSONResponse:
    try:
        body: Any = json.loads(await request.body() or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return JSONResponse(
            {"error": "invalid_body", "message": "Body must be a JSON object.", "request_id": request.state.request_id},
            status_code=400,
        )
    payment = {
        "id": f"pay_{request.state.request_id[:12]}",
        "account_id": request.state.account_id,
        "amount": str(body.get("amount", "0")),
        "currency": str(body.get("currency", "USDT")),
        "status": "pending",
    }
    return JSONResponse(payment, status_code=201)


async def get_statement(request: Request) -> JSONResponse:
    account = request.state.account_id
    return JSONResponse({"account_id": account, "period": "current-month", "payments": 3, "total": "60"})


async def get_rates(request: Request) -> JSONResponse:
    return JSONResponse({"data": _RATES})


class ServingTime:
    """Calls of the API (``/v0/``) take ``seconds`` to serve, like a real API's handlers
    (``METER_DEMO_SERVING_MS``), or a time drawn evenly up to ``longest`` (``..._MAX_MS``);
    behind the meter, so the meter sees requests in flight."""

    def __init__(
        self,
        app: ASGIApp,
        seconds: float,
        longest: float | None = None,
        draw: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.app = app
        self.seconds = seconds
        self.longest = longest
        self.draw = draw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v0/"):
            took = self.seconds if self.longest is None else self.draw(self.seconds, self.longest)
            await asyncio.sleep(took)
        await self.app(scope, receive, send)


# long: the demo API's routes, health and lifespan in one place
def build_node_app(
    settings: NodeSettings,
    keys: KeyStore,
    *,
    reporter: UsageReporter | None = None,
    cache: DecisionCache | None = None,
    fail_open: bool = True,
    ready_timeout_s: float = 10.0,
    now: Callable[[], datetime] | None = None,
) -> Starlette:
    """The demo API behind the meter. Its lifespan starts and stops the reporter and the cache."""
    reporter = reporter or UsageReporter(
        settings, max_buffer=settings.node_buffer_max, linger_ms=settings.node_report_linger_ms
    )
    if cache is None:
        guard = LocalGuard(
            settings.policy_book(),
            settings.node_id,
            settings.node_guard_max_keys,
            settings.node_burst_share,
        )
        cache = DecisionCache(settings, guard=guard, now=now) if now else DecisionCache(settings, guard=guard)

    async def health(request: Request) -> JSONResponse:
        # Not ready until the block table is bootstrapped: a load balancer must not send
        # traffic that this node could not yet limit. Nothing more in public: fail-open and
        # the brokers' addresses in errors tell an attacker when and where to push.
        ready = cache.state().ready
        return JSONResponse({"status": "ok" if ready else "starting"}, status_code=200 if ready else 503)

    async def health_details(request: Request) -> JSONResponse:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        token = settings.node_health_token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token):
            return JSONResponse(
                {
                    "error": "unauthorized",
                    "message": "Send the node's health token as 'Authorization: Bearer <token>'.",
                    "request_id": request.state.request_id,
                },
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        cache_state = cache.state()
        reporter_state = reporter.state()
        if not cache_state.ready:
            status = "starting"
        elif cache_state.available and reporter_state.connected:
            status = "ok"
        else:
            status = "degraded"  # serving (fail-open or from memory) but the meter is not reachable
        body = {
            "status": status,
            "node_id": settings.node_id,
            "fail_open": fail_open,
            "cache": asdict(cache_state),
            "reporter": asdict(reporter_state),
        }
        if cache.guard is not None:
            body["guard"] = {
                "keys": len(cache.guard),
                "forgotten": cache.guard.forgotten,
                "allowances_applied": cache.guard.allowances_applied,
                "shadow_refusals": cache.guard.shadow_refusals,
            }
        return JSONResponse(body, status_code=200 if cache_state.ready else 503)

    routes = [
        Route("/v0/payments", list_payments, methods=["GET"]),
        Route("/v0/payments", create_payment, methods=["POST"]),
        Route("/v0/payments/statement", get_statement, methods=["GET"]),
        Route("/v0/payments/{payment_id}", get_payment, methods=["GET"]),
        Route("/v0/rates", get_rates, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    if settings.node_health_token.get_secret_value():  # no token: no details route at all
        routes.append(Route("/health/details", health_details, methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await reporter.start()
        await cache.start()
        if not await cache.wait_ready(ready_timeout_s):
            log.warning(
                "node %s: decision cache not ready after %.0fs; serving %s",
                settings.node_id,
                ready_timeout_s,
                "fail-open" if fail_open else "503 until it is",
            )
        try:
            yield
        finally:
            await cache.stop()
            await reporter.stop()

    longest = settings.demo_serving_max_ms / 1000.0 if settings.demo_serving_max_ms is not None else None
    serving = bool(settings.demo_serving_ms or settings.demo_serving_max_ms)
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(
                MeterMiddleware,
                settings=settings,
                keys=keys,
                reporter=reporter,
                cache=cache,
                guard=cache.guard,
                route_scopes=ROUTE_SCOPES,
                fail_open=fail_open,
                burst_wait_s=settings.node_burst_wait_ms / 1000.0,
                route_resolver=starlette_route_resolver(routes),
                now=now,
            ),
            *([Middleware(ServingTime, seconds=settings.demo_serving_ms / 1000.0, longest=longest)] if serving else []),
        ],
    )
    app.state.reporter = reporter
    app.state.cache = cache
    app.state.keys = keys
    return app


async def run_node(
    settings: NodeSettings,
    port: int,
    *,
    keys: KeyStore | None = None,
    demo_seed: str | None = None,
    extra_keys: int = 0,
    host: str = "127.0.0.1",
    fail_open: bool | None = None,
) -> None:
    """Serve the demo API with uvicorn until cancelled (a cancel is a graceful shutdown).

    Keys come from ``keys`` or, for the demo, from ``demo_keys(demo_seed)``.
    """
    if keys is None:
        if not demo_seed:
            raise ValueError("run_node needs a key store or a demo seed")
        keys = demo_key_store(demo_keys(demo_seed, extra_keys), settings.node_secret.get_secret_value().encode())
    app = build_node_app(settings, keys, fail_open=settings.node_fail_open if fail_open is None else fail_open)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        access_log=False,  # every request is already an event; the meter is the access log
        # The middleware reads X-Forwarded-For from METER_NODE_TRUSTED_PROXIES only; uvicorn's
        # own handling would believe it from loopback (its default) before the middleware runs.
        proxy_headers=False,
        log_level=settings.log_level.lower(),
    )
    server = uvicorn.Server(config)
    sock = listening_socket(host, port)  # a port in use is one error here, not uvicorn's exit
    serving = asyncio.create_task(server.serve(sockets=[sock]), name=f"node-{settings.node_id}")
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        # Cancelling the caller means "shut down": let uvicorn run the lifespan shutdown so the
        # reporter flushes, instead of abandoning its tasks mid-flight.
        server.should_exit = True
        await serving
        raise
