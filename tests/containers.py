"""Kafka and ClickHouse in containers (testcontainers) for the integration tests, when a Docker
engine answers; ``None`` otherwise, so the tests fall back to the local KRaft broker
(``infra/kafka/kafka.sh``) and to chDB.

``USE_TESTCONTAINERS``: unset or ``auto`` = use Docker when an engine answers within
``PROBE_TIMEOUT`` seconds; ``0``/``no``/``off`` = never; ``1``/``yes``/``on`` = required
(a missing engine is an error instead of a silent fallback).

The broker is ``apache/kafka`` (the same Apache Kafka 4.1 as ``infra/kafka`` and
``docker-compose.yml``) in KRaft combined mode; its advertised address is written into the
container after start, once the mapped port is known. Containers live until the test
process ends (and testcontainers' reaper removes them if the process is killed).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import secrets
import tarfile
import threading
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

KAFKA_IMAGE = "apache/kafka:4.1.1"
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:25.8"
PROBE_TIMEOUT = 3.0
STARTUP_TIMEOUT = 120.0

_HOST_PORT = 9092  # listener the tests reach through the mapped port
_ENV_SCRIPT = "/tmp/meter-kafka-env.sh"


def _mode() -> str:
    value = os.environ.get("USE_TESTCONTAINERS", "auto").strip().lower()
    if value in ("0", "no", "off", "false"):
        return "off"
    if value in ("1", "yes", "on", "true", "required"):
        return "required"
    return "auto"


def docker_engine_available(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a Docker engine answers a ping within ``timeout`` seconds (never hangs longer).

    Uses testcontainers' own idea of the engine (``DOCKER_HOST``, the docker context,
    ``~/.testcontainers.properties``). The probe runs in a daemon thread so that even a
    host that never answers cannot hold the test session.
    """
    answer: list[bool] = []

    def probe() -> None:
        try:
            from testcontainers.core.docker_client import DockerClient

            client = DockerClient(timeout=max(timeout, 0.1))  # negotiating the API version is a request
            try:
                answer.append(bool(client.client.ping()))
            finally:
                client.client.close()
        except Exception:  # no socket, refused, timed out, bad DOCKER_HOST: no engine
            answer.append(False)

    thread = threading.Thread(target=probe, name="docker-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


class KafkaKRaftContainer:
    """``apache/kafka`` in KRaft combined mode, reachable from the host at ``bootstrap``."""

    def __init__(self, image: str = KAFKA_IMAGE) -> None:
        from testcontainers.core.container import DockerContainer

        self.container: DockerContainer = DockerContainer(image)
        self.container.with_exposed_ports(_HOST_PORT)
        self.container.with_envs(
            CLUSTER_ID="EiPjn3NsS6KkQnzTosy_-g",
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS=f"PLAINTEXT://:{_HOST_PORT},BROKER://:19092,CONTROLLER://:9093",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_INTER_BROKER_LISTENER_NAME="BROKER",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_LOG_DIRS="/tmp/kraft-combined-logs",
        )
        # The advertised listener needs the mapped port, known only after start: the
        # container waits for a small env script, then runs the image's own launcher.
        wait_then_run = f"while [ ! -f {_ENV_SCRIPT} ]; do sleep 0.1; done; . {_ENV_SCRIPT}; exec /etc/kafka/docker/run"
        self.container.with_kwargs(entrypoint=["sh", "-c"])
        self.container.with_command([wait_then_run])
        self.bootstrap = ""

    def start(self, timeout: float = STARTUP_TIMEOUT) -> KafkaKRaftContainer:
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy

        self.container.start()
        host = self.container.get_container_host_ip()
        port = self.container.get_exposed_port(_HOST_PORT)
        self.bootstrap = f"{host}:{port}"
        script = f"export KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://{self.bootstrap},BROKER://localhost:19092\n"
        self._put_file(_ENV_SCRIPT, script.encode())
        strategy = LogMessageWaitStrategy("Kafka Server started").with_startup_timeout(int(timeout))
        strategy.wait_until_ready(self.container)
        return self

    def _put_file(self, path: str, content: bytes) -> None:
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(name=path.lstrip("/"))
            info.size = len(content)
            info.mtime = int(time.time())
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
        self.container.get_wrapped_container().put_archive("/", archive.getvalue())

    def stop(self) -> None:
        self.container.stop()


class _Services:
    """The containers of this test process: started on first use, stopped at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._available: bool | None = None
        self._kafka: KafkaKRaftContainer | None = None
        self._clickhouse: DockerContainer | None = None
        self._clickhouse_dsn: str | None = None
        atexit.register(self.stop_all)

    def available(self) -> bool:
        if self._available is None:
            mode = _mode()
            self._available = mode != "off" and docker_engine_available()
            if mode == "required" and not self._available:
                raise RuntimeError("USE_TESTCONTAINERS requires a Docker engine, and none answers")
        return self._available

    def kafka(self) -> str | None:
        with self._lock:
            if not self.available():
                return None
            if self._kafka is None:
                self._kafka = KafkaKRaftContainer().start()
            return self._kafka.bootstrap

    def clickhouse(self) -> str | None:
        with self._lock:
            if not self.available():
                return None
            if self._clickhouse_dsn is None:
                from testcontainers.community.clickhouse import ClickHouseContainer

                password = secrets.token_hex(16)
                container = ClickHouseContainer(CLICKHOUSE_IMAGE, username="meter", password=password, dbname="default")
                container.start()
                self._clickhouse = container
                host = container.get_container_host_ip()
                port = container.get_exposed_port(8123)
                self._clickhouse_dsn = f"http://meter:{password}@{host}:{port}"
            return self._clickhouse_dsn

    def stop_all(self) -> None:
        with self._lock:
            for started in (self._kafka, self._clickhouse):
                if started is not None:
                    with contextlib.suppress(Exception):  # best effort at exit; the reaper removes leftovers
                        started.stop()
            self._kafka = self._clickhouse = None
            self._clickhouse_dsn = None


_services = _Services()


def docker_kafka() -> str | None:
    """Bootstrap address of a containerised Kafka broker, or ``None`` without a Docker engine."""
    return _services.kafka()


def docker_clickhouse() -> str | None:
    """``http://user:pass@host:port`` of a containerised ClickHouse server, or ``None``."""
    return _services.clickhouse()


@pytest.fixture(scope="session")
def docker_kafka_bootstrap() -> str | None:
    """Session fixture form of :func:`docker_kafka` (the container is stopped at exit)."""
    return docker_kafka()


@pytest.fixture(scope="session")
def docker_clickhouse_dsn() -> str | None:
    """Session fixture form of :func:`docker_clickhouse` (the container is stopped at exit)."""
    return docker_clickhouse()
