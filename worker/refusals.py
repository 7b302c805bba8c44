"""What a question to the store may be refused for: a range or size the store cannot answer.

One type for every reader (the query API answers it with a 4xx, the CLI with one line and
exit code 2); any other exception is a bug and stays a 500 / a traceback under DEBUG.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import ValidationError


class QueryRefused(ValueError):
    """The question cannot be answered as asked (a bad or too large range, a cap)."""


class ActionRefused(ValueError):
    """An operator action that cannot be published as given (a field out of its bounds, ...)."""


def problems(exc: ValidationError) -> str:
    """Every field a model refused, in one line: ``where: why; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())


class OutOfRange(QueryRefused):
    """A time the store cannot hold (ClickHouse ``DateTime``: 1970-01-01 .. 2106-02-07 UTC)."""


class EmptyRange(QueryRefused):
    """A range whose start is not before its end."""

    def __init__(self, since: datetime, until: datetime, detail: str = "") -> None:
        super().__init__(f"since ({iso(since)}) must be before until ({iso(until)}){detail}")


def iso(value: datetime) -> str:
    """A time for a message, in UTC (as given when UTC cannot hold it: year 1 with an offset)."""
    try:
        return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except OverflowError:
        return value.isoformat(timespec="seconds")
