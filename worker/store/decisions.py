"""The decisions audit table: every block / unblock, worker-made or operator-made."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DataError

from schemas.decisions import Decision
from worker.store.client import quote_identifier

log = logging.getLogger(__name__)

COLUMNS = [
    "key_id",
    "version",
    "action",
    "window",
    "limit_value",
    "count_value",
    "until",
    "reason",
    "source",
    "decided_at",
    "shadow",
]


class DecisionStore:
    """The audit of every decision published (``decisions`` table): writes and reads."""

    def __init__(self, client: Client, database: str) -> None:
        self._client = client
        self._table = f"{quote_identifier(database)}.decisions"

    def record(self, decisions: Sequence[Decision]) -> list[Decision]:
        """Insert; recording the same (key_id, version) twice collapses on merge and in reads.

        A decision whose values the table cannot hold is a data error, not an outage: it is
        logged and skipped (returned), the others recorded. Store failures are raised, for the
        caller to retry."""
        if not decisions:
            return []
        try:
            self._client.insert(self._table, [_row(d) for d in decisions], column_names=COLUMNS)
            return []
        except DataError:
            if len(decisions) == 1:
                log.error("decision %s v%s cannot be audited and is skipped", decisions[0].key_id, decisions[0].version)
                return list(decisions)
        # Some decision of the batch is unstorable: record them one by one to find which.
        return [bad for d in decisions for bad in self.record([d])]

    def history(self, key_id: str, limit: int = 50) -> list[Decision]:
        result = self._client.query(
            f"SELECT {', '.join(COLUMNS)} FROM {self._table} FINAL WHERE key_id = {{key:String}} "
            "ORDER BY version DESC LIMIT {n:UInt32}",
            parameters={"key": key_id, "n": limit},
        )
        out = []
        for row in result.result_rows:
            key, version, action, window, limit_v, count_v, until, reason, source, decided_at, shadow = row
            out.append(
                Decision(
                    key_id=key,
                    version=version,
                    action=action,
                    window=window,
                    limit=limit_v,
                    count=count_v,
                    until=_utc(until),
                    reason=reason,
                    source=source,
                    decided_at=_utc(decided_at),
                    shadow=bool(shadow),
                )
            )
        return out


def _row(d: Decision) -> list[object]:
    return [
        d.key_id,
        d.version,
        d.action.value,
        d.window.value,
        d.limit,
        d.count,
        d.until,
        d.reason,
        d.source,
        d.decided_at,
        d.shadow,
    ]


def _utc(value: object) -> object:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
