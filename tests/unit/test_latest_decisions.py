"""The newest decision per key that a worker keeps from the decisions topic: kept while it
matters (a block in force, an unblock the guards still respect), forgotten after, so one entry
per key ever decided on does not grow without end."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from aiokafka.errors import NotEnoughReplicasError
from aiokafka.structs import ConsumerRecord

from schemas.decisions import Decision, DecisionAction, Window
from tests.clock import Clock
from worker.limits.engine import Verdicts
from worker.limits.fastlane import FastBatch
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


class _Recording:
    def __init__(self) -> None:
        self.rows: list[str] = []
        self.inserts = 0

    def record(self, decisions: list[Decision]) -> list[Decision]:
        self.rows += [d.key_id for d in decisions]
        self.inserts += 1
        return []


def _audited_service(audit: _Recording) -> LimitService:
    return LimitService(
        Settings(),
        rollups=cast(Any, None),
        audit=cast(Any, audit),
        send=cast(Any, None),
        partition_count=lambda: 1,
        stored_offsets=dict,
    )


async def test_decisions_read_while_the_readers_stop_are_still_audited() -> None:
    # Before: the last audit insert ran before the readers stopped, so a block the decisions
    # reader got in its last batch (the fast lane's last decisions) was never recorded.
    audit = _Recording()
    service = _audited_service(audit)
    service._auditor = asyncio.create_task(service._audit_forever())
    await service._on_decisions([_record(decision("k1", DecisionAction.block), 0)])

    async def last_batch_on_stop() -> None:
        await service._on_decisions([_record(decision("k2", DecisionAction.block), 1)])

    service.fast_lane.stop = last_batch_on_stop  # type: ignore[method-assign]
    await service.stop()
    assert audit.rows == ["k1", "k2"]
    assert len(service._unaudited) == 0


async def test_decisions_are_audited_together_and_the_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    audit = _Recording()
    service = _audited_service(audit)
    await service._on_decisions([_record(decision(f"k{i}", DecisionAction.block), i) for i in range(3)])
    assert audit.inserts == 0  # queued for the auditor's next insert
    await service._unaudited.record()
    assert (audit.inserts, audit.rows) == (1, ["k0", "k1", "k2"])
    monkeypatch.setattr("worker.limits.service.MAX_UNAUDITED", 2)
    await service._on_decisions([_record(decision(f"m{i}", DecisionAction.block), i) for i in range(2)])
    assert audit.inserts == 2  # at the bound the reader waits for the insert itself
    assert len(service._unaudited) == 0


async def test_a_publish_retried_through_an_outage_lands_before_the_newer_ones() -> None:
    """A block whose publish failed once and an unblock of the same key decided meanwhile: the
    block is on the topic before the unblock. Before, the unblock went out while the block waited
    for its retry; compaction then kept the older block (the last by offset)."""
    landed: list[int] = []
    failed_once = False

    async def send(topic: str, key: str, value: bytes) -> None:
        nonlocal failed_once
        version = Decision.model_validate_json(value).version
        if not failed_once:
            failed_once = True
            raise ConnectionError("broker away")
        landed.append(version)

    service = _publishing_service(send)
    block = decision("k", DecisionAction.block, until=T0 + timedelta(seconds=55))
    unblock = decision("k", DecisionAction.unblock, at=T0 + timedelta(seconds=1))
    await service.publish_decisions([block])
    await asyncio.sleep(0.01)  # the block's first attempt failed; its retry waits
    await service.publish_decisions([unblock])
    await asyncio.wait_for(service.publisher.flush(), 5)
    assert landed == [block.version, unblock.version]


async def test_a_record_that_cannot_land_holds_back_its_key_only() -> None:
    """One key's partition refuses its writes (below min.insync.replicas, an ACL missing): the
    other keys' decisions still land, those decided in the same batch as the stuck one too, and
    the caller (the fast lane, the tick) is not held. Before, the whole batch was retried until
    the stuck record landed, and the fast lane stopped counting every key meanwhile."""
    landed: list[str] = []
    refusing = True

    async def send(topic: str, key: str, value: bytes) -> None:
        if key == "stuck" and refusing:
            await asyncio.sleep(0.01)
            raise NotEnoughReplicasError()
        landed.append(f"{key} {Decision.model_validate_json(value).action.value}")

    service = _publishing_service(send)
    until = T0 + timedelta(seconds=55)
    both = [decision(key, DecisionAction.block, until=until) for key in ("stuck", "healthy")]
    await asyncio.wait_for(service.publish_decisions(both), 0.05)  # queued, not waited for
    await service.publish_decisions([decision("stuck", DecisionAction.unblock, at=T0 + timedelta(seconds=1))])
    await asyncio.sleep(0.5)
    assert landed == ["healthy block"]
    assert service.publisher.waiting() == (1, 2)  # the stuck key's block (being sent) and its unblock
    refusing = False
    await asyncio.wait_for(service.publisher.flush(), 5)
    assert landed == ["healthy block", "stuck block", "stuck unblock"]  # the same key's, in order


@pytest.mark.parametrize("revoked_after_s", [0.05, 0.005], ids=["while-retried", "first-attempt-in-flight"])
async def test_a_revoked_partitions_refused_decisions_are_dropped_not_retried(revoked_after_s: float) -> None:
    """Found by reviews: the old owner kept retrying a refused decision after its partition
    moved (also one whose first attempt was still in flight at the revoke: the Kafka client
    holds a refused send up to its request timeout); once the partition took writes again, it
    landed after the new owner's newer one."""
    attempts = 0

    async def send(topic: str, key: str, value: bytes) -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.02)
        raise NotEnoughReplicasError()

    service = _publishing_service(send)
    await service.publish_decisions([decision("k", DecisionAction.block, until=T0 + timedelta(seconds=55))])
    await asyncio.sleep(revoked_after_s)
    await service.on_revoked({0})  # the only partition (partition_count=1)
    await asyncio.sleep(0.1)  # a first attempt in flight at the revoke has failed by now
    assert service.publisher.waiting() == (0, 0)
    assert service.publisher.forgotten == 1
    tried = attempts
    await asyncio.sleep(0.5)
    assert attempts == tried


