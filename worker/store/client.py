"""ClickHouse client factory: ``chdb:///dir`` is the embedded engine, ``http(s)://`` a server."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

_lock = threading.Lock()
# Query parameters whose value is a secret (clickhouse-connect takes ``?password=``,
# ``?access_token=``, ...): any name mentioning one of these words, case-insensitive.
_SECRET_PARAMETER = re.compile(r"pass|pwd|secret|token|credential|auth|(^|_)key$", re.IGNORECASE)


def is_embedded(dsn: str) -> bool:
    return dsn.startswith("chdb:")


def connect(dsn: str, database: str | None = None) -> Client:
    """Open a client and make sure ``database`` exists. Several clients on one chDB path share the engine."""
    with _lock:
        if is_embedded(dsn):
            path = dsn.removeprefix("chdb://")
            if path and path not in ("memory", ":memory:"):
                Path(path).mkdir(parents=True, exist_ok=True)
        if is_embedded(dsn):
            client: Client = clickhouse_connect.get_client(dsn=dsn)
        else:
            # No server session: a client is used from several threads (insert, audit, health
            # check), and one session refuses concurrent queries ("Session is locked").
            client = clickhouse_connect.get_client(dsn=dsn, autogenerate_session_id=False)
        if database:
            client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
            client.database = database
        log.debug("clickhouse client open on %s (database %s)", redact_dsn(dsn), database)
        return client


def quote_identifier(name: str) -> str:
    """Backtick-quote an identifier from settings (never from request input)."""
    if not name or "`" in name or "\x00" in name:
        raise ValueError(f"invalid ClickHouse identifier: {name!r}")
    return f"`{name}`"


def redact_dsn(dsn: str) -> str:
    """A DSN fit for logs: the password of ``user:password@`` and secret query values replaced.

    Parsed as clickhouse-connect parses it (``urlsplit``; query values become client
    arguments, ``password`` among them). Use it wherever a DSN is printed or logged.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError:  # e.g. an unclosed "[" in the host: no telling where the password is
        return "<unparsable DSN>"
    netloc = parts.netloc
    if parts.password is not None:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = "&".join(
        f"{name}=***" if sep and _SECRET_PARAMETER.search(name) else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
    )
    # Replaced in place: urlunsplit would turn ``chdb:///dir`` into ``chdb:/dir``.
    return dsn.replace(parts.netloc, netloc, 1).replace(f"?{parts.query}", f"?{query}", 1)


def settings_for_insert(token: str) -> dict[str, Any]:
    """Settings that make a retried insert of the same block a no-op."""
    return {"insert_deduplication_token": token, "insert_deduplicate": 1}
