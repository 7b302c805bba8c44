"""ASGI middleware that authenticates, enforces and reports every request of an API node.

Pure ASGI (no BaseHTTPMiddleware), so it works under Starlette, FastAPI or any ASGI server
and adds one short pass per request: header lookup, one HMAC, a few dict lookups. The order of
checks is 401 (missing / invalid key) -> 403 (permission) -> 429 (blocked by a decision) ->
503 (meter not available and fail-closed) -> 429 (this node's guard: the key's limit reached
here, or this node's allowance used up). Every request, allowed or not, is reported as one
event carrying this node's own counts of the key; the raw key never reaches an event, a log
line, a response or the wrapped app. Every 429 names the window, the limit, the count and the
decision or allowance (version) that refused it.

Security: permissions are matched on the path the router routes on (relative to ``root_path``,
so a mount prefix cannot hide a route from its rule) and a route no rule covers is refused
unless declared public; events name the route template, or ``UNMATCHED_ENDPOINT``, never a raw
path; ``X-Forwarded-For`` is believed only from ``node_trusted_proxies``; a websocket is refused
unless its path is exempt (a connection is neither authenticated nor metered here).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError
from starlette.routing import BaseRoute, Match

from common.log_throttle import LogThrottle
from node.decision_cache import Block
from node.guard import Headroom, LocalGuard, Refusal, RefusedBy
from node.in_flight import InFlight, Serving
from node.keys import KeyIdDeriver, KeyRecord, KeyStore, is_well_formed
from node.settings import NodeSettings
from schemas.decisions import WINDOW_SECONDS, Window, window_seconds
from schemas.events import MAX_BYTES_OUT, MAX_COST, MAX_LATENCY_MS, RequestEvent, make_event
from schemas.limits import ROUTE_NAME_PATTERN, route_subject, split_subject

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RouteResolver = Callable[[Scope], str | None]

ANONYMOUS_KEY_ID = "anonymous"
# Unknown or malformed keys are reported under one of 256 bucket ids ("invalid-00".."invalid-ff",
# from their keyed hash): a spray of made-up keys cannot create a counter and a rollup series
# per guess, yet "one client tried many different keys" stays visible to the abuse signals.
INVALID_KEY_PREFIX = "invalid-"
_KEY_HEADER = b"x-api-key"
_FORWARDED_HEADER = b"x-forwarded-for"
_MAX_ENDPOINT = 256
_ROUTE_NAME = re.compile(ROUTE_NAME_PATTERN)
# What a request no route matched (404s, denials of made-up paths) is recorded under: raw paths
# would make a rollup row per unique path, kept for years, and some carry tokens.
UNMATCHED_ENDPOINT = "/{unmatched}"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UsageSink(Protocol):
    """Where events go (``UsageReporter`` or a test fake); must not block or raise."""

    def report(self, event: RequestEvent) -> None: ...


class BlockChecker(Protocol):
    """What the middleware needs of the decision cache."""

    def check(self, key_id: str) -> Block | None: ...

    @property
    def available(self) -> bool: ...

    def now(self) -> datetime: ...

    async def wait_change(self, timeout_s: float) -> None: ...


@dataclass(frozen=True, slots=True)
class RouteScope:
    """Requests under ``prefix`` (and of ``methods``, if given) need ``scope`` on the key;
    ``scope=None`` declares the prefix public: any valid key may call it.

    The node's route configuration: ``cost`` is what a served request spends of its key's
    limits (an expensive route more than a cheap one); ``route`` names the route limit its
    requests also count against (limits per key x route: ``METER_ROUTE_LIMITS`` and overrides)."""

    prefix: str
    scope: str | None
    methods: frozenset[str] | None = None
    cost: int = 1
    route: str | None = None

    def __post_init__(self) -> None:
        # The event contract's bounds (a served request's cost: 0 is a refusal's), checked at start-up.
        if not 1 <= self.cost <= MAX_COST:
            raise ValueError(f"route {self.prefix}: cost {self.cost} is not within 1..{MAX_COST}")
        if self.route is not None and not _ROUTE_NAME.fullmatch(self.route):
            raise ValueError(f"route {self.prefix}: route name {self.route!r} must match {_ROUTE_NAME.pattern}")

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        base = self.prefix.rstrip("/")
        return path == base or path.startswith(base + "/") or (base == "" and path.startswith("/"))


@dataclass(frozen=True, slots=True)
class _Denial:
    status: int
    error: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    details: tuple[tuple[str, object], ...] = ()  # extra fields of the JSON body
    shadow: bool = False  # from a shadow policy: not sent, the request is served and counted
    spends: bool = True  # False: refused before the limits were checked; its event costs 0


def route_path(scope: Scope) -> str:
    """The path relative to ``root_path`` (a ``Mount`` prefix or ``--root-path``), as routers
    match it; ASGI servers put the root path in ``path`` too, older ones did not."""
    path: str = scope["path"]
    root = scope.get("root_path") or ""
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


_REFUSED_LOG_INTERVAL_S = 10.0


def client_ip(scope: Scope, trusted: Sequence[IPNetwork]) -> str | None:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the nearest
    ``X-Forwarded-For`` hop (from the right) that is not one, since a client may write anything
    to the left. None when unknown or a hop is not an address."""
    client = scope.get("client")
    ip = _ip(client[0]) if isinstance(client, (tuple, list)) and client else None
    if ip is None or not trusted:
        return str(ip) if ip is not None else None
    headers = scope.get("headers", ())
    hops = [h for k, v in headers if k == _FORWARDED_HEADER for h in bytes(v).split(b",") if h.strip()]
    while hops and any(ip in net for net in trusted):
        ip = _ip(hops.pop().strip().decode("latin-1"))
        if ip is None:
            return None
    return str(ip)


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            # fe80::1%eth0: the zone names an interface of the receiving host, not the client
            # (and a long one would make the event refused by the contract).
            ip = ipaddress.IPv6Address(text.partition("%")[0])
        return ip.ipv4_mapped or ip
    return ip


