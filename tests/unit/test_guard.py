"""The node's own guard: exact local limits, bounded memory, and the worker's allowances."""

from __future__ import annotations

from datetime import UTC, datetime

from node.guard import LocalGuard, RefusedBy
from schemas.allowances import MAX_DIVISION_WAIT_S, Allowance, NodeGrant, WindowAllowance
from schemas.decisions import WINDOW_SECONDS, Window
from schemas.limits import LimitPolicy, PolicyBook

T0 = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC).timestamp()
MINUTE = int(T0) // 60 * 60  # 12:00:00
HOUR = int(T0) // 3600 * 3600


def dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def guard(policy: LimitPolicy | None = None, node: str = "n1", max_keys: int = 1000) -> LocalGuard:
    return LocalGuard(PolicyBook(policy or LimitPolicy()), node, max_keys=max_keys)


def allowance(
    version: int,
    grants: dict[str, tuple[int, int]],
    others: int = 0,
    start: int = MINUTE,
    window: Window = Window.minute,
    key: str = "k",
) -> Allowance:
    return Allowance(
        key_id=key,
        version=version,
        decided_at=dt(T0),
        windows=[
            WindowAllowance(
                window=window,
                start=dt(start),
                until=dt(start + WINDOW_SECONDS[window]),
                limit=100,
                count=60,
                grants={n: NodeGrant(used=used, cap=cap) for n, (used, cap) in grants.items()},
                others=others,
            )
        ],
    )


def minute_count(g: LocalGuard, at: float, key: str = "k") -> int:
    counts = g.counts(key, at)
    assert counts is not None
    return counts[0]


def admit_until_refused(g: LocalGuard, at: float, most: int = 1000, key: str = "k") -> int:
    """How many requests ``g`` admits in a row at ``at`` before refusing one."""
    for n in range(most):
        if g.admit(key, "acct", at) is not None:
            return n
    raise AssertionError(f"admitted {most} without refusing")


# -- local limits --------------------------------------------------------------------------


def test_one_node_alone_admits_exactly_the_limit() -> None:
    g = guard()
    results = [g.admit("k", "acct", T0 + i * 0.1) for i in range(300)]
    assert sum(r is None for r in results) == 100
    assert all(r is None for r in results[:100])
    refusal = results[100]
    assert refusal is not None
    assert (refusal.by, refusal.window, refusal.limit, refusal.count) == (
        RefusedBy.local_limit,
        Window.minute,
        100,
        100,
    )
    assert refusal.until == MINUTE + 60
    assert (refusal.version, refusal.cap) == (None, None)
    assert g.counts("k", T0 + 30) == [100, 100, 100]  # refused requests count nothing


def test_a_new_minute_admits_again() -> None:
    g = guard()
    assert admit_until_refused(g, T0) == 100
    assert g.admit("k", "acct", MINUTE + 59.999) is not None
    assert g.admit("k", "acct", MINUTE + 60) is None
    assert g.counts("k", MINUTE + 60) == [1, 101, 101]


def test_every_window_is_checked_before_any_is_counted() -> None:
    g = guard(LimitPolicy(per_minute=100, per_hour=150, per_day=5000))
    assert admit_until_refused(g, T0) == 100
    next_minute = MINUTE + 60
    assert admit_until_refused(g, next_minute) == 50  # the hour binds at 150
    refusal = g.admit("k", "acct", next_minute)
    assert refusal is not None
    assert (refusal.by, refusal.window, refusal.limit, refusal.count) == (RefusedBy.local_limit, Window.hour, 150, 150)
    assert refusal.until == HOUR + 3600
    assert g.counts("k", next_minute) == [50, 150, 150]  # the refused ones added to no window


def test_record_counts_without_checking() -> None:
    g = guard(LimitPolicy(per_minute=5))
    assert admit_until_refused(g, T0) == 5
    for _ in range(3):
        g.record("k", "acct", T0)  # e.g. 403s: counted even at the limit
    assert g.counts("k", T0) == [8, 8, 8]
    g.record("fresh", "acct", T0)
    assert g.counts("fresh", T0) == [1, 1, 1]


def test_counts_are_minute_hour_day_and_none_for_an_unknown_key() -> None:
    g = guard()
    assert g.counts("k", T0) is None
    for _ in range(3):
        g.admit("k", "acct", T0)
    g.admit("k", "acct", MINUTE + 60)
    assert g.counts("k", MINUTE + 60) == [1, 4, 4]
    assert g.counts("k", HOUR + 3600) == [0, 0, 4]  # a new hour, same day
    assert g.counts("k", HOUR + 86400) == [0, 0, 0]


