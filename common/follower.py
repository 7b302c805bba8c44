"""Read topics from the beginning without a consumer group, then follow them: the one follower.

The worker follows the decisions, limits and allowances topics with it (audit, operator
blocks, overrides, versions), the node's decision cache follows the same topics, and the
CLI reads a topic to its end once (``read_to_end``).

Every partition is assigned by hand. The partitions are asked of the cluster with the admin
client (public API), and only for topics the cluster lists: a metadata request naming a
missing topic would create it on a broker with ``auto.create.topics.enable`` (Kafka's
default), with the wrong partitions and no compaction. ``ready`` is set once the end offsets
seen at the first connection are reached. After a failure the follower reconnects with backoff
(``common.retry``) and resumes after the last record it handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, ValidationError

from common import kafka_clients
from common.kafka_clients import KafkaTarget
from common.retry import cancel_all_and_wait, cancel_and_wait, describe_error, retry_forever

log = logging.getLogger(__name__)

# The records of one partition, in offset order (tombstones included).
OnRecords = Callable[[list[Any]], Awaitable[None]]
M = TypeVar("M", bound=BaseModel)

# Records handed over per getmany: what a follower catching up does between two turns of the
# event loop it shares (a worker's limits, a node's requests). 500 keep such a stretch under
# ~20 ms; 5,000 held it ~80 ms, in the same total time (135k allowances read either way in ~1.2 s).
FOLLOW_MAX_RECORDS = 500
# How long the broker holds a fetch that finds nothing new. A record that arrives meanwhile is
# answered at once, so a longer wait would only poll a quiet topic less (an idle follower costs
# 2.3% of a core at 50 ms, 0.7% at 500). Kept short: at 500 ms the ingest trickle test
# (tests/integration/test_ingest.py) failed every run, likely because the broker answers a
# connection's requests in order and a follower's offset lookups wait behind its held fetch.
FOLLOW_FETCH_MAX_WAIT_MS = 50
# How often a follower's consumer refreshes its metadata, so partitions added to a topic are
# read within about this long (a block on one of them enforced). One small request per refresh.
FOLLOW_METADATA_MAX_AGE_MS = 30_000

# How long a reader's position may take (it needs the broker when the partition's offset is
# reset): past it, the connection is taken as failed.
POSITION_TIMEOUT_S = 10.0

# Kafka error codes a topic's metadata may carry, in words.
_TOPIC_ERRORS = {3: "not found", 29: "not authorized for this principal (Kafka ACLs)"}
# A topic the cluster does not list: it does not exist, or the principal may not see it.
_NOT_LISTED = "not found, or not authorized for this principal (Kafka ACLs)"


class TopicUnavailable(Exception):
    """A topic cannot be read: missing, not authorized, or the broker is unreachable."""


def valid_records(records: Iterable[Any], model: type[M]) -> Iterator[M]:
    """The records' values as ``model``: tombstones skipped, bad ones logged with where they are."""
    for record in records:
        if record.value is None:
            continue
        try:
            yield model.model_validate_json(record.value)
        except ValidationError as exc:
            log.error("bad %s at %s[%d]@%d: %s", model.__name__, record.topic, record.partition, record.offset, exc)


def _not_listed(topics: Iterable[str]) -> str:
    return f"topic {', '.join(sorted(topics))} {_NOT_LISTED}"


@contextlib.asynccontextmanager
async def _admin(kafka: KafkaTarget) -> AsyncIterator[Any]:
    admin = kafka_clients.admin(kafka, request_timeout_ms=10_000)
    try:
        await admin.start()
        yield admin
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _listed_topics(kafka: KafkaTarget) -> set[str]:
    async with _admin(kafka) as admin:
        return set(await admin.list_topics())


