"""What the control topics hold now, read once from the beginning (for the CLI, the query API
and operator actions): the overrides in force, and the newest decision and allowance per key."""

from __future__ import annotations

from common.follower import read_to_end, valid_records
from schemas.allowances import Allowance
from schemas.decisions import Decision
from schemas.limits import LimitOverride
from worker.settings import Settings


async def current_overrides(settings: Settings) -> dict[str, LimitOverride]:
    """The overrides in force: the latest record per scope:subject on the limits topic."""
    latest: dict[str, LimitOverride] = {}
    for override in valid_records(await read_to_end(settings, settings.limits_topic), LimitOverride):
        latest[override.topic_key] = override
    return {k: v for k, v in latest.items() if v.policy is not None}


async def latest_decisions(settings: Settings) -> dict[str, Decision]:
    latest: dict[str, Decision] = {}
    for decision in valid_records(await read_to_end(settings, settings.decisions_topic), Decision):
        if decision.key_id not in latest or latest[decision.key_id].version < decision.version:
            latest[decision.key_id] = decision
    return latest


async def latest_allowances(settings: Settings) -> dict[str, Allowance]:
    latest: dict[str, Allowance] = {}
    records = await read_to_end(settings, settings.allowances_topic)
    for allowance in valid_records(records, Allowance):
        if allowance.key_id not in latest or latest[allowance.key_id].version < allowance.version:
            latest[allowance.key_id] = allowance
    return latest
