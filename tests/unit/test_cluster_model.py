"""Enforcement targets on the cluster model (``tests.unit.cluster_model``: real guards, fast-lane
grouping and limit engine on one simulated clock) with handlers that take time: requests a node
admitted and still serves are in its counts, not in the worker's, until they end."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.unit.cluster_model import Cluster


def spread(serve: Callable[[random.Random], float], rate: float | None, n: int = 300, seed: int = 0) -> Cluster:
    """``n`` requests of one key round-robin over 3 nodes at ``rate`` req/s (None: all at once)."""
    cluster, rnd = Cluster(), random.Random(seed)
    for i in range(n):
        cluster.request(f"n{i % 3 + 1}", i, i / rate if rate else 0.0, serve(rnd))
    cluster.run()
    return cluster


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("serve", "rate", "target"),
    [
        (lambda r: 0.0, 600.0, 110),
        (lambda r: 0.08, 600.0, 110),  # the measured case: 153 of 100 over real HTTP before
        (lambda r: r.uniform(0.01, 0.2), 600.0, 110),  # requests end out of their order
        (lambda r: r.uniform(0.01, 0.2), None, 120),
        (lambda r: 0.08, 100.0, 105),
    ],
    ids=["instant-600", "80ms-600", "10-200ms-600", "10-200ms-at-once", "80ms-100"],
)
def test_three_nodes_hold_the_limit_whatever_their_handlers_take(
    serve: Callable[[random.Random], float], rate: float | None, target: int, seed: int
) -> None:
    cluster = spread(serve, rate, seed=seed)
    assert 100 <= cluster.admitted <= target


@pytest.mark.parametrize("serve", [0.0, 0.1, 0.2])
@pytest.mark.parametrize("split", [(60, 30, 0), (50, 20, 20), (80, 5, 5), (30, 30, 30), (90, 0, 0)])
def test_a_key_at_90_percent_is_never_refused_whatever_its_handlers_take(
    serve: float, split: tuple[int, int, int]
) -> None:
    """90 requests in 0.3 s, split over the nodes as given."""
    order = [f"n{i + 1}" for i, n in enumerate(split) for _ in range(n)]
    random.Random(1).shuffle(order)
    cluster = Cluster()
    for i, node in enumerate(order):
        cluster.request(node, i, i / 300, serve)
    cluster.run()
    assert (cluster.admitted, cluster.refused) == (90, [])
