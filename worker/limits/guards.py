"""Abuse guards: rules over the keys' recent activity that block a key for a while.

Opt-in and shadow first: a rule is off until its threshold is set, and its blocks are shadow
decisions (nodes serve the key and count what they would have refused) until
``METER_GUARD_SHADOW=false``. Blocks are ordinary audited decisions with ``source=guard`` and
a plain-words reason; ``meter unblock`` lifts one, and the guard leaves that key alone for the
rest of the block it lifted. Pure: the runner (``worker.limits.guard_runner``) does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from schemas.decisions import Decision, DecisionAction
from worker.settings import Settings


@dataclass(frozen=True)
class GuardRules:
    max_client_ips_per_hour: int = 0  # more distinct client IPs than this in an hour: block (0: off)
    max_auth_failures: int = 0  # more 401 + 403 than this in the span below: block (0: off)
    auth_failures_minutes: int = 10
    block_minutes: int = 60
    shadow: bool = True

    @classmethod
    def from_settings(cls, s: Settings) -> GuardRules:
        return cls(
            max_client_ips_per_hour=s.guard_max_client_ips_per_hour,
            max_auth_failures=s.guard_max_auth_failures,
            auth_failures_minutes=s.guard_auth_failures_minutes,
            block_minutes=s.guard_block_minutes,
            shadow=s.guard_shadow,
        )

    @property
    def enabled(self) -> bool:
        return self.max_client_ips_per_hour > 0 or self.max_auth_failures > 0


@dataclass(frozen=True)
class Finding:
    key_id: str
    rule: str
    reason: str


def findings(
    rules: GuardRules, many_ips: Iterable[tuple[str, int]], auth_failures: Iterable[tuple[str, int]]
) -> list[Finding]:
    """One finding per key (the first rule it breaks), with the reason in plain words."""
    found: dict[str, Finding] = {}
    for key_id, ips in many_ips:
        found.setdefault(
            key_id,
            Finding(
                key_id,
                "client_ips",
                f"guard: used from {ips} client IPs this hour (more than {rules.max_client_ips_per_hour}): "
                f"a shared or leaked key; blocked {rules.block_minutes} min",
            ),
        )
    for key_id, n in auth_failures:
        found.setdefault(
            key_id,
            Finding(
                key_id,
                "auth_failures",
                f"guard: {n} responses 401/403 in {rules.auth_failures_minutes} min "
                f"(more than {rules.max_auth_failures}); blocked {rules.block_minutes} min",
            ),
        )
    return list(found.values())


def lifted_by_operator(latest: Decision | None, now: float, rules: GuardRules) -> bool:
    """An operator unblocked the key less than a block's length ago: the guard leaves it alone."""
    return (
        latest is not None
        and latest.source == "operator"
        and latest.action is DecisionAction.unblock
        and now - latest.decided_at.timestamp() < rules.block_minutes * 60
    )