def starlette_route_resolver(routes: Sequence[BaseRoute]) -> RouteResolver:
    """Templated path (``/v0/payments/{payment_id}``) of a request the app never saw (denied)."""

    def resolve(scope: Scope) -> str | None:
        for route in routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                path = getattr(route, "path", None)
                return path if isinstance(path, str) else None
        return None

    return resolve


class MeterMiddleware:
    """``Middleware(MeterMiddleware, settings=..., keys=..., reporter=..., cache=...)``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: NodeSettings,
        keys: KeyStore,
        reporter: UsageSink,
        cache: BlockChecker,
        guard: LocalGuard | None = None,
        route_scopes: Sequence[RouteScope] = (),
        fail_open: bool = True,
        burst_wait_s: float = 0.25,
        exempt_paths: Collection[str] = ("/health", "/health/details"),
        route_resolver: RouteResolver | None = None,
        now: Callable[[], datetime] | None = None,
        open_block_retry_after_s: int = 60,
        strip_key_header: bool = True,
    ) -> None:
        self.app = app
        self._derive = KeyIdDeriver(settings.node_secret.get_secret_value().encode())
        self._node_id = settings.node_id
        self._keys = keys
        self._reporter = reporter
        self._cache = cache
        self._guard = guard
        self._refused_fields: set[str] = set()  # see _warn_refused_fields
        self._in_flight = InFlight()
        self._refused_log = LogThrottle(_REFUSED_LOG_INTERVAL_S)
        self._route_scopes = (*route_scopes, *(RouteScope(p, None) for p in settings.node_public_routes))
        self._trusted: tuple[IPNetwork, ...] = tuple(settings.node_trusted_proxies)
        self._fail_open = fail_open
        self._burst_wait_s = burst_wait_s
        self._exempt = frozenset(exempt_paths)
        self._resolve = route_resolver
        # One clock for event time and Retry-After, by default the cache's, so that the
        # seconds announced match the moment the cache stops enforcing.
        self._now = now or cache.now
        self._open_block_retry_after_s = open_block_retry_after_s
        self._strip_key_header = strip_key_header

    # long: the request path in its order (auth, scope, limits, the app, the event): split, the order hides
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._not_a_request(scope, receive, send)
            return
        # Our own id, never the client's: the worker dedups on it, so a client must not be
        # able to make its requests collide.
        request_id = uuid.uuid4().hex
        rid_header = (b"x-request-id", request_id.encode())
        path = route_path(scope)
        if path in self._exempt:
            state = {**(scope.get("state") or {}), "request_id": request_id}
            await self.app({**self._without_key(scope), "state": state}, receive, _adding_header(send, rid_header))
            return

        started = time.perf_counter()
        ts = self._now()
        method: str = scope.get("method", "GET")
        raw_key = _header(scope, _KEY_HEADER)

        key_id = ANONYMOUS_KEY_ID
        record: KeyRecord | None = None
        rule: RouteScope | None = None
        denial: _Denial | None
        epoch = ts.timestamp()
        if raw_key is None or not raw_key.strip():
            denial = _Denial(401, "missing_api_key", "Missing API key: send it in the X-API-Key header.")
        else:
            key_id = self._derive(raw_key)
            rule = self._rule(method, path)
            record, denial = self._authorize(raw_key, key_id, rule, ts, epoch)
            if (denial is None or denial.shadow) and record is not None and self._guard is not None:
                admitted = await self._admit(self._guard, key_id, record.account_id, ts, epoch, rule)
                if admitted is not None and (denial is None or not admitted.shadow):
                    denial = admitted
            if record is None:
                key_id = INVALID_KEY_PREFIX + key_id[-2:]
        del raw_key  # nothing below needs it

        status = 500
        bytes_out = 0
        extra_headers = [rid_header]
        if denial is not None and denial.shadow:  # a dry run: served, and counted as refused
            if self._guard is not None:
                self._guard.shadow_refusals += 1
            extra_headers.append((b"x-ratelimit-shadow", _shadow_note(denial)))
            denial = None
        if denial is None and record is not None and self._guard is not None:
            room = self._headroom(self._guard, key_id, rule, epoch)
            if room is not None:
                extra_headers += _ratelimit_headers(room)

        async def send_tracked(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra_headers]
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        # Only a served request spends its route's cost and counts against its route limit.
        served = rule if denial is None and record is not None else None
        cost = served.cost if served is not None else 1 if denial is None or denial.spends else 0
        # Admitted and counted by the guard, not reported until it ends: what its event's
        # node_in_flight tells the worker about the requests of the key still being served.
        serving = self._in_flight.start(key_id, cost, epoch) if denial is None and record is not None else None
        inner = scope
        try:
            if denial is not None:
                log.debug("request %s denied %d %s for key %s", request_id, denial.status, denial.error, key_id)
                await _send_error(send_tracked, denial, request_id)
            else:
                inner = self._inner_scope(scope, request_id, key_id, record)
                await self.app(inner, receive, send_tracked)
        finally:
            node_counts, node_in_flight = self._node_counts(key_id, epoch, record, serving)
            self._report(
                request_id=request_id,
                key_id=key_id,
                account_id=record.account_id if record else None,
                method=method,
                endpoint=self._endpoint(inner, scope),
                status=status,
                ts=ts,
                latency_ms=min((time.perf_counter() - started) * 1000.0, MAX_LATENCY_MS),
                client_ip=client_ip(scope, self._trusted),
                bytes_out=min(bytes_out, MAX_BYTES_OUT),
                node_counts=node_counts,
                node_in_flight=node_in_flight,
                cost=cost,
                route=served.route if served is not None else None,
            )

    def _node_counts(
        self, key_id: str, epoch: float, record: KeyRecord | None, serving: Serving | None
    ) -> tuple[list[int] | None, int | None]:
        """What a request's event says of the node's own counts of its key as it ends: the counts
        (this request included) and what of them is still being served, this request no longer."""
        if serving is not None:
            self._in_flight.end(serving)
        if self._guard is None or record is None:
            return None, None
        counts = self._guard.counts(key_id, epoch)
        return counts, (self._in_flight.of(key_id, epoch) if counts is not None else None)

    def _authorize(
        self, raw_key: str, key_id: str, rule: RouteScope | None, now: datetime, epoch: float
    ) -> tuple[KeyRecord | None, _Denial | None]:
        invalid = _Denial(401, "invalid_api_key", "Invalid API key: it is unknown, malformed or revoked.")
        if not is_well_formed(raw_key):
            return None, invalid
        record = self._keys.lookup(key_id)
        if record is None:
            return None, invalid
        if not record.active:
            return record, invalid  # a revoked key still in use is worth seeing under its own id
        if rule is None or not record.allows(rule.scope):
            if self._guard is not None:  # the worker counts it against the key: so does the node
                self._guard.record(key_id, record.account_id, epoch)
            # The path is not echoed: callers sometimes paste secrets into URLs.
            if rule is None:  # fail closed: a route added without a rule is not open to every key
                return record, _Denial(403, "forbidden", "This route is not open to API keys.")
            return record, _Denial(
                403, "forbidden", f"This API key lacks the '{rule.scope}' permission this route requires."
            )
        block = self._block(key_id, rule)
        if block is not None and not block.shadow:
            return record, self._rate_limited(block, now)
        if not self._fail_open and not self._cache.available:
            return record, _Denial(
                503,
                "meter_unavailable",
                "Usage limits cannot be checked right now; retry shortly.",
                ((b"retry-after", b"5"),),
                # A client retrying through an outage must not find itself blocked once the
                # meter is back: the node's guard does not count these refusals, nor does the worker.
                spends=False,
            )
        return record, self._rate_limited(block, now) if block is not None else None  # shadow: noted only

    @staticmethod
    def _headroom(guard: LocalGuard, key_id: str, rule: RouteScope | None, epoch: float) -> Headroom | None:
        """The key's tightest window, or its route's when that is tighter (``RateLimit-*``)."""
        room = guard.headroom(key_id, epoch)
        if rule is not None and rule.route is not None:
            on_route = guard.headroom(route_subject(key_id, rule.route), epoch)
            if on_route is not None and (room is None or on_route.remaining < room.remaining):
                return on_route
        return room

    def _block(self, key_id: str, rule: RouteScope | None) -> Block | None:
        """The key's block, else (on a route with a route limit) the block of the key on the route."""
        block = self._cache.check(key_id)
        if block is None and rule is not None and rule.route is not None:
            block = self._cache.check(route_subject(key_id, rule.route))
        return block

    async def _admit(
        self, guard: LocalGuard, key_id: str, account: str, ts: datetime, epoch: float, rule: RouteScope | None
    ) -> _Denial | None:
        """The node's guard; a request that must wait for the worker's division is held (no
        remote call: it waits for the node's own follower to apply the next allowance or
        decision) and asked again; after ``burst_wait_s`` (longer while the node serves requests
        of the key: ``InFlight.deadline``) the answer is final."""
        cost, route = (rule.cost, rule.route) if rule is not None else (1, None)
        refusal = guard.admit(key_id, account, epoch, cost=cost, route=route)
        if refusal is not None and refusal.by is RefusedBy.awaiting:
            loop = asyncio.get_running_loop()
            since = loop.time()
            while refusal is not None and refusal.by is RefusedBy.awaiting:
                # The division comes once the worker has heard of the key's requests, which it
                # does as they end: while some are being served, or just were, the wait is longer.
                left = self._in_flight.deadline(key_id, since, self._burst_wait_s, refusal.settling) - loop.time()
                if left <= 0:
                    refusal = guard.admit(key_id, account, epoch, final=True, cost=cost, route=route)
                    waited_ms = (loop.time() - since) * 1e3
                    log.debug("key %s: no division within %.0f ms, final answer %s", key_id, waited_ms, refusal)
                    break
                # Woken by the next allowance or decision, or to read the deadline again: it moves
                # when the key's last request here ends.
                await self._cache.wait_change(min(left, self._burst_wait_s))
                block = self._block(key_id, rule)
                if block is not None and not block.shadow:
                    return self._rate_limited(block, ts)
                refusal = guard.admit(key_id, account, epoch, cost=cost, route=route)
        return _refused(refusal, epoch) if refusal is not None else None

    def _rule(self, method: str, path: str) -> RouteScope | None:
        for rule in self._route_scopes:
            if rule.matches(method, path):
                return rule
        return None

    def _rate_limited(self, block: Block, now: datetime) -> _Denial:
        seconds = block.seconds_left(now) or self._open_block_retry_after_s
        window_s = WINDOW_SECONDS.get(block.window)
        if window_s is not None:
            # A window's block ends with it: never longer, even with this node's clock behind
            # the worker's (within the skew the worker accepts).
            seconds = min(seconds, window_s)
        if block.window is Window.month and block.until is not None:  # Retry-After is to the month end
            window_s = window_seconds(Window.month, block.until.timestamp() - 1)
        headers: list[tuple[bytes, bytes]] = [(b"retry-after", str(seconds).encode())]
        if block.limit is not None:
            headers.append((b"ratelimit-limit", str(block.limit).encode()))
        headers += [(b"ratelimit-remaining", b"0"), (b"ratelimit-reset", str(seconds).encode())]
        route = split_subject(block.key_id)[1]
        details: tuple[tuple[str, object], ...] = (
            ("window", block.window.value),
            ("limit", block.limit),
            ("count", block.count),
            ("refused_by", "decision"),
            ("version", block.version),
            *((("route", route),) if route else ()),
        )
        if block.limit is not None and window_s is not None:
            headers.append((b"ratelimit-policy", f"{block.limit};w={window_s}".encode()))
            message = (
                f"Rate limit exceeded{_on_route(route)}: {block.limit} requests per {block.window.value} "
                f"({block.count} counted; block decision {block.version}). Retry after {seconds} seconds."
            )
        else:
            # Operators' reasons stay in the audit; the client gets a generic message.
            blocked_by = "by abuse protection" if block.source == "guard" else "by an operator"
            message = f"API key blocked {blocked_by}. Retry after {seconds} seconds."
        return _Denial(429, "rate_limited", message, tuple(headers), details, shadow=block.shadow)

    def _inner_scope(self, scope: Scope, request_id: str, key_id: str, record: KeyRecord | None) -> Scope:
        """The scope the app sees: the key header removed (nothing downstream can log it) and the
        request id / key id / account in ``request.state``."""
        inner = self._without_key(scope)
        state = dict(scope.get("state") or {})
        state.update(request_id=request_id, key_id=key_id, account_id=record.account_id if record else None)
        inner["state"] = state
        return inner

    async def _not_a_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Lifespan and the like go through (without the key header); a websocket is refused
        unless its path is exempt: a connection is not a request, nothing here authenticates
        or meters it, and it must not get through unauthenticated."""
        if scope["type"] == "websocket" and route_path(scope) not in self._exempt:
            await send({"type": "websocket.close", "code": 1008, "reason": "websocket routes are not metered"})
            return
        await self.app(self._without_key(scope), receive, send)

    def _without_key(self, scope: Scope) -> Scope:
        """``scope`` without the key header (unless configured to keep it): for every scope the
        app sees, exempt paths included, so nothing downstream can log the key."""
        if not self._strip_key_header or "headers" not in scope:
            return dict(scope)
        return {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != _KEY_HEADER]}

    def _endpoint(self, scope: Scope, outer: Scope) -> str:
        # A route already in the scope before the app ran is a Mount above us, not our route.
        route = scope.get("route")
        template = getattr(route, "path", None) if route is not outer.get("route") else None
        if not isinstance(template, str) and self._resolve is not None:
            template = self._resolve(scope)
        endpoint = template if isinstance(template, str) and template else UNMATCHED_ENDPOINT
        if not endpoint.startswith("/"):
            endpoint = "/" + endpoint
        return endpoint[:_MAX_ENDPOINT]

    def _report(
        self,
        *,
        request_id: str,
        key_id: str,
        account_id: str | None,
        method: str,
        endpoint: str,
        status: int,
        ts: datetime,
        latency_ms: float,
        client_ip: str | None,
        bytes_out: int,
        node_counts: list[int] | None,
        node_in_flight: int | None,
        cost: int,
        route: str | None,
    ) -> None:
        counted: dict[str, Any] = {
            "request_id": request_id,
            "key_id": key_id,
            "node_id": self._node_id,
            "method": method[:16] or "GET",
            "endpoint": endpoint,
            "status": status,
            "ts": ts,
            "latency_ms": latency_ms,
            "bytes_out": bytes_out,
            "cost": cost,
            "route": route,
        }
        described = {
            "account_id": account_id,
            "client_ip": client_ip,
            "node_counts": node_counts,
            "node_in_flight": node_in_flight,
        }
        try:
            try:
                event = make_event(**counted, **described)
            except ValidationError as exc:
                refused = {str(e["loc"][0]) for e in exc.errors(include_input=False) if e["loc"]}
                if not refused <= described.keys():
                    raise
                # A describing field the contract refuses (an account id a key store made too
                # long, an odd client address) must not un-meter the request: counted without it.
                self._refused_fields.update(refused)
                self._warn_refused_fields()
                event = make_event(**counted, **{k: v for k, v in described.items() if k not in refused})
            self._reporter.report(event)
        except ValidationError as exc:  # a counted field: a bug of this node; no input in the log
            log.error("request %s: usage event not reported: %s", request_id, exc.errors(include_input=False))
        except Exception:  # reporting must never fail a request
            log.exception("request %s: usage event not reported", request_id)

    def _warn_refused_fields(self) -> None:
        """One warning per ``_REFUSED_LOG_INTERVAL_S`` at most: a key store's bad account id
        would otherwise log once per request of its keys."""
        events = self._refused_log.tick()
        if events is not None:
            log.warning(
                "%d event(s) reported without their %s (refused by the event contract) since the last warning",
                events,
                ", ".join(sorted(self._refused_fields)),
            )
            self._refused_fields.clear()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _adding_header(send: Send, header: tuple[bytes, bytes]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return wrapped


def _ratelimit_headers(room: Headroom) -> list[tuple[bytes, bytes]]:
    return [
        (b"ratelimit-limit", str(room.limit).encode()),
        (b"ratelimit-remaining", str(room.remaining).encode()),
        (b"ratelimit-reset", str(room.reset_s).encode()),
        (b"ratelimit-policy", f"{room.limit};w={room.window_s or WINDOW_SECONDS[room.window]}".encode()),
    ]


def _refused(refusal: Refusal, now: float) -> _Denial:
    window_s = window_seconds(refusal.window, refusal.until - 1)
    # Never past the window's length: this node's clock may have stepped back since it counted.
    seconds = min(window_s, max(1, int(refusal.until - now + 0.999)))
    window = refusal.window.value
    if refusal.version is None:
        message = (
            f"Rate limit exceeded{_on_route(refusal.route)}: {refusal.limit} requests per {window} reached. "
            f"Retry after {seconds} seconds."
        )
    else:
        message = (
            f"Rate limit exceeded: the key has made {refusal.count} of {refusal.limit} requests this {window} "
            f"across the cluster and this node has used its allowance ({refusal.cap}, allowance "
            f"{refusal.version}). Retry after {seconds} seconds."
        )
    headers = (
        (b"retry-after", str(seconds).encode()),
        (b"ratelimit-limit", str(refusal.limit).encode()),
        (b"ratelimit-remaining", b"0"),
        (b"ratelimit-reset", str(seconds).encode()),
        (b"ratelimit-policy", f"{refusal.limit};w={window_s}".encode()),
    )
    details: tuple[tuple[str, object], ...] = (
        ("window", window),
        ("limit", refusal.limit),
        ("count", refusal.count),
        ("refused_by", refusal.by.value),
        ("version", refusal.version),
        *((("route", refusal.route),) if refusal.route else ()),
    )
    return _Denial(429, "rate_limited", message, headers, details, shadow=refusal.shadow)


def _on_route(route: str | None) -> str:
    """Names the route limit that refused (the key's own limits say nothing more)."""
    return f" on route '{route}'" if route else ""


def _shadow_note(denial: _Denial) -> bytes:
    """What a shadow policy would have answered, for the client and the operator to see."""
    fields = dict(denial.details)
    return f"would-refuse; window={fields.get('window')}; limit={fields.get('limit')}".encode()


async def _send_error(send: Send, denial: _Denial, request_id: str) -> None:
    body = json.dumps(
        {"error": denial.error, "message": denial.message, "request_id": request_id, **dict(denial.details)}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *denial.headers,
    ]
    await send({"type": "http.response.start", "status": denial.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
