"""The webhook deliverer: the notifications topic, posted to every configured endpoint.

A consumer group (``METER_NOTIFY_CONSUMER_GROUP``) reads the notifications topic; each
notification is POSTed as JSON to every URL of ``METER_NOTIFY_WEBHOOK_URLS``, signed
(``worker.notify.signature``). An attempt succeeds on a 2xx answer. A timeout, a connection
failure, 408, 425, 429 or 5xx is retried: the delay before attempt n+1 is drawn at random in
[0, min(first × 2^(n-1), max)] (exponential backoff, full jitter; a ``Retry-After`` within
the max is honoured), up to ``METER_NOTIFY_MAX_ATTEMPTS`` attempts. Any other answer (3xx,
4xx) is final. What an endpoint never accepted goes to the dead-letter topic with the reason
and the endpoint; a record that is not a notification goes there too, whole, with its reason.

Each endpoint goes at its own pace: the deliverer keeps fetching while an endpoint retries, so
one that keeps failing holds back neither the others' notifications of the same fetch nor
those of later fetches, until it is ``MAX_HELD_NOTIFICATIONS`` behind (then fetching pauses).
A partition's offset is committed only up to its first notification that some endpoint has not
delivered or dead-lettered yet (``worker.notify.progress``): nothing is lost, and a crash or a
rebalance delivers again what was not committed (at-least-once; receivers deduplicate on the
notification's ``id``, sent as ``X-Meter-Notification-Id`` too). Within this process a
notification already delivered to an endpoint is not sent to it again (a worker may publish a
crossing twice, same id). Notifications of one key are posted to each endpoint in order, one at
a time, across fetches; different keys concurrently, at most
``METER_NOTIFY_CONCURRENCY_PER_ENDPOINT`` requests in flight per endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
from aiokafka import ConsumerRebalanceListener, TopicPartition
from pydantic import ValidationError

from common import kafka_clients
from common.follower import topic_partitions
from common.recent_set import RecentSet
from common.retry import (
    cancel_all_and_wait,
    cancel_and_wait,
    describe_error,
    finish_despite_cancels,
    keep_running,
    retry_forever,
)
from schemas.notifications import Notification, UndeliveredNotification
from worker.ingest.dlq import dead_letter, dead_letter_key, record_id, send_or_skip
from worker.notify.progress import PartitionProgress
from worker.notify.signature import HEADER, sign
from worker.records import Rejection, validation_reason
from worker.settings import Settings

log = logging.getLogger(__name__)

USER_AGENT = "usage-meter-notify/1"
RETRIED_STATUSES = frozenset({408, 425, 429})  # and every 5xx
FETCH_MAX_RECORDS = 200
# Notifications fetched and not committed (behind the oldest one some endpoint has not ended)
# before fetching pauses: an endpoint that keeps failing holds back the others only once it is
# this far behind; memory and what a crash or rebalance delivers again stay bounded by it.
MAX_HELD_NOTIFICATIONS = 10_000
CLIENTS_STOP_TIMEOUT_S = 30.0  # leaving the group and flushing the producer, at most
_DEAD_LETTERS = "dead letters"  # the chains' slot of records that are not notifications (never a URL)
REMEMBERED_DELIVERIES = 100_000  # (notification, endpoint) pairs done, to skip a duplicate

Sleep = Callable[[float], Awaitable[Any]]


@dataclass(frozen=True)
class Endpoint:
    url: str
    label: str  # for logs and the dead-letter topic: never the path or query (they may hold a token)
    slots: asyncio.Semaphore  # requests in flight to this endpoint


def endpoint_label(url: str) -> str:
    """``scheme://host[:port]`` plus a short hash of the whole URL: which endpoint, without the
    path and query string, where services put their tokens."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    more = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{more} #{hashlib.sha256(url.encode()).hexdigest()[:8]}"


