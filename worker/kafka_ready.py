"""Waiting at start for Kafka to name the worker's group coordinator.

A new cluster creates its offsets topic on the first group request; a consumer that joins
meanwhile logs an error per retry (aiokafka: "Group Coordinator Request failed: [Error 15]
GroupCoordinatorNotAvailableError"), which reads like a fault on the first run of a fresh
broker. The worker asks first, quietly, and says what it waits for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.errors import CoordinatorNotAvailableError, KafkaError

from common import kafka_clients
from common.kafka_clients import KafkaTarget
from common.retry import describe_error

log = logging.getLogger(__name__)

COORDINATOR_WAIT_S = 30.0  # past it the consumer is started anyway: it keeps retrying on its own
COORDINATOR_RETRY_S = 0.2


async def coordinator_named(
    admin: Any,
    group_id: str,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """Ask ``admin`` for ``group_id``'s coordinator until one is named (True) or ``timeout``
    passes (False). Only "not available yet" is waited out; any other answer (an ACL, a broker
    error) is left for the consumer to report as it always has (False)."""
    deadline = clock() + timeout
    waited = False
    while True:
        try:
            await admin.find_coordinator(group_id)
        except CoordinatorNotAvailableError:
            if clock() >= deadline:
                log.warning("Kafka named no coordinator for group %s within %g s; starting anyway", group_id, timeout)
                return False
            if not waited:
                log.info(
                    "waiting for Kafka's coordinator of group %s (a new cluster creates its offsets topic)", group_id
                )
                waited = True
            await sleep(COORDINATOR_RETRY_S)
        except KafkaError as exc:
            log.debug("group coordinator of %s not asked: %s", group_id, describe_error(exc))
            return False
        else:
            if waited:
                log.info("Kafka's coordinator of group %s is ready", group_id)
            return True


async def wait_for_group_coordinator(kafka: KafkaTarget, group_id: str, timeout: float = COORDINATOR_WAIT_S) -> bool:
    """``coordinator_named`` on an admin client of its own."""
    admin = kafka_clients.admin(kafka, request_timeout_ms=15_000)
    try:
        await admin.start()
        return await coordinator_named(admin, group_id, timeout)
    finally:
        await admin.close()
