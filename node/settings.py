"""What an API node needs to know, and nothing else: one frozen settings class (``METER_*``).

The worker's settings extend this class, so one environment configures both sides and a
node never imports the worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, IPvAnyNetwork, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.kafka_clients import security_errors
from node.keys import check_secret
from schemas.limits import LimitPolicy, PolicyBook, RouteName

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class NodeSettings(BaseSettings):
    # hide_input_in_errors: a validation error must not print the environment (it holds secrets)
    model_config = SettingsConfigDict(
        env_prefix="METER_", env_file=".env", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    # Kafka: the node writes events and follows decisions, overrides and allowances
    kafka_bootstrap: str = "127.0.0.1:9092"
    events_topic: str = "usage.events"
    decisions_topic: str = "usage.decisions"
    limits_topic: str = "usage.limits"  # compacted: operators' per-key / per-account overrides
    allowances_topic: str = "usage.allowances"  # compacted: each hot key's per-node caps
    # How every client (node, worker, CLI) authenticates to Kafka: see docs/operations.md,
    # "Security model". PLAINTEXT is for a development broker only.
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism = "PLAIN"  # with SASL_PLAINTEXT / SASL_SSL
    kafka_sasl_username: str = Field(default="", max_length=256)
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_cafile: Path | None = None  # with SSL / SASL_SSL; None: the system's CAs
    kafka_ssl_certfile: Path | None = None  # client certificate (mutual TLS), PEM
    kafka_ssl_keyfile: Path | None = None  # its private key, PEM (None: inside the certfile)
    kafka_ssl_keyfile_password: SecretStr = SecretStr("")

    # The default policy of the metered API (overrides come from the limits topic)
    limit_per_minute: int = Field(default=100, ge=0)
    limit_per_hour: int = Field(default=1_000, ge=0)
    limit_per_day: int = Field(default=5_000, ge=0)
    # A quota per UTC calendar month (unset: none). Enforced by the worker's block decisions and
    # each node's own count; not divided into allowances (see README, "Calendar-month quotas").
    limit_per_month: int | None = Field(default=None, ge=0)
    # A global dry run: the worker decides and audits as usual, nodes refuse nothing and count
    # (and mark with X-RateLimit-Shadow) what they would have refused. Per policy: --shadow.
    limits_shadow: bool = False
    # Route limits: route name -> its default limits per key, e.g.
    # METER_ROUTE_LIMITS='{"reports": {"per_minute": 10, "per_hour": 100}}'
    # (a window left out is not limited for the route: the key's own limits still hold). A route gets its name
    # (and its cost) in the node's route configuration (RouteScope). Overrides per key or account:
    # `meter limits set --key K --route reports ...`.
    route_limits: dict[RouteName, dict[str, int | None]] = Field(default_factory=dict)

    node_id: str = Field(default="node-1", min_length=1, max_length=64)
    # HMAC key for key ids: the same on every node, never in code, at least 32 bytes
    node_secret: SecretStr = SecretStr("")
    node_fail_open: bool = True  # admit requests when the meter is unreachable
    node_buffer_max: int = Field(default=100_000, ge=100)  # events a node buffers while Kafka is down
    # How long the reporter waits to fill a batch: part of the delay before the worker counts a
    # request (and so before a burst meets its allowance); longer = fewer, larger produces.
    node_report_linger_ms: int = Field(default=2, ge=0, le=1_000)
    # Keys whose local counts a node keeps (least recently seen forgotten past it, ~250 B each)
    node_guard_max_keys: int = Field(default=200_000, ge=100)
    # Before the worker has divided a key's window among the nodes, a node admits this fraction
    # of the limit on its own; past it a request waits (at most node_burst_wait_ms) for the
    # division. About 1/number of nodes: lower = less overshoot when a burst hits every node at
    # once, more requests delayed; 1 = no waiting (each node may admit the whole limit).
    node_burst_share: float = Field(default=0.34, gt=0.0, le=1.0)
    node_burst_wait_ms: int = Field(default=250, ge=0, le=10_000)
    demo_seed: SecretStr = SecretStr("")  # derives the demo API's keys (demo and tests only)
    # How long each demo API call is served (a real API's handlers take time; requests admitted
    # and still served are counted by the node before the worker sees their events): benchmarks.
    demo_serving_ms: int = Field(default=0, ge=0, le=60_000)
    # Set: each call takes a time drawn evenly from demo_serving_ms to this (handlers of random
    # length, whose requests end out of their order).
    demo_serving_max_ms: int | None = Field(default=None, ge=0, le=60_000)
    # Route prefixes any valid key may call without a scope. A route no rule covers and not
    # listed here is refused (403): a route added without a rule fails closed.
    node_public_routes: Annotated[tuple[str, ...], NoDecode] = ()
    # Proxies (CIDRs, comma-separated) whose X-Forwarded-For is believed. Empty: none, loopback
    # neither, so a client cannot choose the address it is recorded under.
    node_trusted_proxies: Annotated[tuple[IPvAnyNetwork, ...], NoDecode] = ()
    # Bearer token of GET /health/details (broker errors, fail-open, counters), >= 32 bytes;
    # empty: not served. The public /health says only whether the node is up and ready.
    node_health_token: SecretStr = SecretStr("")

    log_level: LogLevel = "INFO"
    log_json: bool = False

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _kafka_security_consistent(self) -> NodeSettings:
        # Contradictions fail at start: credentials or TLS files that would be silently
        # ignored, a SASL protocol without its user and password, a missing file.
        errors = security_errors(self)
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _serving_range(self) -> NodeSettings:
        if self.demo_serving_max_ms is not None and self.demo_serving_max_ms < self.demo_serving_ms:
            raise ValueError(
                f"METER_DEMO_SERVING_MAX_MS ({self.demo_serving_max_ms}) is below METER_DEMO_SERVING_MS "
                f"({self.demo_serving_ms}): it is the longest a call takes"
            )
        return self

    @field_validator("node_secret", "node_health_token")
    @classmethod
    def _strong(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        if value.get_secret_value():  # empty: not configured (a node refuses to run without its secret)
            check_secret(value.get_secret_value().encode(), f"METER_{str(info.field_name).upper()}")
        return value

    @field_validator("node_public_routes", "node_trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return (
                json.loads(value)
                if value.lstrip().startswith("[")
                else [v.strip() for v in value.split(",") if v.strip()]
            )
        return value

    @field_validator("node_public_routes")
    @classmethod
    def _route_prefixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in value:
            if not prefix.startswith("/") or any(c in prefix for c in "?# ") or not prefix.isprintable():
                raise ValueError(f"{prefix!r} is not a path prefix (e.g. /v0/status)")
        return value

    def default_policy(self) -> LimitPolicy:
        return LimitPolicy(
            per_minute=self.limit_per_minute,
            per_hour=self.limit_per_hour,
            per_day=self.limit_per_day,
            per_month=self.limit_per_month,
        )

    @field_validator("route_limits")
    @classmethod
    def _route_policies(cls, value: dict[str, dict[str, int | None]]) -> dict[str, dict[str, int | None]]:
        for route, windows in value.items():
            _route_policy(windows)  # refused at start, naming the route, if off
            unknown = set(windows) - {"per_minute", "per_hour", "per_day", "per_month", "shadow"}
            if unknown:
                raise ValueError(f"route {route!r}: unknown field(s) {sorted(unknown)} (per_minute, per_hour, ...)")
        return value

    def route_policies(self) -> dict[str, LimitPolicy]:
        return {route: _route_policy(windows) for route, windows in self.route_limits.items()}

    def policy_book(self) -> PolicyBook:
        """The default policy, every override applied later; all in shadow when METER_LIMITS_SHADOW."""
        return PolicyBook(self.default_policy(), shadow_all=self.limits_shadow, routes=self.route_policies())


def _route_policy(windows: dict[str, int | None]) -> LimitPolicy:
    """A route's policy: only the windows it names are limited."""
    return LimitPolicy.model_validate({"per_minute": None, "per_hour": None, "per_day": None, **windows})
