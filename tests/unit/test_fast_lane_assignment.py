"""The limits' fast lane and a rebalance that completes while its fetch waits (a fake consumer
forces the race): the fetch's records came from the old position and overwrote the position the
new assignment set, so the events between the stored offset and the old position were never
counted by the limits (or counted twice, the other way round)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

import common.follower as follower
import worker.limits.fastlane as fastlane


class RacingConsumer:
    """Its first fetch waits for ``gate`` and then returns records 200..209 of partition 0."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.fetches = 0
        self.seeks: list[tuple[int, int]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, tps: list[TopicPartition]) -> None:
        pass

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp.partition, offset))

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        pass

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        self.fetches += 1
        if self.fetches == 1:
            await self.gate.wait()
            return {TopicPartition("ev", 0): [SimpleNamespace(partition=0, offset=o) for o in range(200, 210)]}
        await asyncio.sleep(0.01)
        return {}


def _counting_lane(monkeypatch: pytest.MonkeyPatch, consumer: RacingConsumer, counted: list[int]) -> fastlane.FastLane:
    """A fast lane on ``consumer`` counting from offset 200 of partition 0; ``counted``: the
    number of records of each batch it hands over."""
    monkeypatch.setattr(fastlane.kafka_clients, "consumer", lambda *a, **k: consumer)
    monkeypatch.setattr(fastlane, "group_batch", lambda records, *a: fastlane.FastBatch(records=len(records)))

    async def on_batch(batch: fastlane.FastBatch) -> None:
        counted.append(batch.records)

    lane = fastlane.FastLane("127.0.0.1:1", "ev", validator=None, on_batch=on_batch, recent_max=10)  # type: ignore[arg-type]
    lane.assign(0, 199)
    return lane


async def test_a_fetch_that_straddles_a_new_assignment_is_fetched_again(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = asyncio.Event()
    consumer = RacingConsumer(gate)
    counted: list[int] = []
    lane = _counting_lane(monkeypatch, consumer, counted)  # counting from 200
    await lane.start()
    try:
        while consumer.fetches < 1:
            await asyncio.sleep(0.001)
        # The partition revoked and assigned back meanwhile, its counters rebuilt up to offset 149.
        lane.revoke({0})
        lane.assign(0, 149)
        gate.set()
        while consumer.fetches < 3:
            await asyncio.sleep(0.001)
    finally:
        await lane.stop()
    assert counted == []  # the old position's records were not counted
    assert lane.positions[0] == 150
    assert consumer.seeks[-1] == (0, 150)


async def test_a_new_assignment_while_the_topic_check_waits_is_not_overwritten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same race across the topic watch, which asks the cluster when the consumer's metadata
    lacks the topic (at a start, around a refresh); found by a review of the first fix."""
    gate = asyncio.Event()
    consumer = RacingConsumer(gate)
    monkeypatch.setattr(consumer, "partitions_for_topic", lambda topic: None)
    in_check = asyncio.Event()

    async def listed(kafka: Any) -> set[str]:
        in_check.set()
        await asyncio.sleep(0.05)
        return {"ev"}

    monkeypatch.setattr(follower, "_listed_topics", listed)
    counted: list[int] = []
    lane = _counting_lane(monkeypatch, consumer, counted)
    await lane.start()
    try:
        while consumer.fetches < 1:
            await asyncio.sleep(0.001)
        gate.set()
        await in_check.wait()  # the fetch of 200..209 is back; the topic check waits on the cluster
        lane.revoke({0})
        lane.assign(0, 149)
        while consumer.fetches < 3:
            await asyncio.sleep(0.001)
    finally:
        await lane.stop()
    assert counted == []
    assert lane.positions[0] == 150
    assert consumer.seeks[-1] == (0, 150)
