"""The notifications audit table: every threshold notification a worker published, and which
thresholds of the current windows have been notified (read back when partitions are assigned)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DataError

from schemas.decisions import Window, window_start
from schemas.notifications import Notification
from worker.store.client import quote_identifier
from worker.store.decisions import _utc

log = logging.getLogger(__name__)

COLUMNS = [
    "id",
    "key_id",
    "account_id",
    "window",
    "window_start",
    "window_end",
    "threshold",
    "threshold_percent",
    "threshold_count",
    "limit_value",
    "count_value",
    "version",
    "decided_at",
    "source",
]

# (key_id, window, window start epoch, threshold label)
Fired = tuple[str, Window, int, str]


class NotificationStore:
    """Writes and reads of the ``notifications`` table."""

    def __init__(self, client: Client, database: str) -> None:
        self._client = client
        self._table = f"{quote_identifier(database)}.notifications"

    def record(self, notifications: Sequence[Notification]) -> list[Notification]:
        """Insert; the same crossing recorded twice collapses on merge and in reads (``FINAL``).

        A notification the table cannot hold is logged and skipped (returned); store failures
        are raised, for the caller to retry."""
        if not notifications:
            return []
        try:
            self._client.insert(self._table, [_row(n) for n in notifications], column_names=COLUMNS)
            return []
        except DataError:
            if len(notifications) == 1:
                n = notifications[0]
                log.error("notification %s of %s cannot be audited and is skipped", n.id, n.key_id)
                return list(notifications)
        return [bad for n in notifications for bad in self.record([n])]

    def fired(self, now: float) -> list[Fired]:
        """The thresholds notified in the windows that contain ``now``."""
        starts = {w: window_start(w, now) for w in (Window.minute, Window.hour, Window.day)}
        result = self._client.query(
            f"SELECT DISTINCT key_id, toString(window), toUInt32(window_start), toString(threshold) FROM {self._table} "
            "WHERE window_start >= toDateTime64({d:UInt32}, 0, 'UTC') AND ("
            "(window = 'minute' AND window_start = toDateTime64({m:UInt32}, 0, 'UTC')) "
            "OR (window = 'hour' AND window_start = toDateTime64({h:UInt32}, 0, 'UTC')) "
            "OR (window = 'day' AND window_start = toDateTime64({d:UInt32}, 0, 'UTC')))",
            parameters={"m": starts[Window.minute], "h": starts[Window.hour], "d": starts[Window.day]},
        )
        return [(str(k), Window(w), int(s), str(t)) for k, w, s, t in result.result_rows]

    def history(self, key_id: str, limit: int = 50) -> list[Notification]:
        """A key's notifications, newest first."""
        result = self._client.query(
            f"SELECT {', '.join(COLUMNS)} FROM {self._table} FINAL WHERE key_id = {{key:String}} "
            "ORDER BY version DESC LIMIT {n:UInt32}",
            parameters={"key": key_id, "n": limit},
        )
        return [
            Notification.model_validate(dict(zip(_FIELDS, (_utc(v) for v in row), strict=True)))
            for row in result.result_rows
        ]


# The model's field of each column.
_FIELDS = [{"limit_value": "limit", "count_value": "count"}.get(c, c) for c in COLUMNS]


def _row(n: Notification) -> list[object]:
    return [
        n.id,
        n.key_id,
        n.account_id,
        n.window.value,
        n.window_start,
        n.window_end,
        n.threshold,
        n.threshold_percent,
        n.threshold_count,
        n.limit,
        n.count,
        n.version,
        n.decided_at,
        n.source,
    ]
