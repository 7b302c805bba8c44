"""Bounds shared by every contract: no field of a record on our topics is unbounded.

A record outside them is refused where it is read (dead-lettered or logged with its place and
skipped), never retried: a value that does not fit a column or a terminal is a data error.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, Field, StringConstraints

# C0 and C1 controls, DEL, and the bidirectional controls (which reorder what a terminal or
# a dashboard shows): none belongs in an id, a path or a note, and each can forge output.
CONTROL_CHARACTERS = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
PRINTABLE = f"^[^{CONTROL_CHARACTERS}]*$"

MAX_COUNT = 10**12  # far above any real window count or limit
MAX_VERSION = 2**63 - 1  # fits the UInt64 audit column and a signed 64-bit anywhere else
# Times stored in DateTime64 columns and compared with the clock: a sane calendar range.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Version = Annotated[int, Field(ge=1, le=MAX_VERSION)]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=PRINTABLE)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=PRINTABLE)]
Note = Annotated[str, StringConstraints(max_length=512, pattern=PRINTABLE)]
# What Kafka accepts as a topic name.
TopicName = Annotated[str, StringConstraints(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")]


def _in_range(value: datetime) -> datetime:
    if not EARLIEST <= value < LATEST:
        raise ValueError(f"time out of range ({EARLIEST:%Y} to {LATEST:%Y})")
    return value


Timestamp = Annotated[AwareDatetime, AfterValidator(_in_range)]


def next_version(last: int, now: float) -> int:
    """The version after ``last``: the clock in microseconds, or ``last + 1`` if that is not
    newer (a clock behind, or two in one microsecond). Readers apply only a newer version."""
    return max(int(now * 1_000_000), last + 1)
