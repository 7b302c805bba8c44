"""The in-memory part of the dedup memory: what it may answer, and what it must leave to the store."""

from __future__ import annotations

from worker.ingest.recent_hashes import RecentHashes

M0, M1, M2 = 60_000, 60_060, 60_120


def test_unassigned_partitions_and_stored_minutes_go_to_the_store() -> None:
    cache = RecentHashes(max_hashes=100)
    cache.assign(0, stored_minutes={M0})
    seen, ask_minutes, ask = cache.split([0, 0, 1], [M0, M1, M1], [1, 2, 3])
    assert seen == set()
    assert ask_minutes == {0: {M0}, 1: {M1}}  # stored before we owned it / not ours at all
    assert ask == [1, 3]


def test_minutes_written_from_scratch_are_answered_here() -> None:
    cache = RecentHashes(max_hashes=100)
    cache.assign(0, stored_minutes=set())
    cache.add([0, 0], [M1, M1], [10, 11])
    seen, ask_minutes, ask = cache.split([0, 0, 0], [M1, M1, M2], [10, 12, 10])
    assert seen == {10}
    assert (ask_minutes, ask) == ({}, [])  # M2 is complete too: nothing stored, nothing written


def test_stored_minutes_are_never_cached() -> None:
    cache = RecentHashes(max_hashes=100)
    cache.assign(0, stored_minutes={M0})
    cache.add([0], [M0], [5])
    assert cache.size == 0
    assert cache.split([0], [M0], [5])[2] == [5]


def test_past_the_bound_the_oldest_minutes_are_forgotten_and_asked_again() -> None:
    cache = RecentHashes(max_hashes=3)
    cache.assign(0, stored_minutes=set())
    cache.add([0, 0], [M0, M0], [1, 2])
    cache.add([0, 0], [M1, M1], [3, 4])  # 4 > 3: M0 goes
    assert cache.size == 2
    seen, ask_minutes, ask = cache.split([0, 0], [M0, M1], [1, 3])
    assert seen == {3}
    assert (ask_minutes, ask) == ({0: {M0}}, [1])


def test_revoke_forgets_the_partition() -> None:
    cache = RecentHashes(max_hashes=100)
    cache.assign(0, stored_minutes=set())
    cache.add([0], [M0], [1])
    cache.revoke(0)
    assert cache.size == 0
    assert cache.split([0], [M0], [1])[2] == [1]


def test_minutes_past_the_horizon_leave_the_record_of_incomplete_minutes() -> None:
    cache = RecentHashes(max_hashes=1)
    cache.assign(0, stored_minutes={M0})
    cache.add([0, 0], [M1, M2], [1, 2])  # bound 1: M1 forgotten (incomplete from now on)
    assert cache.split([0, 0], [M0, M1], [7, 8])[1] == {0: {M0, M1}}
    cache.forget_before(M1)  # M0 is past the horizon: no event of it is accepted any more
    assert cache.split([0], [M1], [8])[1] == {0: {M1}}  # M1 still asks the store
    assert cache._incomplete == {0: {M1}}  # the record that must not grow without end
