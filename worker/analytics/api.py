"""The HTTP query API (``/v1/...``, OpenAPI at ``/openapi.json``) and the dashboard page.

Every ``/v1`` route needs the admin key in ``X-API-Key``; errors are always
``{"error", "message", "request_id"}`` like the metered API's. The dashboard page itself
holds no data: its script asks for the admin key once, keeps it in ``sessionStorage``
(gone when the tab closes, never in a URL or a cookie) and sends it on each fetch.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from clickhouse_connect.driver.client import Client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.limits import PolicyBook
from worker.analytics import routes
from worker.analytics.query_context import PolicyLookup, QueryContext
from worker.analytics.side_handle import SideHandle
from worker.analytics.throttle import LoginThrottle
from worker.settings import Settings
from worker.store.usage import LevelsHeld

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
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


def settings_limits(settings: Settings) -> PolicyLookup:
    """The settings' limits (the default and the routes' defaults): what a caller that follows no
    overrides passes (the worker and ``meter serve-api`` pass their live book's ``resolve``)."""
    return settings.policy_book().resolve


def book_of(settings: Settings, policy_for: PolicyLookup | None) -> PolicyBook:
    """The book behind ``policy_for`` when it is a book's ``resolve`` (as the worker and ``meter
    serve-api`` pass it: followed live), else the settings' limits without overrides."""
    owner = getattr(policy_for, "__self__", None)
    return owner if isinstance(owner, PolicyBook) else settings.policy_book()


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
    app = FastAPI(
        title="Usage meter query API",
        version="1",
        description="Usage analytics and abuse investigation over the usage meter's rollups. "
        "Every /v1 route needs the admin key in the X-API-Key header.",
        docs_url=None,  # Swagger UI loads its assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    side = SideHandle(client)  # opened by the first /v1/signals call, closed with the app
    app.state.query_context = QueryContext(
        client=client,
        database=settings.clickhouse_database,
        lookup=policy_for or settings_limits(settings),
        book=policy_book if policy_book is not None else book_of(settings, policy_for),
        clock=now or (lambda: datetime.now(UTC)),
        admin_key=settings.admin_api_key.get_secret_value().encode(),
        throttle=LoginThrottle(settings.admin_login_burst, settings.admin_login_refill_per_minute / 60),
        held=LevelsHeld.of(settings),
        side=side,
        trusted_proxies=tuple(settings.node_trusted_proxies),
    )
    app.router.on_shutdown.append(side.close)
    for router in (routes.usage, routes.limits, routes.abuse):
        app.include_router(router)
    _answer_errors_as_json(app)
    _serve_dashboard(app)
    return app


def _answer_errors_as_json(app: FastAPI) -> None:
    """Every answer carries a request id and the security headers; every error is the JSON
    ``{"error", "message", "request_id"}`` the metered API answers too."""

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


def _serve_dashboard(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")

    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="static")
