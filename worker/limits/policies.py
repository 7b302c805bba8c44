"""Which limits apply to a key: per-key override, else per-account override, else the default."""

from __future__ import annotations

from schemas.limits import LimitOverride, LimitPolicy, OverrideScope
from worker.settings import Settings


def default_policy(settings: Settings) -> LimitPolicy:
    return LimitPolicy(
        per_minute=settings.limit_per_minute, per_hour=settings.limit_per_hour, per_day=settings.limit_per_day
    )


class PolicyBook:
    def __init__(self, default: LimitPolicy) -> None:
        self.default = default
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

    def source(self, key_id: str, account_id: str = "") -> str:
        if key_id in self.by_key:
            return f"key override {key_id}"
        if account_id and account_id in self.by_account:
            return f"account override {account_id}"
        return "default policy"
