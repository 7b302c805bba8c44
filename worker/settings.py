"""One frozen settings object, built once at the entry point and passed down.

Every value comes from the environment (prefix ``METER_``) or a ``.env`` file; nothing
secret lives in code. It extends the node's settings (topics, node identity, default
policy), so one environment configures the worker and the nodes alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from node.settings import NodeSettings
from schemas.notifications import MAX_THRESHOLDS, NotifyThresholds, Percent, Threshold
from worker.dsn import embedded_path

MIN_ADMIN_KEY_BYTES = 32  # a guess is then hopeless, throttled or not
MAX_WEBHOOK_URLS = MAX_THRESHOLDS
CLICKHOUSE_SCHEMES = ("chdb", "http", "https", "clickhouse")


class Settings(NodeSettings):
    model_config = SettingsConfigDict(
        env_prefix="METER_", env_file=".env", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    # Kafka
    dlq_topic: str = "usage.events.dlq"
    consumer_group: str = "usage-meter"
    # How long a dead worker (kill -9) keeps its partitions before the group reassigns them.
    # At most the brokers' group.max.session.timeout.ms (default 30 min): above it no worker
    # can join its group. The heartbeat must be well inside it (checked below).
    consumer_session_timeout_ms: int = Field(default=10_000, ge=6_000, le=1_800_000)
    consumer_heartbeat_interval_ms: int = Field(default=2_000, ge=100)
    events_partitions: int = Field(default=6, ge=1)
    decisions_partitions: int = Field(default=3, ge=1)
    # Replication of the topics the worker creates. The defaults fit one development broker;
    # production: 3 and 2 (the worker refuses replication 1 on a cluster of several brokers).
    kafka_replication_factor: int = Field(default=1, ge=1, le=32)
    kafka_min_insync_replicas: int = Field(default=1, ge=1, le=32)

    # ClickHouse: chdb:///dir (embedded engine) or http(s)://user:pass@host:8123/db (server).
    # Default: an embedded store in .data/clickhouse under the directory the command starts in.
    clickhouse_dsn: str = Field(default_factory=lambda: f"chdb://{Path.cwd() / '.data' / 'clickhouse'}")
    clickhouse_database: str = "meter"
    # Unset: the migrations shipped with the package (worker/store/sql); a directory of
    # NNN_name.sql files replaces them.
    migrations_dir: Path | None = None
    # How long a worker (or `meter migrate`) waits for another run's migration lock; a backfill on
    # a large store takes minutes. Past it: an error naming the holder (docs/operations.md).
    migration_lock_wait_seconds: float = Field(default=900.0, gt=0)
    # A ClickHouse cluster (remote_servers name): the migrations create every table ON CLUSTER
    # with Replicated engines (docs/scaling.md). Empty: one server or the embedded engine.
    clickhouse_cluster: str = Field(default="", max_length=128, pattern=r"^[A-Za-z0-9_.-]*$")

    # Retention of each rollup level, in days (set on the tables by `meter migrate`)
    ttl_minute_days: int = Field(default=7, ge=1)
    ttl_hour_days: int = Field(default=90, ge=1)
    # At least a month: a new owner rebuilds a key's calendar-month count from the month's day rows.
    ttl_day_days: int = Field(default=3 * 365, ge=31)

    # Ingest
    batch_max_records: int = Field(default=20_000, ge=1)
    batch_timeout_ms: int = Field(default=200, ge=1)
    # The broker answers the ingest consumer's fetch once it holds this many bytes for it, or
    # after ingest_fetch_max_wait_ms: at moderate rates fewer, larger batches (each insert is a
    # part for the engine to merge, and costs the same CPU whatever its size up to ~1,000
    # events). The limits' fast lane reads on a consumer of its own and never waits for this.
    ingest_fetch_min_bytes: int = Field(default=256 * 1024, ge=1, le=64 * 1024 * 1024)
    ingest_fetch_max_wait_ms: int = Field(default=250, ge=1, le=10_000)
    max_event_bytes: int = Field(default=8_192, ge=256)
    # Events older than this (event time) are refused to the DLQ: it is also how long the
    # request_id dedup memory is kept, so every counted event is covered by it.
    dedup_horizon_hours: int = Field(default=24, ge=1)
    # Request hashes kept in memory for the minutes a worker writes from scratch, so most
    # batches skip the ClickHouse dedup lookup (~60 bytes each; 0 = always ask ClickHouse).
    dedup_cache_max_hashes: int = Field(default=2_000_000, ge=0)
    max_clock_skew_seconds: int = Field(default=300, ge=0)
    store_retry_max_seconds: float = Field(default=30.0, gt=0)

    # Limits: the default policy is the node's (limit_per_minute|hour|day).
    # Allowances: a window is hot (its remainder divided among the nodes) from this fraction of
    # its limit. Lower: a burst meets the division earlier (less overshoot), more records.
    allowance_threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    # Expected time from a node's admission to that node holding a new cap (the fast lane's
    # propagation, measured by bench/decisions.py). Higher: less overshoot when several nodes
    # burst at once, more false refusals when traffic moves between nodes.
    allowance_lag_ms: float = Field(default=30.0, ge=0.0, le=10_000.0)
    # A node may use the whole remainder minus what the others are expected to admit (false:
    # only its share in proportion to its rate; exact under steady traffic, refuses more when
    # traffic moves).
    allowance_pooled: bool = True
    # How long a hot window's first division holds back the burst shares of the nodes not heard
    # from yet (they may have admitted that much unseen). Longer: bursts over many nodes are
    # held closer to the limit under load; a node bursting alone waits that much longer (keep it
    # below METER_NODE_BURST_WAIT_MS, or its waiting requests are refused).
    allowance_settle_ms: float = Field(default=120.0, ge=0.0, le=10_000.0)
    fast_lane_recent_requests: int = Field(default=500_000, ge=1_000)  # request hashes it remembers
    # The broker answers the fast lane's fetch once it holds this many bytes for it, or after
    # fast_lane_fetch_max_wait_ms: a bound on the fetches a second (each costs the worker and
    # the broker CPU whatever it carries), at the price of at most that wait on a crossing.
    fast_lane_fetch_min_bytes: int = Field(default=1, ge=1, le=64 * 1024 * 1024)
    fast_lane_fetch_max_wait_ms: int = Field(default=100, ge=1, le=10_000)
    # Rows of checked records held for the other reader of the events topic (the fast lane or the
    # ingest path, whichever is behind), so each record is validated once; per direction, ~0.5 KB
    # each (the readers run a fetch or two apart). 0: each reader checks every record itself.
    fast_lane_handoff_rows: int = Field(default=100_000, ge=0)

    # Abuse guards (worker/limits/guards.py): off until a threshold is set; shadow first.
    guard_max_client_ips_per_hour: int = Field(default=0, ge=0, le=1_000_000)
    guard_max_auth_failures: int = Field(default=0, ge=0, le=1_000_000_000)
    guard_auth_failures_minutes: int = Field(default=10, ge=1, le=1_440)
    guard_block_minutes: int = Field(default=60, ge=1, le=10_080)
    guard_shadow: bool = True
    guard_interval_seconds: float = Field(default=30.0, ge=0.1, le=3_600.0)

    # Threshold notifications (docs/operations.md, "Threshold notifications"): the worker
    # publishes one per key, window start and threshold crossed; the deliverer posts them.
    notifications_topic: str = "usage.notifications"
    notifications_dlq_topic: str = "usage.notifications.dlq"  # what no endpoint accepted
    notifications_partitions: int = Field(default=3, ge=1)
    # Percentages of each window's limit, comma-separated ("" = none). A policy's own
    # thresholds (LimitPolicy.notify, set per override) replace all of these.
    notify_thresholds_percent: Annotated[tuple[Percent, ...], NoDecode] = (80.0, 100.0)
    # Absolute counts per window, comma-separated (e.g. METER_NOTIFY_THRESHOLDS_PER_DAY=4000).
    notify_thresholds_per_minute: Annotated[tuple[Threshold, ...], NoDecode] = ()
    notify_thresholds_per_hour: Annotated[tuple[Threshold, ...], NoDecode] = ()
    notify_thresholds_per_day: Annotated[tuple[Threshold, ...], NoDecode] = ()
    # Webhook deliverer (`meter notify`, or inside the worker with notify_in_worker):
    # endpoints, comma-separated http(s) URLs, each gets every notification.
    notify_webhook_urls: Annotated[tuple[str, ...], NoDecode] = ()
    notify_webhook_secret: SecretStr = SecretStr("")  # HMAC-SHA-256 key of the signature, >= 32 bytes
    notify_webhook_timeout_s: float = Field(default=5.0, gt=0.0, le=120.0)  # per attempt
    # Attempts per endpoint before the notification is dead-lettered; the delays between them
    # double from the first to the max, each drawn at random below it (full jitter).
    notify_max_attempts: int = Field(default=8, ge=1, le=100)
    notify_retry_first_delay_s: float = Field(default=1.0, gt=0.0, le=3_600.0)
    notify_retry_max_delay_s: float = Field(default=60.0, gt=0.0, le=3_600.0)
    notify_concurrency_per_endpoint: int = Field(default=4, ge=1, le=256)  # requests in flight
    notify_consumer_group: str = "usage-meter-notify"
    notify_in_worker: bool = False  # run the deliverer inside the worker (else: `meter notify`)

    # HTTP (metrics, health, query API)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8090, ge=0, le=65535)  # worker /metrics and /health/*; 0 = off
    ready_unassigned_grace_seconds: float = Field(default=60.0, ge=0)  # no partitions this long: not ready
    ready_stall_seconds: float = Field(default=60.0, gt=0)  # lag but no batch written this long: not ready
    # The query API's admin key (X-API-Key): unset = API off; else at least MIN_ADMIN_KEY_BYTES.
    admin_api_key: SecretStr = SecretStr("")
    # Failed admin logins (401s) per client address (an IPv6 /64): this many in a row, then one
    # more per 60 / refill seconds; past it every request of that client gets 429 + Retry-After.
    admin_login_burst: int = Field(default=20, ge=1, le=10_000)
    admin_login_refill_per_minute: float = Field(default=12.0, gt=0.0, le=6_000.0)
    # Where the CLI's read commands ask instead of opening the store (a worker's or a
    # `meter serve-api`'s base URL, e.g. http://127.0.0.1:8090); --api overrides it.
    query_api_url: str = ""

    @field_validator("clickhouse_dsn")
    @classmethod
    def _known_store(cls, dsn: str) -> str:
        # clickhouse-connect takes any other scheme for plain HTTP: a typo would silently go
        # to port 8123. The DSN itself is not repeated (it may carry a password).
        scheme = dsn.split(":", 1)[0] if "://" in dsn or dsn.lower().startswith("chdb:") else ""
        if scheme not in CLICKHOUSE_SCHEMES:  # lower case only: the client takes "CHDB:" for HTTP
            raise ValueError(
                f"scheme {scheme!r} is not a store: chdb://<data directory> (embedded), "
                "or http://, https:// or clickhouse:// (a server), in lower case"
            )
        if scheme == "chdb":
            path = embedded_path(dsn)
            if path is not None and not path.is_absolute():
                raise ValueError("an embedded store's directory must be absolute: chdb:///var/lib/meter/clickhouse")
            return dsn
        parts = urlsplit(dsn)
        try:
            port_ok = parts.hostname is not None and (parts.port is None or parts.port > 0)
        except ValueError:
            port_ok = False
        if not port_ok or (parts.username is None and "@" in dsn.partition("://")[2]):
            raise ValueError(
                "the server DSN's host, port or credentials do not parse (a password containing "
                "# / ? or @ must be URL-encoded, e.g. # as %23)"
            )
        return dsn

    @field_validator("admin_api_key", "notify_webhook_secret")
    @classmethod
    def _admin_key_long_enough(cls, key: SecretStr, info: ValidationInfo) -> SecretStr:
        size = len(key.get_secret_value().encode())
        if 0 < size < MIN_ADMIN_KEY_BYTES:
            raise ValueError(
                f"METER_{str(info.field_name).upper()} is {size} bytes; "
                f"it must be at least {MIN_ADMIN_KEY_BYTES} bytes "
                "(generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return key

    @model_validator(mode="after")
    def _min_insync_within_replication(self) -> Settings:
        if self.kafka_min_insync_replicas > self.kafka_replication_factor:
            raise ValueError(
                f"METER_KAFKA_MIN_INSYNC_REPLICAS ({self.kafka_min_insync_replicas}) must not be above "
                f"METER_KAFKA_REPLICATION_FACTOR ({self.kafka_replication_factor}): no write could be acknowledged"
            )
        return self

    @field_validator(
        "notify_thresholds_percent",
        "notify_thresholds_per_minute",
        "notify_thresholds_per_hour",
        "notify_thresholds_per_day",
        "notify_webhook_urls",
        mode="before",
    )
    @classmethod
    def _notify_lists(cls, value: object) -> object:
        return NodeSettings._comma_separated(value)

    @field_validator("notify_webhook_urls")
    @classmethod
    def _webhook_urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        if len(urls) > MAX_WEBHOOK_URLS:
            raise ValueError(f"at most {MAX_WEBHOOK_URLS} webhook URLs")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048 or not url.isprintable():
                raise ValueError("each webhook URL must be an http:// or https:// URL with a host")
            try:
                parts.port  # noqa: B018 - urlsplit checks the port only when it is read
            except ValueError:
                raise ValueError("a webhook URL's port must be a number from 0 to 65535") from None
        if len(set(urls)) != len(urls):
            raise ValueError("a webhook URL is listed twice")
        return urls

    @model_validator(mode="after")
    def _notify_consistent(self) -> Settings:
        self.notify_thresholds()  # bounds: each list at most MAX_THRESHOLDS values in range
        if self.notify_webhook_urls and not self.notify_webhook_secret.get_secret_value():
            raise ValueError("METER_NOTIFY_WEBHOOK_URLS needs METER_NOTIFY_WEBHOOK_SECRET (receivers verify it)")
        if self.notify_in_worker and not self.notify_webhook_urls:
            raise ValueError("METER_NOTIFY_IN_WORKER needs METER_NOTIFY_WEBHOOK_URLS")
        if self.notify_retry_max_delay_s < self.notify_retry_first_delay_s:
            raise ValueError("METER_NOTIFY_RETRY_MAX_DELAY_S must not be below METER_NOTIFY_RETRY_FIRST_DELAY_S")
        return self

    def notify_thresholds(self) -> NotifyThresholds:
        """The global notification thresholds (a policy with its own ``notify`` replaces them)."""
        return NotifyThresholds(
            percent=self.notify_thresholds_percent,
            per_minute=self.notify_thresholds_per_minute,
            per_hour=self.notify_thresholds_per_hour,
            per_day=self.notify_thresholds_per_day,
        )

    @model_validator(mode="after")
    def _heartbeat_within_the_session(self) -> Settings:
        # Kafka's own rule: a member that heartbeats less often than its session lasts is
        # taken for dead between two heartbeats.
        if self.consumer_heartbeat_interval_ms >= self.consumer_session_timeout_ms:
            raise ValueError(
                f"METER_CONSUMER_HEARTBEAT_INTERVAL_MS ({self.consumer_heartbeat_interval_ms}) must be below "
                f"METER_CONSUMER_SESSION_TIMEOUT_MS ({self.consumer_session_timeout_ms}); a third of it is usual"
            )
        return self

    @model_validator(mode="after")
    def _settle_within_the_burst_wait(self) -> Settings:
        if self.allowance_settle_ms >= self.node_burst_wait_ms > 0:
            raise ValueError(
                f"METER_ALLOWANCE_SETTLE_MS ({self.allowance_settle_ms:g}) must be below METER_NODE_BURST_WAIT_MS "
                f"({self.node_burst_wait_ms}): requests waiting for a settling division would be refused"
            )
        return self
