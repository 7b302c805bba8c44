"""Decisions and allowances onto their compacted topics, notifications onto theirs: each key's
records in the order they were decided, no key waiting on another's, and no caller waiting on
the broker.

Order matters per topic and key: nodes go by version, but a compacted topic keeps the last
record by offset, so a node rebuilt from it would hold whichever landed last. Across keys, and
across the two topics, it does not: one key's partition refusing its writes (below
``min.insync.replicas``, an ACL missing) must not hold back every other key's blocks, that key's
blocks behind its allowances, nor the fast lane that decides them. Notifications are keyed the
same way, but each one must be delivered: none is superseded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from common.log_throttle import LogThrottle
from common.retry import cancel_all_and_wait, describe_error, retry_forever

log = logging.getLogger(__name__)

T = TypeVar("T")
Record = tuple[str, str, bytes]  # (topic, message key: the key id, value)
Send = Callable[[str, str, bytes], Awaitable[Any]]
Slot = tuple[str, str]  # (topic, key): what the compacted topic keeps one record of
Outcome = asyncio.Future[bool]  # a record's: True once it landed, False if it never will
Pending = tuple[bytes, Outcome]
# How often a revoke's wait for the revoked keys' senders looks again at which keys are ours.
SETTLE_LOOK_AGAIN_S = 0.1
# Failures, recoveries and dropped records are logged once per interval at most: a broker away
# with 10,000 keys waiting would otherwise log 10,000 lines per retry round.
LOG_INTERVAL_S = 10.0


class KeyedPublisher:
    """One sender task per (topic, key) with a record to send; each record retried until it lands.

    With ``supersede`` (decisions, allowances) a slot holds at most the record being sent and
    the newest one waiting: a newer record replaces one still waiting (``superseded``), since
    the compacted topic would keep only the newer and the nodes act on the newest version. So a
    long outage holds at most two records per key and topic, however often the engine decides
    meanwhile. (Decisions are audited as read from the topic: one superseded before it could be
    sent reached no node and is not.) Without it (notifications) every record waits its turn.
    ``what`` names the records in the log lines.
    """

    def __init__(
        self,
        send: Send,
        owns: Callable[[str], bool] = lambda key: True,
        retry_max_s: float = 10.0,
        log_interval_s: float = LOG_INTERVAL_S,
        *,
        supersede: bool = True,
        what: str = "decision/allowance records",
    ) -> None:
        self._send = send
        self._owns = owns  # whether this worker still owns the key's partition: retried only then
        self._retry_max_s = retry_max_s
        self._supersede = supersede
        self.what = what
        self._waiting: dict[Slot, deque[Pending]] = {}  # a slot's records not yet being sent, oldest first
        self._in_flight: dict[Slot, Outcome] = {}
        self._delays: dict[Slot, asyncio.Future[None]] = {}  # retry delays under way: a revoke ends them
        # Slots whose retries a revoke stopped, until their sender ends: the count of what they
        # dropped, shared by the slots of one stop, for the stopper to say.
        self._stopped: dict[Slot, list[int]] = {}
        self._senders: dict[Slot, asyncio.Task[None]] = {}
        self._closed = False
        self._failures = LogThrottle(log_interval_s)
        self._recoveries = LogThrottle(log_interval_s)
        self._refusals = LogThrottle(log_interval_s)
        self._disowned = LogThrottle(log_interval_s)
        self.published: Counter[str] = Counter()  # records landed, per topic
        self.superseded = 0  # waiting records a newer one of the same slot replaced (never sent)
        self.forgotten = 0  # waiting or in-flight records dropped (partitions revoked, or after the stop)

    def submit(self, records: Iterable[Record]) -> list[Outcome]:
        """Queue records (in the order decided) and return at once: they are sent in the
        background. One outcome per record: True once it landed, False if it never will (a newer
        one replaced it, its partition was revoked, the stop) -- for a caller that wants to pace
        itself on the broker without being held by a record that cannot land."""
        loop = asyncio.get_running_loop()
        outcomes: list[Outcome] = []
        for topic, key, value in records:
            slot = (topic, key)
            outcome: Outcome = loop.create_future()
            outcomes.append(outcome)
            if self._closed:
                self._forget_after_close(slot)
                outcome.set_result(False)
                continue
            queue = self._waiting.setdefault(slot, deque())
            if self._supersede and queue:
                self.superseded += 1
                _settle(queue.pop()[1], False)
            queue.append((value, outcome))
            if slot not in self._senders:
                self._senders[slot] = asyncio.create_task(self._drain(slot), name="publish-slot")
        return outcomes

    def idle(self) -> bool:
        """Nothing waits or is being sent."""
        return not self._waiting and not self._in_flight

    def waiting(self) -> tuple[int, int]:
        """(keys, records) not acknowledged yet: waiting, or being sent."""
        slots = self._waiting.keys() | self._in_flight.keys()
        return len({key for _, key in slots}), sum(map(len, self._waiting.values())) + len(self._in_flight)

    async def forget(self) -> None:
        """Drop what waits for the keys this worker no longer ``owns`` (their partitions
        revoked), and stop retrying their refused records: the next owner decides them again
        from the stored counts, and an older record of ours retried through an outage must not
        land after its newer ones. An attempt in flight is left to end (it cannot be taken
        back from the Kafka client): if it is refused, it is not retried. (A record handed to
        the Kafka client may still land until the client's request timeout expires it: a node
        that follows the topic goes by version and ignores it; one rebuilt from the compacted
        topic in that window holds it until a newer record of the key, or the block's end.)"""
        waiting = [slot for slot in self._waiting if not self._owns(slot[1])]
        dropped = sum(_settle_all(self._waiting.pop(slot)) for slot in waiting)
        self.forgotten += dropped
        retried = await self._stop_disowned_retries()
        if dropped + retried:
            log.warning(
                "%d %s of keys whose partitions were revoked dropped unpublished (%d being retried): "
                "their new owner decides them again",
                dropped + retried,
                self.what,
                retried,
            )

    async def settle_disowned(self) -> None:
        """Until no record of a key this worker no longer ``owns`` is being sent: a key whose
        record was refused before is dropped, each other one waiting gets one attempt in its
        key's order (a refusal drops the key's rest), so a revoke can let them land before the
        next owner reads what landed."""
        if retried := await self._stop_disowned_retries():
            log.warning("%d %s of revoked keys dropped while being retried", retried, self.what)
        # Looked at again on each end: a key owned again meanwhile is retried, not waited for.
        while senders := [task for (_, key), task in self._senders.items() if not self._owns(key)]:
            await asyncio.wait(senders, timeout=SETTLE_LOOK_AGAIN_S, return_when=asyncio.FIRST_COMPLETED)

    async def _stop_disowned_retries(self) -> int:
        """Stop for good the retries of the keys this worker no longer owns (their delays end
        now, and a key owned again meanwhile is not retried either), and wait until their
        senders have dropped their records (``_drop_disowned``); how many records that dropped
        (said by the caller). An attempt in flight is not waited for."""
        slots = [slot for slot in self._delays if not self._owns(slot[1]) and slot not in self._stopped]
        dropped = [0]
        for slot in slots:
            self._stopped[slot] = dropped
            _settle(self._delays[slot], None)
        if senders := [self._senders[slot] for slot in slots if slot in self._senders]:
            await asyncio.wait(senders)
        return dropped[0]

    async def _retry_delay(self, slot: Slot, delay_s: float) -> None:
        """The delay before a slot's next attempt; ``_Disowned`` once its key is no longer ours
        (at once when ``_stop_disowned_retries`` ends it: a revoke does not wait out a backoff)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay_s
        while (left := deadline - loop.time()) > 0 and self._owns(slot[1]) and slot not in self._stopped:
            woken = self._delays[slot] = loop.create_future()
            timer = loop.call_later(left, _settle, woken, None)
            try:
                await woken
            finally:
                timer.cancel()
                del self._delays[slot]
        if slot in self._stopped or not self._owns(slot[1]):
            raise _Disowned(slot[1])

    async def flush(self) -> None:
        """Until everything queued so far (and queued meanwhile) has landed."""
        while self._senders:
            await asyncio.wait(set(self._senders.values()))

    async def close(self, timeout_s: float) -> None:
        """Let the queued records land for up to ``timeout_s``, then stop trying: a stop must
        not wait on a broker that is away. What is left is said in a warning; records
        submitted afterwards are dropped (said too)."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        while self._senders and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._senders.values()), timeout=left)
        before = self.forgotten
        keys = len({key for _, key in self._senders.keys() | self._waiting.keys()})
        await cancel_all_and_wait(*self._senders.values())  # each counts its record in flight
        # What waits, also a queue a stopped sender kept for a key owned again as the stop began.
        self.forgotten += sum(_settle_all(queue) for queue in self._waiting.values())
        self._waiting.clear()
        if dropped := self.forgotten - before:  # a record acked as the time ran out landed
            log.warning(
                "%d %s of %d keys not published within %gs of the stop: "
                "the next owner of their partitions decides them again from the stored counts",
                dropped,
                self.what,
                keys,
                timeout_s,
            )

    def _forget_after_close(self, slot: Slot) -> None:
        self.forgotten += 1
        dropped = self._refusals.tick()
        if dropped is not None:
            log.warning("%d %s decided after the stop not published (last: %s)", dropped, self.what, slot)

    async def _drain(self, slot: Slot) -> None:
        topic, key = slot
        try:
            while (pending := self._next(slot)) is not None:
                value, outcome = pending
                self._in_flight[slot] = outcome
                try:
                    await self._deliver(topic, key, value)
                except Exception:  # refused, and the key's partition is no longer ours (or was revoked
                    self._drop_disowned(slot)  # while it waited to retry): not retried
                    return
                del self._in_flight[slot]
                self.published[topic] += 1
                _settle(outcome, True)
        finally:
            stopped = self._stopped.pop(slot, None)
            if (unsent := self._in_flight.pop(slot, None)) is not None:
                self.forgotten += 1  # the one place a record in flight is counted as dropped
                if stopped is not None:
                    stopped[0] += 1
                _settle(unsent, False)
            del self._senders[slot]
            if slot in self._waiting and not self._closed:  # queued while this sender was ending
                self._senders[slot] = asyncio.create_task(self._drain(slot), name="publish-slot")

    def _next(self, slot: Slot) -> Pending | None:
        """The slot's oldest record waiting, taken off its queue (the queue dropped once empty)."""
        queue = self._waiting.get(slot)
        if queue is None:
            return None
        pending = queue.popleft()
        if not queue:
            del self._waiting[slot]
        return pending

    def _drop_disowned(self, slot: Slot) -> None:
        """A slot whose key is no longer ours: its record in flight (counted by ``_drain``) and
        the records waiting behind it are dropped."""
        stopped = self._stopped.get(slot)
        if stopped is not None and self._owns(slot[1]):
            return  # owned again since the stop: what was queued since is sent by a new sender
        dropped = _settle_all(self._waiting.pop(slot, deque()))
        self.forgotten += dropped
        if stopped is not None:
            stopped[0] += dropped
            return  # said by ``forget`` or ``settle_disowned``, which stopped it
        since_last = self._disowned.tick()
        if since_last is not None:
            log.warning(
                "%d keys' %s dropped unpublished after their partition was revoked (refused, or waiting to be "
                "retried; last: %s): their new owner decides them again",
                since_last,
                self.what,
                slot,
            )

    async def _deliver(self, topic: str, key: str, value: bytes) -> None:
        """One record, retried until the broker has it or its key's partition is no longer
        ours (raised then)."""

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
            permanent=lambda exc: not self._owns(key),
            on_failure=failed,
            on_recovery=recovered,
            sleep=lambda delay: self._retry_delay((topic, key), delay),
        )


class _Disowned(Exception):
    """A record's key is no longer this worker's: its retries stop."""


def _settle(future: asyncio.Future[T], value: T) -> None:
    """A record's outcome, or a retry delay's end, unless it is settled already."""
    if not future.done():
        future.set_result(value)


def _settle_all(queue: deque[Pending]) -> int:
    """Settle the records of a dropped queue as never landing; how many there were."""
    for _, outcome in queue:
        _settle(outcome, False)
    return len(queue)
