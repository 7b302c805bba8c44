"""The tests' one helpers module (unit tests use it too): where the repository is, addresses,
polling until a condition holds, reading a topic, independent expectations and ClickHouse
totals, a demo node."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from starlette.applications import Starlette

from common.follower import TopicUnavailable, read_to_end, topic_partitions
from common.kafka_clients import KafkaTarget
from node.demo_api import build_node_app, demo_key_store, demo_keys
from node.keys import KeyStore, derive_key_id
from schemas.decisions import Window
from schemas.events import RequestEvent
from tests.node_secret import NODE_SECRET
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.store.migrations import discover
from worker.store.rollup import rollup_table

REPO_ROOT = Path(__file__).resolve().parents[2]
# Nothing listens here: the address of tests that must not reach (or start) a broker.
DEAD_BOOTSTRAP = "127.0.0.1:1"


def days_ago(days: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    """That time of the day ``days`` before today (UTC). Rows written at a pinned date age past
    the store's TTLs (chDB deletes them on the real clock, a second after the insert): a test
    that needs a particular hour or second takes it on a recent day instead."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days) + timedelta(hours=hour, minutes=minute, seconds=second)


BucketCounts = Counter[tuple[str, str, int]]  # (level, key_id, bucket epoch) -> requests

STEP = {"minute": 60, "hour": 3600, "day": 86400}


def expected_counts(events: Iterable[RequestEvent], measure: str = "requests") -> BucketCounts:
    """What the rollups must hold (``measure``: requests, or their cost: 1 without one),
    computed without any of the worker's code."""
    out: BucketCounts = Counter()
    for e in events:
        epoch = int(e["ts"].timestamp())
        n = 1 if measure == "requests" else e.get("cost", 1)
        for level, step in STEP.items():
            out[(level, e["key_id"], epoch - epoch % step)] += n
    return out


def db_counts(client: Any, database: str, measure: str = "requests") -> BucketCounts:
    """Sums of ``measure`` (requests or cost) per level, key and bucket in the rollups."""
    column = {"requests": "requests", "cost": "cost"}[measure]
    rows = client.query(
        f"SELECT toString(level), key_id, toUInt32(bucket), sum({column}) FROM `{database}`.usage_rollup "
        "WHERE level IN ('minute', 'hour', 'day') GROUP BY level, key_id, bucket"
    ).result_rows
    return Counter({(lv, k, int(b)): int(n) for lv, k, b, n in rows if n})