def test_headroom_is_the_tightest_window() -> None:
    g = guard(LimitPolicy(per_minute=100, per_hour=120, per_day=None))
    assert g.headroom("k", T0) is None
    for _ in range(30):
        g.admit("k", "acct", T0)
    room = g.headroom("k", T0)
    assert room is not None
    assert (room.window, room.limit, room.remaining, room.reset_s) == (Window.minute, 100, 70, 55)
    later = MINUTE + 60 + 10
    for _ in range(60):
        g.admit("k", "acct", later)
    room = g.headroom("k", later)  # minute: 40 left; hour: 120 - 90 = 30 left
    assert room is not None
    assert (room.window, room.limit, room.remaining) == (Window.hour, 120, 30)
    assert room.reset_s == HOUR + 3600 - int(later)


def test_headroom_counts_the_allowance_cap() -> None:
    g = guard()
    for _ in range(12):
        g.admit("k", "acct", T0)
    assert g.apply(allowance(1, {"n1": (10, 30)}), T0)
    room = g.headroom("k", T0)
    assert room is not None
    assert (room.window, room.remaining) == (Window.minute, 30 - 12)


def test_memory_is_bounded_by_forgetting_the_least_recently_seen_keys() -> None:
    g = guard(max_keys=1000)
    for i in range(5000):
        g.admit(f"k{i}", "acct", T0)
    assert len(g) == 1000
    assert g.forgotten == 4000
    assert g.counts("k0", T0) is None  # the oldest went first
    assert g.counts("k4999", T0) == [1, 1, 1]


def test_a_key_seen_again_is_not_the_next_forgotten() -> None:
    g = guard(max_keys=3)
    for key in ("a", "b", "c"):
        g.admit(key, "acct", T0)
    g.admit("a", "acct", T0)  # a is now the most recently seen
    g.admit("d", "acct", T0)
    assert g.counts("b", T0) is None
    assert g.counts("a", T0) == [2, 2, 2]


# -- allowances ----------------------------------------------------------------------------


def test_a_listed_node_admits_until_its_own_count_reaches_its_cap() -> None:
    g = guard()
    assert g.apply(allowance(7, {"n1": (10, 30), "n2": (40, 60)}), T0)
    assert g.allowances_applied == 1
    assert minute_count(g, T0) == 10  # what the worker saw this node admit is charged to it
    assert admit_until_refused(g, T0 + 1) == 20
    # 40 remain and n1 holds 20 of them: the next division may give it more, so it waits first
    waiting = g.admit("k", "acct", T0 + 1)
    assert waiting is not None
    assert waiting.by is RefusedBy.awaiting
    refusal = g.admit("k", "acct", T0 + 1, final=True)
    assert refusal is not None
    assert (refusal.by, refusal.window, refusal.version, refusal.cap) == (RefusedBy.allowance, Window.minute, 7, 30)
    assert (refusal.limit, refusal.count, refusal.until) == (100, 60, MINUTE + 60)
    assert minute_count(g, T0 + 1) == 30


def test_a_cap_that_holds_nothing_back_refuses_at_once() -> None:
    g = guard()
    assert g.apply(allowance(7, {"n1": (10, 50)}), T0)  # 40 remain, all of them n1's
    assert admit_until_refused(g, T0 + 1) == 40
    refusal = g.admit("k", "acct", T0 + 1)
    assert refusal is not None
    assert refusal.by is RefusedBy.allowance


def test_the_allowance_ends_with_its_window() -> None:
    g = guard()
    g.apply(allowance(7, {"n1": (10, 30)}), T0)
    assert admit_until_refused(g, T0) == 20
    assert g.admit("k", "acct", MINUTE + 60) is None  # a new minute: only the local limit holds


def test_a_restarted_node_takes_its_count_back_from_the_allowance() -> None:
    restarted = guard()
    restarted.apply(allowance(7, {"n1": (25, 30)}), T0)
    assert minute_count(restarted, T0) == 25
    assert admit_until_refused(restarted, T0) == 5

    ahead = guard()  # the node admitted more than the worker has heard of yet: its own count stands
    for _ in range(28):
        ahead.admit("k", "acct", T0)
    ahead.apply(allowance(7, {"n1": (25, 30)}), T0)
    assert ahead.counts("k", T0) == [28, 28, 28]
    assert admit_until_refused(ahead, T0) == 2


