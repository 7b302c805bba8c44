"""The newest decision per key that a worker keeps from the decisions topic: kept while it
matters (a block in force, an unblock the guards still respect), forgotten after, so one entry
per key ever decided on does not grow without end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from aiokafka.structs import ConsumerRecord

from schemas.decisions import Decision, DecisionAction, Window
from tests.clock import Clock
from worker.limits.service import LimitService, still_matters
from worker.settings import Settings

T0 = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC)
HOUR = 3600.0


def decision(
    key_id: str, action: DecisionAction, *, at: datetime = T0, until: datetime | None = None, source: str = "worker"
) -> Decision:
    return Decision(
        key_id=key_id,
        action=action,
        window=Window.manual if source == "operator" else Window.minute,
        until=until,
        version=int(at.timestamp() * 1_000_000),
        decided_at=at,
        source=source,
    )


def test_a_block_matters_until_it_ends_and_one_without_end_always() -> None:
    block = decision("k", DecisionAction.block, until=T0 + timedelta(minutes=1))
    assert still_matters(block, T0.timestamp() + 59, HOUR)
    assert not still_matters(block, T0.timestamp() + 60, HOUR)
    forever = decision("k", DecisionAction.block, source="operator")
    assert still_matters(forever, T0.timestamp() + 365 * 86_400, HOUR)


def test_an_unblock_matters_for_the_memory_given() -> None:
    unblock = decision("k", DecisionAction.unblock, source="operator")
    assert still_matters(unblock, T0.timestamp() + HOUR - 1, HOUR)
    assert not still_matters(unblock, T0.timestamp() + HOUR, HOUR)


class _Audit:
    def record(self, decisions: list[Decision]) -> None:
        return None


def _record(d: Decision, offset: int) -> ConsumerRecord[bytes, bytes]:
    value = d.model_dump_json().encode()
    return ConsumerRecord("decisions", 0, offset, 0, 0, d.key_id.encode(), value, None, 0, len(value), ())


def _service(clock: Clock) -> LimitService:
    return LimitService(
        Settings(guard_block_minutes=60),
        rollups=cast(Any, None),  # only read on partition assignment, which this test does not do
        audit=cast(Any, _Audit()),
        send=cast(Any, None),
        partition_count=lambda: 1,
        stored_offsets=dict,
        clock=clock,
    )


async def test_the_service_forgets_what_no_longer_matters_and_keeps_the_rest() -> None:
    clock = Clock(T0.timestamp())
    service = _service(clock)
    seen = [
        decision("minute-block", DecisionAction.block, until=T0 + timedelta(seconds=55)),
        decision("day-block", DecisionAction.block, until=T0 + timedelta(hours=12)),
        decision("banned", DecisionAction.block, source="operator"),
        decision("pardoned", DecisionAction.unblock, source="operator"),
    ]
    await service._on_decisions([_record(d, i) for i, d in enumerate(seen)])
    assert service.forget_settled() == 0
    assert all(service.latest_decision(d.key_id) == d for d in seen)

    clock.now = T0.timestamp() + 56  # the minute block is over
    assert service.forget_settled() == 1
    assert service.latest_decision("minute-block") is None

    clock.now = T0.timestamp() + HOUR  # the operator's unblock is past a guard block's length
    assert service.forget_settled() == 1
    assert service.latest_decision("pardoned") is None
    assert service.latest_decision("day-block") == seen[1]
    assert service.latest_decision("banned") == seen[2]


async def test_an_operators_unblock_is_kept_beside_the_keys_newer_decisions() -> None:
    # The guards leave a key an operator unblocked alone for a guard block's length; its own
    # minute limit blocking and unblocking it since must not hide that unblock from them.
    clock = Clock(T0.timestamp())
    service = _service(clock)
    pardon = decision("k", DecisionAction.unblock, source="operator")
    later = [
        decision("k", DecisionAction.block, at=T0 + timedelta(seconds=30), until=T0 + timedelta(seconds=55)),
        decision("k", DecisionAction.unblock, at=T0 + timedelta(seconds=55)),
    ]
    await service._on_decisions([_record(d, i) for i, d in enumerate([pardon, *later])])
    assert service.latest_decision("k") == later[-1]
    assert service.operator_decision("k") == pardon
    clock.now = T0.timestamp() + HOUR  # a guard block's length later: nothing left to respect
    service.forget_settled()
    assert service.operator_decision("k") is None
