"""What a question to the store may be refused for: a range or size the store cannot answer.

One type for every reader (the query API answers it with a 4xx, the CLI with one line and
exit code 2); any other exception is a bug and stays a 500 / a traceback under DEBUG.
"""

from __future__ import annotations


class QueryRefused(ValueError):
    """The question cannot be answered as asked (a bad or too large range, a cap)."""


class OutOfRange(QueryRefused):
    """A time the store cannot hold (ClickHouse ``DateTime``: 1970-01-01 .. 2106-02-07 UTC)."""
