"""Decisions and allowances onto their compacted topics: each key's records in the order they
were decided, no key waiting on another's, and no caller waiting on the broker.

Order matters within a key: nodes go by version, but a compacted topic keeps the last record by
offset, so a node rebuilt from it would hold whichever landed last. Across keys it does not: one
key's partition refusing its writes (below ``min.insync.replicas``, an ACL missing) must not hold
back every other key's blocks, nor the fast lane that decides them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from common.log_throttle import LogThrottle
from common.retry import cancel_all_and_wait, describe_error, retry_forever

log = logging.getLogger(__name__)

Record = tuple[str, str, bytes]  # (topic, message key: the key id, value)
Send = Callable[[str, str, bytes], Awaitable[Any]]
# Failures and recoveries are logged once per interval at most: a broker away with 10,000 keys
# waiting would otherwise log 10,000 lines per retry round.
LOG_INTERVAL_S = 10.0


class KeyedPublisher:
    """One sender task per key with records waiting; each record retried until it lands.

    ``latest_only``: topics where a newer record of a key replaces one of that key still
    waiting (not yet being sent): the compacted topic would keep only the newer, and the nodes
    act on the newest version. Elsewhere (decisions: each is audited) every record is sent.
    """

    def __init__(
        self,
        send: Send,
        latest_only: Collection[str] = (),
        retry_max_s: float = 10.0,
        log_interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self._send = send
        self._latest_only = frozenset(latest_only)
        self._retry_max_s = retry_max_s
        self._waiting: dict[str, deque[Record]] = {}  # key -> records not yet being sent
        self._senders: dict[str, asyncio.Task[None]] = {}  # key -> its sender (one record in flight)
        self._failures = LogThrottle(log_interval_s)
        self._recoveries = LogThrottle(log_interval_s)
        self.published: Counter[str] = Counter()  # records landed, per topic
        self.superseded = 0  # waiting records a newer one of the same key and topic replaced

    def submit(self, records: Iterable[Record]) -> None:
        """Queue records (in the order decided) and return at once: they are sent in the background."""
        for record in records:
            topic, key, _ = record
            queue = self._waiting.get(key)
            if queue is None:
                queue = self._waiting[key] = deque()
            elif topic in self._latest_only and any(r[0] == topic for r in queue):
                kept = deque(r for r in queue if r[0] != topic)
                self.superseded += len(queue) - len(kept)
                queue = self._waiting[key] = kept
            queue.append(record)
            if key not in self._senders:
                self._senders[key] = asyncio.create_task(self._drain(key), name="publish-key")

    def waiting(self) -> tuple[int, int]:
        """(keys, records) not published yet: queued, or being sent (one per key with a sender)."""
        return len(self._waiting.keys() | self._senders.keys()), sum(map(len, self._waiting.values())) + len(
            self._senders
        )

    async def flush(self) -> None:
        """Until everything queued so far (and queued meanwhile) has landed."""
        while self._senders:
            await asyncio.wait(set(self._senders.values()))

    async def close(self, timeout_s: float) -> None:
        """Let the queued records land for up to ``timeout_s``, then stop trying: a stop must
        not wait on a broker that is away. What is left is said in a warning."""
        deadline = time.monotonic() + timeout_s
        while self._senders and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._senders.values()), timeout=left)
        if self._senders:
            keys, records = self.waiting()
            log.warning(
                "%d decision/allowance records of %d keys not published within %.0fs of the stop: "
                "the next owner of their partitions decides them again from the stored counts",
                records,
                keys,
                timeout_s,
            )
            await cancel_all_and_wait(*self._senders.values())

    async def _drain(self, key: str) -> None:
        try:
            while queue := self._waiting.get(key):
                topic, _, value = queue.popleft()
                await self._deliver(topic, key, value)
                self.published[topic] += 1
            self._waiting.pop(key, None)
        finally:
            del self._senders[key]

    async def _deliver(self, topic: str, key: str, value: bytes) -> None:
        """One record, retried until the broker has it."""

        def failed(exc: Exception, attempt: int, delay: float) -> None:
            since_last = self._failures.tick()
            if since_last is not None:
                keys, records = self.waiting()
                log.error(
                    "publishing to %s failed for key %s (attempt %d, retry in %.1fs): %s; %d failed "
                    "sends since the last such line, %d records of %d keys waiting (other keys go on)",
                    topic,
                    key,
                    attempt,
                    delay,
                    describe_error(exc),
                    since_last,
                    records,
                    keys,
                )

        def recovered(attempts: int) -> None:
            since_last = self._recoveries.tick()
            if since_last is not None:
                log.warning(
                    "publishing to %s landed for key %s after %d attempts (%d keys recovered since the last such line)",
                    topic,
                    key,
                    attempts,
                    since_last,
                )

        await retry_forever(
            lambda: self._send(topic, key, value),
            f"publishing to {topic}",
            0.2,
            self._retry_max_s,
            on_failure=failed,
            on_recovery=recovered,
        )