async def test_the_fast_lane_waits_for_its_acks_but_not_on_a_record_that_cannot_land(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Paced on its publishes' acks; a refused record holds it once, for the bound, and not on
    every fetch of the outage (found by a review); the pacing resumes once all has landed."""
    refusing = True

    async def send(topic: str, key: str, value: bytes) -> None:
        await asyncio.sleep(0.01)  # the broker's ack
        if key == "stuck" and refusing:
            raise NotEnoughReplicasError()

    service = _publishing_service(send)
    keys = iter(["stuck", "other", "other2", "other3"])
    until = T0 + timedelta(seconds=55)
    monkeypatch.setattr(
        service.engine,
        "observe",
        lambda counts, nodes: Verdicts([decision(next(keys), DecisionAction.block, until=until)]),
    )

    async def one_fetch() -> float:
        started = time.monotonic()
        await service._on_fast_batch(FastBatch())
        return time.monotonic() - started

    assert 0.09 < await one_fetch() < 0.5  # "stuck": refused, the wait runs out
    assert await one_fetch() < 0.05  # "other": not held (for the 0.1 s bound) while "stuck" retries
    refusing = False
    await asyncio.wait_for(service.publisher.flush(), 5)
    assert await one_fetch() > 0.009  # "other2": paced again, on its ack (10 ms)


def _publishing_service(send: Any) -> LimitService:
    """A service owning the one partition (its records are retried while it owns it)."""
    service = LimitService(
        Settings(),
        rollups=cast(Any, None),
        audit=cast(Any, _Audit()),
        send=send,
        partition_count=lambda: 1,
        stored_offsets=dict,
        clock=Clock(T0.timestamp()),
    )
    service.engine.assign(0, [])
    return service


async def test_a_stop_during_the_readers_own_insert_records_the_decisions_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: at the bound the decisions reader inserts itself; the stop cancelled it
    inside the insert, the batch went back and the thread landed too: recorded twice."""
    monkeypatch.setattr("worker.limits.service.MAX_UNAUDITED", 2)
    started = threading.Event()

    class SlowAudit(_Recording):
        def record(self, decisions: list[Decision]) -> list[Decision]:
            started.set()
            time.sleep(0.3)
            return super().record(decisions)

    audit = SlowAudit()
    service = _audited_service(audit)
    service._auditor = asyncio.create_task(service._audit_forever())
    reader = asyncio.create_task(
        service._on_decisions([_record(decision(f"k{i}", DecisionAction.block), i) for i in range(2)])
    )
    while not started.is_set():
        await asyncio.sleep(0.005)
    reader.cancel()  # what the decisions follower's stop does to its task
    await service.stop()
    await asyncio.sleep(0.4)
    assert audit.rows == ["k0", "k1"]
