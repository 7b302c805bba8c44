"""Kafka commits kept level with the stored offsets: never backwards, tried again after a failure."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from worker.ingest.commits import OffsetCommitter


class FakeConsumer:
    """Records each commit as the broker would apply it; the first ``failures`` raise; the
    n-th commit takes ``delays[n]`` seconds (0 past the list)."""

    def __init__(self, failures: int = 0, delays: tuple[float, ...] = ()) -> None:
        self.failures = failures
        self.delays = list(delays)
        self.commits: list[dict[int, int]] = []

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        await asyncio.sleep(self.delays.pop(0) if self.delays else 0.0)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("coordinator unavailable")
        self.commits.append({tp.partition: meta.offset for tp, meta in offsets.items()})


def committer(consumer: FakeConsumer, retries: int = 3) -> OffsetCommitter:
    return OffsetCommitter("events", lambda: consumer, retries=retries, retry_pause_s=0.01)  # type: ignore[arg-type, return-value]


async def test_commits_only_what_kafka_has_not_confirmed() -> None:
    consumer = FakeConsumer()
    commits = committer(consumer)
    assert await commits.level({0: 9, 1: 4})
    assert await commits.level({0: 9, 1: 6})
    assert await commits.level({0: 9, 1: 6})
    assert consumer.commits == [{0: 10, 1: 5}, {1: 7}]  # next offset to read: stored + 1


async def test_a_slow_level_commit_never_lands_after_a_newer_one() -> None:
    consumer = FakeConsumer(delays=(0.2, 0.0))  # the first commit is slow to be answered
    commits = committer(consumer)
    stored = {0: 100}
    commits.level_soon(lambda: stored)  # the assignment's commit, from a task
    await asyncio.sleep(0.02)  # on its way to the broker
    stored[0] = 250  # a write landed meanwhile
    assert await commits.level(stored)
    await asyncio.sleep(0.3)  # the slow one has been answered
    assert consumer.commits[-1] == {0: 251}
    assert all(c[0] <= 251 for c in consumer.commits)
    assert [c[0] for c in consumer.commits] == sorted(c[0] for c in consumer.commits)


async def test_a_failed_commit_is_tried_again_without_a_new_record() -> None:
    consumer = FakeConsumer(failures=2)
    commits = committer(consumer)
    stored = {0: 41, 3: 7}
    assert not await commits.level(stored)
    commits.level_soon(lambda: stored)
    for _ in range(100):
        if consumer.commits:
            break
        await asyncio.sleep(0.01)
    assert consumer.commits == [{0: 42, 3: 8}]


async def test_retries_are_bounded() -> None:
    consumer = FakeConsumer(failures=1_000)
    commits = committer(consumer, retries=3)
    commits.level_soon(lambda: {0: 1})
    await asyncio.sleep(0.2)
    assert consumer.failures == 1_000 - 3
    assert consumer.commits == []


async def test_partitions_that_changed_hands_are_committed_again() -> None:
    consumer = FakeConsumer()
    commits = committer(consumer)
    assert await commits.level({0: 5})
    commits.forget({0})  # revoked; another owner may have committed 3 meanwhile
    assert await commits.level({0: 5})
    assert consumer.commits == [{0: 6}, {0: 6}]