class Failure(Exception):
    """An attempt the endpoint did not accept."""

    def __init__(self, reason: str, *, final: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.final = final  # retrying cannot help (e.g. 404): dead-letter now
        self.retry_after = retry_after


@dataclass
class DeliveryStats:
    delivered: int = 0  # (notification, endpoint) pairs accepted
    attempts: int = 0
    retries: int = 0
    dead_lettered: int = 0
    duplicates: int = 0  # skipped: already delivered or dead-lettered by this process
    invalid: int = 0  # records that are not notifications (dead-lettered with the reason)

    def summary(self) -> str:
        return (
            f"{self.delivered} delivered, {self.attempts} attempts ({self.retries} retried), "
            f"{self.dead_lettered} dead-lettered, {self.duplicates} duplicates skipped, {self.invalid} invalid"
        )


def _retry_after(value: str | None) -> float | None:
    # ASCII digits only: str.isdigit() takes '²' too, which float() refuses.
    if value is None or not (value.strip().isascii() and value.strip().isdigit()):
        return None  # an HTTP date is rare on webhooks: the backoff decides
    return float(value.strip())


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:500]


async def _then_done(step: Callable[[], Awaitable[None]], progress: PartitionProgress, offset: int) -> None:
    await step()
    progress.done(offset)


async def _stop_clients(*clients: Any) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.stop()


class _Skipped(Exception):
    """A chain not run: the one before it in its slot was cancelled, failed or not run."""


