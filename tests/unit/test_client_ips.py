"""The per-key, per-day distinct address counts the ingest writes as ``client_ips`` rows."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest

from worker.ingest.client_ips import ClientAddressCounts, FirstAddresses, fingerprints

DAY = 86_400


def test_first_address_table_keeps_the_first_and_grows() -> None:
    table = FirstAddresses(slots=8)
    keys = fingerprints(f"k{i}" for i in range(1000))
    firsts = table.first_of(keys, fingerprints(f"a{i}" for i in range(1000)))
    assert (firsts == fingerprints(f"a{i}" for i in range(1000))).all()
    assert table.used == 1000
    assert len(table.keys) >= 1000 / 0.6  # grew from 8 slots
    # Later addresses do not replace the first; one call's repeated key takes its first pair.
    again = table.first_of(keys[:3], fingerprints(["x", "y", "z"]))
    assert (again == firsts[:3]).all()
    new = table.first_of(fingerprints(["new", "new"]), fingerprints(["b1", "b2"]))
    assert (new == fingerprints(["b1", "b1"])).all()


def test_counts_match_a_python_count_of_the_distinct_addresses() -> None:
    rnd = random.Random(5)
    counts = ClientAddressCounts(cap=32)
    truth: dict[tuple[str, int], set[str]] = defaultdict(set)
    written: dict[tuple[str, int], int] = {}
    for _ in range(40):  # 40 batches over two days, keys with 1 to 50 addresses
        keys, days, ips = [], [], []
        for _ in range(rnd.randint(1, 400)):
            k = rnd.randint(0, 300)
            key, day = f"key-{k}", DAY * rnd.choice((100, 101))
            ip = f"10.0.{k % 7}.{rnd.randint(0, k % 50)}"
            keys.append(key)
            days.append(day)
            ips.append(ip)
            truth[(key, day)].add(ip)
        for cell, n in counts.observe(keys, days, ips).items():
            assert n > written.get(cell, 1)  # a row is written when the count grows
            written[cell] = n
    assert written == {cell: min(len(ips), 32) for cell, ips in truth.items() if len(ips) >= 2}
    assert counts.multi_address_keys == len(written)


def test_newest_days_kept_older_events_not_counted() -> None:
    counts = ClientAddressCounts(cap=8, days_kept=2)
    assert counts.observe(["k", "k"], [DAY, DAY], ["a", "b"]) == {("k", DAY): 2}
    assert counts.observe(["k", "k"], [3 * DAY, 3 * DAY], ["a", "b"]) == {("k", 3 * DAY): 2}
    # Day 1 fell out (newest is day 3, two days kept): not counted, no row.
    assert counts.observe(["k"], [DAY], ["c"]) == {}
    assert counts.observe(["k"], [2 * DAY], ["a"]) == {}
    assert counts.observe(["k"], [2 * DAY], ["b"]) == {("k", 2 * DAY): 2}


def test_cap_below_two_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ClientAddressCounts(cap=1)


def test_fingerprints_never_zero() -> None:
    assert fingerprints(["a", "b"]).dtype == np.uint64
    assert (fingerprints(str(i) for i in range(10_000)) != 0).all()


def test_a_new_day_starts_as_big_as_the_newest() -> None:
    counts = ClientAddressCounts(cap=8)
    counts.observe([f"k{i}" for i in range(5000)], [DAY] * 5000, ["a"] * 5000)
    grown = counts.nbytes
    assert grown > FirstAddresses.INITIAL_SLOTS * 16
    counts.observe(["k"], [2 * DAY], ["a"])
    assert counts.nbytes == 2 * grown  # day 2 sized like day 1 from its first event


def test_table_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of 2"):
        FirstAddresses(slots=1000)
