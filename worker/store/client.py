"""ClickHouse client factory: ``chdb:///dir`` is the embedded engine, ``http(s)://`` a server."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

_lock = threading.Lock()


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
    """A DSN fit for logs: the password, if any, replaced."""
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def settings_for_insert(token: str) -> dict[str, Any]:
    """Settings that make a retried insert of the same block a no-op."""
    return {"insert_deduplication_token": token, "insert_deduplicate": 1}
