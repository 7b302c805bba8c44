"""Kafka's committed offsets, kept level with the offsets stored in ClickHouse.

They are advisory (lag monitoring, tooling): the stored offsets decide where a worker resumes.
Still, lag that never clears looks like a stuck worker, so the commits here are serialized
(an older commit never lands after a newer one) and a failed commit is tried again a few times
after a pause: a partition that gets no newer record would otherwise show the lag for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from common.retry import cancel_and_wait

log = logging.getLogger(__name__)

COMMIT_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 2.0
RETRIES = 3

StoredOffsets = Callable[[], Mapping[int, int]]


class OffsetCommitter:
    """Commits ``stored offset + 1`` of every partition Kafka has not confirmed yet."""

    def __init__(
        self,
        topic: str,
        get_consumer: Callable[[], AIOKafkaConsumer | None],
        retries: int = RETRIES,
        retry_pause_s: float = RETRY_PAUSE_S,
    ) -> None:
        self.topic = topic
        self.get_consumer = get_consumer
        self.retries = retries
        self.retry_pause_s = retry_pause_s
        self._confirmed: dict[int, int] = {}  # partition -> last stored offset Kafka confirmed
        self._lock = asyncio.Lock()
        self._retrying: asyncio.Task[None] | None = None

    def forget(self, partitions: Collection[int]) -> None:
        """Partitions that changed hands: another owner may have committed anything meanwhile."""
        for p in partitions:
            self._confirmed.pop(p, None)

    async def level(self, stored: Mapping[int, int]) -> bool:
        """Commit the partitions whose stored offset Kafka has not confirmed; True when level."""
        async with self._lock:
            behind = {p: o for p, o in stored.items() if self._confirmed.get(p, -1) < o}
            if not behind:
                return True
            if not await self._send(behind):
                # A timed-out request may still land later, and older: the next attempt sends
                # the newest offsets of these partitions whatever was confirmed before.
                self.forget(behind)
                return False
            self._confirmed.update(behind)
            return True

    def level_soon(self, stored: StoredOffsets) -> None:
        """Level from a task, trying again after a pause when it fails (bounded). A task already
        on its way reads the newest offsets when it runs, so a second one is not started."""
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(self._level_with_retries(stored), name="ingest-commit-level")

    async def close(self, stored: StoredOffsets) -> None:
        """Shutdown: one last attempt, bounded by the commit timeout; pending retries stop."""
        task, self._retrying = self._retrying, None
        await cancel_and_wait(task)  # a cancel lost in the commit's wait_for must not leave it running
        await self.level(stored())

    async def _level_with_retries(self, stored: StoredOffsets) -> None:
        for attempt in range(1, self.retries + 1):
            if await self.level(stored()):
                return
            if attempt < self.retries:
                await asyncio.sleep(self.retry_pause_s)
        log.warning(
            "kafka offsets still behind the stored ones after %d commits; the next write commits again",
            self.retries,
        )

    async def _send(self, offsets: dict[int, int]) -> bool:
        consumer = self.get_consumer()
        if consumer is None:
            return False
        try:
            # Bounded: aiokafka retries a commit until the group coordinator answers, and an
            # advisory commit must not hold up the landing of later writes (or a shutdown).
            await asyncio.wait_for(
                consumer.commit(
                    {TopicPartition(self.topic, p): OffsetAndMetadata(o + 1, "") for p, o in offsets.items()}
                ),
                COMMIT_TIMEOUT_S,
            )
        except Exception as exc:  # advisory only: ClickHouse holds the offsets that matter
            log.warning("kafka offset commit failed (stored offsets are authoritative): %r", exc)
            return False
        return True
