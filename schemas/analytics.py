"""Results of the analytics queries (usage series, top lists, key state, abuse signals).

Definitions used everywhere:

- *errors*: responses with status >= 400 (4xx and 5xx; 401, 403 and 429 included);
- *auth failures*: responses 401 (missing / invalid key) and 403 (key without permission);
- *rate limited*: responses 429;
- *status class*: ``2xx``, ``3xx``, ``4xx``, ``5xx`` (the hundreds of the status).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from schemas.bounds import Count, Identifier
from schemas.decisions import Decision, Window
from schemas.limits import LimitPolicy
from schemas.usage import Granularity


class Subject(StrEnum):
    key = "key"
    account = "account"


class Breakdown(StrEnum):
    none = "none"
    endpoint = "endpoint"
    status_class = "status_class"


class TopDimension(StrEnum):
    key = "key"
    account = "account"
    endpoint = "endpoint"


class TopMetric(StrEnum):
    requests = "requests"
    errors = "errors"  # status >= 400
    auth_failures = "auth_failures"  # 401 + 403
    rate_limited = "rate_limited"  # 429


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class SeriesGroup(_Frozen):
    """One line of a series: everything (``group="all"``), one endpoint, or one status class.

    Columnar: value ``i`` of each list belongs to the bucket starting at
    ``series.since + i * series.step_seconds`` (a 30-day minute series is 43,200 buckets;
    one object per bucket would cost more than the query).
    """

    group: str
    total_requests: int
    requests: list[int]
    errors: list[int]  # status >= 400
    bytes_out: list[int]


class UsageSeries(_Frozen):
    subject: Subject | None  # None: all traffic
    id: str | None
    granularity: Granularity
    breakdown: Breakdown
    since: AwareDatetime  # start of the first bucket
    until: AwareDatetime  # exclusive
    step_seconds: int
    buckets: int
    groups: list[SeriesGroup]

    def bucket_start(self, index: int) -> datetime:
        return self.since + timedelta(seconds=index * self.step_seconds)


class TopEntry(_Frozen):
    rank: int
    id: str
    account_id: str | None = None  # for keys: the account they belong to
    requests: int
    errors: int
    auth_failures: int
    rate_limited: int


class TopList(_Frozen):
    dimension: TopDimension
    metric: TopMetric
    level: Granularity  # the rollup level the window was counted from
    since: AwareDatetime
    until: AwareDatetime
    entries: list[TopEntry]


class WindowState(_Frozen):
    """The count of one key in the fixed UTC window containing ``as_of``, against its limit."""

    window: Window
    start: AwareDatetime
    end: AwareDatetime
    count: int
    limit: int | None  # None: unlimited
    remaining: int | None
    over: bool


class KeyState(_Frozen):
    key_id: str
    account_id: str | None
    as_of: AwareDatetime
    windows: list[WindowState]
    blocked: bool
    blocked_until: AwareDatetime | None  # None while blocked: until an operator unblocks
    active_block: Decision | None  # the block in force, shadow ones included
    history: list[Decision]
    shadow_blocked: bool = False  # a shadow policy's block: nodes serve the key, counting it as refused


class BlockedKey(_Frozen):
    key_id: str
    window: Window
    limit: int | None
    count: int | None
    until: AwareDatetime | None
    reason: str
    source: str
    decided_at: AwareDatetime
    version: int
    shadow: bool = False  # a shadow policy's block: the key is served, the refusals only counted


class SignalKind(StrEnum):
    rate_jump = "rate_jump"
    auth_failures = "auth_failures"
    rate_limited = "rate_limited"
    many_sources = "many_sources"
    repeated_blocks = "repeated_blocks"
    invalid_key_storm = "invalid_key_storm"


class Severity(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"


class Signal(_Frozen):
    """One suspicious pattern, with the numbers behind it and a sentence a person can act on."""

    kind: SignalKind
    severity: Severity
    key_id: str | None = None
    client_ip: str | None = None
    account_id: str | None = None
    score: float = Field(description="how many times over the signal's threshold")
    explanation: str
    evidence: dict[str, int | float | str]
    since: AwareDatetime
    until: AwareDatetime


class SignalReport(_Frozen):
    as_of: AwareDatetime
    signals: list[Signal]


# -- backtest of a candidate limit policy -----------------------------------------------------


class BacktestScope(StrEnum):
    """Where the candidate would be set: one key, one account (its keys), or the default (all keys)."""

    key = "key"
    account = "account"
    all = "all"


class BacktestRequest(_Frozen):
    """A candidate policy, whom it would apply to and the span to replay it on (``POST /v1/limits/backtest``).

    Each limit must be given; ``null`` is unlimited. ``span`` (instead of ``since``) counts back
    from ``until`` on the answering side's clock; neither: everything the minute level holds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_minute: Count | None
    per_hour: Count | None
    per_day: Count | None
    scope: BacktestScope = BacktestScope.all
    subject: Identifier | None = Field(default=None, description="the key id or account id of scope key / account")
    since: AwareDatetime | None = None
    until: AwareDatetime | None = Field(default=None, description="exclusive (default: now)")
    span: timedelta | None = Field(default=None, gt=timedelta(0), le=timedelta(days=3660))
    top: int = Field(default=20, ge=0, le=1000, description="how many of the most refused keys to list")
    windows_per_key: int = Field(default=10, ge=0, le=1000, description="refused windows listed per listed key")
    ignore_overrides: bool = Field(
        default=False, description="the candidate applies to every key of the scope, even where an override holds"
    )

    @model_validator(mode="after")
    def _consistent(self) -> BacktestRequest:
        if (self.scope is BacktestScope.all) != (self.subject is None):
            raise ValueError("give a subject with scope key or account, and none with scope all")
        if self.since is not None and self.span is not None:
            raise ValueError("give since or span, not both")
        return self