def test_an_older_or_equal_version_is_ignored() -> None:
    g = guard()
    assert g.apply(allowance(7, {"n1": (10, 30)}), T0)
    assert not g.apply(allowance(6, {"n1": (10, 90)}), T0)
    assert not g.apply(allowance(7, {"n1": (10, 90)}), T0)
    assert g.allowances_stale == 2
    held = g.allowance("k")
    assert held is not None
    assert held.version == 7
    assert admit_until_refused(g, T0) == 20  # the cap of version 7 holds
    assert g.apply(allowance(8, {"n1": (10, 35)}), T0)  # a newer one replaces it
    assert admit_until_refused(g, T0) == 5


def test_an_allowance_of_a_past_window_is_ignored() -> None:
    g = guard()
    assert not g.apply(allowance(7, {"n1": (0, 1)}, start=MINUTE - 60), T0)
    assert g.allowance("k") is None
    assert g.allowances_applied == 0
    assert admit_until_refused(g, T0) == 100


def test_an_unlisted_node_admits_others_more_from_when_it_first_held_the_allowance() -> None:
    g = guard(node="n9")
    for _ in range(5):
        g.admit("k", "acct", T0)
    assert g.apply(allowance(7, {"n1": (30, 40), "n2": (20, 30)}, others=10), T0)
    assert g.counts("k", T0) == [5, 5, 5]  # nothing to take back: the worker has not heard of it
    assert admit_until_refused(g, T0) == 10
    refusal = g.admit("k", "acct", T0)
    assert refusal is not None
    # not listed yet: wait for the worker to list this node; once the wait is over, refused
    assert (refusal.by, refusal.version, refusal.cap) == (RefusedBy.awaiting, 7, 15)
    final = g.admit("k", "acct", T0, final=True)
    assert final is not None
    assert (final.by, final.version, final.cap) == (RefusedBy.allowance, 7, 15)


def test_a_request_awaiting_a_settling_division_says_so() -> None:
    """The node waits longer for a division that settles (``InFlight.deadline``): the worker
    holds shares for nodes it has not heard from and divides again soon."""
    g = guard(node="n1")
    settling = allowance(7, {"n1": (30, 34)})
    settling = settling.model_copy(update={"windows": [settling.windows[0].model_copy(update={"settling": True})]})
    assert g.apply(settling, T0)
    assert admit_until_refused(g, T0) == 4  # from the 30 the worker saw
    refusal = g.admit("k", "acct", T0)
    assert refusal is not None
    assert (refusal.by, refusal.settling) == (RefusedBy.awaiting, True)
    assert g.apply(allowance(8, {"n1": (34, 34)}, others=0), T0)  # settled: n1 may still get more
    refusal = g.admit("k", "acct", T0)
    assert refusal is not None
    assert (refusal.by, refusal.settling) == (RefusedBy.awaiting, False)


def _window(window: Window, start: int, cap: int, limit: int, count: int, settling: bool) -> WindowAllowance:
    return WindowAllowance(
        window=window,
        start=dt(start),
        until=dt(start + WINDOW_SECONDS[window]),
        limit=limit,
        count=count,
        grants={"n2": NodeGrant(used=cap, cap=cap)},
        settling=settling,
    )


def test_a_settling_division_is_waited_on_whichever_window_is_checked_last() -> None:
    """The minute division settles, the hour one does not, and the node is at both caps: the
    request waits for the settling one (found by the review: the hour's refusal, checked last,
    said not settling, and the request was refused after 250 ms)."""
    g = guard(LimitPolicy(per_minute=100, per_hour=200, per_day=None), node="n2")
    held = Allowance(
        key_id="k",
        version=7,
        decided_at=dt(T0),
        windows=[
            _window(Window.hour, HOUR, 79, 200, 158, settling=False),
            _window(Window.minute, MINUTE, 34, 100, 68, settling=True),
        ],
    )
    assert g.apply(held, T0)
    refusal = g.admit("k", "acct", T0)
    assert refusal is not None
    assert (refusal.by, refusal.window, refusal.settling) == (RefusedBy.awaiting, Window.hour, True)


