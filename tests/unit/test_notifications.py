"""Threshold notifications, the pure parts: the contract and its bounds, which crossings fire
(edge-triggered per key, window start and threshold), the webhook signature, the settings, the
deliverer's retry schedule (its HTTP side against a mock transport; tests/integration/
test_notifications.py runs it against a real receiver and the real broker)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from schemas.decisions import Window
from schemas.limits import LimitOverride, LimitPolicy, OverrideScope, PolicyBook
from schemas.notifications import (
    Notification,
    NotifyThresholds,
    UndeliveredNotification,
    notification_id,
    percent_count,
)
from tests.clock import Clock
from worker.kafka_acls import Operation, Resource, Role, role_acls
from worker.limits.engine import LimitEngine
from worker.limits.thresholds import ThresholdTracker
from worker.notify.deliver import Endpoint, WebhookDeliverer, endpoint_label
from worker.notify.signature import sign, verify
from worker.settings import Settings
from worker.topics import topic_specs

T0 = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC).timestamp()  # minute- and hour-aligned
SECRET = "s" * 32


def tracked(
    policy: LimitPolicy | None = None, thresholds: NotifyThresholds | None = None
) -> tuple[LimitEngine, Clock, PolicyBook]:
    clock = Clock(T0 + 5)
    book = PolicyBook(policy or LimitPolicy())
    engine = LimitEngine(book, clock, thresholds=ThresholdTracker(thresholds or NotifyThresholds()))
    engine.assign(0, [])
    return engine, clock, book


def hit(engine: LimitEngine, clock: Clock, key: str, n: int) -> list[tuple[Window, str, int]]:
    verdicts = engine.observe({(0, key, "acct", int(clock.now) // 60 * 60): n})
    return [(x.window, x.threshold, x.count) for x in verdicts.notifications]


# -- which crossings fire ----------------------------------------------------------------


def test_each_threshold_fires_once_per_window_and_again_in_the_next() -> None:
    engine, clock, _ = tracked()
    assert hit(engine, clock, "k", 79) == []
    assert hit(engine, clock, "k", 1) == [(Window.minute, "80%", 80)]
    assert hit(engine, clock, "k", 19) == []  # edge-triggered: nothing per event past it
    assert hit(engine, clock, "k", 1) == [(Window.minute, "100%", 100)]
    assert hit(engine, clock, "k", 50) == []
    clock.now = T0 + 65  # the next minute: its own crossings
    assert hit(engine, clock, "k", 90) == [(Window.minute, "80%", 90)]


def test_thresholds_closer_than_six_digits_fire_each() -> None:
    # 99.99999% and 100% were both labelled "100%": one fired bit, the second never notified.
    policy = LimitPolicy(per_minute=10_000_000, per_hour=None, per_day=None)
    engine, clock, _ = tracked(policy, NotifyThresholds(percent=(99.99999, 100.0)))
    assert hit(engine, clock, "k", 9_999_999) == [(Window.minute, "99.99999%", 9_999_999)]
    assert hit(engine, clock, "k", 1) == [(Window.minute, "100%", 10_000_000)]


def test_a_batch_crossing_several_thresholds_fires_each_in_order_with_the_count_seen() -> None:
    engine, _clock, _ = tracked()
    verdicts = engine.observe({(0, "k", "acct", int(T0)): 120})
    got = [(n.threshold, n.threshold_count, n.count, n.limit) for n in verdicts.notifications]
    assert got == [("80%", 80, 120, 100), ("100%", 100, 120, 100)]
    first, second = verdicts.notifications
    assert second.version > first.version
    assert (first.window_start, first.window_end) == (
        datetime.fromtimestamp(T0, UTC),
        datetime.fromtimestamp(T0 + 60, UTC),
    )
    assert first.account_id == "acct"
    assert first.id == notification_id("k", Window.minute, int(T0), "80%")
    assert verdicts.decisions  # the block is decided as before, beside them


def test_hour_and_day_windows_and_absolute_thresholds() -> None:
    thresholds = NotifyThresholds(percent=(50,), per_minute=(10,), per_day=(150,))
    engine, clock, _ = tracked(LimitPolicy(per_minute=100, per_hour=200, per_day=None), thresholds)
    assert hit(engine, clock, "k", 10) == [(Window.minute, "10", 10)]
    assert hit(engine, clock, "k", 40) == [(Window.minute, "50%", 50)]
    clock.now = T0 + 65
    assert hit(engine, clock, "k", 60) == [
        (Window.minute, "10", 60),
        (Window.minute, "50%", 60),
        (Window.hour, "50%", 110),
    ]
    clock.now = T0 + 125
    # The day has no limit: only its absolute threshold applies.
    assert hit(engine, clock, "k", 40) == [(Window.minute, "10", 40), (Window.day, "150", 150)]


def test_a_policy_with_its_own_thresholds_replaces_the_global_ones() -> None:
    engine, clock, book = tracked()
    own = LimitPolicy(per_minute=10, notify=NotifyThresholds(percent=(50,)))
    book.apply(LimitOverride(scope=OverrideScope.key, subject="vip", policy=own, updated_at=datetime.now(UTC)))
    assert hit(engine, clock, "vip", 5) == [(Window.minute, "50%", 5)]
    assert hit(engine, clock, "vip", 5) == []  # no 100% for this key
    assert hit(engine, clock, "other", 80) == [(Window.minute, "80%", 80)]


def test_no_tracker_no_notifications() -> None:
    engine = LimitEngine(PolicyBook(LimitPolicy()), Clock(T0 + 5))
    engine.assign(0, [])
    assert engine.observe({(0, "k", "", int(T0)): 100}).notifications == []


def test_a_new_owner_restores_what_fired_and_notifies_what_did_not() -> None:
    engine, clock, _ = tracked()
    assert hit(engine, clock, "k", 85) == [(Window.minute, "80%", 85)]
    engine.revoke(0)
    assert engine.thresholds is not None
    assert "k" not in engine.thresholds.fired
    # The next owner: counts rebuilt from ClickHouse, notified thresholds from the audit.
    other, clock2, _ = tracked()
    other.assign(0, [("k", "acct", Window.minute, int(T0), 85), ("j", "acct", Window.minute, int(T0), 95)])
    assert other.thresholds is not None
    other.thresholds.restore([("k", Window.minute, int(T0), "80%"), ("k", Window.minute, int(T0) - 60, "100%")])
    assert [(n.key_id, n.threshold) for n in other.notify_all([0])] == [("j", "80%")]  # j's was never sent
    assert hit(other, clock2, "k", 10) == []
    assert hit(other, clock2, "k", 5) == [(Window.minute, "100%", 100)]


def test_expire_forgets_keys_of_past_days() -> None:
    engine, clock, _ = tracked()
    hit(engine, clock, "k", 80)
    assert engine.thresholds is not None
    assert engine.thresholds.expire(T0 + 60) == 0
    assert engine.thresholds.expire(T0 + 86_400) == 1
    assert engine.thresholds.fired == {}


# -- the contract --------------------------------------------------------------------------


def _notification(**changes: Any) -> dict[str, Any]:
    start = datetime.fromtimestamp(T0, UTC)
    values: dict[str, Any] = {
        "id": notification_id("k", Window.minute, int(T0), "80%"),
        "key_id": "k",
        "window": "minute",
        "window_start": start.isoformat(),
        "window_end": datetime.fromtimestamp(T0 + 60, UTC).isoformat(),
        "threshold": "80%",
        "threshold_percent": 80,
        "threshold_count": 80,
        "limit": 100,
        "count": 81,
        "version": 1,
        "decided_at": start.isoformat(),
    }
    values.update(changes)
    return values


def test_notification_bounds() -> None:
    assert Notification.model_validate(_notification()).type == "threshold.crossed"
    Notification.model_validate(_notification(unknown_future_field=1))  # newer producers
    for bad in (
        {"window": "manual"},
        {"window_end": datetime.fromtimestamp(T0 + 61, UTC).isoformat()},
        {"count": 79},
        {"version": 2**63},
        {"version": 0},
        {"key_id": "k\x1b[31m"},
        {"key_id": "x" * 65},
        {"account_id": "a\u202e"},
        {"threshold_percent": float("nan")},
        {"threshold_percent": 0},
        {"window_start": "2300-01-01T00:00:00Z", "window_end": "2300-01-01T00:01:00Z"},
        {"count": 10**13},
    ):
        with pytest.raises(ValidationError):
            Notification.model_validate(_notification(**bad))


def test_thresholds_bounds_and_ids() -> None:
    assert NotifyThresholds(percent=(100, 80, 80)).percent == (80, 100)
    with pytest.raises(ValidationError):
        NotifyThresholds(percent=tuple(range(1, 18)))
    with pytest.raises(ValidationError):
        NotifyThresholds(per_day=(0,))
    assert percent_count(80, 100) == 80
    assert percent_count(33.3, 10) == 4  # reached when the count is at or past the fraction
    assert percent_count(1, 5) == 1
    ids = {notification_id("k", w, s, t) for w in (Window.minute, Window.hour) for s in (0, 60) for t in ("80%", "80")}
    assert len(ids) == 8
    assert all(len(i) <= 64 for i in ids)


def test_limit_records_with_and_without_notify_thresholds_parse() -> None:
    old = (
        '{"scope":"key","subject":"k","policy":{"per_minute":5,"per_hour":null,"per_day":9},'
        '"updated_at":"2026-01-01T00:00:00Z"}'
    )
    assert LimitOverride.model_validate_json(old).policy == LimitPolicy(per_minute=5, per_hour=None, per_day=9)
    new = json.loads(old)
    new["policy"]["notify"] = {"percent": [50], "per_day": [7]}
    policy = LimitOverride.model_validate(new).policy
    assert policy is not None
    assert policy.notify == NotifyThresholds(percent=(50,), per_day=(7,))
    # A node's view (it ignores what it does not know): the same limits.
    assert policy.limit_tuple() == (5, None, 9)
    new["policy"]["notify"] = {"percent": [-1]}
    with pytest.raises(ValidationError):
        LimitOverride.model_validate(new)


# -- the signature -------------------------------------------------------------------------


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"id":"ntf_1"}'
    header = sign(SECRET.encode(), body, 1_700_000_000)
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify(SECRET.encode(), body, header, now=1_700_000_100)


@pytest.mark.parametrize(
    ("case", "mutate"),
    [
        ("tampered body", lambda body, header, now: (body + b" ", header, now)),
        ("other secret", lambda body, header, now: (body, sign(b"o" * 32, body, 1_700_000_000), now)),
        ("too old", lambda body, header, now: (body, header, now + 301)),
        ("from the future", lambda body, header, now: (body, header, now - 301)),
        ("no timestamp", lambda body, header, now: (body, header.split(",")[1], now)),
        ("no signature", lambda body, header, now: (body, header.split(",")[0], now)),
        ("garbage", lambda body, header, now: (body, "t=x,v1=\u00e9", now)),
        ("timestamp swapped", lambda body, header, now: (body, header.replace("t=1700000000", "t=1700000001"), now)),
    ],
)
def test_signature_refused(case: str, mutate: Callable[[bytes, str, float], tuple[bytes, str, float]]) -> None:
    body = b'{"id":"ntf_1"}'
    header = sign(SECRET.encode(), body, 1_700_000_000)
    assert not verify(SECRET.encode(), *mutate(body, header, 1_700_000_000)), case


def test_signature_with_a_rotated_secret_beside_the_current_one() -> None:
    body = b"{}"
    old, new = sign(b"o" * 32, body, 1_700_000_000), sign(SECRET.encode(), body, 1_700_000_000)
    header = f"{old},{new.split(',')[1]}"
    assert verify(SECRET.encode(), body, header, now=1_700_000_000)


# -- settings, topics, ACLs ----------------------------------------------------------------


def test_settings_lists_and_secrets() -> None:
    s = Settings(notify_thresholds_percent="50, 90", notify_thresholds_per_day="4000")  # type: ignore[arg-type]
    assert s.notify_thresholds() == NotifyThresholds(percent=(50, 90), per_day=(4000,))
    assert Settings(notify_thresholds_percent="").notify_thresholds().percent == ()  # type: ignore[arg-type]
    assert Settings().notify_thresholds() == NotifyThresholds()  # 80 and 100 by default
    urls = "https://a.example/hook,http://127.0.0.1:9000/x"
    assert Settings(notify_webhook_urls=urls, notify_webhook_secret=SECRET).notify_webhook_urls == (  # type: ignore[arg-type]
        "https://a.example/hook",
        "http://127.0.0.1:9000/x",
    )
    for bad in (
        {"notify_webhook_urls": "https://a.example/hook"},  # no secret
        {"notify_webhook_urls": "https://a.example/hook", "notify_webhook_secret": "short"},
        {"notify_webhook_urls": "ftp://a.example/", "notify_webhook_secret": SECRET},
        {"notify_webhook_urls": "https://a.example/,https://a.example/", "notify_webhook_secret": SECRET},
        {"notify_webhook_urls": "https://a.example:99999/hook", "notify_webhook_secret": SECRET},  # was at start
        {"notify_in_worker": True},
        {"notify_thresholds_percent": "0"},
        {"notify_thresholds_per_hour": "-5"},
        {"notify_retry_first_delay_s": 10, "notify_retry_max_delay_s": 1},
    ):
        with pytest.raises(ValidationError):
            Settings(**bad)  # type: ignore[arg-type]


def test_topics_and_acls() -> None:
    s = Settings()
    specs = {spec.name: spec for spec in topic_specs(s)}
    assert specs["usage.notifications"].config.get("cleanup.policy") != "compact"  # every crossing kept
    assert "usage.notifications.dlq" in specs
    worker = {(a.resource, a.name, a.operation) for a in role_acls(Role.worker, s)}
    assert (Resource.topic, s.notifications_topic, Operation.write) in worker
    notifier = {(a.resource, a.name, a.operation) for a in role_acls(Role.notifier, s)}
    assert notifier == {
        (Resource.topic, s.notifications_topic, Operation.read),
        (Resource.topic, s.notifications_topic, Operation.describe),
        (Resource.topic, s.notifications_dlq_topic, Operation.write),
        (Resource.topic, s.notifications_dlq_topic, Operation.describe),
        (Resource.group, s.notify_consumer_group, Operation.read),
    }


def test_endpoint_labels_never_show_the_path_or_query() -> None:
    label = endpoint_label("https://hooks.example.com/services/T0/B0/secret-token?x=1")
    assert label.startswith("https://hooks.example.com/… #")
    assert "secret" not in label
    assert "T0" not in label
    assert endpoint_label("http://[::1]:9000").startswith("http://[::1]:9000 #")


# -- the deliverer's retry schedule (mock transport, no broker) ----------------------------


class Recorder:
    def __init__(self, answers: list[int | str]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else 200
        if answer == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if answer == "retry-after":
            return httpx.Response(503, headers={"Retry-After": "7"})
        if answer == "odd-retry-after":  # byte 0xB2: '²' decoded, a digit to str.isdigit()
            return httpx.Response(503, headers=[(b"Retry-After", b"\xb2")])
        assert isinstance(answer, int)
        return httpx.Response(answer)


async def deliver_once(
    answers: list[int | str],
    notification: dict[str, Any] | None = None,
    topic: str = "usage.notifications",
    **settings: Any,
) -> tuple[Recorder, list[float], list[Any], Any]:
    recorder = Recorder(answers)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    values: dict[str, Any] = {
        "notify_webhook_urls": ("http://receiver.test/hook",),
        "notify_webhook_secret": SecretStr(SECRET),
        "notify_max_attempts": 5,
        "notify_retry_first_delay_s": 1.0,
        "notify_retry_max_delay_s": 4.0,
        **settings,
    }
    deliverer = WebhookDeliverer(
        Settings(**values), sleep=sleep, jitter=lambda: 0.5, transport=httpx.MockTransport(recorder), clock=lambda: T0
    )
    letters: list[Any] = []

    async def send_and_wait(topic: str, value: bytes, key: bytes) -> None:
        letters.append((topic, UndeliveredNotification.model_validate_json(value), key))

    deliverer._producer = SimpleNamespace(send_and_wait=send_and_wait)
    n = Notification.model_validate(notification or _notification())
    record = SimpleNamespace(topic=topic, partition=2, offset=41)
    endpoint: Endpoint = deliverer.endpoints[0]
    await deliverer._deliver(endpoint, n, n.model_dump_json().encode(), record)
    await deliverer._deliver(endpoint, n, n.model_dump_json().encode(), record)  # a duplicate: skipped
    await deliverer.client.aclose()
    return recorder, slept, letters, deliverer.stats


async def test_retries_with_exponential_backoff_and_full_jitter_then_delivers() -> None:
    recorder, slept, letters, stats = await deliver_once([500, "timeout", 502, 429])
    assert len(recorder.requests) == 5
    assert letters == []
    assert slept == [0.5, 1.0, 2.0, 2.0]  # jitter 0.5 x min(1 x 2^n, 4)
    assert [r.headers["X-Meter-Delivery-Attempt"] for r in recorder.requests] == ["1", "2", "3", "4", "5"]
    last = recorder.requests[-1]
    assert verify(SECRET.encode(), last.content, last.headers["X-Meter-Signature"], now=T0)
    assert last.headers["Content-Type"] == "application/json"
    assert (stats.delivered, stats.retries, stats.duplicates) == (1, 4, 1)


async def test_retry_after_is_honoured_within_the_max_delay() -> None:
    _, slept, _, _ = await deliver_once(["retry-after"], notify_retry_max_delay_s=30.0)
    assert slept == [7.0]


async def test_an_endpoint_that_never_accepts_is_dead_lettered_after_the_last_attempt() -> None:
    recorder, slept, letters, stats = await deliver_once([503] * 5)
    assert len(recorder.requests) == 5
    assert len(slept) == 4
    [(topic, letter, key)] = letters
    assert topic == "usage.notifications.dlq"
    assert (letter.reason, letter.attempts, letter.partition, letter.offset) == ("HTTP 503", 5, 2, 41)
    assert letter.endpoint.startswith("http://receiver.test/… #")
    assert key == letter.notification.id.encode()
    assert (stats.dead_lettered, stats.duplicates) == (1, 1)


async def test_a_retry_after_of_other_digits_leaves_the_wait_to_the_backoff() -> None:
    recorder, slept, letters, stats = await deliver_once(["odd-retry-after"])
    assert len(recorder.requests) == 2
    assert slept == [0.5]
    assert (letters, stats.delivered) == ([], 1)


async def test_a_notification_that_cannot_be_sent_is_dead_lettered_not_retried_for_ever() -> None:
    # Its id cannot be an HTTP header (not ASCII): before, the error left the deliverer, which
    # fetched the same uncommitted batch again for ever, every delivery behind it stalled.
    recorder, slept, letters, stats = await deliver_once([], notification=_notification(id="ntf_\u00e9"))
    assert (recorder.requests, slept) == ([], [])
    [(_, letter, _)] = letters
    assert letter.reason.startswith("UnicodeEncodeError")
    assert (letter.attempts, stats.dead_lettered) == (1, 1)


async def test_a_dead_letter_names_a_topic_longer_than_an_identifier() -> None:
    topic = "meter." + "n" * 200  # Kafka takes up to 249 characters
    _, _, letters, _ = await deliver_once([404], topic=topic)
    assert letters[0][1].topic == topic


def test_a_signature_time_of_other_digits_is_refused_not_raised() -> None:
    assert not verify(SECRET.encode(), b"{}", "t=\u00b2,v1=00", now=T0)


@pytest.mark.parametrize("status", [301, 400, 401, 404, 410])
async def test_a_final_answer_is_dead_lettered_at_once(status: int) -> None:
    recorder, slept, letters, _ = await deliver_once([status])
    assert len(recorder.requests) == 1
    assert slept == []
    assert letters[0][1].reason == f"HTTP {status}"
