"""The HTTP query API (``/v1/...``, OpenAPI at ``/openapi.json``) and the dashboard page.

Every ``/v1`` route needs the admin key in ``X-API-Key``; errors are always
``{"error", "message", "request_id"}`` like the metered API's. The dashboard page itself
holds no data: its script asks for the admin key once, keeps it in ``sessionStorage``
(gone when the tab closes, never in a URL or a cookie) and sends it on each fetch.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

from clickhouse_connect.driver.client import Client
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, AwareDatetime
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.analytics import (
    BacktestRequest,
    BacktestResult,
    BlockedKey,
    Breakdown,
    KeyState,
    SignalKind,
    SignalReport,
    Subject,
    TopDimension,
    TopList,
    TopMetric,
    UsageSeries,
)
from schemas.limits import LimitPolicy, PolicyBook
from schemas.usage import Granularity
from worker.analytics import backtest, queries, signals
from worker.analytics.throttle import LoginThrottle, client_key
from worker.cli_args import EARLIEST, LATEST, parse_duration
from worker.refusals import OutOfRange, QueryRefused
from worker.settings import Settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_WINDOW = timedelta(days=93)
_WINDOW_PATTERN = r"^[1-9][0-9]{0,3}[mhd]$"
_ERROR_CODES = {
    400: "bad_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}
# Applied to every response: the dashboard loads only its own files, nothing inline.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

# Module level: FastAPI resolves the (string) annotations of the routes from module globals.
_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the admin API key")

T = TypeVar("T")
PolicyLookup = Callable[[str, str], LimitPolicy]  # (key_id, account_id) -> limits

KeyIdPath = Annotated[str, PathParam(min_length=1, max_length=64, description="key id (never the raw key)")]
AccountPath = Annotated[str, PathParam(min_length=1, max_length=64)]


def _storable(value: datetime | None) -> datetime | None:
    """ClickHouse DateTime cannot hold the rest: a 422 here, not a 500 from the store."""
    if value is not None and not (EARLIEST <= value < LATEST):
        raise ValueError("time must be between 1970-01-01T00:00:00Z and 2106-02-07T00:00:00Z")
    return value


StorableTime = Annotated[AwareDatetime | None, AfterValidator(_storable)]
Since = Annotated[StorableTime, Query(description="RFC 3339 start, with offset (default: one span back)")]
Until = Annotated[StorableTime, Query(description="RFC 3339 end, exclusive (default: now)")]
TopGroups = Annotated[
    int,
    Query(
        ge=1,
        le=queries.MAX_SERIES_GROUPS,
        description="with a breakdown: this many biggest groups, the rest summed into one 'other' group",
    ),
]
WindowParam = Annotated[
    str | None,
    Query(pattern=_WINDOW_PATTERN, description="a span ending now, e.g. 15m, 1h, 24h, 7d (instead of since/until)"),
]


def settings_limits(settings: Settings) -> PolicyLookup:
    """Every key gets the settings' limits: what a caller that follows no overrides passes (the
    worker and ``meter serve-api`` pass their live book's ``resolve``)."""
    policy = settings.default_policy()
    return lambda _key_id, _account_id: policy


def book_of(settings: Settings, policy_for: PolicyLookup | None) -> PolicyBook:
    """The book behind ``policy_for`` when it is a book's ``resolve`` (as the worker and ``meter
    serve-api`` pass it: followed live), else the settings' default without overrides."""
    owner = getattr(policy_for, "__self__", None)
    return owner if isinstance(owner, PolicyBook) else PolicyBook(settings.default_policy())


def error_body(status: int, message: str, request_id: str, error: str | None = None) -> dict[str, str]:
    return {"error": error or _ERROR_CODES.get(status, "error"), "message": message, "request_id": request_id}


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


