"""Operators' view of the dead-letter topic: what was rejected and why, and replaying it.

A DLQ may hold the same source record twice (a worker killed after dead-lettering a batch
but before writing it dead-letters it again on restart): records are collapsed by their id
(source topic, partition, offset), the first one kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from common import kafka_clients
from common.follower import read_to_end
from worker.ingest.dlq import DeadLetter
from worker.records import Rejection, Validator
from worker.settings import Settings

log = logging.getLogger(__name__)


def unique_letters(records: Iterable[object]) -> tuple[list[DeadLetter], int]:
    """The DLQ's records parsed and collapsed by id: (letters, copies dropped). A record that is
    not a DLQ record at all is logged with its offset and left out."""
    letters: list[DeadLetter] = []
    seen: set[str] = set()
    copies = 0
    for record in records:
        offset: int = getattr(record, "offset", -1)
        try:
            letter = DeadLetter.parse(getattr(record, "key", None), getattr(record, "value", None), offset)
        except ValueError as exc:  # json's and base64's errors are ValueErrors too
            log.error("DLQ record at offset %d is not a dead letter and is skipped: %s", offset, exc)
            continue
        if letter.id in seen:
            copies += 1
            continue
        seen.add(letter.id)
        letters.append(letter)
    return letters, copies


def select(letters: Iterable[DeadLetter], reason: str | None, since: datetime | None) -> list[DeadLetter]:
    def rejected_at(letter: DeadLetter) -> datetime | None:
        try:
            return datetime.fromisoformat(letter.rejected_at)
        except ValueError:
            return None

    out = []
    for letter in letters:
        if reason is not None and letter.reason != reason:
            continue
        at = rejected_at(letter)
        if since is not None and (at is None or at < since):
            continue
        out.append(letter)
    return out


async def read_dead_letters(settings: Settings) -> tuple[list[DeadLetter], int]:
    return unique_letters(await read_to_end(settings, settings.dlq_topic))


@dataclass
class ReplayReport:
    """What a replay did: records re-published, and those left in the DLQ and why."""

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


def triage(letters: Iterable[DeadLetter], validator: Validator, now: float) -> tuple[list[DeadLetter], ReplayReport]:
    """Which letters would be counted if re-published now (validated as the worker will), and
    what stays in the DLQ and why."""
    report = ReplayReport()
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
    return good, report


async def republish(settings: Settings, letters: list[DeadLetter], report: ReplayReport) -> None:
    """Send the originals back to the events topic with their original keys; ``report`` counts
    those Kafka took and those it did not, by error (each send is waited for: a flush does not
    say whether its records were delivered). A replayed event already counted is dropped by
    the worker's dedup (within the dedup horizon)."""
    if not letters:
        return
    producer = kafka_clients.producer(settings, enable_idempotence=True, acks="all")
    try:
        await producer.start()  # inside: a failed start must still stop the producer
        sent = [await producer.send(settings.events_topic, letter.original, key=letter.key) for letter in letters]
        await producer.flush()
        for outcome in await asyncio.gather(*sent, return_exceptions=True):
            if isinstance(outcome, BaseException):
                report.failed[type(outcome).__name__] += 1
            else:
                report.republished += 1
    finally:
        await producer.stop()


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
