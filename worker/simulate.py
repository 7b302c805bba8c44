"""Simulated API traffic: request events as the nodes would publish them (for demo, tests, bench)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from common import kafka_clients
from common.kafka_clients import KafkaTarget
from schemas.events import RequestEvent, dump_event, make_event

ENDPOINTS = ("/v0/payments", "/v0/payments/{id}", "/v0/rates", "/v0/wallets", "/v0/invoices")
STATUSES = (200,) * 90 + (201,) * 4 + (400, 401, 403, 404, 429, 500)
METHODS = {"/v0/payments": "POST", "/v0/rates": "GET"}
# An expensive route: spends 5 of its key's limits and counts against the "invoices" route limit.
ROUTE_COSTS = {"/v0/invoices": (5, "invoices")}
LEGACY_KEYS = 5  # every 5th key's node is not upgraded yet: version-1 events, no cost (count 1)


@dataclass(frozen=True)
class Traffic:
    keys: int = 20
    nodes: int = 3
    spread: timedelta = timedelta(minutes=30)  # events' ts fall in [end - spread, end]
    seed: int = 7


def key_ids(n: int) -> list[str]:
    """Stable, realistic-looking key ids (display prefix + HMAC-like hex)."""
    rng = random.Random(n)
    return [f"cf_liv_{rng.getrandbits(96):024x}" for _ in range(n)]


def generate(count: int, traffic: Traffic = Traffic(), end: datetime | None = None) -> Iterator[RequestEvent]:
    """``count`` events over ``traffic.keys`` keys (Zipf-like: a few keys are heavy)."""
    rng = random.Random(traffic.seed)
    end = end or datetime.now(UTC)
    keys = key_ids(traffic.keys)
    weights = [1.0 / (i + 1) for i in range(len(keys))]
    spread = traffic.spread.total_seconds()
    for _ in range(count):
        i = rng.choices(range(len(keys)), weights)[0]
        endpoint = ENDPOINTS[i % 3] if rng.random() < 0.9 else rng.choice(ENDPOINTS)
        cost, route = ROUTE_COSTS.get(endpoint, (1, None))
        priced = {"v": 1} if i % LEGACY_KEYS == LEGACY_KEYS - 1 else {"cost": cost, "route": route}
        yield make_event(
            request_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            key_id=keys[i],
            node_id=f"node-{rng.randrange(traffic.nodes) + 1}",
            method=METHODS.get(endpoint, "GET"),
            endpoint=endpoint,
            status=rng.choice(STATUSES),
            ts=end - timedelta(seconds=rng.random() * spread),
            account_id=f"acct-{i % 7}",
            latency_ms=round(rng.expovariate(1 / 40), 2),
            client_ip=f"198.51.100.{i % 250 + 1}",
            bytes_out=rng.randrange(200, 4000),
            **priced,
        )


async def publish(kafka: KafkaTarget, topic: str, events: Sequence[RequestEvent] | Iterator[RequestEvent]) -> int:
    """Publish events keyed by key_id with an idempotent producer; returns how many were sent."""
    producer = kafka_clients.producer(
        kafka, enable_idempotence=True, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    sent = 0
    try:
        await producer.start()  # inside: a failed start must still stop the producer
        pending = []
        for event in events:
            pending.append(await producer.send(topic, dump_event(event), key=event["key_id"].encode()))
            sent += 1
            if len(pending) >= 10_000:
                for fut in pending:
                    await fut
                pending.clear()
        for fut in pending:
            await fut
    finally:
        await producer.stop()
    return sent
