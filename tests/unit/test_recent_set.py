"""The bounded recent set: remembers the newest items, forgets the oldest first."""

from __future__ import annotations

from common.recent_set import RecentSet


def test_it_remembers_the_newest_and_forgets_the_oldest_first() -> None:
    recent: RecentSet[int] = RecentSet(3)
    assert [recent.add(i) for i in (1, 2, 3)] == [True, True, True]
    assert recent.add(2) is False  # already remembered: not moved, not added again
    assert recent.add(4) is True  # 1, the oldest, is forgotten
    assert 1 not in recent
    assert [i in recent for i in (2, 3, 4)] == [True, True, True]
    assert len(recent) == 3
    assert recent.add(1) is True  # forgotten, so new again


def test_a_long_stream_stays_bounded() -> None:
    recent: RecentSet[int] = RecentSet(1_000)
    for i in range(100_000):
        recent.add(i)
    assert len(recent) == 1_000
    assert 98_999 not in recent
    assert 99_000 in recent
