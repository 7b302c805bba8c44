"""Property: whatever bytes arrive, the validator answers with an event or a reason; it never raises."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_strategies import GOOD, any_messages, bad_messages
from worker.records import Rejection, Validator

REASONS = {
    "empty_value",
    "oversized",
    "invalid_json",
    "schema_violation",
    "missing_key",
    "key_mismatch",
    "ts_too_old",
    "ts_in_future",
}
VALIDATOR = Validator(max_event_bytes=8192, max_age_seconds=24 * 3600, max_skew_seconds=300)


class Rec:
    topic = "events"
    partition = 0
    offset = 7

    def __init__(self, value: bytes | None, key: bytes | None) -> None:
        self.value = value
        self.key = key


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(value=bad_messages, key=st.sampled_from([GOOD["key_id"].encode(), None, b"other"]))
def test_bad_messages_are_rejected_with_a_known_reason(value: bytes, key: bytes | None) -> None:
    result = VALIDATOR.check(Rec(value, key), datetime.now(UTC).timestamp())
    assert isinstance(result, Rejection), value[:200]
    assert result.reason in REASONS
    assert result.detail
    assert result.value == value  # the original bytes go to the DLQ untouched


@settings(max_examples=300, deadline=None)
@given(value=any_messages)
def test_anything_at_all_never_raises(value: bytes) -> None:
    result = VALIDATOR.check(Rec(value, GOOD["key_id"].encode()), datetime.now(UTC).timestamp())
    if isinstance(result, Rejection):
        assert result.reason in REASONS
    else:
        event, epoch = result  # an event and its time
        assert isinstance(event, dict)
        assert isinstance(epoch, float)