class _InFlight(ConsumerRebalanceListener):  # type: ignore[misc]
    """One connection's deliveries in flight: each partition's progress, the newest chain of
    deliveries per (endpoint, partition, key), and the first error one of them raised (a bug:
    the fetch loop raises it and reconnects, and what was not committed is delivered again)."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.progress: dict[TopicPartition, PartitionProgress] = {}
        self.chains: dict[tuple[str, TopicPartition, bytes | None], asyncio.Task[None]] = {}  # the newest
        self.running: dict[asyncio.Task[None], TopicPartition] = {}  # every chain not ended, and its partition
        self.failure: BaseException | None = None
        # One commit at a time: aiokafka retries a commit after a backoff without looking at the
        # assignment again, so a revoke's commit could land first and be overwritten with less.
        self._commit_lock = asyncio.Lock()

    @property
    def held(self) -> int:
        """Notifications fetched and not committed yet (ended or not): what a crash or a
        rebalance delivers again, and what memory holds."""
        return sum(p.held for p in self.progress.values())

    def chain(self, slot: tuple[str, TopicPartition, bytes | None], deliver: Callable[[], Awaitable[None]]) -> None:
        """Run ``deliver`` once the chain of ``slot`` before it has ended."""
        task = asyncio.create_task(self._after(self.chains.get(slot), deliver))
        self.chains[slot] = task
        self.running[task] = slot[1]
        task.add_done_callback(partial(self._ended, slot))

    @staticmethod
    async def _after(before: asyncio.Task[None] | None, deliver: Callable[[], Awaitable[None]]) -> None:
        if before is not None:
            await asyncio.wait({before})
            if before.cancelled() or before.exception() is not None:
                # Never past a notification that did not end, down the whole chain: the fetch
                # loop raises the failure (or the partition was dropped) and the rest is
                # delivered again from the commit point.
                raise _Skipped
        await deliver()

    def _ended(self, slot: tuple[str, TopicPartition, bytes | None], task: asyncio.Task[None]) -> None:
        self.running.pop(task, None)
        if self.chains.get(slot) is task:
            del self.chains[slot]
        if task.cancelled() or self.failure is not None:
            return
        error = task.exception()
        if error is not None and not isinstance(error, _Skipped):
            self.failure = error

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def commit(self, partitions: Collection[TopicPartition] | None = None) -> None:
        """Commit each owned partition (of ``partitions``, default all) up to its commit point."""
        async with self._commit_lock:
            await self._commit(partitions)

    async def _commit(self, partitions: Collection[TopicPartition] | None) -> None:
        assigned = self.consumer.assignment()
        moved: dict[TopicPartition, tuple[PartitionProgress, int]] = {}
        for tp, progress in self.progress.items():
            if tp not in assigned or (partitions is not None and tp not in partitions):
                continue
            point = progress.commit_point()
            if point is not None and point != progress.committed:
                moved[tp] = progress, point
        if moved:
            await self.consumer.commit({tp: point for tp, (_, point) in moved.items()})
            for progress, point in moved.values():
                progress.committed = point  # a progress dropped meanwhile is no longer read

    async def drop(self, partitions: Collection[TopicPartition]) -> None:
        """Stop the deliveries of ``partitions`` and forget them (their owner delivers again what
        was not committed; receivers deduplicate by the notification's id)."""
        tasks = [task for task, tp in self.running.items() if tp in partitions]
        try:
            await cancel_all_and_wait(*tasks)  # every one cancelled at once; errors are not raised
        finally:
            for task in tasks:
                self.running.pop(task, None)  # ended: its callback may not have run yet
        for slot in [slot for slot in self.chains if slot[1] in partitions]:
            del self.chains[slot]
        for tp in partitions:
            self.progress.pop(tp, None)

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        partitions = set(revoked)
        # The lock until the partitions are dropped: a commit of the loop waiting for it would
        # commit them again meanwhile (the assignment still lists them), possibly after the
        # next owner's. The chains the drop waits for never take it.
        async with self._commit_lock:
            try:
                await self._commit(partitions)  # what ended is not delivered again by the next owner
            except Exception as exc:  # e.g. the member's session already lost: the next owner redelivers
                log.warning("notify: committing revoked partitions failed (%s)", describe_error(exc))
            finally:
                await self.drop(partitions)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        pass  # read from the committed offsets; a partition's progress starts with its first fetch


class WebhookDeliverer:
    """Consumes the notifications topic and posts each notification to every endpoint (see the
    module docstring). ``start`` / ``stop`` inside a running loop (the worker), or ``run``."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not settings.notify_webhook_urls:
            raise ValueError("no webhook endpoints: set METER_NOTIFY_WEBHOOK_URLS")
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.jitter = jitter
        self.secret = settings.notify_webhook_secret.get_secret_value().encode()
        per_endpoint = settings.notify_concurrency_per_endpoint
        self.endpoints = [
            Endpoint(u, endpoint_label(u), asyncio.Semaphore(per_endpoint)) for u in settings.notify_webhook_urls
        ]
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.notify_webhook_timeout_s),
            limits=httpx.Limits(max_connections=per_endpoint * len(self.endpoints)),
            follow_redirects=False,
            transport=transport,
            headers={"User-Agent": USER_AGENT},
        )
        self.stats = DeliveryStats()
        self._done: RecentSet[tuple[str, str]] = RecentSet(REMEMBERED_DELIVERIES)  # (notification id, url)
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="notify-deliverer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self.client.aclose()
        log.info("notify stopped: %s", self.stats.summary())

    async def run(self) -> None:
        s = self.settings
        log.info(
            "notify: delivering %s (group %s) on %s to %s",
            s.notifications_topic,
            s.notify_consumer_group,
            kafka_clients.describe(s),
            ", ".join(e.label for e in self.endpoints),
        )
        await keep_running(self._consume, f"notify: consuming {s.notifications_topic}", 0.5, 10.0)

    # -- consuming -------------------------------------------------------------------------
    async def _consume(self) -> None:
        """One connection: never returns; raises on a failure (``keep_running`` reconnects)."""
        s = self.settings
        # Both topics must exist (the worker creates them): a consumer or producer naming a missing
        # topic would have it auto-created with the broker's defaults.
        await topic_partitions(s, [s.notifications_topic, s.notifications_dlq_topic])
        producer = kafka_clients.producer(s, enable_idempotence=True, acks="all")
        consumer = kafka_clients.consumer(
            s,
            group_id=s.notify_consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=s.consumer_session_timeout_ms,
            heartbeat_interval_ms=s.consumer_heartbeat_interval_ms,
        )
        in_flight = _InFlight(consumer)
        consumer.subscribe([s.notifications_topic], listener=in_flight)
        try:
            await producer.start()
            self._producer = producer
            await consumer.start()
            while True:
                # Past the bound (an endpoint far behind), fetch nothing more but keep polling:
                # the group keeps this member, and a rebalance is handled meanwhile.
                if in_flight.held >= MAX_HELD_NOTIFICATIONS:
                    consumer.pause(*consumer.assignment())
                else:
                    consumer.resume(*consumer.paused())
                batches = await consumer.getmany(timeout_ms=500, max_records=FETCH_MAX_RECORDS)
                for tp, records in batches.items():
                    self._hand_over(in_flight, tp, records)  # no await: a revoke cannot cut into it
                in_flight.raise_failure()
                # Only what every endpoint delivered or dead-lettered, in offset order.
                await in_flight.commit()
        finally:
            try:
                await in_flight.drop(set(in_flight.progress))
            finally:
                self._producer = None
                # To its end, whatever cancels the caller meanwhile: the group must be left.
                stopping = _stop_clients(consumer, producer)
                await finish_despite_cancels(stopping, "notify: stopping the Kafka clients", CLIENTS_STOP_TIMEOUT_S)

    def _hand_over(self, in_flight: _InFlight, tp: TopicPartition, records: list[Any]) -> None:
        """One partition's fetch to every endpoint: each key's notifications in order, after the
        ones of that key still in flight to that endpoint (each endpoint on its own: one that keeps
        failing does not hold back the others' next notifications). Records that are not
        notifications are dead-lettered the same way, in order, by a chain of their own."""
        progress = in_flight.progress.setdefault(tp, PartitionProgress())
        by_key: dict[bytes | None, list[tuple[Notification, bytes, Any]]] = {}
        for record in records:
            if record.value is None:
                progress.add(record.offset, 0)
                continue
            try:
                notification = Notification.model_validate_json(record.value)
            except ValidationError as exc:
                progress.add(record.offset, 1)
                unreadable = partial(self._dead_letter_unreadable, record, exc)
                in_flight.chain((_DEAD_LETTERS, tp, None), partial(_then_done, unreadable, progress, record.offset))
                continue
            progress.add(record.offset, len(self.endpoints))
            by_key.setdefault(record.key, []).append((notification, notification.model_dump_json().encode(), record))
        for key, parsed in by_key.items():
            for endpoint in self.endpoints:
                in_flight.chain((endpoint.url, tp, key), partial(self._deliver_each, endpoint, parsed, progress))

    async def _deliver_each(
        self, endpoint: Endpoint, parsed: list[tuple[Notification, bytes, Any]], progress: PartitionProgress
    ) -> None:
        for notification, body, record in parsed:
            await self._deliver(endpoint, notification, body, record)
            progress.done(record.offset)

    # -- delivering ------------------------------------------------------------------------
    async def _deliver(self, endpoint: Endpoint, n: Notification, body: bytes, record: Any) -> None:
        """Deliver ``n`` to ``endpoint``, retrying; dead-letter it if the endpoint never accepts it."""
        done = (n.id, endpoint.url)
        if done in self._done:
            self.stats.duplicates += 1
            return
        s = self.settings
        attempts = 0
        last: Failure | None = None

        async def attempt() -> None:
            nonlocal attempts
            attempts += 1
            try:
                await self._post(endpoint, n, body, attempts)
            except Failure:
                raise
            except Exception as exc:
                # A bug some notification or answer trips (a header it cannot be sent in, ...):
                # retrying cannot help, and raising would stop every delivery behind it for good.
                log.exception("notification %s to %s: attempt %d failed", n.id, endpoint.label, attempts)
                raise Failure(_clean(describe_error(exc)), final=True) from None

        def give_up(exc: Exception) -> bool:
            return not isinstance(exc, Failure) or exc.final or attempts >= s.notify_max_attempts

        def failed(exc: Exception, attempt: int, delay: float) -> None:
            nonlocal last
            last = exc if isinstance(exc, Failure) else None
            self.stats.retries += 1
            log.warning("notification %s to %s: attempt %d failed (%s)", n.id, endpoint.label, attempt, exc)

        async def backoff(delay: float) -> None:
            wait = self.jitter() * delay  # full jitter
            if last is not None and last.retry_after is not None:
                wait = max(wait, min(last.retry_after, s.notify_retry_max_delay_s))
            await self.sleep(wait)

        try:
            await retry_forever(
                attempt,
                f"notification {n.id} to {endpoint.label}",
                s.notify_retry_first_delay_s,
                s.notify_retry_max_delay_s,
                permanent=give_up,
                on_failure=failed,
                sleep=backoff,
            )
            self.stats.delivered += 1
        except Failure as exc:
            await self._dead_letter(endpoint, n, exc.reason, attempts, record)
        self._remember(done)

    async def _post(self, endpoint: Endpoint, n: Notification, body: bytes, attempt: int) -> None:
        headers = {
            "Content-Type": "application/json",
            HEADER: sign(self.secret, body, int(self.clock())),  # signed anew: a fresh timestamp
            "X-Meter-Notification-Id": n.id,
            "X-Meter-Delivery-Attempt": str(attempt),
        }
        async with endpoint.slots:
            self.stats.attempts += 1
            try:
                async with asyncio.timeout(self.settings.notify_webhook_timeout_s):
                    # The answer's body is never read: only its status matters.
                    async with self.client.stream("POST", endpoint.url, content=body, headers=headers) as response:
                        status = response.status_code
                        retry_after = _retry_after(response.headers.get("Retry-After"))
            except (TimeoutError, httpx.TimeoutException):
                raise Failure(f"no answer within {self.settings.notify_webhook_timeout_s:g}s") from None
            except httpx.HTTPError as exc:
                raise Failure(_clean(describe_error(exc))) from None
        if 200 <= status < 300:
            return
        final = not (status >= 500 or status in RETRIED_STATUSES)
        raise Failure(f"HTTP {status}", final=final, retry_after=retry_after)

    async def _dead_letter(self, endpoint: Endpoint, n: Notification, reason: str, attempts: int, record: Any) -> None:
        letter = UndeliveredNotification(
            notification=n,
            endpoint=endpoint.label,
            reason=_clean(reason),
            attempts=attempts,
            failed_at=datetime.fromtimestamp(self.clock(), UTC),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        producer = self._producer
        await retry_forever(  # not lost: wait for the broker
            lambda: producer.send_and_wait(
                self.settings.notifications_dlq_topic, letter.model_dump_json().encode(), key=n.id.encode()
            ),
            f"dead-lettering notification {n.id}",
        )
        self.stats.dead_lettered += 1
        log.error(
            "notification %s (%s) dead-lettered for %s after %d attempt(s): %s",
            n.id,
            n.key_id,
            endpoint.label,
            attempts,
            letter.reason,
        )

    async def _dead_letter_unreadable(self, record: Any, exc: ValidationError) -> None:
        """A record that is not a notification (nothing to deliver) goes to the dead-letter topic
        whole, in the events' dead-letter format (``worker.ingest.dlq``): not skipped unseen."""
        place = record_id(record.topic, record.partition, record.offset)
        done = (place, _DEAD_LETTERS)
        if done in self._done:  # fetched again (a revoke, a restart): dead-lettered already
            self.stats.duplicates += 1
            return
        reason, detail = validation_reason(exc)
        rejection = Rejection(record.topic, record.partition, record.offset, reason, detail, record.key, record.value)
        value, headers = dead_letter(rejection, datetime.fromtimestamp(self.clock(), UTC))
        producer = self._producer
        topic, key = self.settings.notifications_dlq_topic, dead_letter_key(rejection)
        if await send_or_skip(lambda: producer.send_and_wait(topic, value, key=key, headers=headers), place, reason):
            log.error("not a notification at %s, dead-lettered (%s): %s", place, reason, detail)
        self.stats.invalid += 1
        self._remember(done)

    def _remember(self, done: tuple[str, str]) -> None:
        self._done.add(done)


async def run_deliverer(settings: Settings) -> None:
    """``meter notify``: deliver until interrupted."""
    deliverer = WebhookDeliverer(settings)
    try:
        await deliverer.run()
    finally:
        await deliverer.stop()
