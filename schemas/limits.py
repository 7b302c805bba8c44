"""Limit policies: how many requests a key may make per fixed UTC window."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, StringConstraints, model_validator

from schemas.bounds import Count, Identifier, Note, Timestamp
from schemas.decisions import Window
from schemas.notifications import NotifyThresholds

# A route limit's name (the node's route configuration gives routes one): short, lower-case,
# never containing ``ROUTE_MARK``, so "key@route" always splits one way.
ROUTE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,31}$"
RouteName = Annotated[str, StringConstraints(pattern=ROUTE_NAME_PATTERN)]
# Joins a key id and a route name into the subject of a route limit. Key ids are
# ``{prefix}_{hex}`` (alphanumerics and "_": see node.keys), so the mark never occurs in one.
ROUTE_MARK = "@"


def route_subject(key_id: str, route: str) -> str:
    """What a route limit counts and decides on: one key on one route (``key_id@route``)."""
    return f"{key_id}{ROUTE_MARK}{route}"


def split_subject(subject: str) -> tuple[str, str | None]:
    """(key id, route) of a limit subject; route None for a key's own limits."""
    key_id, mark, route = subject.partition(ROUTE_MARK)
    return (key_id, route) if mark else (subject, None)


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
    """An operator's override for one key or one account, on the compacted limits topic; with
    ``route``, for that key's (or account's keys') requests to that route only.

    Message key = ``"{scope}:{subject}"`` (``"…@{route}"`` with a route); ``policy=None``
    removes the override (reset).
    """

    model_config = ConfigDict(frozen=True)

    scope: OverrideScope
    subject: Identifier
    policy: LimitPolicy | None
    updated_at: Timestamp
    note: Note = ""
    route: RouteName | None = None  # records without it parse as before: the key's own limits

    @model_validator(mode="after")
    def _one_topic_key_each(self) -> LimitOverride:
        # "account:acme@corp" would be both account "acme@corp" and account "acme" on route
        # "corp": compaction would keep one of the two. (A key id never holds the mark; a key
        # subject "key@route" is the key's override on that route either way.)
        if self.scope is OverrideScope.account and ROUTE_MARK in self.subject:
            raise ValueError(
                f"an account id containing {ROUTE_MARK!r} cannot have an override: its record would share "
                "the limits topic's key of a route override of another account"
            )
        return self

    @property
    def topic_key(self) -> str:
        base = f"{self.scope.value}:{self.subject}"
        return route_subject(base, self.route) if self.route else base


UNLIMITED = LimitPolicy.unlimited()
_Slot = TypeVar("_Slot", str, tuple[str, str])


class PolicyBook:
    """Which limits apply to a subject. A key (``key_id``): per-key override, else per-account
    override, else the default. A key on a route (``key_id@route``, see ``route_subject``): the
    key's override for the route, else its account's, else the route's default
    (``METER_ROUTE_LIMITS``), else none (the route is limited by the key's own limits only).

    The worker and every node resolve policies with this one rule, so both sides agree on a
    key's limits.
    """

    def __init__(
        self, default: LimitPolicy, shadow_all: bool = False, routes: Mapping[str, LimitPolicy] | None = None
    ) -> None:
        self.default = default
        self.shadow_all = shadow_all  # every policy in shadow: a global dry run
        self.routes = dict(routes or {})  # route name -> its default limits per key
        self.by_key: dict[str, LimitPolicy] = {}  # key id or key@route -> override
        self.by_account: dict[str, LimitPolicy] = {}
        self.by_account_route: dict[tuple[str, str], LimitPolicy] = {}
        self.version = 0  # bumps on every change, so callers can re-check what they cached

    def apply(self, override: LimitOverride) -> None:
        if override.scope is OverrideScope.account and override.route:
            _put(self.by_account_route, (override.subject, override.route), override.policy)
        elif override.scope is OverrideScope.account:
            _put(self.by_account, override.subject, override.policy)
        else:
            slot = route_subject(override.subject, override.route) if override.route else override.subject
            _put(self.by_key, slot, override.policy)
        self.version += 1

    def resolve(self, subject: str, account_id: str = "") -> LimitPolicy:
        policy = self.by_key.get(subject)
        if policy is not None:
            return policy
        if ROUTE_MARK in subject:
            route = split_subject(subject)[1] or ""
            held = self.by_account_route.get((account_id, route)) if account_id else None
            return held or self.routes.get(route) or UNLIMITED
        if account_id:
            policy = self.by_account.get(account_id)
        return policy or self.default

    def is_shadow(self, policy: LimitPolicy) -> bool:
        return self.shadow_all or policy.shadow

    def source(self, subject: str, account_id: str = "") -> str:
        key_id, route = split_subject(subject)
        on = f" on route {route}" if route else ""
        if subject in self.by_key:
            return f"key override {key_id}{on}"
        if route is not None:
            if account_id and (account_id, route) in self.by_account_route:
                return f"account override {account_id}{on}"
            return f"route default{on}" if route in self.routes else f"no limit{on}"
        if account_id and account_id in self.by_account:
            return f"account override {account_id}"
        return "default policy"


def _put(table: dict[_Slot, LimitPolicy], slot: _Slot, policy: LimitPolicy | None) -> None:
    """Set an override (None: remove it)."""
    if policy is None:
        table.pop(slot, None)
    else:
        table[slot] = policy
