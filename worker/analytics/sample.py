"""A small, known data set written straight into the rollups and the decisions table.

Used by the analytics tests, the browser test and ``meter analytics-sample`` (to look at
the dashboard without running the pipeline). Every level gets the same traffic, so the
numbers agree whichever level a query reads.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from clickhouse_connect.driver.client import Client

from schemas.decisions import Decision, DecisionAction, Window
from schemas.usage import Granularity
from worker.analytics.signals import SignalThresholds
from worker.store.decisions import DecisionStore
from worker.store.rollup import mark_summary_levels, rollup_table
from worker.store.usage import floor_to

_COLUMNS = [
    "level",
    "key_id",
    "bucket",
    "endpoint",
    "status",
    "node_id",
    "client_ip",
    "account_id",
    "requests",
    "bytes_out",
    "latency_ms_sum",
]

NORMAL_KEY = "cf_liv_normal0000000001"
ABUSED_KEY = "cf_liv_abused0000000002"
QUIET_KEY = "cf_liv_quiet00000000003"
PROBER_KEY = "cf_liv_prober0000000004"
MANUAL_KEY = "cf_liv_manual0000000005"
STORM_IP = "203.0.113.66"


@dataclass
class SampleFacts:
    """What the sample holds, for assertions: counts are of the last hour unless named otherwise."""

    now: datetime
    last_hour: dict[str, int] = field(default_factory=dict)  # requests per key in [floor(now-1h), now)
    last_hour_429: dict[str, int] = field(default_factory=dict)
    last_hour_auth: dict[str, int] = field(default_factory=dict)
    baseline_per_day: dict[str, int] = field(default_factory=dict)
    baseline_per_hour: dict[str, int] = field(default_factory=dict)  # at each hour start of baseline_hours
    baseline_hours: list[datetime] = field(default_factory=list)
    abused_ips: int = 0
    storm_keys: int = 0
    blocked: list[str] = field(default_factory=list)  # keys blocked at ``now``, newest block first
    abused_blocks_24h: int = 0
    rows: int = 0

    def baseline(self, keys: Iterable[str], since: datetime, until: datetime) -> int:
        """Baseline requests of ``keys`` in buckets [since, until): what a window reaching back
        before today holds besides the last hour (``since`` floored to the window's granularity)."""
        hours = sum(1 for at in self.baseline_hours if since <= at < until)
        return hours * sum(self.baseline_per_hour.get(key, 0) for key in keys)


class _Rows:
    def __init__(self) -> None:
        # (level, key, bucket, endpoint, status, node, ip, account) -> [requests, bytes, latency]
        self.cells: dict[tuple[str, str, datetime, str, int, str, str, str], list[float]] = defaultdict(
            lambda: [0, 0, 0.0]
        )

    def add(
        self,
        key: str,
        account: str,
        minute: datetime,
        n: int,
        *,
        endpoint: str = "/v0/rates",
        status: int = 200,
        node: str = "node-1",
        ip: str = "198.51.100.10",
    ) -> None:
        """``n`` requests in one minute, counted at every level like the ingest does."""
        hour, day = floor_to(minute, Granularity.hour), floor_to(minute, Granularity.day)
        for cell in (
            ("minute", key, minute, endpoint, status, "", "", account),
            ("hour", key, hour, endpoint, status, node, "", account),
            ("day", key, day, endpoint, status, node, "", account),
            ("client_hour", key, hour, "", status, "", ip, account),
        ):
            acc = self.cells[cell]
            acc[0] += n
            acc[1] += n * 512
            acc[2] += n * 25.0

    def as_rows(self) -> list[list[object]]:
        return [[*cell, int(v[0]), int(v[1]), float(v[2])] for cell, v in self.cells.items()]


# long: the sample data set written out as data, one scenario after another
def seed_sample(client: Client, database: str, now: datetime | None = None) -> SampleFacts:
    """Write the sample around ``now`` (default: the current time) and return its facts."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    facts = SampleFacts(now=now)
    rows = _Rows()
    this_minute = floor_to(now, Granularity.minute)
    today = floor_to(now, Granularity.day)

    # Quiet days before today, one batch per hour: the keys' own baseline. One day more than the
    # rate-jump baseline: it ends where the recent window's first day begins, so in the day's
    # first hour it is days -8..-2 (of the default 7).
    quiet_days = SignalThresholds().baseline_days + 1
    baseline = {NORMAL_KEY: 60, ABUSED_KEY: 20, QUIET_KEY: 5, PROBER_KEY: 2}
    accounts = {NORMAL_KEY: "acct-a", ABUSED_KEY: "acct-b", QUIET_KEY: "acct-a", PROBER_KEY: "acct-c"}
    first_quiet_day = today - timedelta(days=quiet_days)
    facts.baseline_hours = [first_quiet_day + timedelta(hours=hour) for hour in range(quiet_days * 24)]
    for at in facts.baseline_hours:
        for key, per_hour in baseline.items():
            rows.add(key, accounts[key], at, per_hour, ip=f"198.51.100.{len(key) + per_hour}")
    facts.baseline_per_hour = dict(baseline)
    facts.baseline_per_day = {k: v * 24 for k, v in baseline.items()}

    # The last hour: 60 minute buckets ending with the current one.
    last_hour = [this_minute - timedelta(minutes=i) for i in range(60)]
    abused_ips = [f"192.0.2.{i + 1}" for i in range(40)]
    for i, minute in enumerate(last_hour):
        rows.add(NORMAL_KEY, "acct-a", minute, 1)
        # The abused key: 50 requests a minute from 40 addresses over 3 nodes, 20 of them refused 429.
        ip = abused_ips[i % len(abused_ips)]
        node = f"node-{i % 3 + 1}"
        rows.add(ABUSED_KEY, "acct-b", minute, 30, endpoint="/v0/payments", ip=ip, node=node)
        rows.add(ABUSED_KEY, "acct-b", minute, 20, endpoint="/v0/payments", status=429, ip=ip, node=node)
        # The prober: 5 forbidden calls and 1 allowed call a minute.
        rows.add(PROBER_KEY, "acct-c", minute, 5, endpoint="/v0/wallets", status=403, ip="198.51.100.77")
        rows.add(PROBER_KEY, "acct-c", minute, 1, endpoint="/v0/rates", ip="198.51.100.77")
    # An invalid-key storm: one address trying 150 different made-up keys once each.
    for i in range(150):
        rows.add(f"cf_liv_guess{i:011d}", "", last_hour[i % 60], 1, endpoint="/v0/payments", status=401, ip=STORM_IP)
    facts.last_hour = {NORMAL_KEY: 60, ABUSED_KEY: 3000, PROBER_KEY: 360}
    facts.last_hour_429 = {ABUSED_KEY: 1200}
    facts.last_hour_auth = {PROBER_KEY: 300}
    facts.abused_ips = len(abused_ips)
    facts.storm_keys = 150

    table_rows = rows.as_rows()
    client.insert(rollup_table(database), table_rows, column_names=_COLUMNS)
    # Written straight into the table: the address counts the worker would have written with them.
    mark_summary_levels(client, database, int((today - timedelta(days=7)).timestamp()))
    facts.rows = len(table_rows)

    # Decisions: the abused key blocked four times today (the last block still holds), the
    # normal key blocked once and released, one key blocked by an operator until further notice.
    decisions: list[Decision] = []
    for i, minutes_ago in enumerate((50, 30, 15, 1)):
        at = now - timedelta(minutes=minutes_ago)
        decided = floor_to(at, Granularity.minute)
        decisions.append(
            _block(ABUSED_KEY, 2 * i + 1, decided, Window.minute, 100, 101, decided + timedelta(minutes=1))
        )
        if minutes_ago > 1:
            decisions.append(_unblock(ABUSED_KEY, 2 * i + 2, decided + timedelta(minutes=1), Window.minute))
    decisions[-1] = decisions[-1].model_copy(update={"until": now + timedelta(minutes=5)})
    decisions.append(_block(NORMAL_KEY, 1, now - timedelta(hours=3), Window.hour, 1000, 1001, now - timedelta(hours=2)))
    decisions.append(_unblock(NORMAL_KEY, 2, now - timedelta(hours=2), Window.hour))
    decisions.append(
        Decision(
            key_id=MANUAL_KEY,
            action=DecisionAction.block,
            window=Window.manual,
            version=1,
            decided_at=now - timedelta(hours=5),
            reason="operator: key posted in a public repository",
            source="operator",
        )
    )
    DecisionStore(client, database).record(decisions)
    facts.blocked = [ABUSED_KEY, MANUAL_KEY]
    facts.abused_blocks_24h = 4
    return facts


def _block(key: str, version: int, at: datetime, window: Window, limit: int, count: int, until: datetime) -> Decision:
    return Decision(
        key_id=key,
        action=DecisionAction.block,
        window=window,
        limit=limit,
        count=count,
        until=until,
        version=version,
        decided_at=at,
        reason=f"{count} requests in the {window.value} window; limit {limit}",
    )


def _unblock(key: str, version: int, at: datetime, window: Window) -> Decision:
    return Decision(
        key_id=key,
        action=DecisionAction.unblock,
        window=window,
        version=version,
        decided_at=at,
        reason="window rolled over",
    )