def build_query_app(
    settings: Settings,
    client: Client,
    policy_for: PolicyLookup | None = None,
    now: Callable[[], datetime] | None = None,
    policy_book: PolicyBook | None = None,
) -> FastAPI:
    """The query API and dashboard as an ASGI app over an open ClickHouse ``client``.

    ``policy_for(key_id, account_id)`` gives a key's limits (default: the settings' limits);
    ``policy_book``: the policies in force the backtest compares with (default: the book whose
    ``resolve`` is ``policy_for``, else the settings' limits); ``now`` is the clock (tests pin it).
    """
    database = settings.clickhouse_database
    admin_key = settings.admin_api_key.get_secret_value().encode()
    lookup = policy_for or settings_limits(settings)
    book = policy_book if policy_book is not None else book_of(settings, policy_for)
    clock = now or (lambda: datetime.now(UTC))
    # One client is not safe to share between threads (and chDB is one engine per process).
    lock = threading.Lock()

    app = FastAPI(
        title="Usage meter query API",
        version="1",
        description="Usage analytics and abuse investigation over the usage meter's rollups. "
        "Every /v1 route needs the admin key in the X-API-Key header.",
        docs_url=None,  # Swagger UI loads its assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )

    throttle = LoginThrottle(settings.admin_login_burst, settings.admin_login_refill_per_minute / 60)

    async def require_admin(request: Request, api_key: Annotated[str | None, Security(_KEY_HEADER)]) -> None:
        """The admin key, or 401; a client with too many 401s gets 429 before its key is even looked at."""
        if not admin_key:
            raise HTTPException(403, "The query API is disabled: no admin key is configured (METER_ADMIN_API_KEY).")
        client, now = client_key(request.client.host if request.client else None), time.monotonic()
        wait = throttle.retry_after(client, now)
        if wait > 0:
            seconds = math.ceil(wait)
            raise HTTPException(
                429,
                f"Too many failed logins from your address; retry in {seconds} s.",
                headers={"Retry-After": str(seconds)},
            )
        if not api_key:
            throttle.failed(client, now)
            raise HTTPException(401, "Missing API key: send the admin key in the X-API-Key header.")
        if not hmac.compare_digest(api_key.encode(), admin_key):
            throttle.failed(client, now)
            if throttle.retry_after(client, now) > 0:
                log.warning("query API: %s throttled after repeated invalid admin keys", client)
            raise HTTPException(401, "Invalid API key.")

    def run(query: Callable[[], T]) -> T:
        """Run one query under the client lock: a time the store cannot hold (``OutOfRange``)
        becomes a 422, any other refused question (``QueryRefused``) a 400; anything else is a
        bug and stays a 500."""
        try:
            with lock:
                return query()
        except OutOfRange as exc:
            raise HTTPException(422, str(exc)) from None
        except QueryRefused as exc:
            raise HTTPException(400, str(exc)) from None

    def window_of(
        window: str | None, since: datetime | None, until: datetime | None, default: str
    ) -> tuple[datetime, datetime]:
        if window is not None and (since is not None or until is not None):
            raise HTTPException(400, "Give either window or since/until, not both.")
        end = until or clock()
        start = since or end - parse_duration(window or default)
        if start >= end:
            raise HTTPException(400, f"since ({start.isoformat()}) must be before until ({end.isoformat()}).")
        if end - start > MAX_WINDOW:
            raise HTTPException(400, f"The window may span at most {MAX_WINDOW.days} days.")
        return start, end

    @app.middleware("http")
    async def request_ids(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.request_id = uuid.uuid4().hex
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = "missing_api_key" if exc.status_code == 401 and str(exc.detail).startswith("Missing") else None
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), _request_id(request), error),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_input(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "header"))
            problems.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return JSONResponse(error_body(422, "; ".join(problems), _request_id(request)), status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = _request_id(request)
        log.exception("query API request %s failed", rid)
        return JSONResponse(error_body(500, "Internal error; see the server log.", rid), status_code=500)

    v1: list[Any] = [Depends(require_admin)]

    @app.get("/v1/keys/{key_id}/usage", dependencies=v1, tags=["usage"])
    def key_usage(
        key_id: KeyIdPath,
        since: Since = None,
        until: Until = None,
        granularity: Granularity = Granularity.minute,
        breakdown: Breakdown = Breakdown.none,
        top: TopGroups = queries.DEFAULT_SERIES_GROUPS,
    ) -> UsageSeries:
        """Requests of one key per minute / hour / day bucket, optionally by endpoint or status class."""
        return run(
            lambda: queries.series(
                client, database, Subject.key, key_id, granularity, since, until, breakdown, now=clock(), top=top
            )
        )

    @app.get("/v1/accounts/{account_id}/usage", dependencies=v1, tags=["usage"])
    def account_usage(
        account_id: AccountPath,
        since: Since = None,
        until: Until = None,
        granularity: Granularity = Granularity.hour,
        breakdown: Breakdown = Breakdown.none,
        top: TopGroups = queries.DEFAULT_SERIES_GROUPS,
    ) -> UsageSeries:
        """Requests of all keys of one account per bucket."""
        return run(
            lambda: queries.series(
                client,
                database,
                Subject.account,
                account_id,
                granularity,
                since,
                until,
                breakdown,
                now=clock(),
                top=top,
            )
        )

    @app.get("/v1/traffic", dependencies=v1, tags=["usage"])
    def traffic(
        since: Since = None,
        until: Until = None,
        granularity: Granularity = Granularity.hour,
        breakdown: Breakdown = Breakdown.status_class,
        top: TopGroups = queries.DEFAULT_SERIES_GROUPS,
    ) -> UsageSeries:
        """All traffic per bucket (default: the last 24 hours by status class)."""
        return run(
            lambda: queries.series(
                client, database, None, "", granularity, since, until, breakdown, now=clock(), top=top
            )
        )

    @app.get("/v1/top", dependencies=v1, tags=["usage"])
    def top(
        dimension: TopDimension = TopDimension.key,
        metric: TopMetric = TopMetric.requests,
        n: Annotated[int, Query(ge=1, le=queries.MAX_TOP_N)] = 20,
        window: WindowParam = None,
        since: Since = None,
        until: Until = None,
    ) -> TopList:
        """The top N keys / accounts / endpoints by requests, errors (status >= 400), 401+403 or 429."""
        start, end = window_of(window, since, until, "1h")
        return run(lambda: queries.top(client, database, dimension, metric, start, end, n))

    @app.get("/v1/keys/{key_id}/state", dependencies=v1, tags=["limits"])
    def key_state(key_id: KeyIdPath, history: Annotated[int, Query(ge=1, le=500)] = 50) -> KeyState:
        """Counts in the current minute / hour / day vs the key's limits, its active block and decisions."""
        return run(lambda: queries.key_state(client, database, key_id, lookup, clock(), history))

    @app.get("/v1/blocked", dependencies=v1, tags=["limits"])
    def blocked(n: Annotated[int, Query(ge=1, le=queries.MAX_TOP_N)] = 100) -> list[BlockedKey]:
        """Keys blocked right now (newest decision is a block still in force)."""
        return run(lambda: queries.blocked_keys(client, database, clock(), n))

    @app.post("/v1/limits/backtest", dependencies=v1, tags=["limits"])
    def limits_backtest(body: BacktestRequest) -> BacktestResult:
        """What a candidate policy would have refused, replayed on the minute rollups (exact at minute
        granularity), beside the policy in force. A span reaching before the oldest minute the minute
        level holds (METER_TTL_MINUTE_DAYS) is a 422 naming that bound."""
        return run(lambda: backtest.backtest(client, database, body, book, settings.ttl_minute_days, clock()))

    @app.get("/v1/signals", dependencies=v1, tags=["abuse"])
    def abuse_signals(
        kind: Annotated[list[SignalKind] | None, Query(description="only these kinds (repeatable)")] = None,
        key_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
        recent: Annotated[str, Query(pattern=_WINDOW_PATTERN, description="window of rate signals")] = "1h",
        lookback: Annotated[str, Query(pattern=_WINDOW_PATTERN, description="window of IP/block signals")] = "24h",
        as_of: Annotated[StorableTime, Query(description="RFC 3339: the signals as of then (default: now)")] = None,
    ) -> SignalReport:
        """Abuse signals, strongest first, each with its numbers and a plain-words explanation."""
        recent_span, lookback_span = parse_duration(recent), parse_duration(lookback)
        if recent_span > queries.MINUTE_LEVEL_MAX_SPAN or lookback_span > timedelta(days=7):
            raise HTTPException(400, "recent may span at most 48h and lookback at most 7d.")
        thresholds = signals.SignalThresholds(recent=recent_span, lookback=lookback_span)
        return run(
            lambda: signals.abuse_signals(
                client, database, as_of or clock(), thresholds, set(kind) if kind else None, key_id=key_id
            )
        )

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")

    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
