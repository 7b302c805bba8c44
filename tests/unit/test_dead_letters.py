"""Reading the dead-letter topic for `meter dlq`: record by record, copies collapsed, odd records
skipped, and only what the command shows held (a DLQ after an outage can outgrow memory)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from worker.ingest.dlq import dead_letter
from worker.ingest.replay import DeadLetters
from worker.records import Rejection

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def letter(offset: int, reason: str, at: datetime = AT) -> SimpleNamespace:
    value, _ = dead_letter(Rejection("usage.events", 0, offset, reason, "why", b"k", b"{}"), at)
    return SimpleNamespace(key=b"k", value=value, offset=offset)


def test_letters_are_counted_by_reason_and_only_the_newest_kept_are_held() -> None:
    letters = DeadLetters(keep=2)
    letters.add([letter(i, "invalid_json" if i % 2 else "oversized") for i in range(10)])
    letters.add([letter(3, "invalid_json"), SimpleNamespace(key=None, value=b"[]", offset=99)])  # a copy, no letter
    assert (letters.total, letters.copies, letters.selected) == (10, 1, 10)
    assert letters.by_reason == {"invalid_json": 5, "oversized": 5}
    assert [held.id for held in letters.chosen] == ["usage.events[0]@8", "usage.events[0]@9"]


def test_the_reason_and_since_choose_what_is_counted_and_held() -> None:
    letters = DeadLetters(reason="oversized", since=AT - timedelta(minutes=5))
    letters.add([letter(1, "oversized", AT - timedelta(hours=1)), letter(2, "oversized"), letter(3, "invalid_json")])
    naive = letter(4, "oversized", AT.replace(tzinfo=None))  # a time without offset: not chosen, no crash
    letters.add([naive])
    assert (letters.total, letters.selected) == (4, 1)
    assert [held.id for held in letters.chosen] == ["usage.events[0]@2"]
