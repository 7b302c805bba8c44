"""Where the CLI's read commands get their answers: the store itself, or a query API.

On the embedded default (chDB, one process per data directory) a running worker holds the
store; it serves the same ``/v1`` API, so a read command asks it instead and prints the same
tables. Both sources return the same result models, so output does not depend on the source.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import TypeAdapter, ValidationError

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
from worker.analytics import backtest, queries
from worker.analytics.signals import SignalThresholds, abuse_signals
from worker.dsn import is_embedded
from worker.listening import running_worker
from worker.refusals import QueryRefused
from worker.settings import Settings
from worker.store.client import StoreUnavailable, connect
from worker.store.usage import DEFAULT_LEVELS_HELD, LevelsHeld

T = TypeVar("T")
PolicyLookup = Callable[[str, str], LimitPolicy]


class SourceUnavailable(Exception):
    """No source can answer: the message names what failed and the ways out."""


class Analytics(Protocol):
    def top(self, dimension: TopDimension, metric: TopMetric, since: datetime, until: datetime, n: int) -> TopList: ...

    def series(
        self,
        subject: Subject | None,
        subject_id: str,
        granularity: Granularity,
        since: datetime | None,
        until: datetime | None,
        breakdown: Breakdown,
        top: int,
    ) -> UsageSeries: ...

    def key_state(self, key_id: str, history: int) -> KeyState: ...

    def blocked(self, n: int) -> list[BlockedKey]: ...

    def signals(
        self,
        as_of: datetime | None,
        recent: timedelta,
        lookback: timedelta,
        kinds: set[SignalKind] | None,
        key_id: str | None,
    ) -> SignalReport: ...

    def backtest(self, request: BacktestRequest) -> BacktestResult: ...


class StoreAnalytics:
    """Queries on an open ClickHouse client (``policies`` is asked only for the key state, ``book``
    - the default and the overrides in force - only for a backtest; ``held``: how long the minute
    and hour levels keep their rows, METER_TTL_*)."""

    def __init__(
        self,
        client: Any,
        database: str,
        policies: Callable[[], PolicyLookup],
        book: Callable[[], PolicyBook] | None = None,
        held: LevelsHeld = DEFAULT_LEVELS_HELD,
    ) -> None:
        self.client = client
        self.database = database
        self.policies = policies
        self.book = book or (lambda: PolicyBook(LimitPolicy()))
        self.held = held

    def top(self, dimension: TopDimension, metric: TopMetric, since: datetime, until: datetime, n: int) -> TopList:
        return queries.top(self.client, self.database, dimension, metric, since, until, n, self.held)

    def series(
        self,
        subject: Subject | None,
        subject_id: str,
        granularity: Granularity,
        since: datetime | None,
        until: datetime | None,
        breakdown: Breakdown,
        top: int,
    ) -> UsageSeries:
        return queries.series(
            self.client, self.database, subject, subject_id, granularity, since, until, breakdown, top=top
        )

    def key_state(self, key_id: str, history: int) -> KeyState:
        lookup = self.policies()
        return queries.key_state(self.client, self.database, key_id, lookup, history=history)

    def blocked(self, n: int) -> list[BlockedKey]:
        return queries.blocked_keys(self.client, self.database, n=n)

    def signals(
        self,
        as_of: datetime | None,
        recent: timedelta,
        lookback: timedelta,
        kinds: set[SignalKind] | None,
        key_id: str | None,
    ) -> SignalReport:
        thresholds = SignalThresholds(recent=recent, lookback=lookback)
        return abuse_signals(self.client, self.database, as_of, thresholds=thresholds, kinds=kinds, key_id=key_id)

    def backtest(self, request: BacktestRequest) -> BacktestResult:
        book = self.book()
        return backtest.backtest(self.client, self.database, request, book, self.held.minute_days)


def _span(value: timedelta) -> str:
    """A span as the API takes it (15m, 2h, 7d; 90s, not rounded to a minute: 30s was "0d")."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _params(**values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        out[name] = value.isoformat() if isinstance(value, datetime) else getattr(value, "value", value)
    return out


# Built once: a TypeAdapter builds its validator when made.
_AS_TOPLIST = TypeAdapter(TopList)
_AS_USAGESERIES = TypeAdapter(UsageSeries)
_AS_KEYSTATE = TypeAdapter(KeyState)
_AS_BLOCKEDKEYS = TypeAdapter(list[BlockedKey])
_AS_SIGNALREPORT = TypeAdapter(SignalReport)
_AS_BACKTESTRESULT = TypeAdapter(BacktestResult)


