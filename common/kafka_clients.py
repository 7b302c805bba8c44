"""The one place Kafka clients are built: every producer, consumer, admin client and the
FastStream broker of the node and the worker come from here, with the bootstrap servers and
the security settings (TLS, SASL PLAIN / SCRAM) of the settings object.

A client is given either a settings object (``NodeSettings`` or the worker's ``Settings``:
anything with the ``kafka_*`` fields of ``KafkaConnectionSettings``) or a bare bootstrap
string, which means PLAINTEXT (tests and benchmarks against the local development broker).

Secrets stay ``SecretStr`` until the moment a client is built; ``describe()`` is what may be
logged (protocol, mechanism and user, never a password).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr

if TYPE_CHECKING:
    from faststream.kafka import KafkaBroker
    from faststream.security import BaseSecurity

SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TLS: Final = frozenset({"SSL", "SASL_SSL"})
_SASL: Final = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


class KafkaConnectionSettings(Protocol):
    """The settings fields a client is built from (``NodeSettings`` has them all)."""

    @property
    def kafka_bootstrap(self) -> str: ...
    @property
    def kafka_security_protocol(self) -> str: ...
    @property
    def kafka_sasl_mechanism(self) -> str: ...
    @property
    def kafka_sasl_username(self) -> str: ...
    @property
    def kafka_sasl_password(self) -> SecretStr: ...
    @property
    def kafka_ssl_cafile(self) -> Path | None: ...
    @property
    def kafka_ssl_certfile(self) -> Path | None: ...
    @property
    def kafka_ssl_keyfile(self) -> Path | None: ...
    @property
    def kafka_ssl_keyfile_password(self) -> SecretStr: ...


# A settings object, or a bare bootstrap string (PLAINTEXT).
KafkaTarget = KafkaConnectionSettings | str


def security_errors(s: KafkaConnectionSettings) -> list[str]:
    """What is wrong or contradictory in the security settings, one sentence per problem,
    naming the environment variables (empty when the settings can build a client)."""
    errors: list[str] = []
    protocol = s.kafka_security_protocol
    if protocol not in SECURITY_PROTOCOLS:
        errors.append(f"METER_KAFKA_SECURITY_PROTOCOL={protocol!r} is not one of {', '.join(SECURITY_PROTOCOLS)}")
        return errors
    if s.kafka_sasl_mechanism not in SASL_MECHANISMS:
        mechanism = s.kafka_sasl_mechanism
        errors.append(f"METER_KAFKA_SASL_MECHANISM={mechanism!r} is not one of {', '.join(SASL_MECHANISMS)}")
    has_user = bool(s.kafka_sasl_username)
    has_password = bool(s.kafka_sasl_password.get_secret_value())
    if protocol in _SASL:
        missing = [
            name
            for name, given in (("METER_KAFKA_SASL_USERNAME", has_user), ("METER_KAFKA_SASL_PASSWORD", has_password))
            if not given
        ]
        if missing:
            errors.append(f"METER_KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(missing)}")
    elif has_user or has_password:
        # Credentials that would be silently ignored: the broker would be reached without them.
        errors.append(
            "METER_KAFKA_SASL_USERNAME / METER_KAFKA_SASL_PASSWORD are set but "
            f"METER_KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL (use SASL_PLAINTEXT or SASL_SSL)"
        )
    tls_files = {
        "METER_KAFKA_SSL_CAFILE": s.kafka_ssl_cafile,
        "METER_KAFKA_SSL_CERTFILE": s.kafka_ssl_certfile,
        "METER_KAFKA_SSL_KEYFILE": s.kafka_ssl_keyfile,
    }
    given_files = {name: path for name, path in tls_files.items() if path is not None}
    if protocol not in _TLS:
        if given_files or s.kafka_ssl_keyfile_password.get_secret_value():
            names = ", ".join(given_files) or "METER_KAFKA_SSL_KEYFILE_PASSWORD"
            errors.append(
                f"{names} set but METER_KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS (use SSL or SASL_SSL)"
            )
        return errors
    for name, path in given_files.items():
        if not path.is_file():
            errors.append(f"{name}={path}: no such file")
    if s.kafka_ssl_keyfile is not None and s.kafka_ssl_certfile is None:
        errors.append("METER_KAFKA_SSL_KEYFILE needs METER_KAFKA_SSL_CERTFILE (the client certificate)")
    if s.kafka_ssl_keyfile_password.get_secret_value() and s.kafka_ssl_certfile is None:
        errors.append("METER_KAFKA_SSL_KEYFILE_PASSWORD needs METER_KAFKA_SSL_CERTFILE (and its key)")
    return errors


def describe(kafka: KafkaTarget) -> str:
    """Where and how clients connect, for logs: never a password."""
    if isinstance(kafka, str):
        return f"{kafka} (PLAINTEXT)"
    how = kafka.kafka_security_protocol
    if how in _SASL:
        how += f", {kafka.kafka_sasl_mechanism} as {kafka.kafka_sasl_username}"
    return f"{kafka.kafka_bootstrap} ({how})"


def bootstrap(kafka: KafkaTarget) -> str:
    return kafka if isinstance(kafka, str) else kafka.kafka_bootstrap


def ssl_context(kafka: KafkaTarget) -> ssl.SSLContext | None:
    """The TLS context for SSL / SASL_SSL (system CAs unless a CA file is given), else None."""
    if isinstance(kafka, str) or kafka.kafka_security_protocol not in _TLS:
        return None

    def path(p: Path | None) -> str | None:
        return str(p) if p is not None else None

    context: ssl.SSLContext = create_ssl_context(
        cafile=path(kafka.kafka_ssl_cafile),
        certfile=path(kafka.kafka_ssl_certfile),
        keyfile=path(kafka.kafka_ssl_keyfile),
        password=kafka.kafka_ssl_keyfile_password.get_secret_value() or None,
    )
    return context


def security_options(kafka: KafkaTarget) -> dict[str, Any]:
    """The aiokafka keyword arguments of the security settings (empty for PLAINTEXT)."""
    if isinstance(kafka, str) or kafka.kafka_security_protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": kafka.kafka_security_protocol}
    if kafka.kafka_security_protocol in _TLS:
        options["ssl_context"] = ssl_context(kafka)
    if kafka.kafka_security_protocol in _SASL:
        options["sasl_mechanism"] = kafka.kafka_sasl_mechanism
        options["sasl_plain_username"] = kafka.kafka_sasl_username
        options["sasl_plain_password"] = kafka.kafka_sasl_password.get_secret_value()
    return options


def connection_options(kafka: KafkaTarget) -> dict[str, Any]:
    """``bootstrap_servers`` and the security keyword arguments, for any aiokafka client."""
    return {"bootstrap_servers": bootstrap(kafka), **security_options(kafka)}


def producer(kafka: KafkaTarget, *, factory: Callable[..., Any] = AIOKafkaProducer, **options: Any) -> Any:
    """An ``AIOKafkaProducer`` (or what ``factory`` builds from the same arguments: tests)."""
    return factory(**connection_options(kafka), **options)


def consumer(kafka: KafkaTarget, *topics: str, factory: Callable[..., Any] = AIOKafkaConsumer, **options: Any) -> Any:
    """An ``AIOKafkaConsumer`` (or what ``factory`` builds from the same arguments: tests)."""
    return factory(*topics, **connection_options(kafka), **options)


def admin(kafka: KafkaTarget, **options: Any) -> Any:
    """An ``AIOKafkaAdminClient``."""
    return AIOKafkaAdminClient(**connection_options(kafka), **options)


async def describe_topics(admin: AIOKafkaAdminClient, topics: list[str]) -> list[dict[str, Any]]:
    """What ``admin.describe_topics`` returns, asked without ``allow_auto_topic_creation``:
    aiokafka's asks with it, and a broker with auto-creation on would create a topic deleted a
    moment ago again, with the broker's defaults (a control topic not compacted)."""
    from aiokafka.protocol.metadata import MetadataRequest

    response = await admin._send_request(MetadataRequest(topics, allow_auto_topic_creation=False))
    described: list[dict[str, Any]] = response.to_object()["topics"]
    return described


