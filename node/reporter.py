"""Usage reporter: one Kafka message per request, sent off the request path.

``report()`` only appends to a bounded in-memory buffer; a background task drains it into an
idempotent, batching aiokafka producer keyed by key id (so every event of a key lands on one
partition and is counted by one worker). If Kafka is down the node keeps serving: events stay
buffered up to the bound and are resent with backoff (``common.retry``); past the bound they
are dropped, counted and logged — never silently. A resend may duplicate an event in Kafka;
the worker dedups by ``request_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.codec import has_lz4
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from common import kafka_clients
from common.log_throttle import LogThrottle
from common.retry import cancel_and_wait, describe_error, retry_forever
from node.settings import NodeSettings
from schemas.events import RequestEvent, dump_event

log = logging.getLogger(__name__)

ProducerFactory = Callable[..., Any]

# Hand control back to the event loop this often while feeding the producer, so a large
# backlog (after an outage) never stalls request handling on the same loop.
_YIELD_EVERY = 256
# One warning per this many seconds while events are being dropped, not one per event.
_DROP_LOG_INTERVAL_S = 5.0
# While stop() flushes, a failed send is tried again this soon (within the flush's time).
_FLUSH_RETRY_S = 0.25
# An idempotent producer retries a batch until it is acknowledged: aiokafka never expires it.
# Against a broker gone after the connection, a chunk would wait for ever, the health would say
# connected and stop() would hang. A delivery not acknowledged within this many request
# timeouts is taken as failed: the chunk is sent again on a new producer (duplicates share
# their request_id: the worker drops them).
_ACK_TIMEOUTS = 2
# How long closing a producer may take: its flush cannot finish while the broker is unreachable,
# and what it holds is already counted (sent again, or unsent).
_CLOSE_TIMEOUT_S = 2.0


def default_compression() -> str | None:
    """lz4 when aiokafka can do it (needs ``cramjam``), else none: events are small JSON and
    gzip would spend the node's CPU on the request loop."""
    return "lz4" if has_lz4() else None


@dataclass(frozen=True, slots=True)
class ReporterState:
    """Snapshot for health checks and metrics."""

    connected: bool
    buffered: int
    dropped: int
    sent: int
    retried: int
    invalid: int
    last_error: str | None
    last_sent_age_s: float | None