def test_a_settling_division_older_than_the_longest_wait_is_not_waited_on() -> None:
    """The worker settles a division within half of MAX_DIVISION_WAIT_S: a settling one held
    longer than that bound (the worker went quiet) does not hold every request of the key 2 s.
    Timed on the node's clock, from when it applied it (the worker's may be skewed)."""
    g = guard(node="n2")
    held = Allowance(
        key_id="k",
        version=7,
        decided_at=dt(T0 - 3600),  # a worker clock an hour behind changes nothing
        windows=[_window(Window.minute, MINUTE, 34, 100, 68, settling=True)],
    )
    assert g.apply(held, T0)
    fresh = g.admit("k", "acct", T0 + MAX_DIVISION_WAIT_S - 0.1)
    stale = g.admit("k", "acct", T0 + MAX_DIVISION_WAIT_S + 0.1)
    assert fresh is not None
    assert stale is not None
    assert (fresh.by, fresh.settling, stale.by, stale.settling) == (RefusedBy.awaiting, True, RefusedBy.awaiting, False)


def test_a_later_unlisted_version_does_not_re_anchor() -> None:
    g = guard(node="n9")
    for _ in range(5):
        g.admit("k", "acct", T0)
    g.apply(allowance(7, {"n1": (30, 40)}, others=10), T0)
    for _ in range(7):
        assert g.admit("k", "acct", T0) is None  # 12 now
    assert g.apply(allowance(8, {"n1": (35, 45)}, others=10), T0)
    assert admit_until_refused(g, T0) == 3  # still counted from 5: 5 + 10
    refusal = g.admit("k", "acct", T0)
    assert refusal is not None
    # not listed yet: wait for the worker to list this node; once the wait is over, refused
    assert (refusal.by, refusal.version, refusal.cap) == (RefusedBy.awaiting, 8, 15)
    final = g.admit("k", "acct", T0, final=True)
    assert final is not None
    assert (final.by, final.version, final.cap) == (RefusedBy.allowance, 8, 15)


def test_an_unlisted_node_keeps_the_anchors_of_the_current_windows_only() -> None:
    # A busy key on a node the worker never lists: one anchor per window it held an allowance
    # of. Before, every minute's stayed for good (4,320 after three days, never forgotten while
    # the key stays busy).
    g = guard(node="n9")
    for minute in range(3 * 1440):
        start = MINUTE + minute * 60
        g.admit("k", "acct", start + 1)
        assert g.apply(allowance(minute + 1, {"n1": (30, 40)}, others=10, start=start), start + 1)
    held = g._keys["k"].anchors  # private: the memory the test is about
    assert held is not None
    assert list(held) == [(0, MINUTE + (3 * 1440 - 1) * 60)]
    # The current window's anchor still counts ``others`` from where it was taken (1 admitted).
    assert admit_until_refused(g, MINUTE + (3 * 1440 - 1) * 60 + 2) == 10


def test_the_local_limit_still_applies_under_a_higher_cap() -> None:
    g = guard()
    g.apply(allowance(7, {"n1": (0, 500)}), T0)
    assert admit_until_refused(g, T0) == 100
    refusal = g.admit("k", "acct", T0)
    assert refusal is not None
    assert (refusal.by, refusal.window, refusal.limit) == (RefusedBy.local_limit, Window.minute, 100)


def test_before_any_division_a_node_admits_its_burst_share_then_waits() -> None:
    g = LocalGuard(PolicyBook(LimitPolicy()), "n1", burst_share=0.34)
    assert admit_until_refused(g, T0) == 34
    waiting = g.admit("k", "acct", T0)
    assert waiting is not None
    assert (waiting.by, waiting.window, waiting.limit, waiting.count) == (RefusedBy.awaiting, Window.minute, 100, 34)
    # the wait is over without a division: the share is waived for this window, the limit holds
    assert g.admit("k", "acct", T0, final=True) is None
    assert admit_until_refused(g, T0) == 100 - 35
    assert g.admit("k", "acct", T0 + 60) is None  # a new minute: the share applies again
    assert admit_until_refused(g, T0 + 60) == 33


def test_an_allowance_replaces_the_burst_share() -> None:
    g = LocalGuard(PolicyBook(LimitPolicy()), "n1", burst_share=0.34)
    assert admit_until_refused(g, T0) == 34
    g.apply(allowance(version=3, grants={"n1": (34, 90)}), T0)
    assert admit_until_refused(g, T0) == 90 - 34


