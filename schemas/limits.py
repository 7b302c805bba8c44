"""Limit policies: how many requests a key may make per fixed UTC window."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from schemas.bounds import Count, Identifier, Note, Timestamp
from schemas.decisions import Window
from schemas.notifications import NotifyThresholds


class LimitPolicy(BaseModel):
    """Per-window limits; ``None`` means that window is unlimited."""

    model_config = ConfigDict(frozen=True)

    per_minute: Count | None = 100
    per_hour: Count | None = 1_000
    per_day: Count | None = 5_000
    # A quota per UTC calendar month (None: none, the default; records without it parse as before).
    per_month: Count | None = None
    # Threshold notifications of keys under this policy (None: the worker's global thresholds,
    # METER_NOTIFY_THRESHOLDS_*). Nodes ignore it; records without it parse as before.
    notify: NotifyThresholds | None = None
    # Shadow (dry run): evaluated, decided and audited as usual, but nodes never refuse on it;
    # they count the requests they would have refused.
    shadow: bool = False

    @classmethod
    def unlimited(cls) -> LimitPolicy:
        return cls(per_minute=None, per_hour=None, per_day=None)

    def limit_tuple(self) -> tuple[int | None, int | None, int | None]:
        return self.per_minute, self.per_hour, self.per_day

    def limit(self, window: Window) -> int | None:
        """The limit of ``window`` (None: unlimited, or a manual window that has no limit)."""
        if window is Window.minute:
            return self.per_minute
        if window is Window.hour:
            return self.per_hour
        if window is Window.day:
            return self.per_day
        if window is Window.month:
            return self.per_month
        return None


class OverrideScope(StrEnum):
    key = "key"
    account = "account"


class LimitOverride(BaseModel):
    """An operator's override for one key or one account, on the compacted limits topic.

    Message key = ``"{scope}:{subject}"``; ``policy=None`` removes the override (reset).
    """

    model_config = ConfigDict(frozen=True)

    scope: OverrideScope
    subject: Identifier
    policy: LimitPolicy | None
    updated_at: Timestamp
    note: Note = ""

    @property
    def topic_key(self) -> str:
        return f"{self.scope.value}:{self.subject}"


class PolicyBook:
    """Which limits apply to a key: per-key override, else per-account override, else the default.

    The worker and every node resolve policies with this one rule, so both sides agree on a
    key's limits.
    """

    def __init__(self, default: LimitPolicy, shadow_all: bool = False) -> None:
        self.default = default
        self.shadow_all = shadow_all  # every policy in shadow: a global dry run
        self.by_key: dict[str, LimitPolicy] = {}
        self.by_account: dict[str, LimitPolicy] = {}
        self.version = 0  # bumps on every change, so callers can re-check what they cached

    def apply(self, override: LimitOverride) -> None:
        table = self.by_key if override.scope is OverrideScope.key else self.by_account
        if override.policy is None:
            table.pop(override.subject, None)
        else:
            table[override.subject] = override.policy
        self.version += 1

    def resolve(self, key_id: str, account_id: str = "") -> LimitPolicy:
        policy = self.by_key.get(key_id)
        if policy is None and account_id:
            policy = self.by_account.get(account_id)
        return policy or self.default

    def is_shadow(self, policy: LimitPolicy) -> bool:
        return self.shadow_all or policy.shadow

    def source(self, key_id: str, account_id: str = "") -> str:
        if key_id in self.by_key:
            return f"key override {key_id}"
        if account_id and account_id in self.by_account:
            return f"account override {account_id}"
        return "default policy"