class ApiAnalytics:
    """The same questions asked of a worker's (or ``meter serve-api``'s) ``/v1`` API."""

    def __init__(self, base_url: str, admin_key: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers={"X-API-Key": admin_key}, timeout=timeout_s)

    def _get(self, path: str, adapter: TypeAdapter[T], **params: Any) -> T:
        return self._ask("GET", path, adapter, params=params)

    def _ask(self, method: str, path: str, adapter: TypeAdapter[T], **request: Any) -> T:
        try:
            response = self._http.request(method, path, **request)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"the query API at {self.base_url} does not answer ({exc})") from None
        if response.status_code == 401:
            raise SourceUnavailable(f"the query API at {self.base_url} refused the admin key (METER_ADMIN_API_KEY)")
        if response.status_code == 404 and not path.startswith("/v1/keys/"):
            raise SourceUnavailable(f"{self.base_url} serves no query API (is METER_ADMIN_API_KEY set on the worker?)")
        if 400 <= response.status_code < 500:
            raise QueryRefused(_message(response))
        if response.status_code >= 500:
            raise SourceUnavailable(f"the query API at {self.base_url} failed: {_message(response)}")
        try:
            return adapter.validate_json(response.content)
        except ValidationError as exc:
            raise SourceUnavailable(f"the query API at {self.base_url} answered something else: {exc}") from None

    def top(self, dimension: TopDimension, metric: TopMetric, since: datetime, until: datetime, n: int) -> TopList:
        params = _params(dimension=dimension, metric=metric, since=since, until=until, n=n)
        return self._get("/v1/top", _AS_TOPLIST, **params)

    def series(
        self,
        subject: Subject | None,
        subject_id: str,
        granularity: Granularity,
        since: datetime | None,
        until: datetime | None,
        breakdown: Breakdown,
        top: int,
    ) -> UsageSeries:
        path = (
            "/v1/traffic"
            if subject is None
            else f"/v1/{'keys' if subject is Subject.key else 'accounts'}/{_segment(subject_id)}/usage"
        )
        params = _params(since=since, until=until, granularity=granularity, breakdown=breakdown, top=top)
        return self._get(path, _AS_USAGESERIES, **params)

    def key_state(self, key_id: str, history: int) -> KeyState:
        return self._get(f"/v1/keys/{_segment(key_id)}/state", _AS_KEYSTATE, history=history)

    def blocked(self, n: int) -> list[BlockedKey]:
        return self._get("/v1/blocked", _AS_BLOCKEDKEYS, n=n)

    def signals(
        self,
        as_of: datetime | None,
        recent: timedelta,
        lookback: timedelta,
        kinds: set[SignalKind] | None,
        key_id: str | None,
    ) -> SignalReport:
        params = _params(as_of=as_of, recent=_span(recent), lookback=_span(lookback), key_id=key_id)
        if kinds:
            params["kind"] = sorted(k.value for k in kinds)
        return self._get("/v1/signals", _AS_SIGNALREPORT, **params)

    def backtest(self, request: BacktestRequest) -> BacktestResult:
        body = request.model_dump(mode="json", exclude_none=True)
        for name in ("per_minute", "per_hour", "per_day"):  # null is "unlimited": always sent
            body[name] = getattr(request, name)
        return self._ask("POST", "/v1/limits/backtest", _AS_BACKTESTRESULT, json=body)


def _segment(value: str) -> str:
    return httpx.URL("/" + value).raw_path.decode()[1:].replace("/", "%2F")


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message") or response.text)[:500]
    except ValueError:
        return response.text[:500] or f"HTTP {response.status_code}"


def _api_answers(url: str) -> bool:
    try:
        return httpx.get(url.rstrip("/") + "/health/live", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


WAYS_OUT = (
    "ask a running worker's (or `meter serve-api`'s) query API with --api URL (or METER_QUERY_API_URL), "
    "or use a ClickHouse server (METER_CLICKHOUSE_DSN=http://...)"
)


def open_analytics(
    settings: Settings,
    api_url: str | None,
    policies: Callable[[], PolicyLookup] | None = None,
    book: Callable[[], PolicyBook] | None = None,
) -> Analytics:
    """The store if it can be opened; else the API of the worker holding it (said in one line on
    stderr); else ``SourceUnavailable`` naming the ways out. ``policies`` gives the limits the
    key state compares with when read from the store (default: the settings' limits); ``book``
    the default and overrides a backtest compares with (default: the settings' limits only)."""
    if policies is None:
        policies = lambda: settings.policy_book().resolve  # noqa: E731
    if book is None:
        book = settings.policy_book
    admin_key = settings.admin_api_key.get_secret_value()
    url = api_url or settings.query_api_url
    if url:
        if not admin_key:
            raise SourceUnavailable(f"set METER_ADMIN_API_KEY (the query API's admin key) to ask {url}")
        return ApiAnalytics(url, admin_key)
    try:
        client = connect(settings.clickhouse_dsn, settings.clickhouse_database)
        return StoreAnalytics(client, settings.clickhouse_database, policies, book, LevelsHeld.of(settings))
    except StoreUnavailable as exc:
        if not is_embedded(settings.clickhouse_dsn):
            raise SourceUnavailable(str(exc)) from None
        worker = running_worker(settings.clickhouse_dsn)
        if worker is None:
            raise SourceUnavailable(f"{exc}; {WAYS_OUT}") from None
        if not worker.api:
            raise SourceUnavailable(
                f"the embedded store is held by a running worker (pid {worker.pid}) that serves no query API: "
                f"restart it with METER_ADMIN_API_KEY set, or {WAYS_OUT}"
            ) from None
        if not admin_key:
            raise SourceUnavailable(
                f"the embedded store is held by a running worker (pid {worker.pid}); "
                f"set METER_ADMIN_API_KEY to ask its API at {worker.url}"
            ) from None
        if not _api_answers(worker.url):
            raise SourceUnavailable(
                f"the embedded store is held by a running worker (pid {worker.pid}) whose API at {worker.url} "
                f"does not answer; {WAYS_OUT}"
            ) from None
        print(
            f"note: the embedded store is held by a running worker (pid {worker.pid}); asking its API at {worker.url}",
            file=sys.stderr,
        )
        return ApiAnalytics(worker.url, admin_key)