def test_a_shadow_policy_never_refuses_or_waits_but_says_what_it_would_have_refused() -> None:
    book = PolicyBook(LimitPolicy(per_minute=3, per_hour=None, per_day=None, shadow=True))
    guard = LocalGuard(book, "node-1", burst_share=0.34)  # a burst share would make it wait
    answers = [guard.admit("k", "", T0 + i * 0.01) for i in range(5)]
    assert answers[:3] == [None, None, None]
    assert all(a is not None and a.shadow and a.by is RefusedBy.local_limit for a in answers[3:])
    assert guard.counts("k", T0 + 1) == [5, 5, 5]  # served, so counted


def test_a_global_shadow_turns_every_policy_into_a_dry_run() -> None:
    guard = LocalGuard(PolicyBook(LimitPolicy(per_minute=1), shadow_all=True), "node-1")
    assert guard.admit("k", "", T0) is None
    refusal = guard.admit("k", "", T0 + 0.1)
    assert refusal is not None
    assert refusal.shadow


def test_a_time_a_little_before_the_current_minute_counts_in_it() -> None:
    """A request that waited for the division while others moved the key into the next minute:
    before, it rolled the key back (count 0) and the next one forward (0 again): twice the limit."""
    g = guard(LimitPolicy(per_minute=5, per_hour=None, per_day=None))
    nxt = MINUTE + 60
    assert [g.admit("k", "a", nxt + 1) is None for _ in range(5)] == [True] * 5
    late = g.admit("k", "a", nxt - 0.2)  # started in the minute before, admitted now
    assert late is not None
    assert late.by is RefusedBy.local_limit
    assert g.admit("k", "a", nxt + 2) is not None
    assert g.counts("k", nxt - 0.2) is None  # that minute's counts are gone: nothing to report
    assert g.counts("k", nxt + 2) == [5, 5, 5]


def test_a_clock_set_back_starts_the_windows_over_instead_of_holding_the_key_in_the_future() -> None:
    """Found by a review of the forward-only windows: one request seen while the clock ran an hour
    ahead held the key in that hour's windows, refusing it at 10% of its limit after the clock
    was set right."""
    g = guard(LimitPolicy(per_minute=100, per_hour=1000, per_day=None))
    assert g.admit("k", "a", T0 + 3600) is None  # the clock an hour ahead
    admitted = sum(g.admit("k", "a", T0 + i * 6) is None for i in range(600))  # 10 a minute for an hour
    assert admitted == 600
    headroom = g.headroom("k", T0 + 3599)
    assert headroom is not None
    assert headroom.reset_s <= 60


def test_a_clock_set_back_within_the_hour_keeps_the_hours_count() -> None:
    """Found by a review of the first clock-step rule, which started every window over: a full
    hour admitted 100 more after a 25 s step back (a drifting clock corrected each 10 minutes
    let one node admit 146,980 in a day against 5,000)."""
    g = guard(LimitPolicy(per_minute=100, per_hour=1000, per_day=None))
    admitted = sum(g.admit("k", "a", T0 + m * 60 + i * 0.5) is None for m in range(10) for i in range(100))
    assert admitted == 1000
    refusal = g.admit("k", "a", T0 + 600)
    assert refusal is not None
    assert refusal.window is Window.hour
    stepped_back = sum(g.admit("k", "a", T0 + 575 + i * 0.1) is None for i in range(100))
    assert stepped_back == 0
    assert g.counts("k", T0 + 585) == [0, 1000, 1000]  # the minute started over, the hour kept


def test_an_allowance_for_a_window_this_node_has_not_reached_yet_still_holds_it_to_others() -> None:
    """This node's clock is 0.3 s behind the one whose events opened the next minute: the
    allowance for that minute arrives before this node is in it, so ``apply`` cannot anchor it.
    Once here, the node (not listed) may admit what the worker left for others: 5, not the limit."""
    g = LocalGuard(PolicyBook(LimitPolicy()), "nB", burst_share=0.34)
    nxt = MINUTE + 60
    assert g.admit("k", "acct", nxt - 0.3) is None
    assert g.apply(allowance(1, {"nA": (60, 95)}, others=5, start=nxt), nxt - 0.3)
    answers = [g.admit("k", "acct", nxt + 0.001 * i, final=True) for i in range(20)]
    assert answers[:5] == [None] * 5
    refusal = answers[5]
    assert refusal is not None
    assert (refusal.by, refusal.cap) == (RefusedBy.allowance, 5)
