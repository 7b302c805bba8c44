"""Enforcement targets on the cluster model (``tests.unit.cluster_model``: real guards, fast-lane
grouping and limit engine on one simulated clock) with handlers that take time: requests a node
admitted and still serves are in its counts, not in the worker's, until they end."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from schemas.allowances import Allowance
from schemas.decisions import Window
from tests.unit.cluster_model import T0, Cluster


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


@pytest.mark.parametrize("lags", [(0.003, 0.01, 0.005), (0.04, 0.02, 0.03)], ids=["quiet", "busy"])
@pytest.mark.parametrize("serve", [0.0, 0.08, 0.5])
@pytest.mark.parametrize("split", [(60, 30, 0), (50, 20, 20), (80, 5, 5), (45, 45, 0)])
def test_a_key_at_90_percent_over_seconds_is_never_refused(
    serve: float, split: tuple[int, int, int], lags: tuple[float, float, float]
) -> None:
    """90 requests in 3 s (30 req/s). The key turns hot with one node listed, which gets the
    whole remainder; when a second node is listed, what the first may have admitted unseen
    was taken to be that whole cap, so the second got nothing (14 of 90 refused with instant
    handlers). A node not at its cap holds no requests to release: only its rate brings it
    admissions the worker has not seen. ``lags``: publish, fetch interval, allowance apply."""
    order = [f"n{i + 1}" for i, n in enumerate(split) for _ in range(n)]
    random.Random(2).shuffle(order)
    publish, fetch, apply = lags
    cluster = Cluster(publish_lag=publish, fetch_every=fetch, apply_lag=apply)
    for i, node in enumerate(order):
        cluster.request(node, i, i * 3.0 / 90, serve)
    cluster.run(12.0)
    assert (cluster.admitted, cluster.refused) == (90, [])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("rate", "target"), [(100.0, 105), (600.0, 110), (None, 120)], ids=["100", "600", "at-once"])
def test_three_nodes_hold_the_limit_with_handlers_of_random_length(rate: float | None, target: int, seed: int) -> None:
    """Handlers of 0 to 2 s: 129 to 150 of 100 in half of these runs before. A node's events
    come as its requests end, so its first ones could come before the key was hot by the
    worker's count (dropped, though its count already held its burst share in flight), and a
    node with none ended yet was silent when the division settled (nothing held for it)."""
    cluster = spread(lambda r: r.uniform(0.0, 2.0), rate, seed=seed)
    assert 100 <= cluster.admitted <= target


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("split", [(90, 0, 0), (80, 5, 5), (60, 30, 0), (50, 20, 20)])
def test_a_key_at_90_percent_at_once_with_handlers_of_random_length_is_never_refused(
    split: tuple[int, int, int], seed: int
) -> None:
    """90 at once, handlers of 0 to 2 s: the requests past a node's burst share wait while the
    division settles (up to the 2 s bound), so the settling that holds the silent nodes'
    shares for as long as the key's requests take cannot get them refused."""
    order = [f"n{i + 1}" for i, n in enumerate(split) for _ in range(n)]
    rnd = random.Random(seed)
    rnd.shuffle(order)
    cluster = Cluster()
    for i, node in enumerate(order):
        cluster.request(node, i, 0.0, rnd.uniform(0.0, 2.0))
    cluster.run(10.0)
    assert (cluster.admitted, cluster.refused) == (90, [])


def other_keys_fast_calls(c: Cluster, every: float = 0.005, took: float = 0.002) -> None:
    """Other keys' 2 ms calls on every node (what a real node also serves)."""

    def tick(node: str) -> None:
        s = c.in_flight[node].start("other", 1, c.clock.now)
        c._at(c.clock.now + took, lambda: c.in_flight[node].end(s))
        c._at(c.clock.now + every, lambda: tick(node))

    for node in c.guards:
        c._at(T0 - 0.0001, lambda node=node: tick(node))


