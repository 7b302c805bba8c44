"""``meter why`` on the real broker: what the topics hold for a key, in plain words; a topic that
cannot be read is one line and exit code 2, not a traceback after a 30 s wait."""

from __future__ import annotations

import time

import pytest

from worker.cli import main
from worker.limits.control import set_override
from worker.settings import Settings

pytestmark = [pytest.mark.kafka]


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: Settings, **extra: str) -> None:
    for name in ("kafka_bootstrap", "decisions_topic", "limits_topic", "allowances_topic"):
        monkeypatch.setenv(f"METER_{name.upper()}", str(getattr(settings, name)))
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


async def test_why_names_the_override_and_says_nothing_refuses_yet(
    topics: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from schemas.limits import LimitPolicy, OverrideScope

    await set_override(topics, OverrideScope.key, "cfxk_why", LimitPolicy(per_minute=7), "trial")
    use_settings(monkeypatch, topics)
    assert await _run(["why", "cfxk_why"]) == 0
    out = capsys.readouterr().out
    assert "limits 7/min, 1000/h, 5000/day (key override cfxk_why)" in out
    assert "no allowance in force" in out


@pytest.mark.parametrize("missing", ["METER_LIMITS_TOPIC", "METER_DECISIONS_TOPIC", "METER_ALLOWANCES_TOPIC"])
async def test_an_unreadable_topic_is_one_line_and_exit_code_2(
    topics: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    # Each of the three: a read that failed first once left the reads after it to a lost cancel.
    use_settings(monkeypatch, topics, **{missing: f"missing-{time.time_ns()}"})
    started = time.monotonic()
    assert await _run(["why", "cfxk_why"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("meter why: cannot read topic missing-")]
    assert not any("Traceback" in line for line in err)


async def test_a_failed_read_stops_the_others_even_one_that_lost_its_cancel(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import contextlib
    import threading

    from worker import control_topics

    async def loses_its_first_cancel(settings: Settings) -> dict[str, object]:
        with contextlib.suppress(asyncio.CancelledError):  # Python 3.11's wait_for race
            await asyncio.sleep(30)
        await asyncio.sleep(30)
        return {}

    monkeypatch.setattr(control_topics, "latest_allowances", loses_its_first_cancel)
    use_settings(monkeypatch, topics, METER_LIMITS_TOPIC=f"missing-{time.time_ns()}")
    codes: list[int] = []
    # A thread of its own, joined with a bound: a hang fails here, not at pytest's timeout.
    thread = threading.Thread(target=lambda: codes.append(main(["why", "cfxk_why"])), daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive(), "meter why did not return"
    assert codes == [2]


async def _run(argv: list[str]) -> int:
    import asyncio

    # The CLI runs its own event loop: keep it off the test's.
    return await asyncio.to_thread(main, argv)


async def test_reads_cancelled_at_any_point_stop(topics: Settings) -> None:
    """What ``meter why`` does to its other reads when one fails: cancel them, wherever they are.
    Before ``cancel_and_wait`` repeated its cancel, 6 to 8 of 60 never stopped (the cancel
    was lost in aiokafka's admin request, then the reader followed the topic for ever)."""
    import asyncio
    import random

    from common.follower import read_to_end
    from common.retry import cancel_and_wait

    random.seed(11)
    for _ in range(60):
        reads = [asyncio.create_task(read_to_end(topics, t)) for t in (topics.limits_topic, topics.decisions_topic)]
        await asyncio.sleep(random.uniform(0.0, 0.03))
        started = time.monotonic()
        # Not wait_for: cancel_and_wait ends its task before it takes its caller's cancel.
        stopping = asyncio.ensure_future(asyncio.gather(*(cancel_and_wait(r) for r in reads)))
        done, _ = await asyncio.wait({stopping}, timeout=10)
        assert done, "a read did not stop"
        assert time.monotonic() - started < 5
        assert not [t for t in asyncio.all_tasks() if "TopicFollower" in getattr(t.get_coro(), "__qualname__", "")]
