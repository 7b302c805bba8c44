"""The worker's notifications: sent per key in the background, so one the broker refuses holds
back only its own key's later ones; each recorded once it landed, and before a revoke lets go."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from aiokafka.errors import NotEnoughReplicasError

from schemas.decisions import Window
from schemas.notifications import Notification, notification_id
from worker.limits import service as service_module
from worker.limits.engine import Verdicts
from worker.limits.service import LimitService
from worker.settings import Settings

START = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def notification(key_id: str, percent: int) -> Notification:
    return Notification(
        id=notification_id(key_id, Window.minute, int(START.timestamp()), f"{percent}%"),
        key_id=key_id,
        window=Window.minute,
        window_start=START,
        window_end=START + timedelta(minutes=1),
        threshold=f"{percent}%",
        threshold_percent=percent,
        threshold_count=percent,
        limit=100,
        count=percent,
        version=1,
        decided_at=START,
    )


class Broker:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.refusing: set[str] = set()
        self.landed: list[tuple[str, str]] = []  # (key, threshold) in the order they landed
        self.delay_s = delay_s

    async def send(self, topic: str, key: str, value: bytes) -> None:
        await asyncio.sleep(self.delay_s)
        if key in self.refusing:
            raise NotEnoughReplicasError()
        self.landed.append((key, Notification.model_validate_json(value).threshold))


class Audit:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, str]] = []

    def record(self, notifications: list[Notification]) -> None:
        self.recorded += [(n.key_id, n.threshold) for n in notifications]


def limit_service(broker: Broker, audit: Audit) -> LimitService:
    service = LimitService(
        Settings(),
        rollups=cast(Any, None),
        audit=cast(Any, None),
        send=broker.send,
        partition_count=lambda: 1,
        stored_offsets=dict,
    )
    service._notification_store = cast(Any, audit)
    service.engine.assign(0, [])  # every key is on partition 0: this worker owns them
    return service


async def test_a_refused_notification_holds_back_only_its_own_keys_later_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: one flush sent and retried the whole batch together, so one notification on a
    partition refusing writes sent the healthy ones again each round and held every later one."""
    monkeypatch.setattr(service_module, "AUDIT_INTERVAL_S", 0.02)
    broker, audit = Broker(), Audit()
    broker.refusing.add("stuck")
    service = limit_service(broker, audit)
    service._notification_recorder = asyncio.create_task(service._record_notifications_forever())
    service._publish(Verdicts(notifications=[notification("stuck", 80), notification("ok", 80)]))
    await asyncio.sleep(0.1)
    service._publish(Verdicts(notifications=[notification("stuck", 100), notification("ok", 100)]))
    await asyncio.sleep(0.1)
    assert broker.landed == [("ok", "80%"), ("ok", "100%")]  # each once: nothing sent again
    assert audit.recorded == [("ok", "80%"), ("ok", "100%")]
    assert service.notifier.waiting() == (1, 2)
    broker.refusing.clear()  # the stuck key's, in order, once its partition takes writes again
    await asyncio.wait_for(service.notifier.flush(), 5)
    await asyncio.sleep(0.1)
    assert broker.landed[2:] == [("stuck", "80%"), ("stuck", "100%")]
    assert sorted(audit.recorded) == sorted(broker.landed)
    assert service.notifications_published == 4
    await service.stop()


async def test_a_revoke_records_what_its_keys_notified_before_letting_go() -> None:
    """The next owner reads the record of what was notified: a revoke waits (bounded) for the
    revoked keys' notifications to land and be recorded, and drops those that cannot land."""
    broker, audit = Broker(delay_s=0.05), Audit()
    service = limit_service(broker, audit)
    service._publish(Verdicts(notifications=[notification("k1", 80), notification("k2", 80)]))
    broker.refusing.add("k2")
    await service.on_revoked({0})
    assert audit.recorded == [("k1", "80%")]
    assert service.notifier.waiting() == (0, 0)  # k2's refused: left to the next owner
    await service.stop()


async def test_a_revoked_key_in_retry_backoff_neither_holds_the_revoke_nor_sends_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a review: the revoke waited for a refused key's sender asleep in its backoff,
    ran out of time before recording what had landed, and the sender went on after it."""
    monkeypatch.setattr(service_module, "NOTIFICATIONS_FLUSH_TIMEOUT", 1.0)
    broker, audit = Broker(delay_s=0.01), Audit()
    broker.refusing.add("stuck")
    service = limit_service(broker, audit)
    service._publish(Verdicts(notifications=[notification("stuck", 80)]))
    await asyncio.sleep(0.7)  # refused at ~0, 0.2, 0.6: now asleep 0.8 s before the next try
    service._publish(Verdicts(notifications=[notification("healthy", 80), notification("stuck", 100)]))
    started = time.monotonic()
    await service.on_revoked({0})
    assert time.monotonic() - started < 0.4
    assert audit.recorded == [("healthy", "80%")]
    assert service.notifier.waiting() == (0, 0)
    assert service.notifier.forgotten == 2  # the stuck key's two: its new owner notifies them
    broker.refusing.clear()
    await asyncio.sleep(1.0)
    assert broker.landed == [("healthy", "80%")]  # nothing sent after the revoke
    await service.stop()


class SlowAudit(Audit):
    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def record(self, notifications: list[Notification]) -> None:
        self.started.set()
        time.sleep(0.3)  # the engine busy merging
        super().record(notifications)


async def test_a_stop_during_an_insert_records_its_notifications_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: the stop cancelled the recording loop inside its insert, whose thread
    went on and landed, and the batch, put back as not recorded, was inserted again."""
    monkeypatch.setattr(service_module, "AUDIT_INTERVAL_S", 0.02)
    broker, audit = Broker(), SlowAudit()
    service = limit_service(broker, audit)
    service._notification_recorder = asyncio.create_task(service._record_notifications_forever())
    service._publish(Verdicts(notifications=[notification("k", 80)]))
    while not audit.started.is_set():
        await asyncio.sleep(0.005)
    await service.stop()
    await asyncio.sleep(0.4)  # an insert's thread left running would land by now
    assert audit.recorded == [("k", "80%")]


async def test_a_revoke_whose_insert_outlasts_its_time_records_the_notifications_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a review: the revoke's bounded wait cancelled the insert's caller, the batch went
    back, and the insert's thread landed as well: recorded twice."""
    monkeypatch.setattr(service_module, "NOTIFICATIONS_FLUSH_TIMEOUT", 0.4)  # 0.2 s per step
    monkeypatch.setattr(service_module, "AUDIT_INTERVAL_S", 0.05)
    broker, audit = Broker(), SlowAudit()  # an insert takes 0.3 s
    service = limit_service(broker, audit)
    service._notification_recorder = asyncio.create_task(service._record_notifications_forever())
    service._publish(Verdicts(notifications=[notification("k", 80)]))
    await asyncio.sleep(0)
    await service.on_revoked({0})
    await asyncio.sleep(1.0)  # the recording loop's next rounds
    await service.stop()
    await asyncio.sleep(0.4)
    assert audit.recorded == [("k", "80%")]