@pytest.mark.parametrize("n2_at", [58.0, 100.0])
def test_the_previous_minutes_requests_in_flight_do_not_shrink_the_next_minute(n2_at: float) -> None:
    """30 calls of 2 s at :59.5 (minute M: 30 of 100), then 90 in minute M+1: 30 on n1 at once,
    60 on n2 later. The M calls still served are not in n1's M+1 counts: reported as in flight in
    M+1 they were added to M+1's count for good (their own events carry no counts to correct it)."""
    c = Cluster()
    rid = 0
    for _ in range(30):
        c.request("n1", rid, 54.5, 2.0)
        rid += 1
    for i in range(30):
        c.request("n1", rid, 55.0 + i * 0.01, 0.0)
        rid += 1
    for i in range(60):
        c.request("n2", rid, n2_at + i * 0.05, 0.0)
        rid += 1
    c.run(120.0)
    assert (c.admitted, c.refused) == (120, [])


@pytest.mark.parametrize("serve", [0.2, 0.4])
@pytest.mark.parametrize("split", [(50, 20, 20), (80, 5, 5), (90, 0, 0)])
def test_a_key_at_90_percent_is_not_refused_when_its_nodes_also_serve_other_keys(
    split: tuple[int, int, int], serve: float
) -> None:
    """The 90% case above with other keys' fast calls on the nodes: a node-wide serving-time
    average they pulled down let the slow key's held requests be refused before its division."""
    order = [f"n{i + 1}" for i, n in enumerate(split) for _ in range(n)]
    random.Random(1).shuffle(order)
    c = Cluster()
    other_keys_fast_calls(c)
    for i, node in enumerate(order):
        c.request(node, i, i / 300, serve)
    c.run(6.0)
    assert (c.admitted, c.refused) == (90, [])


@pytest.mark.parametrize(
    ("serve", "rate", "target"),
    [(0.3, None, 120), (0.5, 600.0, 110), (1.0, 600.0, 110), (2.5, 100.0, 105)],
    ids=["300ms-at-once", "500ms-600", "1s-600", "2.5s-100"],
)
def test_three_nodes_hold_the_limit_with_handlers_slower_than_the_burst_wait(
    serve: float, rate: float | None, target: int
) -> None:
    """Requests held past the burst share wait while the node serves requests of the key (the
    worker cannot have heard of them): with a fixed 250 ms wait they got their final answer
    before any event reached the worker, and the share was waived (up to 300 of 100)."""
    c = Cluster()
    for i in range(300):
        c.request(f"n{i % 3 + 1}", i, i / rate if rate else 0.0, serve)
    c.run(20.0)
    assert 100 <= c.admitted <= target


def test_traffic_that_moves_after_the_first_node_ran_out_is_not_refused() -> None:
    """60 requests on n1 then 30 on n2, 300 req/s, instant handlers: 90 of 100."""
    c = Cluster()
    for i in range(90):
        c.request("n1" if i < 60 else "n2", i, i / 300, 0.0)
    c.run(10.0)
    assert (c.admitted, c.refused) == (90, [])


@pytest.mark.parametrize(
    ("split", "spread_s", "serve"),
    [((80, 5, 5), 0.0, 0.0), ((60, 30, 0), 0.3, 0.08), ((45, 45, 0), 3.0, 0.0), ((50, 20, 20), 0.3, 0.0)],
)
def test_a_key_at_90_percent_of_its_minute_and_hour_limits_is_never_refused(
    split: tuple[int, int, int], spread_s: float, serve: float
) -> None:
    """Hour limit 200: 90 requests in each of two minutes (the hour window hot as well). Each
    window was divided on its own, and a node at its cap in one of them was below it in the
    other: there its part went to the other nodes, the next division gave it back, and the two
    windows' caps flipped in opposite phase every re-division, never both with room (168 of
    180 on the first case; found by the review)."""
    c = Cluster(per_hour=200)
    rid = 0
    for at in (5.0, 55.5):  # the second in the next minute (T0 is 5 s into one)
        order = [f"n{i + 1}" for i, n in enumerate(split) for _ in range(n)]
        random.Random(rid).shuffle(order)
        for i, node in enumerate(order):
            c.request(node, rid, at + i * spread_s / 90, serve)
            rid += 1
    c.run(60.0)
    assert (c.admitted, c.refused) == (180, [])


