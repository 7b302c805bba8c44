"""Decision cache rules without a broker: version ordering, expiry at `until`, bad records."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from node.decision_cache import Block, DecisionCache
from schemas.decisions import Decision, DecisionAction, Window
from worker.settings import Settings

T0 = datetime(2025, 3, 1, 12, 0, 30, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.value = now

    def __call__(self) -> datetime:
        return self.value


def decision(
    key_id: str,
    action: DecisionAction,
    version: int,
    *,
    until: datetime | None = None,
    window: Window = Window.minute,
    limit: int | None = 100,
) -> Decision:
    return Decision(
        key_id=key_id,
        action=action,
        window=window,
        limit=limit,
        count=101 if action is DecisionAction.block else None,
        until=until,
        reason="limit exceeded" if action is DecisionAction.block else "window rolled over",
        version=version,
        decided_at=T0,
    )


def block(key_id: str, version: int, until: datetime | None = T0 + timedelta(seconds=30)) -> Decision:
    return decision(key_id, DecisionAction.block, version, until=until)


def unblock(key_id: str, version: int) -> Decision:
    return decision(key_id, DecisionAction.unblock, version)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def cache(clock: Clock) -> DecisionCache:
    return DecisionCache(Settings(), now=clock)


def test_block_then_unblock(cache: DecisionCache) -> None:
    assert cache.check("k1") is None
    assert cache.apply(block("k1", 1))
    got = cache.check("k1")
    assert isinstance(got, Block)
    assert (got.window, got.limit, got.count, got.version) == (Window.minute, 100, 101, 1)
    assert cache.apply(unblock("k1", 2))
    assert cache.check("k1") is None


def test_older_or_equal_version_ignored(cache: DecisionCache) -> None:
    assert cache.apply(block("k1", 10))
    assert not cache.apply(unblock("k1", 9))  # late, older unblock
    assert not cache.apply(unblock("k1", 10))  # same version: not newer
    assert cache.check("k1") is not None
    assert cache.apply(unblock("k1", 11))
    assert not cache.apply(block("k1", 5))  # an old block replayed after the unblock
    assert cache.check("k1") is None
    state = cache.state()
    assert (state.applied, state.stale_ignored, state.keys_known, state.keys_blocked) == (2, 3, 1, 0)


def test_block_over_at_until_without_unblock(cache: DecisionCache, clock: Clock) -> None:
    until = T0 + timedelta(seconds=30)
    cache.apply(block("k1", 1, until=until))
    clock.value = until - timedelta(microseconds=1)
    block_now = cache.check("k1")
    assert block_now is not None
    assert block_now.seconds_left(clock.value) == 1
    clock.value = until
    assert cache.check("k1") is None
    assert cache.state().keys_blocked == 0
    # the version is still held: a replay of the same block does not come back
    clock.value = until - timedelta(seconds=5)
    assert not cache.apply(block("k1", 1, until=until))


def test_hour_and_day_windows(cache: DecisionCache, clock: Clock) -> None:
    hour_end = datetime(2025, 3, 1, 13, tzinfo=UTC)
    day_end = datetime(2025, 3, 2, tzinfo=UTC)
    cache.apply(decision("kh", DecisionAction.block, 1, until=hour_end, window=Window.hour, limit=1000))
    cache.apply(decision("kd", DecisionAction.block, 1, until=day_end, window=Window.day, limit=5000))
    clock.value = datetime(2025, 3, 1, 12, 59, 59, 500_000, tzinfo=UTC)
    hour_block = cache.check("kh")
    assert hour_block is not None
    assert hour_block.seconds_left(clock.value) == 1
    assert cache.check("kd") is not None
    clock.value = hour_end
    assert cache.check("kh") is None
    assert cache.check("kd") is not None
    clock.value = day_end + timedelta(seconds=1)
    assert cache.check("kd") is None


def test_manual_block_without_until_lasts_until_unblock(cache: DecisionCache, clock: Clock) -> None:
    cache.apply(decision("km", DecisionAction.block, 7, until=None, window=Window.manual, limit=None))
    clock.value = T0 + timedelta(days=400)
    manual = cache.check("km")
    assert manual is not None
    assert manual.seconds_left(clock.value) is None
    cache.apply(unblock("km", 8))
    assert cache.check("km") is None


def test_on_applied_hook(clock: Clock) -> None:
    seen: list[tuple[str, int, float]] = []
    cache = DecisionCache(Settings(), now=clock, on_applied=lambda d, t: seen.append((d.key_id, d.version, t)))
    cache.apply(block("k1", 2), received=123.5)
    cache.apply(unblock("k1", 1))  # stale: no callback
    assert seen == [("k1", 2, 123.5)]


def test_failing_hook_does_not_break_apply(clock: Clock) -> None:
    def boom(d: Decision, t: float) -> None:
        raise RuntimeError("hook bug")

    cache = DecisionCache(Settings(), now=clock, on_applied=boom)
    assert cache.apply(block("k1", 1))
    assert cache.check("k1") is not None


@dataclass
class Record:
    value: bytes | None
    topic: str = "decisions"
    partition: int = 2
    offset: int = 41


def test_records_invalid_and_tombstones(cache: DecisionCache, caplog: pytest.LogCaptureFixture) -> None:
    cache._handle(Record(b"{not json"), 1.0)
    cache._handle(Record(b'{"key_id": "k"}'), 1.0)
    cache._handle(Record(None), 1.0)
    cache._handle(Record(block("k1", 3).model_dump_json().encode()), 1.0)
    state = cache.state()
    assert (state.invalid, state.applied) == (2, 1)
    assert cache.check("k1") is not None
    assert "decisions[2] offset 41" in caplog.text


def test_not_ready_until_started(cache: DecisionCache) -> None:
    state = cache.state()
    assert not state.ready
    assert not state.available
    assert not cache.ready
