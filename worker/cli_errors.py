"""Expected failures of a ``meter`` command, each said in one line with what to do.

A traceback is for bugs; a store held by the worker, a broker that is down or a range out of
bounds is the user's situation, and they get one line on stderr and exit code 2 (the
traceback stays available with ``--log-level DEBUG``).
"""

from __future__ import annotations

import logging

from aiokafka.errors import KafkaError
from clickhouse_connect.driver.exceptions import ClickHouseError

from common import kafka_clients
from common.follower import TopicUnavailable
from common.listen import PortUnavailable
from worker.analytics.source import SourceUnavailable
from worker.dsn import redact_dsn
from worker.refusals import ActionRefused, QueryRefused
from worker.settings import Settings
from worker.store.client import StoreUnavailable
from worker.store.migrations import MigrationLocked
from worker.topics import TopicsRefused

# Commands that keep running and log as they go; the others answer once and print only that.
LONG_RUNNING = frozenset({"worker", "node", "demo", "serve-api", "notify"})


def quiet_client_logs(command: str, level: str) -> None:
    """The clients' own lines repeat (worse) what the command says: one-shot commands keep
    none of them; long-running ones keep the Kafka client's errors, which say what a running
    worker or node is waiting for. HTTP clients' retry warnings are noise everywhere."""
    if level.upper() == "DEBUG":
        return
    for name in ("urllib3", "clickhouse_connect", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.ERROR if command in LONG_RUNNING else logging.CRITICAL)
    if command not in LONG_RUNNING:
        for name in ("aiokafka", "kafka", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def one_line(exc: BaseException, settings: Settings) -> str | None:
    """The line for an expected failure; None for anything else (a bug)."""
    refused = (
        SourceUnavailable
        | QueryRefused
        | ActionRefused
        | StoreUnavailable
        | TopicsRefused
        | PortUnavailable
        | MigrationLocked
    )
    if isinstance(exc, refused):
        return str(exc)
    if isinstance(exc, TopicUnavailable):
        return f"{exc} (is Kafka up at METER_KAFKA_BOOTSTRAP? `meter topics` creates the topics)"
    if isinstance(exc, KafkaError):
        where = kafka_clients.describe(settings)
        return f"Kafka at {where} failed: {_first_line(exc)} (is it up, and are METER_KAFKA_* right?)"
    if isinstance(exc, ClickHouseError):
        where = f"{redact_dsn(settings.clickhouse_dsn)} (database {settings.clickhouse_database})"
        if "UNKNOWN_TABLE" in str(exc) or "Unknown table" in str(exc):
            return f"the store at {where} has no meter tables yet: run `meter migrate`, or start a worker"
        return f"ClickHouse at {where} failed: {_first_line(exc)}"
    if isinstance(exc, ConnectionError | TimeoutError):
        return f"{_first_line(exc)} (is the service it names up?)"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
