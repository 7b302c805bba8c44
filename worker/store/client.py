"""ClickHouse client factory: ``chdb:///dir`` is the embedded engine, ``http(s)://`` a server."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from worker.dsn import embedded_path, is_embedded, redact_dsn

log = logging.getLogger(__name__)

_lock = threading.Lock()
# The embedded engine's configuration (settings chDB's defaults get wrong for this table):
# only the first client on a data directory starts the engine, every client passes it alike.
ENGINE_CONFIG = Path(__file__).with_name("chdb") / "config.xml"
ENGINE_USERS = ENGINE_CONFIG.with_name("users.xml")  # its settings profile (config.xml names it)
ENGINE_OPTIONS = {"config-file": str(ENGINE_CONFIG)}  # chDB start-up options that load it


class StoreUnavailable(Exception):
    """The store cannot be opened: an embedded one held by another process, or a server that
    does not answer or refuses the credentials. The message says which, for one line."""


def engine_profile() -> dict[str, str]:
    """The settings the embedded engine's default profile sets (``ENGINE_USERS``)."""
    default = ET.parse(ENGINE_USERS).getroot().find("profiles/default")
    return {} if default is None else {child.tag: (child.text or "").strip() for child in default}


def connect(dsn: str, database: str | None = None) -> Client:
    """Open a client and make sure ``database`` exists. Several clients on one chDB path share the engine."""
    with _lock:
        path = embedded_path(dsn)
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
        try:
            client = _open(dsn)
            if database:
                client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
                client.database = database
        except ClickHouseError as exc:
            raise StoreUnavailable(_unavailable(dsn, exc)) from exc
        log.debug("clickhouse client open on %s (database %s)", redact_dsn(dsn), database)
        return client


def _open(dsn: str) -> Client:
    if is_embedded(dsn):
        with _native_stderr_captured() as said:
            try:
                return clickhouse_connect.get_client(dsn=dsn, chdb_options=ENGINE_OPTIONS)
            except ClickHouseError as exc:
                # The engine prints its reason on the process's stderr; it belongs in the error.
                raise type(exc)(f"{exc} {said()}".strip()) from exc
    # No server session: a client is used from several threads (insert, audit, health
    # check), and one session refuses concurrent queries ("Session is locked").
    return clickhouse_connect.get_client(dsn=dsn, autogenerate_session_id=False)


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[Callable[[], str]]:
    """Capture what native code writes to file descriptor 2 meanwhile (chDB reports a failed
    open there), so the CLI can say it in its one line instead of a raw engine message."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors="replace"))[1].strip()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _unavailable(dsn: str, exc: ClickHouseError) -> str:
    where = redact_dsn(dsn)
    text = str(exc)
    if is_embedded(dsn):
        if "Cannot lock file" in text or "Another server instance" in text:
            return f"the embedded store {where} is held by another process (a running `meter worker`?)"
        return f"cannot open the embedded store {where}: {text.strip().splitlines()[-1][:300] if text.strip() else exc}"
    if "Authentication failed" in text or "AUTHENTICATION_FAILED" in text or "password is incorrect" in text:
        return f"ClickHouse at {where} refused the credentials (check the user and password in METER_CLICKHOUSE_DSN)"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"ClickHouse at {where} does not answer: {first[:200]}"


def quote_identifier(name: str) -> str:
    """Backtick-quote an identifier from settings (never from request input)."""
    if not name or "`" in name or "\x00" in name:
        raise ValueError(f"invalid ClickHouse identifier: {name!r}")
    return f"`{name}`"


def settings_for_insert(token: str) -> dict[str, Any]:
    """Settings that make a retried insert of the same block a no-op."""
    return {"insert_deduplication_token": token, "insert_deduplicate": 1}