def faststream_security(kafka: KafkaTarget) -> BaseSecurity | None:
    """The same security as a FastStream security object (None for PLAINTEXT)."""
    from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

    if isinstance(kafka, str) or kafka.kafka_security_protocol == "PLAINTEXT":
        return None
    tls = kafka.kafka_security_protocol in _TLS
    context = ssl_context(kafka)
    if kafka.kafka_security_protocol == "SSL":
        return BaseSecurity(ssl_context=context, use_ssl=True)
    user, password = kafka.kafka_sasl_username, kafka.kafka_sasl_password.get_secret_value()
    if kafka.kafka_sasl_mechanism == "SCRAM-SHA-256":
        return SASLScram256(user, password, ssl_context=context, use_ssl=tls)
    if kafka.kafka_sasl_mechanism == "SCRAM-SHA-512":
        return SASLScram512(user, password, ssl_context=context, use_ssl=tls)
    return SASLPlaintext(user, password, ssl_context=context, use_ssl=tls)


def broker(kafka: KafkaTarget, **options: Any) -> KafkaBroker:
    """The worker's FastStream ``KafkaBroker`` (its consumers and publishers)."""
    from faststream.kafka import KafkaBroker

    return KafkaBroker(bootstrap(kafka), security=faststream_security(kafka), **options)
