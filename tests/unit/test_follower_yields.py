"""A follower lets the event loop run between the partitions of one fetch."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from common.follower import FOLLOW_MAX_RECORDS, TopicFollower, TopicUnavailable, TopicWatch

TOPIC = "allowances"
TPS = [TopicPartition(TOPIC, p) for p in range(3)]


def record(partition: int, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(TOPIC, partition, offset, 0, 0, b"k", b"{}", None, 0, 2, ())


class OneFetch:
    """A consumer whose first fetch holds all three partitions; then nothing."""

    def __init__(self) -> None:
        self.fetches = 0
        self.asked: list[int] = []  # max_records of each getmany

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in TPS}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 2 for tp in tps}

    async def getmany(self, **options: Any) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        self.fetches += 1
        self.asked.append(options["max_records"])
        if self.fetches == 1:
            return {tp: [record(tp.partition, 0), record(tp.partition, 1)] for tp in TPS}
        await asyncio.sleep(0.01)
        return {}


async def test_other_tasks_run_between_the_partitions_of_a_fetch() -> None:
    """A worker's followers share the loop with its limits: a fetch of thousands of records per
    partition (a follower catching up) must not hold the loop for all of them at once."""
    ticks = 0
    seen_at: list[int] = []  # the other task's ticks when each partition was handed over

    async def on_records(records: list[Any]) -> None:
        seen_at.append(ticks)

    async def other_task() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    follower = TopicFollower("127.0.0.1:1", TOPIC, on_records, "test")
    consumer = OneFetch()
    other = asyncio.create_task(other_task())
    reading = asyncio.create_task(follower._read(consumer, TPS, TopicWatch("127.0.0.1:1", [TOPIC])))
    try:
        await asyncio.wait_for(follower.ready.wait(), 5)
    finally:
        reading.cancel()
        other.cancel()
        await asyncio.gather(reading, other, return_exceptions=True)
    assert len(seen_at) == 3
    assert seen_at[0] < seen_at[1] < seen_at[2]  # the other task ran between them
    assert follower.positions == {tp: 2 for tp in TPS}
    # and a fetch is handed over a few hundred records at a time, not thousands
    assert consumer.asked
    assert max(consumer.asked) == FOLLOW_MAX_RECORDS <= 500


async def test_the_backoff_starts_over_after_a_connection_that_was_up(caplog: pytest.LogCaptureFixture) -> None:
    """Five failed attempts raise the delay to its max; a connection that then held and failed
    must not leave the next outage at that max (a node's cache would wait 5 s after a blip), and
    one that fails as soon as it connects must not reset it (a reconnect loop at full speed)."""
    delays: list[float] = []
    attempts = 0

    async def follow() -> None:
        nonlocal attempts
        attempts += 1
        if attempts in (6, 7):
            follower.connected = False  # what a probe of the broker says after a blip
            # connected, then the broker went: after reading for 1 s (6), at once (7)
            follower._connected_at = time.monotonic() - (1.0 if attempts == 6 else 0.0)
        raise ConnectionError(f"down {attempts}")

    async def on_records(records: list[Any]) -> None:
        pass

    follower = TopicFollower("127.0.0.1:1", TOPIC, on_records, "test", first_delay=0.01, max_delay=0.08)
    failed = follower._failed

    def record(exc: Exception, attempt: int, delay: float) -> None:
        delays.append(delay)
        failed(exc, attempt, delay)

    follower._failed = record  # type: ignore[method-assign]
    follower.follow = follow  # type: ignore[method-assign]
    await follower.start()
    try:
        while attempts < 9:
            await asyncio.sleep(0.01)
    finally:
        await follower.stop()
    assert delays[:5] == [0.01, 0.02, 0.04, 0.08, 0.08]
    # 6 held longer than max_delay: said with first_delay, and the next outage starts over;
    # 7 failed as soon as it connected: retried with the growing backoff.
    assert delays[5:8] == [0.01, 0.01, 0.02]
    assert not follower.connected
    assert not [r for r in caplog.records if "succeeded" in r.getMessage()]  # a failure is no success


class NoPosition(OneFetch):
    """A compacted topic that ends past its last record, with the broker gone: ``position()``
    (which aiokafka retries until the broker answers) never returns."""

    async def getmany(self, **options: Any) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        await asyncio.sleep(0.01)
        return {}

    async def position(self, tp: TopicPartition) -> int:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_position_the_broker_never_gives_fails_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the catch-up waited for it for ever, the follower saying it was connected."""
    monkeypatch.setattr("common.follower.POSITION_TIMEOUT_S", 0.2)
    follower = TopicFollower("127.0.0.1:1", TOPIC, lambda records: asyncio.sleep(0), "test")
    with pytest.raises(TopicUnavailable, match=r"no position of allowances\[0\] within 0.2 s"):
        await asyncio.wait_for(follower._read(NoPosition(), TPS, TopicWatch("127.0.0.1:1", [TOPIC])), 5)
    assert not follower.ready.is_set()
