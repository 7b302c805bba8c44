"""Shared fixtures: the real Kafka broker, unique topics per test, a random ClickHouse database.

The broker: ``METER_KAFKA_BOOTSTRAP`` if it answers, else the project's own KRaft broker
started by ``infra/kafka/kafka.sh`` on port 19092 (left running for the next run; stop it
with ``KAFKA_PORT=19092 infra/kafka/kafka.sh stop``).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.containers import docker_kafka
from tests.integration.helpers import DEAD_BOOTSTRAP, REPO_ROOT
from tests.node_secret import NODE_SECRET
from worker.settings import Settings

TEST_KAFKA_PORT = 19092
# Loggers the CLI tunes (worker.logs, worker.cli_errors): put back after each test.
_TUNED_LOGGERS = ("", "aiokafka", "kafka", "asyncio", "urllib3", "clickhouse_connect", "httpx", "httpcore")


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs ``meter`` in-process (``main()``) installs a handler on the stream pytest
    captured for that test, and tunes client loggers: without this, later tests log into a
    closed stream ("Logging error ... I/O operation on closed file") and miss client logs."""
    loggers = [logging.getLogger(name) for name in _TUNED_LOGGERS]
    saved = [(lg, lg.handlers[:], lg.level) for lg in loggers]
    yield
    for lg, handlers, level in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)


def _answers(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Address of a real Kafka broker; starts the project's own if none is given."""
    given = os.environ.get("METER_KAFKA_BOOTSTRAP")
    if given:
        if not _answers(given):
            pytest.fail(f"METER_KAFKA_BOOTSTRAP={given} does not answer")
        return given
    addr = docker_kafka()  # an apache/kafka container where a Docker engine answers, else None
    if addr:
        return addr
    bootstrap = f"127.0.0.1:{TEST_KAFKA_PORT}"
    if not _answers(bootstrap):
        env = {**os.environ, "KAFKA_PORT": str(TEST_KAFKA_PORT)}
        subprocess.run([str(REPO_ROOT / "infra" / "kafka" / "kafka.sh"), "start"], check=True, env=env)
    return bootstrap


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one chDB data directory of this test process (chDB allows one per process)."""
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def make_settings(request: pytest.FixtureRequest, chdb_dir: Path, unique: str) -> Callable[..., Settings]:
    """Settings for one test: unique topics and group, a random database, the session's chDB.

    A test marked ``no_kafka`` gets an address where nothing listens (and no broker is started)."""
    if request.node.get_closest_marker("no_kafka"):
        kafka_bootstrap = DEAD_BOOTSTRAP
    else:
        kafka_bootstrap = request.getfixturevalue("kafka_bootstrap")

    def build(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "kafka_bootstrap": kafka_bootstrap,
            "events_topic": f"t{unique}.events",
            "decisions_topic": f"t{unique}.decisions",
            "dlq_topic": f"t{unique}.dlq",
            "limits_topic": f"t{unique}.limits",
            "allowances_topic": f"t{unique}.allowances",
            "consumer_group": f"g{unique}",
            "clickhouse_dsn": f"chdb://{chdb_dir}",
            "clickhouse_database": f"test_{unique}",
            "batch_timeout_ms": 50,
            "http_port": 0,  # tests that need /metrics pick a free port
            "node_secret": NODE_SECRET,  # generated per run; nodes refuse one under 32 bytes
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return build


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def topics(settings: Settings) -> AsyncIterator[Settings]:
    """Create the test's topics on the real broker (deleted afterwards)."""
    from worker.topics import ensure_topics

    await ensure_topics(settings)
    yield settings
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(
            [
                settings.events_topic,
                settings.decisions_topic,
                settings.dlq_topic,
                settings.limits_topic,
                settings.allowances_topic,
            ]
        )
    except Exception:  # best-effort cleanup
        pass
    finally:
        await admin.close()


@pytest.fixture
def clickhouse(settings: Settings) -> Iterator[object]:
    """A migrated random database on the session's chDB engine, dropped afterwards."""
    from worker.store.client import connect, quote_identifier
    from worker.store.migrations import migrate

    client = connect(settings.clickhouse_dsn, settings.clickhouse_database)
    migrate(client, settings)
    yield client
    client.command(f"DROP DATABASE IF EXISTS {quote_identifier(settings.clickhouse_database)}")
