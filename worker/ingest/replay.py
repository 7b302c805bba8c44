"""Operators' view of the dead-letter topic: what was rejected and why, and replaying it.

A DLQ may hold the same source record twice (a worker killed after dead-lettering a batch
but before writing it dead-letters it again on restart): records are collapsed by their id
(source topic, partition, offset), the first one kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from common import kafka_clients
from common.follower import read_through
from worker.ingest.dlq import DeadLetter
from worker.records import Rejection, Validator
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class DeadLetters:
    """The DLQ read through once, record by record (a DLQ after an outage can be far larger than
    memory if kept whole): letters collapsed by id (the first copy kept), those chosen by
    ``reason`` and ``since`` counted by reason, and of those only the newest ``keep`` held
    (None: every chosen letter; a replay holds none, it sends each batch's as it reads). A
    record that is not a DLQ record at all is logged with its offset and left out."""

    reason: str | None = None
    since: datetime | None = None
    keep: int | None = None
    total: int = 0  # distinct letters read
    copies: int = 0  # repeated copies collapsed
    by_reason: Counter[str] = field(default_factory=Counter)  # the chosen letters
    chosen: deque[DeadLetter] = field(init=False)
    _seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.chosen = deque(maxlen=self.keep)

    @property
    def selected(self) -> int:
        return sum(self.by_reason.values())

    def add(self, records: Iterable[object]) -> list[DeadLetter]:
        """Read ``records`` in; returns the letters of them chosen (new ids only)."""
        chosen = []
        for record in records:
            offset: int = getattr(record, "offset", -1)
            try:
                letter = DeadLetter.parse(getattr(record, "key", None), getattr(record, "value", None), offset)
            except ValueError as exc:  # json's and base64's errors are ValueErrors too
                log.error("DLQ record at offset %d is not a dead letter and is skipped: %s", offset, exc)
                continue
            if letter.id in self._seen:
                self.copies += 1
                continue
            self._seen.add(letter.id)
            self.total += 1
            if self._wanted(letter):
                self.by_reason[letter.reason] += 1
                self.chosen.append(letter)
                chosen.append(letter)
        return chosen

    def _wanted(self, letter: DeadLetter) -> bool:
        if self.reason is not None and letter.reason != self.reason:
            return False
        if self.since is None:
            return True
        try:
            return datetime.fromisoformat(letter.rejected_at) >= self.since
        except (ValueError, TypeError):  # not a time, or one without an offset
            return False


async def read_dead_letters(
    settings: Settings, reason: str | None = None, since: datetime | None = None, keep: int | None = None
) -> DeadLetters:
    letters = DeadLetters(reason, since, keep)

    async def add(batch: list[Any]) -> None:
        letters.add(batch)

    await read_through(settings, settings.dlq_topic, add)
    return letters


@dataclass
class ReplayReport:
    """What a replay did: records re-published, and those left in the DLQ and why."""

    passed: int = 0  # would be counted now: re-published, or offered to Kafka and refused
    republished: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # delivery error -> records Kafka did not take
    still_rejected: Counter[str] = field(default_factory=Counter)  # reason -> records left in the DLQ
    truncated: int = 0  # originals cut to fit the DLQ: cannot be replayed


@dataclass(frozen=True, slots=True)
class _Original:
    """A dead letter's original as the ingest validator reads a record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def triage(letters: Iterable[DeadLetter], validator: Validator, now: float, report: ReplayReport) -> list[DeadLetter]:
    """Which letters would be counted if re-published now (validated as the worker will);
    ``report`` counts them and what stays in the DLQ and why."""
    good = []
    for letter in letters:
        if letter.truncated:
            report.truncated += 1
            continue
        checked = validator.check(_Original("replay", 0, letter.dlq_offset, letter.key, letter.original), now)
        if isinstance(checked, Rejection):
            report.still_rejected[checked.reason] += 1
            continue
        good.append(letter)
    report.passed += len(good)
    return good


async def replay_dead_letters(
    settings: Settings, reason: str | None, since: datetime | None, now: float, *, dry_run: bool
) -> tuple[DeadLetters, ReplayReport]:
    """Read the DLQ through once and send the originals of the chosen letters that would be
    counted now back to the events topic with their original keys, batch by batch as they are
    read (a DLQ after an outage can be far larger than memory; only the ids are kept, to collapse
    repeated copies). ``report`` counts those Kafka took and those it did not, by error. A
    replayed event already counted is dropped by the worker's dedup (within the dedup horizon).
    ``dry_run``: validate and count, send nothing."""
    letters = DeadLetters(reason, since, keep=0)
    report = ReplayReport()
    validator = Validator.from_settings(settings)
    producer = None if dry_run else kafka_clients.producer(settings, enable_idempotence=True, acks="all")

    async def replay(batch: list[Any]) -> None:
        good = triage(letters.add(batch), validator, now, report)
        if producer is not None and good:
            await _send(producer, settings.events_topic, good, report)

    try:
        if producer is not None:
            await producer.start()  # inside: a failed start must still stop the producer
        await read_through(settings, settings.dlq_topic, replay)
    finally:
        if producer is not None:
            await producer.stop()
    return letters, report


async def _send(producer: Any, topic: str, letters: list[DeadLetter], report: ReplayReport) -> None:
    """Each send waited for (a flush does not say whether its records were delivered)."""
    sent = [await producer.send(topic, letter.original, key=letter.key) for letter in letters]
    await producer.flush()
    for outcome in await asyncio.gather(*sent, return_exceptions=True):
        if isinstance(outcome, BaseException):
            report.failed[type(outcome).__name__] += 1
        else:
            report.republished += 1


def describe(letter: DeadLetter) -> dict[str, object]:
    """One letter as a JSON-able row (the original shown as text when it is UTF-8)."""
    try:
        original = letter.original.decode()
    except UnicodeDecodeError:
        original = "hex:" + letter.original.hex()
    return {
        "id": letter.id,
        "reason": letter.reason,
        "detail": letter.detail,
        "rejected_at": letter.rejected_at,
        "truncated": letter.truncated,
        "original": original[:200],
    }
