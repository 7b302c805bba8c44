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

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.decisions import Decision, Window
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
