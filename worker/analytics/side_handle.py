"""A second handle on the store, so that one request can run two queries at the same time.

clickhouse-connect runs one query at a time per chDB handle (a lock per handle), but two
handles on the one embedded engine do run side by side; the abuse signals use that to run
their costliest scan beside the others (see ``signals.abuse_signals``). An HTTP client
without a session takes concurrent queries itself, so it is its own side handle.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from clickhouse_connect.driver.client import Client

from worker.store.client import StoreUnavailable, connect

log = logging.getLogger(__name__)


def sibling(client: Client) -> Client | None:
    """A handle that reads what ``client`` reads and may query while ``client`` does (None: none)."""
    uri = str(getattr(client, "uri", "") or "")
    if not uri.startswith("chdb:"):
        return client  # a server: no session, concurrent queries are fine
    if uri.removeprefix("chdb://") in ("", ":memory:", "memory"):
        return None  # an in-memory engine: keep to the one handle
    return connect(uri, client.database)


class SideHandle:
    """The side handle of one main client, opened on first use (opening a chDB handle takes
    10-50 ms) and lent to one caller at a time."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._side: Client | None = None
        self._opened = False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Client | None]:
        """The side handle for the ``with`` block (None: the store offers none)."""
        with self._lock:
            if not self._opened:
                try:
                    self._side = sibling(self._client)
                except StoreUnavailable as exc:  # the queries then run one after the other
                    log.warning("analytics: no second store handle (%s)", exc)
                self._opened = True
            yield self._side

    @property
    def is_open(self) -> bool:
        return self._side is not None and self._side is not self._client

    def close(self) -> None:
        with self._lock:
            if self._side is not None and self._side is not self._client:
                self._side.close()
            self._side, self._opened = None, False