def test_a_hot_key_gone_quiet_does_not_have_its_remainder_flip_between_nodes() -> None:
    """After a burst (hour limit 200: the hour window hot too), n1's hour cap flipped between 68
    (nothing left) and 190 (everything) every re-division (30 ms) for the rest of the window:
    at its cap it kept its last rate for good and got the remainder; below it, its rate faded
    and the remainder went to the others; at its cap again... (~33 allowances a second for a
    key that sends nothing). What is left: n2 and n3 flip by one unit (the unit a node at its
    cap keeps: ``divide``'s ``starved``)."""
    c = Cluster(per_hour=200)
    order = ["n1"] * 80 + ["n2"] * 5 + ["n3"] * 5
    random.Random(1).shuffle(order)
    for i, node in enumerate(order):
        c.request(node, i, 0.0, 0.0)
    hour_caps: list[int] = []
    send = c._send

    def noted(allowances: list[Allowance]) -> None:
        if c.clock.now > T0 + 8.0:
            hour_caps.extend(w.grants["n1"].cap for a in allowances for w in a.windows if w.window is Window.hour)
        send(allowances)

    c._send = noted  # type: ignore[method-assign]
    c.run(40.0)
    changes = sum(1 for before, after in itertools.pairwise(hour_caps) if before != after)
    assert changes <= 2  # was 1,063: 68, 190, 68, 190, ... (once the rates have faded to 0, it splits evenly)


@pytest.mark.parametrize("slow", ["n1", "n3"])
@pytest.mark.parametrize(("rate", "target"), [(100.0, 105), (600.0, 110), (None, 120)], ids=["100", "600", "at-once"])
def test_a_node_slower_than_the_others_is_held_for_before_it_is_heard_from(
    slow: str, rate: float | None, target: int
) -> None:
    """One node's calls all take 0.5 s, the others' none (its other keys' events show it). Its
    first events of the key come 0.5 s after its first requests: silent until then, it was left
    out of the division once it settled, and its burst share went to the others as well (137
    to 146 of 100). The division settles for as long as a silent node's events take to come."""
    c = Cluster()
    for node in c.guards:
        c.background(node, 0.5 if node == slow else 0.0)
    for i in range(300):
        node = f"n{i % 3 + 1}"
        c.request(node, i, 2.0 + (i / rate if rate else 0.0), 0.5 if node == slow else 0.0)
    c.run(10.0)
    assert 100 <= c.admitted <= target


@pytest.mark.parametrize("split", [(90, 0, 0), (60, 30, 0), (30, 30, 30)])
@pytest.mark.parametrize("spread_s", [0.0, 0.3, 3.0])
def test_a_key_at_90_percent_is_not_refused_when_another_node_is_slow(
    split: tuple[int, int, int], spread_s: float
) -> None:
    """The longer settling for a slow silent node (n3, 0.5 s calls) delays requests past a burst
    share on the other nodes; they wait for it (a settling division), and are not refused."""
    c = Cluster()
    for node in c.guards:
        c.background(node, 0.5 if node == "n3" else 0.0)
    order = [f"n{i + 1}" for i, n in enumerate(split) for _ in range(n)]
    random.Random(1).shuffle(order)
    for i, node in enumerate(order):
        c.request(node, i, 2.0 + i * spread_s / 90, 0.5 if node == "n3" else 0.0)
    c.run(spread_s + 10.0)
    assert (c.admitted, c.refused) == (90, [])


@pytest.mark.parametrize("split", [(60, 30, 0), (50, 20, 20), (30, 30, 30)])
def test_a_key_spread_over_nodes_is_sent_a_new_division_only_when_a_node_needs_one(
    split: tuple[int, int, int],
) -> None:
    """90 requests in 3 s, then 9 s quiet. Every re-division (each fetch, every 30 ms) moved some
    cap as the rates shifted and faded, and each went out: 383–409 allowances to every node. The
    caps the nodes hold add up to the limit, so one goes out only when a node may reach its cap
    (76–100 now), and nothing is refused for it."""
    order = [f"n{i + 1}" for i, n in enumerate(split) for _ in range(n)]
    random.Random(2).shuffle(order)
    cluster = Cluster()
    for i, node in enumerate(order):
        cluster.request(node, i, i * 3.0 / 90, 0.0)
    cluster.run(12.0)
    assert (cluster.admitted, cluster.refused) == (90, [])
    assert cluster.allowances_sent <= 120


