"""Kafka security settings and the one client factory (issue 9, item 2), without a broker.

Before: settings had only a bootstrap string, ``METER_KAFKA_SECURITY_PROTOCOL`` was silently
ignored and every module built its clients itself."""

from __future__ import annotations

import ast
import asyncio
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import certifi
import pytest
from faststream.kafka.security import parse_security
from pydantic import SecretStr, ValidationError

from common import kafka_clients
from node.reporter import UsageReporter
from node.settings import NodeSettings
from schemas.events import make_event
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CA = Path(certifi.where())
PASSWORD = "s3cret-Pa55word-never-logged"


def sasl(protocol: str = "SASL_PLAINTEXT", mechanism: str = "SCRAM-SHA-512", **extra: Any) -> Settings:
    return Settings(
        kafka_bootstrap="broker-1:9093,broker-2:9093",
        kafka_security_protocol=protocol,
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="node",
        kafka_sasl_password=SecretStr(PASSWORD),
        **extra,
    )


# -- settings ----------------------------------------------------------------------------------


def test_defaults_are_plaintext_and_change_nothing() -> None:
    s = Settings()
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert kafka_clients.connection_options(s) == {"bootstrap_servers": s.kafka_bootstrap}
    assert kafka_clients.faststream_security(s) is None


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METER_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")  # any case
    monkeypatch.setenv("METER_KAFKA_SASL_MECHANISM", "scram-sha-256")
    monkeypatch.setenv("METER_KAFKA_SASL_USERNAME", "worker")
    monkeypatch.setenv("METER_KAFKA_SASL_PASSWORD", PASSWORD)
    monkeypatch.setenv("METER_KAFKA_SSL_CAFILE", str(CA))
    for cls in (NodeSettings, Settings):
        s = cls()
        assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")
        assert s.kafka_sasl_password.get_secret_value() == PASSWORD
        assert PASSWORD not in repr(s)
        assert PASSWORD not in str(s.model_dump())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT"},
            "needs METER_KAFKA_SASL_USERNAME and METER_KAFKA_SASL_PASSWORD",
        ),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "node"},
            "SASL_SSL needs METER_KAFKA_SASL_PASSWORD",
        ),
        # credentials that would be silently ignored: the bug of issue 9
        ({"kafka_sasl_username": "node", "kafka_sasl_password": PASSWORD}, "does not use SASL"),
        ({"kafka_ssl_cafile": str(CA)}, "METER_KAFKA_SSL_CAFILE set but METER_KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"}, "no such file"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": str(CA)}, "needs METER_KAFKA_SSL_CERTFILE"),
        ({"kafka_security_protocol": "TLS"}, "'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL'"),
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI"}, "'PLAIN', 'SCRAM-SHA-256'"),
    ],
)
def test_contradictory_settings_fail_with_a_clear_error(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**values)
    assert message in str(err.value)


def test_a_settings_error_never_shows_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic prints the whole input of a model-level error by default: the environment
    monkeypatch.setenv("METER_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("METER_KAFKA_SASL_PASSWORD", PASSWORD)  # no username: invalid
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "METER_KAFKA_SASL_USERNAME" in str(err.value)
    assert PASSWORD not in str(err.value)
    assert PASSWORD not in repr(err.value)


# -- the factory -------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_options(mechanism: str) -> None:
    assert kafka_clients.connection_options(sasl(mechanism=mechanism)) == {
        "bootstrap_servers": "broker-1:9093,broker-2:9093",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "node",
        "sasl_plain_password": PASSWORD,
    }


def test_tls_options_carry_an_ssl_context() -> None:
    options = kafka_clients.connection_options(sasl("SASL_SSL", kafka_ssl_cafile=CA))
    assert options["security_protocol"] == "SASL_SSL"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname

    only_tls = Settings(kafka_security_protocol="SSL")  # the system's CAs
    options = kafka_clients.connection_options(only_tls)
    assert options["security_protocol"] == "SSL"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert "sasl_plain_password" not in options


@pytest.mark.parametrize(
    ("protocol", "mechanism"),
    [("SSL", "PLAIN"), ("SASL_PLAINTEXT", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-256"), ("SASL_PLAINTEXT", "SCRAM-SHA-512")],
)
def test_the_faststream_broker_gets_the_same_security(protocol: str, mechanism: str) -> None:
    s = (
        Settings(kafka_bootstrap="broker-1:9093,broker-2:9093", kafka_security_protocol="SSL")
        if protocol == "SSL"
        else sasl(protocol, mechanism)
    )
    expected = kafka_clients.security_options(s)
    translated = parse_security(kafka_clients.faststream_security(s))
    assert {k: v for k, v in translated.items() if k != "ssl_context"} == {
        k: v for k, v in expected.items() if k != "ssl_context"
    }
    assert isinstance(translated["ssl_context"], ssl.SSLContext) == (protocol in ("SSL", "SASL_SSL"))

    broker = kafka_clients.broker(s)
    assert broker._connection_kwargs["security_protocol"] == protocol
    assert broker._connection_kwargs["bootstrap_servers"] == ["broker-1:9093,broker-2:9093"]


def test_a_bare_bootstrap_string_is_plaintext() -> None:
    assert kafka_clients.connection_options("127.0.0.1:19092") == {"bootstrap_servers": "127.0.0.1:19092"}
    assert kafka_clients.faststream_security("127.0.0.1:19092") is None


def test_describe_for_logs_never_shows_the_password() -> None:
    text = kafka_clients.describe(sasl())
    assert text == "broker-1:9093,broker-2:9093 (SASL_PLAINTEXT, SCRAM-SHA-512 as node)"
    assert PASSWORD not in text


async def test_the_reporter_builds_its_producer_through_the_factory() -> None:
    configs: list[dict[str, Any]] = []

    class Refused(Exception):
        pass

    def factory(**config: Any) -> Any:
        configs.append(config)
        raise Refused

    reporter = UsageReporter(sasl(), producer_factory=factory, backoff_initial_s=10)
    await reporter.start()
    reporter.report(
        make_event(
            request_id="r1",
            key_id="k1",
            node_id="n1",
            method="GET",
            endpoint="/v0/rates",
            status=200,
            ts=datetime(2025, 3, 1, tzinfo=UTC),
        )
    )
    for _ in range(100):
        if configs:
            break
        await asyncio.sleep(0.01)
    await reporter.stop(flush_timeout_s=0.1)
    assert configs, "the reporter never built a producer"
    assert configs[0]["security_protocol"] == "SASL_PLAINTEXT"
    assert configs[0]["sasl_plain_username"] == "node"
    assert configs[0]["sasl_plain_password"] == PASSWORD
    assert configs[0]["enable_idempotence"] is True


def _direct_constructions(package: str) -> list[str]:
    clients = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "KafkaBroker"}
    found = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in clients:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}(...)")
    return found


@pytest.mark.parametrize("package", ["node", "worker", "bench"])
def test_every_client_is_built_by_the_factory(package: str) -> None:
    """No module builds an aiokafka client or a FastStream broker itself: a client built
    elsewhere would connect without the security settings."""
    assert _direct_constructions(package) == []