class BacktestWindow(_Frozen):
    """Refusals charged to one window kind (minute, hour or day) under one policy."""

    window: Window
    keys: int  # keys this window refused at least once
    buckets: int  # (key, window bucket) pairs with a refusal charged to this window
    refused: int  # requests refused, charged to this window


class BacktestOutcome(_Frozen):
    """What one policy would have refused in the span."""

    keys_refused: int
    refused: int
    windows: list[BacktestWindow]  # minute, hour, day


class RefusedWindow(_Frozen):
    """One window bucket of one key with refusals charged to it."""

    window: Window
    start: AwareDatetime
    requests: int  # all requests of the key in that bucket (what it asked for)
    refused: int  # of them refused, charged to this window


class BacktestKey(_Frozen):
    key_id: str
    account_id: str | None  # the newest account of the key in the span
    requests: int  # in the span, 429s included
    observed_refused: int  # stored 429s: what the limiter in force actually refused
    refused: int  # under the candidate
    refused_minute: int
    refused_hour: int
    refused_day: int
    first_refused: AwareDatetime | None  # the minute of the first refusal under the candidate
    windows_refused: int  # window buckets with refusals under the candidate (listed: ``windows``)
    in_force_refused: int  # the same replay under the policy in force
    candidate: LimitPolicy  # the limits replayed for this key
    candidate_applies: bool  # False: an override of narrower scope keeps the key's own limits
    in_force: LimitPolicy
    in_force_source: str  # "default policy", "key override <key>" or "account override <account>"
    windows: list[RefusedWindow]  # the most refused window buckets, most refused first


class BacktestResult(_Frozen):
    """A candidate policy replayed on the minute rollups of [since, until), beside the policy in force.

    ``keys`` / ``requests`` / ``observed_refused``: every key of the scope with requests in the span.
    ``top``: the keys most refused under the candidate (then under the policy in force).
    ``notes``: what bounds the figures (a first day partly beyond the minute level, ...).
    """

    scope: BacktestScope
    subject: str | None
    policy: LimitPolicy
    ignore_overrides: bool
    since: AwareDatetime  # first minute replayed (a whole minute)
    until: AwareDatetime  # exclusive, a whole minute
    counted_from: AwareDatetime  # hour and day windows count requests from here (before since: warm-up)
    minute_level_from: AwareDatetime  # the oldest minute the minute level holds (METER_TTL_MINUTE_DAYS)
    keys: int
    requests: int  # demand: every stored request, 429s included
    observed_refused: int  # stored 429s
    candidate: BacktestOutcome
    in_force: BacktestOutcome
    newly_refused_keys: int  # refused under the candidate, not under the policy in force
    no_longer_refused_keys: int  # refused under the policy in force, not under the candidate
    top: list[BacktestKey]
    semantics: str
    notes: list[str]