@pytest.mark.parametrize(("serve", "target"), [(0.0, 103), (0.5, 113)])
def test_a_node_that_joins_late_gets_what_remains_not_what_remained_when_the_key_turned_hot(
    serve: float, target: int
) -> None:
    """n1 and n2 send 10 req/s each in step (their caps never move), n3 bursts 60 at 4 s. A node
    not listed may admit ``others``: held from when the key turned hot (66), n3 took it all while
    the others had spent most of the remainder: 144–154 of 100 (a review's case). ``others`` is
    sent again once it moved by a fiftieth of the limit (before the change: 100 and 110)."""
    cluster, rid = Cluster(), itertools.count()
    for k in range(50):
        for node in ("n1", "n2"):
            cluster.request(node, next(rid), k * 0.1, 0.0)
    for _ in range(60):
        cluster.request("n3", next(rid), 4.0, serve)
    cluster.run(15.0)
    assert 100 <= cluster.admitted <= target


def test_a_unit_given_to_a_starved_node_is_taken_back_when_it_is_not_used() -> None:
    """160 requests over 4 s on 10 nodes at random. A node at its cap gets at least one unit
    while anything remains (``divide``): the caps may then add up past the limit, which the next
    division took back. Kept when only lower caps were due, the extra units were admitted: 103."""
    rnd, cluster = random.Random(0), Cluster(nodes=10)
    for i in range(160):
        cluster.request(f"n{rnd.randrange(10) + 1}", i, i * 4.0 / 160, 0.0)
    cluster.run(12.0)
    assert cluster.admitted <= 101


@pytest.mark.parametrize("every", [1.5, 2.5, 3.5])
def test_a_node_sending_now_and_then_is_not_refused_below_the_limit(every: float) -> None:
    """n2 and n3 carry the key (80 requests over 9 s), n1 sends one every ``every`` s. n1's part
    is nothing at its rate: at its cap, it holds its next request for a raise the worker cannot
    see it wait for. Its raise was sent only while n1 itself had sent within 2 s: n1's request
    was refused with the key at 83 of 100 (a review's case)."""
    cluster, rid = Cluster(), itertools.count()
    for i in range(45):
        cluster.request("n2", next(rid), 0.5 + i * 0.2, 0.0)
    for i in range(35):
        cluster.request("n3", next(rid), 0.6 + i * 0.25, 0.0)
    n1 = 0
    while 1.0 + n1 * every < 10.0:
        cluster.request("n1", next(rid), 1.0 + n1 * every, 0.0)
        n1 += 1
    cluster.run(30.0)
    assert (cluster.admitted, cluster.refused) == (80 + n1, [])


@pytest.mark.parametrize("gap", [1.0, 2.5, 4.0])
def test_a_hot_key_whose_traffic_goes_sparse_is_not_refused_below_its_limits(gap: float) -> None:
    """45 requests spread over 3 nodes make the key hot (hour limit 120), then one request every
    ``gap`` s on a random node. A node at its cap is given one unit while anything remains; it
    was taken back once the node's rate faded, and given again, and the division left in force
    when the key went quiet was the one without it: each sparse request waited for a raise the
    worker could not see it needed and was refused, 10–13 with the minute at 46 of 100 (a
    review's case). The unit now stays with a node one unit from its cap."""
    cluster, rid, rnd = Cluster(per_hour=120), itertools.count(), random.Random(7)
    for i in range(45):
        cluster.request(f"n{i % 3 + 1}", next(rid), 1 + i * 0.05, 0.0)
    t, sparse = 5.0, 0
    while t < 50 and sparse < 40:
        cluster.request(f"n{rnd.randrange(3) + 1}", next(rid), t, 0.0)
        t, sparse = t + gap, sparse + 1
    cluster.run(60.0)
    assert (cluster.admitted, cluster.refused) == (45 + sparse, [])
