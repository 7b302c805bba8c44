"""The one place that relies on FastStream internals: a batch parser that hands the handler
aiokafka's records as they came.

FastStream's own batch parser builds a body list and a headers dict per record (~1 µs each)
that the ingest path never reads: it validates the raw bytes itself. This adapter builds the
same ``KafkaAckableMessage`` FastStream would, minus that work. It uses FastStream's message
class and its ``FAKE_CONSUMER``, which are not public API: ``pyproject.toml`` pins FastStream
below 0.8, and ``tests/unit/test_faststream_batch.py`` fails on an upgrade that changes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from faststream.kafka.message import FAKE_CONSUMER, KafkaAckableMessage

BatchParser = Callable[[tuple[ConsumerRecord, ...]], Awaitable[KafkaAckableMessage]]


async def raw_decoder(msg: Any) -> Any:
    """No per-message JSON decode: the pipeline validates the raw bytes itself."""
    return None


def raw_batch_parser(consumer: Callable[[], AIOKafkaConsumer | None]) -> BatchParser:
    """A parser whose message's ``raw_message`` is the records tuple; headers and ids are the
    first record's, as FastStream's. ``consumer`` gives the live consumer (for acks)."""

    async def parse(records: tuple[ConsumerRecord, ...]) -> KafkaAckableMessage:
        first, last = records[0], records[-1]
        # Headers mean nothing to the worker; Kafka allows any bytes and null. This parser must
        # not fail: FastStream would drop the whole fetched batch after the consumer moved past it.
        headers = {k: v.decode(errors="replace") for k, v in first.headers if v is not None}
        return KafkaAckableMessage(
            raw_message=records,
            body=b"",
            headers=headers,
            reply_to=headers.get("reply_to", ""),
            content_type=headers.get("content-type"),
            message_id=f"{first.offset}-{last.offset}-{first.timestamp}",
            correlation_id=headers.get("correlation_id"),
            consumer=consumer() or FAKE_CONSUMER,
        )

    return parse