async def _present_partitions(
    kafka: KafkaTarget, topics: Sequence[str], required: Iterable[str]
) -> tuple[set[str], list[TopicPartition]]:
    """(the topics the cluster does not list, every partition of the others), asked with one
    admin client; no partitions when a ``required`` topic is not listed (the caller says so), and
    ``TopicUnavailable`` if a listed one is not readable. Never creates a topic (see the module
    docstring)."""
    async with _admin(kafka) as admin:
        listed = set(await admin.list_topics())
        missing = set(topics) - listed
        if missing & set(required):
            return missing, []
        present = [t for t in topics if t in listed]
        described = await kafka_clients.describe_topics(admin, present) if present else []
    found = {d["topic"]: d for d in described}
    tps: list[TopicPartition] = []
    for topic in present:
        desc = found.get(topic)
        code = desc["error_code"] if desc is not None else 3
        if code or desc is None or not desc["partitions"]:
            raise TopicUnavailable(f"topic {topic} {_TOPIC_ERRORS.get(code, f'not available (error {code})')}")
        tps += [TopicPartition(topic, p["partition"]) for p in desc["partitions"]]
    return missing, sorted(tps)


async def topic_partitions(kafka: KafkaTarget, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of ``topics``; ``TopicUnavailable`` if one is missing or not readable."""
    missing, tps = await _present_partitions(kafka, topics, required=topics)
    if missing:
        raise TopicUnavailable(_not_listed([next(t for t in topics if t in missing)]))
    return tps


class TopicWatch:
    """Notices topics deleted under a consumer that reads hand-assigned partitions, and their return.

    aiokafka then asks the broker for a deleted topic's metadata in a loop without pause, logging
    an error each time (thousands a second, for ever), while ``getmany()`` returns nothing from
    it, as if it were quiet. ``check`` runs on every turn of the reader's loop: a dictionary
    lookup per topic, and when the consumer's metadata lacks a topic (or one is known gone) the
    cluster is asked, at most once per ``every_s``; while a topic stays gone, twice as long
    between askings each time, up to ``max_every_s``. Metadata that is only late (at start) is
    no alarm: the cluster still lists the topic.
    """

    def __init__(
        self, kafka: KafkaTarget, topics: Sequence[str], every_s: float = 1.0, max_every_s: float = 10.0
    ) -> None:
        self.kafka = kafka
        self.topics = list(topics)
        self.every_s = every_s
        self.max_every_s = max_every_s
        self.gone: set[str] = set()
        self.partitions: dict[str, int] = {}  # topic -> partitions read (see ``grown``)
        self._next_check = 0.0
        self._wait_s = every_s

    async def check(self, consumer: Any) -> tuple[set[str], set[str]]:
        """(topics found gone, topics back) since the last call: both empty nearly always."""
        unlisted = {t for t in self.topics if t not in self.gone and consumer.partitions_for_topic(t) is None}
        now = time.monotonic()
        if not (unlisted or self.gone) or now < self._next_check:
            return set(), set()
        listed = await _listed_topics(self.kafka)
        went = unlisted - listed
        back = self.gone & listed
        self.gone = (self.gone | went) - back
        self._wait_s = min(self._wait_s * 2, self.max_every_s) if self.gone and not went else self.every_s
        self._next_check = time.monotonic() + self._wait_s
        return went, back

    def reading(self, tps: Sequence[TopicPartition]) -> None:
        """The partitions now read (what ``grown`` compares with)."""
        self.partitions = {}
        for tp in tps:
            self.partitions[tp.topic] = self.partitions.get(tp.topic, 0) + 1

    def grown(self, consumer: Any) -> set[str]:
        """Topics that have more partitions in the consumer's metadata than are read: partitions
        added while read (a hand-assigned consumer never reads them by itself)."""
        return {
            topic for topic, count in self.partitions.items() if len(consumer.partitions_for_topic(topic) or ()) > count
        }

    async def raise_if_gone(self, consumer: Any) -> None:
        """For a reader of one topic: ``TopicUnavailable`` once it is gone."""
        went, _ = await self.check(consumer)
        if went:
            raise TopicUnavailable(f"{_not_listed(went)} (deleted while read)")


class _ConnectionHeld(Exception):
    """A follower's connection that had held for a while failed (``cause``)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class TopicFollower:
    """Reads ``topics`` from the beginning, hands every record to ``on_records``, then follows.

    State for health checks: ``ready`` (bootstrap read done), ``connected`` (in touch with the
    broker), ``last_error``, ``lag`` (records behind, known when ``probe_interval_s`` is set)
    and ``positions`` (next offset per partition read so far).
    """

    def __init__(
        self,
        kafka: KafkaTarget,
        topics: str | Sequence[str],
        on_records: OnRecords,
        name: str,
        *,
        quiet: bool = False,
        first_delay: float = 0.5,
        max_delay: float = 10.0,
        poll_timeout_ms: int = 100,
        fetch_max_wait_ms: int = FOLLOW_FETCH_MAX_WAIT_MS,
        max_records: int = FOLLOW_MAX_RECORDS,
        probe_interval_s: float | None = None,
        client_id: str | None = None,
        consumer_factory: Callable[..., Any] = AIOKafkaConsumer,
        required: Sequence[str] | None = None,
        metadata_max_age_ms: int = FOLLOW_METADATA_MAX_AGE_MS,
    ) -> None:
        """``probe_interval_s``: ask for the end offsets this often, since ``getmany()`` does
        not fail when the broker is gone (``connected`` and ``lag`` then stay current).
        ``required``: the topics without which nothing is followed (default: all of them); the
        others are followed when the cluster has them."""
        self.kafka = kafka
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.required = set(self.topics if required is None else required)
        self.on_records = on_records
        self.name = name
        self.quiet = quiet
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.poll_timeout_ms = poll_timeout_ms
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.max_records = max_records
        self.probe_interval_s = probe_interval_s
        self.client_id = client_id
        self.consumer_factory = consumer_factory
        self.metadata_max_age_ms = metadata_max_age_ms

        self.ready = asyncio.Event()
        self.connected = False
        self.last_error: str | None = None
        self._watch: TopicWatch | None = None  # the present connection's
        self.lag: int | None = None
        self.positions: dict[TopicPartition, int] = {}
        self.records_seen = 0
        self.bootstrap_s: float | None = None
        self._started_at = time.monotonic()
        self._connected_at: float | None = None  # when the present connection started reading
        self._task: asyncio.Task[None] | None = None

    @property
    def where(self) -> str:
        return f"{', '.join(self.topics)} on {kafka_clients.bootstrap(self.kafka)}"

    async def start(self) -> None:
        """Follow in the background until ``stop()``; ``ready`` tells when the bootstrap is read."""
        if self._task is None:
            self._started_at = time.monotonic()
            self._task = asyncio.create_task(self._run(), name=f"follow-{self.topics[0]}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.connected = False

    async def _run(self) -> None:
        while True:
            try:
                await retry_forever(
                    self._connection,
                    f"{self.name}: following {self.where}",
                    self.first_delay,
                    self.max_delay,
                    permanent=lambda exc: isinstance(exc, _ConnectionHeld),
                    on_failure=self._failed,
                )
            except _ConnectionHeld as ended:
                # The backoff starts over from first_delay (a node's cache back 0.2 s after a
                # broker blip, not at the last outage's 5 s).
                self._failed(ended.cause, 1, self.first_delay)
                await asyncio.sleep(self.first_delay)

    async def _connection(self) -> None:
        """``follow()``, which only ever ends by raising; ``_ConnectionHeld`` when its connection
        had read for ``max_delay`` at least. One that fails each time soon after it connects is
        retried ever more slowly, not every first_delay."""
        self._connected_at = None
        try:
            await self.follow()
        except Exception as exc:
            if self._connected_at is not None and time.monotonic() - self._connected_at >= self.max_delay:
                raise _ConnectionHeld(exc) from exc
            raise

    def _failed(self, exc: Exception, attempt: int, delay: float) -> None:
        message = describe_error(exc)
        if message != self.last_error:  # once per distinct failure, not once per retry
            log.warning("%s: following %s failed (%s); retry in %.1fs", self.name, self.where, message, delay)
        self.connected = False
        self.last_error = message

    async def follow(self) -> None:
        """One connection: assign every partition, read from where this follower is, follow.

        Never returns; raises on the first failure (``TopicUnavailable``, a Kafka error). Of
        several topics, the ones the cluster lists are followed (the others are watched for)."""
        watch = self._watch = TopicWatch(self.kafka, self.topics)
        watch.gone, tps = await _present_partitions(self.kafka, self.topics, self.required)
        self._forget(watch.gone)  # gone, perhaps created again later: its offsets start over
        if lost := watch.gone & self.required:
            raise TopicUnavailable(_not_listed(lost))
        consumer = kafka_clients.consumer(
            self.kafka,
            factory=self.consumer_factory,
            **({"client_id": self.client_id} if self.client_id else {}),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Only records of committed transactions; costs nothing for plain producers.
            isolation_level="read_committed",
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            # How soon partitions added to a topic are seen (``TopicWatch.grown``): a hand-assigned
            # consumer learns of them only from its metadata refresh (aiokafka's default: 5 min).
            metadata_max_age_ms=self.metadata_max_age_ms,
        )
        try:
            await consumer.start()
            await self._seek(consumer, tps)
            watch.reading(tps)
            await self._read(consumer, tps, watch)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _seek(self, consumer: Any, tps: list[TopicPartition]) -> None:
        """Resume where this follower was after a reconnect; from the beginning otherwise."""
        consumer.assign(tps)
        fresh = [tp for tp in tps if tp not in self.positions]
        for tp in tps:
            if tp in self.positions:
                consumer.seek(tp, self.positions[tp])
        if fresh:
            await consumer.seek_to_beginning(*fresh)

    async def _read(self, consumer: Any, tps: list[TopicPartition], watch: TopicWatch) -> None:
        # Partitions still to read up to their end at start (none once ready).
        pending: dict[TopicPartition, int] = {}
        if not self.ready.is_set():
            pending = {tp: end for tp, end in (await consumer.end_offsets(tps)).items() if end > 0}
        self.connected = True
        self._connected_at = time.monotonic()
        self.last_error = self._missing()
        next_probe = math.inf if self.probe_interval_s is None else time.monotonic() + self.probe_interval_s
        while True:
            if not pending and not self.ready.is_set():
                self._mark_ready()
            batches = await consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
            for tp, records in batches.items():
                if not records:
                    continue
                self.records_seen += len(records)
                await self.on_records(records)
                self.positions[tp] = records[-1].offset + 1
                if tp in pending and records[-1].offset + 1 >= pending[tp]:
                    del pending[tp]
                # Let the loop run between partitions: a fetch of a follower that catches up holds
                # thousands of records per partition, and the worker's limits share this loop.
                await asyncio.sleep(0)
            went, back = await watch.check(consumer)
            if went or back or watch.grown(consumer):
                tps = await self._reassign(consumer, tps, watch, went)
                pending = {tp: end for tp, end in pending.items() if tp.topic not in went}
            if pending and not batches:
                # A compacted or transactional topic may end past its last record.
                pending = {tp: end for tp, end in pending.items() if await self._position(consumer, tp) < end}
            if time.monotonic() >= next_probe:
                await self._probe(consumer, tps)
                next_probe = time.monotonic() + (self.probe_interval_s or math.inf)

    async def _reassign(
        self, consumer: Any, tps: list[TopicPartition], watch: TopicWatch, went: set[str]
    ) -> list[TopicPartition]:
        """Topics deleted (``went``), created again or grown: read the partitions there are. A
        topic created again, and a partition added, is read from its start (its offsets start
        over); without a required topic, raise and retry."""
        self._forget(went)
        if lost := watch.gone & self.required:
            raise TopicUnavailable(f"{_not_listed(lost)} (deleted while read)")
        here = [t for t in self.topics if t not in watch.gone]
        new_tps = await topic_partitions(self.kafka, here)
        await self._seek(consumer, new_tps)
        watch.reading(new_tps)
        self.last_error = self._missing()
        if watch.gone:
            log.warning("%s: %s; following %s", self.name, self.last_error, ", ".join(here))
        elif added := sorted(f"{tp.topic}[{tp.partition}]" for tp in set(new_tps) - set(tps)):
            log.info("%s: partitions added: following %s too, from their start", self.name, ", ".join(added))
        else:
            log.info("%s: following %s again", self.name, self.where)
        return new_tps

    def _forget(self, topics: set[str]) -> None:
        for tp in [tp for tp in self.positions if tp.topic in topics]:
            del self.positions[tp]

    @property
    def missing_topics(self) -> set[str]:
        """Of ``topics``, the ones the cluster lacked when last asked."""
        return set(self._watch.gone) if self._watch is not None else set()

    def _missing(self) -> str | None:
        """What ``last_error`` says while connected: the topics followed without (None: none)."""
        topics = self.missing_topics
        return _not_listed(topics) if topics else None

    async def _probe(self, consumer: Any, tps: list[TopicPartition]) -> None:
        """Ask for the end offsets: whether the broker answers, and how far behind we are."""
        try:
            end = await asyncio.wait_for(consumer.end_offsets(tps), self.probe_interval_s)
        except Exception as exc:  # broker unreachable: keep following, say so
            if self.connected:
                log.warning("%s: broker of %s unreachable (%s)", self.name, self.where, describe_error(exc))
            self.connected = False
            self.last_error = describe_error(exc)
            return
        # The lag first: the state below changes at once (no await between), never connected
        # again with the lag of before.
        lag = sum([max(0, off - await self._position(consumer, tp)) for tp, off in end.items()])
        if not self.connected:
            log.info("%s: broker of %s reachable again", self.name, self.where)
        self.connected = True
        self.last_error = self._missing()
        self.lag = lag

    async def _position(self, consumer: Any, tp: TopicPartition) -> int:
        """aiokafka's ``position()`` retries until the broker answers: bounded, so a broker gone
        during the catch-up fails this connection (reconnected with backoff, and said) instead
        of holding it for ever with ``connected`` still true."""
        try:
            return int(await asyncio.wait_for(consumer.position(tp), POSITION_TIMEOUT_S))
        except TimeoutError:
            where = f"{tp.topic}[{tp.partition}]"
            raise TopicUnavailable(f"the broker gave no position of {where} within {POSITION_TIMEOUT_S:g} s") from None

    def _mark_ready(self) -> None:
        self.bootstrap_s = time.monotonic() - self._started_at
        self.ready.set()
        log.log(
            logging.DEBUG if self.quiet else logging.INFO,
            "%s: caught up with %s in %.3fs (%d records)",
            self.name,
            ", ".join(self.topics),
            self.bootstrap_s,
            self.records_seen,
        )


async def read_to_end(kafka: KafkaTarget, topic: str, timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic`` up to its end now (for one-shot readers such as the CLI).

    One attempt, no retries: a missing topic or an unreachable broker is ``TopicUnavailable``
    at once (or after ``timeout_s``), for the caller to say in one line."""
    records: list[Any] = []

    async def collect(batch: list[Any]) -> None:
        records.extend(batch)

    await read_through(kafka, topic, collect, timeout_s)
    return records


async def read_through(
    kafka: KafkaTarget, topic: str, on_batch: Callable[[list[Any]], Awaitable[None]], timeout_s: float = 30.0
) -> None:
    """``read_to_end``, batch by batch to ``on_batch`` instead of kept: for a topic too large to
    hold (a dead-letter topic after an outage). ``timeout_s`` bounds a wait for the broker (no
    record read, no ``on_batch`` running), not the whole read: a large topic, or a slow
    ``on_batch``, takes as long as it takes. The reader stops between two batches, never inside
    ``on_batch`` (records that arrive while the topic is read may be handed over too, each batch
    whole)."""
    handing_over = asyncio.Lock()

    async def whole(batch: list[Any]) -> None:
        async with handing_over:
            await on_batch(batch)

    follower = TopicFollower(kafka, topic, whole, "reader", quiet=True)
    reading = asyncio.create_task(follower.follow())
    caught_up = asyncio.create_task(follower.ready.wait())
    try:
        seen = -1
        while not (reading.done() or caught_up.done()) and (follower.records_seen != seen or handing_over.locked()):
            seen = follower.records_seen
            await asyncio.wait({reading, caught_up}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        read = caught_up.done()
        failure = reading.exception() if reading.done() else None
    finally:
        try:
            async with handing_over:  # the batch being handed over finishes first
                await cancel_all_and_wait(reading, caught_up)
        finally:  # a second cancel ended the wait for it: still no reader left following
            await cancel_all_and_wait(reading, caught_up)
    if read:
        return
    where = kafka_clients.bootstrap(kafka)
    stalled = f"no record read for {timeout_s:g}s before its end"
    raise TopicUnavailable(f"cannot read topic {topic} on {where}: {failure or stalled}")
