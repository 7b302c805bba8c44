"""The FastStream adapter: fails loudly when a FastStream upgrade changes what it relies on."""

from __future__ import annotations

import asyncio
import importlib.metadata

from aiokafka import ConsumerRecord
from faststream.kafka.message import FAKE_CONSUMER, KafkaAckableMessage

from worker.faststream_batch import raw_batch_parser, raw_decoder


def _record(offset: int, headers: list[tuple[str, bytes | None]]) -> ConsumerRecord:  # type: ignore[type-arg]
    return ConsumerRecord(
        topic="t",
        partition=0,
        offset=offset,
        timestamp=1_000 + offset,
        timestamp_type=0,
        key=b"k",
        value=b"{}",
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=2,
        headers=headers,
    )


def test_faststream_is_the_series_the_adapter_was_written_for() -> None:
    version = importlib.metadata.version("faststream")
    assert version.startswith("0.7."), (
        f"FastStream {version}: worker/faststream_batch.py uses KafkaAckableMessage and FAKE_CONSUMER "
        "(internals of 0.7); check them against the new version, then move the pin in pyproject.toml"
    )


def test_the_parser_hands_over_the_records_as_they_came() -> None:
    records = (_record(5, [("correlation_id", b"c-1")]), _record(6, []), _record(7, []))
    message = asyncio.run(raw_batch_parser(lambda: None)(records))
    assert isinstance(message, KafkaAckableMessage)
    assert message.raw_message is records
    assert message.message_id == "5-7-1005"
    assert message.correlation_id == "c-1"
    assert message.headers == {"correlation_id": "c-1"}
    assert message.consumer is FAKE_CONSUMER  # no live consumer: nothing to ack against
    assert asyncio.run(raw_decoder(message)) is None


def test_headers_that_are_no_text_do_not_fail_the_parser() -> None:
    # A failing parser makes FastStream drop the fetched batch (integration: test_poison_records).
    records = (_record(1, [("trace", b"\xff\xfe"), ("empty", None), ("correlation_id", b"c-2")]),)
    message = asyncio.run(raw_batch_parser(lambda: None)(records))
    assert message.headers == {"trace": "\ufffd\ufffd", "correlation_id": "c-2"}
    assert message.raw_message is records
