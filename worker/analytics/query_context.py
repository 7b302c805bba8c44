"""What every query route needs, held once per app: the client (one at a time: a client is
not safe to share between threads) and its side handle, the clock, the policies, the admin
key and its throttle.

Routes get it with ``Depends(context)``, so each handler is a plain function, testable alone.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, TypeVar

from clickhouse_connect.driver.client import Client
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from node.middleware import IPNetwork, client_ip
from schemas.limits import LimitPolicy, PolicyBook
from worker.analytics.side_handle import SideHandle
from worker.analytics.throttle import LoginThrottle, client_key
from worker.cli_args import parse_duration
from worker.refusals import EmptyRange, OutOfRange, QueryRefused
from worker.store.usage import LevelsHeld

log = logging.getLogger(__name__)

T = TypeVar("T")
PolicyLookup = Callable[[str, str], LimitPolicy]  # (key_id, account_id) -> limits
MAX_WINDOW = timedelta(days=93)

# Module level: FastAPI resolves the (string) annotations of the routes from module globals.
KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the admin API key")


@dataclass
class QueryContext:
    client: Client
    database: str
    lookup: PolicyLookup  # a key's limits now
    book: PolicyBook  # the policies in force (the backtest compares with them)
    clock: Callable[[], datetime]
    admin_key: bytes
    throttle: LoginThrottle
    held: LevelsHeld  # how long the minute and hour levels keep their rows (METER_TTL_*)
    side: SideHandle | None = None  # a second handle, for a request that runs two queries at once
    # Proxies whose X-Forwarded-For names the client that failed logins are throttled by
    # (METER_NODE_TRUSTED_PROXIES): behind a proxy every client would share its one address.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, query: Callable[[], T]) -> T:
        """One query under the client lock: a time the store cannot hold (``OutOfRange``) is a
        422, any other refused question (``QueryRefused``) a 400; anything else is a bug: 500."""
        try:
            with self.lock:
                return query()
        except OutOfRange as exc:
            raise HTTPException(422, str(exc)) from None
        except QueryRefused as exc:
            raise HTTPException(400, str(exc)) from None

    def run_beside(self, query: Callable[[Client | None], T]) -> T:
        """``run``, and ``query`` gets the side handle too (None: there is none); the client
        lock is always taken before the side handle's, so two such requests cannot deadlock."""
        if self.side is None:
            return self.run(lambda: query(None))
        side = self.side

        def both() -> T:
            with side.borrow() as handle:
                return query(handle)

        return self.run(both)

    def window(
        self, window: str | None, since: datetime | None, until: datetime | None, default: str
    ) -> tuple[datetime, datetime]:
        """[since, until) from either a span ending now or explicit bounds."""
        if window is not None and (since is not None or until is not None):
            raise HTTPException(400, "Give either window or since/until, not both.")
        end = until or self.clock()
        start = since or end - parse_duration(window or default)
        if start >= end:
            raise HTTPException(400, f"{EmptyRange(start, end)}.")
        if end - start > MAX_WINDOW:
            raise HTTPException(400, f"The window may span at most {MAX_WINDOW.days} days.")
        return start, end


def context(request: Request) -> QueryContext:
    found: QueryContext = request.app.state.query_context
    return found


Context = Annotated[QueryContext, Depends(context)]


async def require_admin(request: Request, ctx: Context, api_key: Annotated[str | None, Security(KEY_HEADER)]) -> None:
    """The admin key, or 401; a client with too many 401s gets 429 before its key is even looked at."""
    if not ctx.admin_key:
        raise HTTPException(403, "The query API is disabled: no admin key is configured (METER_ADMIN_API_KEY).")
    client, now = client_key(client_ip(request.scope, ctx.trusted_proxies)), time.monotonic()
    wait = ctx.throttle.retry_after(client, now)
    if wait > 0:
        seconds = math.ceil(wait)
        raise HTTPException(
            429,
            f"Too many failed logins from your address; retry in {seconds} s.",
            headers={"Retry-After": str(seconds)},
        )
    if not api_key:
        ctx.throttle.failed(client, now)
        raise HTTPException(401, "Missing API key: send the admin key in the X-API-Key header.")
    if not hmac.compare_digest(api_key.encode(), ctx.admin_key):
        ctx.throttle.failed(client, now)
        if ctx.throttle.retry_after(client, now) > 0:
            log.warning("query API: %s throttled after repeated invalid admin keys", client)
        raise HTTPException(401, "Invalid API key.")