async def wait_for(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` (plain or async) until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = cond()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def migrations_up_to(version: int, directory: Path) -> Path:
    """A copy of the shipped migrations up to ``version`` in ``directory``: a store as an older
    release left it, for a migration to upgrade."""
    directory.mkdir(parents=True, exist_ok=True)
    for migration in discover():
        if migration.version <= version:
            shutil.copy(Path(str(migration.path)), directory / migration.path.name)
    return directory


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_topic(kafka: KafkaTarget, topic: str, at_least: int = 0, timeout: float = 20.0) -> list[Any]:
    """Every record in ``topic`` (all partitions, from the beginning, to the end), once it
    holds at least ``at_least`` of them; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = await read_to_end(kafka, topic, timeout_s=max(1.0, deadline - time.monotonic()))
        except TopicUnavailable as exc:
            raise AssertionError(f"could not read {topic}: {exc}") from exc
        if len(records) >= at_least:
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{topic} holds {len(records)} records, not {at_least}, after {timeout}s")
        await asyncio.sleep(0.1)


async def group_lag(bootstrap: str, group: str, topic: str) -> dict[int, tuple[int | None, int]]:
    """(committed, end) of every non-empty partition the group's committed offset has not
    reached (None: nothing committed)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        parts = await topic_partitions(bootstrap, [topic])
        end = await consumer.end_offsets(parts)
        done = {tp: committed[tp].offset for tp in parts if tp in committed}
        return {tp.partition: (done.get(tp), end[tp]) for tp in parts if end[tp] > done.get(tp, 0)}
    finally:
        await consumer.stop()
        await admin.close()


async def group_caught_up(bootstrap: str, group: str, topic: str) -> bool:
    """True when the group's committed offsets reached the end of every partition."""
    return not await group_lag(bootstrap, group, topic)


@contextlib.asynccontextmanager
async def demo_node(
    settings: Settings, node_id: str, keys: KeyStore, now: Callable[[], datetime] | None = None
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """One demo API node (reporter, decision cache, guard) on the real broker, served in-process
    (``now``: its clock, when a test moves time)."""
    app = build_node_app(
        settings.model_copy(update={"node_id": node_id}), keys, fail_open=settings.node_fail_open, now=now
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            yield app, client


async def until_fresh_minute(min_left: float = 25.0) -> None:
    """Start a minute-window test with enough of the minute left to finish inside it."""
    left = 60 - time.time() % 60
    if left < min_left:
        await asyncio.sleep(left + 0.5)


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``meter`` subprocess on the test's broker and topics (no METER_*
    of the test process leaks in); ``extra``: more METER_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    names = ("kafka_bootstrap", "events_topic", "decisions_topic", "limits_topic", "allowances_topic", "dlq_topic")
    return (
        base
        | {f"METER_{n.upper()}": str(getattr(settings, n)) for n in names}
        | {
            "METER_CONSUMER_GROUP": settings.consumer_group,
            **extra,
        }
    )


# Minute rows with 429s (test_minute_429.py, test_client_401.py, test_migration_lock.py) --------

MINUTE_COLUMNS = ["level", "key_id", "account_id", "bucket", "endpoint", "status", "route", "requests"]
# Within the minute rows' TTL (days) whenever the test runs: expired rows are not kept.
MINUTE_429_NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0) - timedelta(hours=1)


def minute_rows(clickhouse: Any, database: str, level: str) -> list[tuple[str, int, str, str, int]]:
    """(key, minute, endpoint, route, requests) of the level's rows of status 429, summed over parts."""
    rows = clickhouse.query(
        f"SELECT key_id, toUInt32(bucket), toString(endpoint), max(route), sum(requests) FROM {rollup_table(database)} "
        "WHERE level = {level:String} AND status = 429 "
        "GROUP BY key_id, bucket, endpoint ORDER BY key_id, bucket, endpoint",
        parameters={"level": level},
    ).result_rows
    return [(str(k), int(b), str(e), str(r), int(n)) for k, b, e, r, n in rows]


def stored_429s(client: Any, database: str) -> list[tuple[str, int, str, str, int]]:
    copies = minute_rows(client, database, "minute_429")
    assert copies == minute_rows(client, database, "minute")
    return copies


def traffic(minutes: int = 30) -> list[list[object]]:
    """Minute rows of 12 keys over the last ``minutes``: key i is refused (i * 7) % 12 times a
    minute, so the ranking by 429s differs from the ranking by requests."""
    rows: list[list[object]] = []
    for m in range(1, minutes + 1):
        bucket = MINUTE_429_NOW - timedelta(minutes=m)
        for i in range(12):
            key, endpoint = f"cf_k{i:02d}", f"/v0/e{i % 2}"
            rows.append(["minute", key, "acct", bucket, endpoint, 200, "typical", 50 - i])
            if (i * 7) % 12:
                rows.append(["minute", key, "acct", bucket, endpoint, 429, "typical", (i * 7) % 12])
    return rows


# The limits end-to-end fleet: demo nodes holding the e2e keys under the tests' node secret.
SECRET = NODE_SECRET
RAW = demo_keys("e2e-seed")


def kid(name: str) -> str:
    return derive_key_id(RAW[name], SECRET.encode())


class Clock:
    """Real time plus an offset the test can advance (the worker's view of 'now')."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@contextlib.asynccontextmanager
async def node(
    settings: Settings, node_id: str, clock: Clock | None = None
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    now = (lambda: datetime.fromtimestamp(clock(), UTC)) if clock is not None else None
    async with demo_node(settings, node_id, demo_key_store(RAW, SECRET.encode()), now) as served:
        yield served


def window_count(worker: WorkerRuntime, subject: str, window: Window) -> int:
    """The worker's live count of ``subject`` in the current ``window`` (0 if it holds none)."""
    assert worker.limits is not None
    engine = worker.limits.engine
    for counters in engine.partitions.values():
        kw = counters.keys.get(subject)
        if kw is not None:
            return kw.count(window, engine.clock())
    return 0


async def blocked_everywhere(apps: list[Starlette], key_id: str, timeout: float = 10.0) -> float:
    started = time.monotonic()
    await wait_for(lambda: all(a.state.cache.check(key_id) for a in apps), timeout, f"block of {key_id} on all nodes")
    return time.monotonic() - started


async def delete_topic(settings: Settings, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def create_again(settings: Settings, topic: str) -> None:
    """The settings' topics created again after ``topic`` was deleted, once a broker lists it
    (a refusal of ``ensure_topics`` is raised: it is not a wait)."""
    from worker.topics import ensure_topics

    async def listed() -> bool:
        await ensure_topics(settings)
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            return topic in await admin.list_topics()
        finally:
            await admin.close()

    await wait_for(listed, timeout=20, what=f"{topic} created again")


class BrokerProxy:
    """A TCP proxy in front of the test broker; ``cut()`` is a broker gone from the network
    (connections reset, new ones refused) without stopping it, ``frozen`` a network partition
    (connections stay open, nothing gets through). Use with ``route_through``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> BrokerProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    while self.frozen:
                        await asyncio.sleep(0.05)
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream), pipe(upstream_reader, writer))

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()


def route_through(monkeypatch: Any, proxy: BrokerProxy) -> None:
    """aiokafka clients reach the broker through ``proxy`` (the broker advertises its own port)."""
    from aiokafka import cluster

    original = cluster.ClusterMetadata.broker_metadata

    def through_proxy(self: Any, broker_id: Any) -> Any:
        broker = original(self, broker_id)
        if broker is not None and (broker.host, broker.port) == proxy.target:
            broker = broker._replace(host="127.0.0.1", port=proxy.port)
        return broker

    monkeypatch.setattr(cluster.ClusterMetadata, "broker_metadata", through_proxy)