class UsageReporter:
    """Async, batched, idempotent producer of request events; ``report()`` never blocks or raises."""

    def __init__(
        self,
        settings: NodeSettings,
        *,
        max_buffer: int = 100_000,
        max_batch: int = 2_000,
        linger_ms: int = 5,
        compression: str | bool | None = True,
        request_timeout_ms: int = 10_000,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        producer_factory: ProducerFactory = AIOKafkaProducer,
    ) -> None:
        if max_buffer < 1 or max_batch < 1:
            raise ValueError("max_buffer and max_batch must be >= 1")
        self._settings = settings
        self._topic = settings.events_topic
        self._max_buffer = max_buffer
        self._max_batch = max_batch
        self._linger_ms = linger_ms
        self._compression = default_compression() if compression is True else (compression or None)
        self._request_timeout_ms = request_timeout_ms
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._producer_factory = producer_factory

        self._buffer: deque[RequestEvent] = deque()
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._producer: Any = None
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._flush_deadline = 0.0  # monotonic: when stop() gives up flushing

        self._connected = False
        self._sent = 0
        self._retried = 0
        self._dropped = 0
        self._invalid = 0
        self._drop_log = LogThrottle(_DROP_LOG_INTERVAL_S)
        self._last_error: str | None = None
        self._last_sent_at: float | None = None

    # -- request path -------------------------------------------------------------------

    def report(self, event: RequestEvent) -> None:
        """Queue one event. O(1); never awaits, never raises."""
        if len(self._buffer) + self._in_flight >= self._max_buffer:
            self._dropped += 1
            self._log_drops()
            return
        self._buffer.append(event)
        if not self._wakeup.is_set():
            self._wakeup.set()

    def _log_drops(self) -> None:
        since_last = self._drop_log.tick()
        if since_last is not None:
            log.warning(
                "usage reporter buffer full: %d events dropped (%d since last warning; bound %d, kafka %s)",
                self._dropped,
                since_last,
                self._max_buffer,
                "connected" if self._connected else "unreachable",
            )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the drain task. Does not wait for Kafka: a node must serve while it is down."""
        if self._task is not None:
            return
        self._stopping = False
        self._stop_requested.clear()
        self._task = asyncio.create_task(self._run(), name="usage-reporter")

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Flush what is buffered (up to ``flush_timeout_s`` seconds), then close the producer."""
        if self._task is None:
            return
        self._stopping = True
        self._flush_deadline = time.monotonic() + flush_timeout_s
        self._stop_requested.set()
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), flush_timeout_s)
        except TimeoutError:
            await cancel_and_wait(self._task)
        self._task = None
        await self._close_producer()
        unsent = len(self._buffer) + self._in_flight
        # Events lost (never sent, or dropped from a full buffer) are worth a warning, not a footnote.
        log.log(
            logging.WARNING if unsent or self._dropped else logging.INFO,
            "usage reporter stopped: sent=%d retried=%d dropped=%d invalid=%d unsent=%d",
            self._sent,
            self._retried,
            self._dropped,
            self._invalid,
            unsent,
        )

    def state(self) -> ReporterState:
        return ReporterState(
            connected=self._connected,
            buffered=len(self._buffer) + self._in_flight,
            dropped=self._dropped,
            sent=self._sent,
            retried=self._retried,
            invalid=self._invalid,
            last_error=self._last_error,
            last_sent_age_s=None if self._last_sent_at is None else time.monotonic() - self._last_sent_at,
        )

    # -- background drain ---------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._buffer:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                # Any Kafka failure: keep buffering, retry with backoff.
                await retry_forever(
                    self._send_next,
                    "usage reporter",
                    self._backoff_initial_s,
                    self._backoff_max_s,
                    # stop() retries until its flush time is up, not past it
                    permanent=lambda exc: self._stopping and time.monotonic() >= self._flush_deadline,
                    on_failure=self._on_failure,
                    sleep=self._sleep_unless_stopped,
                )
            except Exception:
                return  # stopping: what is unsent stays counted as such

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        """Sleep the backoff; once stop() flushes, a short wait instead (its time is bounded)."""
        if not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), seconds)
        if self._stopping:
            await asyncio.sleep(min(seconds, _FLUSH_RETRY_S))

    async def _send_next(self) -> None:
        await self._send_chunk(await self._ensure_producer())

    async def _ensure_producer(self) -> Any:
        if self._producer is not None:
            return self._producer
        producer = kafka_clients.producer(
            self._settings,
            factory=self._producer_factory,
            client_id=f"meter-node-{self._settings.node_id}",
            enable_idempotence=True,
            acks="all",
            linger_ms=self._linger_ms,
            compression_type=self._compression,
            max_batch_size=256 * 1024,
            request_timeout_ms=self._request_timeout_ms,
        )
        try:
            await producer.start()
        except BaseException:
            # A producer whose start failed cannot be restarted; the next attempt builds anew.
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer
        if not self._connected:
            log.info("usage reporter connected to %s, topic %s", self._settings.kafka_bootstrap, self._topic)
        self._connected = True
        return producer

    async def _send_chunk(self, producer: Any) -> None:
        """Hand up to ``max_batch`` events to the producer and wait for their acks.

        Events failing delivery go back to the head of the buffer, in order, for a resend.
        """
        chunk: list[RequestEvent] = []
        while self._buffer and len(chunk) < self._max_batch:
            chunk.append(self._buffer.popleft())
        self._in_flight = len(chunk)
        futures: list[tuple[RequestEvent, asyncio.Future[Any]]] = []
        try:
            for i, event in enumerate(chunk):
                try:
                    value = dump_event(event)
                    key = event["key_id"].encode()
                except Exception as exc:  # a bad event must not stall the rest
                    self._invalid += 1
                    log.error("usage reporter: unserialisable event dropped: %s", exc)
                    continue
                futures.append((event, await producer.send(self._topic, value=value, key=key)))
                if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            # Hard stop: whatever was not confirmed stays counted as unsent.
            self._in_flight = 0
            self._requeue(chunk)
            raise
        except Exception:
            # Not every event reached the producer: give back those it did not accept, and
            # settle the ones it did before retrying.
            accepted = {id(ev) for ev, _ in futures}
            self._requeue([ev for ev in chunk if id(ev) not in accepted])
            await self._collect(futures)
            raise
        failure = await self._collect(futures)
        if failure is not None:
            raise failure

    async def _collect(self, futures: list[tuple[RequestEvent, asyncio.Future[Any]]]) -> Exception | None:
        """Await every delivery; count successes, requeue failures; return the first failure."""
        failed: list[RequestEvent] = []
        first: Exception | None = None
        ack_timeout_s = _ACK_TIMEOUTS * self._request_timeout_ms / 1000
        unacknowledged: set[asyncio.Future[Any]] = set()
        if futures:
            _, unacknowledged = await asyncio.wait([f for _, f in futures], timeout=ack_timeout_s)
            for future in unacknowledged:  # failed later when its producer closes: nothing to log then
                future.add_done_callback(_outcome_seen)
        for event, future in futures:
            if future in unacknowledged:
                result: Any = KafkaTimeoutError(f"no acknowledgement within {ack_timeout_s:g} s")
            elif future.cancelled():
                result = RuntimeError("delivery cancelled")
            else:
                result = future.exception() or future.result()
            if isinstance(result, BaseException):
                failed.append(event)
                if first is None:
                    first = result if isinstance(result, Exception) else RuntimeError(repr(result))
            else:
                self._sent += 1
        self._in_flight = 0
        if len(failed) < len(futures):
            self._last_sent_at = time.monotonic()
        self._requeue(failed)
        return first

    def _requeue(self, events: list[RequestEvent]) -> None:
        self._retried += len(events)
        self._buffer.extendleft(reversed(events))

    def _on_failure(self, exc: Exception, attempt: int, backoff: float) -> None:
        message = describe_error(exc)
        if self._connected or message != self._last_error:
            log.warning(
                "usage reporter: kafka %s unreachable (%s); %d events buffered, retry in %.1fs",
                self._settings.kafka_bootstrap,
                message,
                len(self._buffer),
                backoff,
            )
        self._connected = False
        self._last_error = message
        # An idempotent producer can end up in a fatal state (e.g. sequence errors after a long
        # outage); a fresh one is cheap, so rebuild rather than diagnose.
        producer, self._producer = self._producer, None
        if producer is not None:
            task = asyncio.get_running_loop().create_task(_stop_quietly(producer))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_quietly(producer)
        self._connected = False


_background: set[asyncio.Task[None]] = set()


def _outcome_seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _stop_quietly(producer: Any) -> None:
    """Stop ``producer``; each step within ``_CLOSE_TIMEOUT_S``. Past the first (its flush waits
    for a broker that is gone), fail what it still holds (so its flush ends and nothing of it
    is left waiting), then end its sender and connections without flushing."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), _CLOSE_TIMEOUT_S)
        return
    with contextlib.suppress(Exception):
        held = producer._message_accumulator
        batches = [b for queued in held._batches.values() for b in queued] + list(held._pending_batches)
        held.fail_all(KafkaConnectionError("producer closed while the broker was away"))
        for batch in batches:  # failed on purpose: not an error for asyncio to log at exit
            _outcome_seen(batch.future)
            _outcome_seen(batch._drain_waiter)
    for part in ("_sender", "client"):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(getattr(producer, part).close(), _CLOSE_TIMEOUT_S)
