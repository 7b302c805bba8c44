"""Limit evaluation for the keys of the partitions this worker owns. Pure: it returns the
decisions and allowances to publish; its caller publishes them.

Blocks are edge-triggered: one decision per transition (not blocked -> blocked, a block
extended to a longer window, blocked -> unblocked at rollover), never one per event. All
windows of a key are checked before deciding, and the block lasts until the latest end among
the exceeded windows. Versions rise per key: max(now in µs, last known version + 1).

Allowances: once a key's count in a window passes ``threshold`` × its limit, the key is hot
and each batch that touches it re-divides what remains among the nodes carrying its traffic
(``worker.limits.allowances``); a new version is returned only when a cap changed.

Threshold notifications (with a ``ThresholdTracker``): each threshold of a key's window fires
once per window start (``worker.limits.thresholds``), returned beside the decisions.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiokafka.partitioner import murmur2

from schemas.allowances import MAX_DIVISION_WAIT_S, Allowance, AllowanceVersion, WindowAllowance
from schemas.bounds import next_version
from schemas.decisions import (
    AUTOMATIC_WINDOWS,
    WINDOW_SECONDS,
    Decision,
    DecisionAction,
    Window,
    month_bounds,
    window_end,
    window_start,
)
from schemas.limits import ROUTE_MARK, PolicyBook
from schemas.notifications import Notification
from worker.limits.allowances import Division, NodeUse, divide
from worker.limits.counters import KeyWindows, WindowCounters
from worker.limits.thresholds import ThresholdTracker

log = logging.getLogger(__name__)

# (partition, subject, account_id, minute epoch) -> cost: a subject is a key id, or a key on a
# route (``schemas.limits.route_subject``) that the policy book gives route limits
LimitCounts = Mapping[tuple[int, str, str, int], int]
_NODE_WINDOWS = (Window.minute, Window.hour, Window.day)  # the order of an event's node_counts
_NODE_INDEX = {window: i for i, window in enumerate(_NODE_WINDOWS)}
_SERVING_WEIGHT = 0.2  # of a fetch's figure in ``LimitEngine.node_serving``
# Windows divided into allowances, longest first. Not the calendar month: a monthly quota is
# enforced by block decisions (and each node's own count), see docs in README "Limits".
_ALLOWANCE_WINDOWS = (Window.day, Window.hour, Window.minute)
# Rebuild rows: day, then hour, then minute (the account of the most recent window is kept),
# the month last (it never moves the account).
_REBUILD_ORDER = {Window.day: 0, Window.hour: 1, Window.minute: 2, Window.month: 3}


@dataclass(frozen=True, slots=True)
class AllowancePolicy:
    """How the owner divides a hot key's remainder (settings ``METER_ALLOWANCE_*``)."""

    threshold: float = 0.3  # a window is hot from this fraction of its limit on
    lag_s: float = 0.03  # expected time from a node's admission to the node holding the new cap
    pooled: bool = True  # a node may use the remainder minus the others' expected admissions
    # What a node admits on its own before any division (METER_NODE_BURST_SHARE): for as long
    # as a window's division settles (``settle_s`` after it turned hot), every known node not
    # heard from on the key may hold that much unseen, so it is held back from the others.
    burst_share: float = 1.0
    settle_s: float = 0.06
    # How long it settles at most while the listed nodes still serve requests of the key (its
    # handlers take time): half the longest a node holds a request for a division.
    serving_settle_s: float = MAX_DIVISION_WAIT_S / 2
    # A node is known (a member of the cluster) while it sent anything within this long.
    node_ttl_s: float = 60.0
    # A strict division (several nodes carry the key) whose caps moved is published only for a
    # node that may reach the cap it holds within this long at its rate (or whose cap may no
    # longer grow): the caps the nodes hold add up to the limit already, and re-dividing every
    # fetch sent ~30 records a second per hot key while the rates moved, most changing nothing.
    renew_s: float = 0.25


@dataclass(slots=True)
class NodeReport:
    """What one batch says of one node's traffic of one key."""

    arrivals: int = 0  # events (admitted or refused)
    counts: tuple[int, int, int] | None = None  # the node's own minute/hour/day counts, its latest minute's highest
    epoch: float = 0.0  # event time of the latest event with those counts
    in_flight: int = 0  # what of them the node was still serving, at its latest event
    # The shortest and the longest the node took over one of them (ms, its own clock: no skew)
    fastest_ms: float = math.inf
    slowest_ms: float = 0.0
    first_ts: float = math.inf  # event times of the first and last of the arrivals
    last_ts: float = 0.0


# (partition, key_id) -> node_id -> report
NodeReports = Mapping[tuple[int, str], Mapping[str, NodeReport]]


@dataclass(slots=True)
class Verdicts:
    """What the engine returns for its caller to publish: decisions, allowances, notifications."""

    decisions: list[Decision] = field(default_factory=list)
    allowances: list[Allowance] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decisions or self.allowances or self.notifications)


@dataclass(frozen=True, slots=True)
class AccountChange:
    """A key whose events now name another account (its limits follow the new one)."""

    key_id: str
    before: str
    after: str
    partition: int


@dataclass(slots=True)
class HotKey:
    """A key past the allowance threshold in some window: the nodes carrying its traffic."""

    nodes: dict[str, NodeUse] = field(default_factory=dict)
    until: float = 0.0  # end of the latest hot window
    last: tuple[object, ...] = ()  # caps of the last allowance returned (to skip unchanged ones)
    since: dict[tuple[Window, int], float] = field(default_factory=dict)  # (window, start) -> turned hot
    held_back: bool = False  # the last division kept part of the remainder from every node
    # (window, start) -> node -> the cap the last division gave it
    caps: dict[tuple[Window, int], dict[str, int]] = field(default_factory=dict)
    # Windows carried by several nodes: divided strictly for the rest of the window (``divide``).
    contended: set[tuple[Window, int]] = field(default_factory=set)
    # The nodes at their cap in some window at the last division (``at_a_cap``): they held
    # requests, which they release up to their new caps the moment these reach them, in every
    # window (a request counts in all of them).
    holding: frozenset[str] = frozenset()
    settled: set[tuple[Window, int]] = field(default_factory=set)  # windows whose division settled
    # The longest a node took over a request of the key this minute (the node's own duration:
    # no clock skew): how long a node may be silent with requests of the key. Per minute: one
    # request held long would otherwise lengthen every later settling of the key.
    slowest: float = 0.0
    slowest_minute: int = 0
    sent: list[WindowAllowance] = field(default_factory=list)  # the division the nodes hold (last published)

    def forget_windows_over(self, now: float) -> None:
        for over in [k for k in self.since if k[1] + WINDOW_SECONDS[k[0]] <= now]:
            del self.since[over]
            self.caps.pop(over, None)
            self.settled.discard(over)
            self.contended.discard(over)

    def starved(self, here: tuple[Window, int], listed: Mapping[str, tuple[int, float]]) -> list[str]:
        """The listed nodes that have reached the cap they were last given (they hold or
        refuse requests the worker does not see), or have one unit left of it: the one a node
        at its cap is given stays with it (taken back once its rate faded, then given again, it
        flipped between nodes, and the division left in force once the key went quiet was the
        one without it: a node's next request waited and was refused far below the limit)."""
        given = self.caps.get(here, {})
        return [n for n, (used, _) in listed.items() if n in given and used + 1 >= given[n]]

    def took(self, seconds: float, now: float) -> None:
        minute = window_start(Window.minute, now)
        if minute != self.slowest_minute:
            self.slowest, self.slowest_minute = 0.0, minute
        self.slowest = max(self.slowest, seconds)

    def at_a_cap(self, heres: Iterable[tuple[Window, int]]) -> set[str]:
        """The nodes at the cap they were last given in any of the windows ``heres``: they hold
        requests, which count in every window, so their demand goes on in all of them (divided
        one by one, a window where such a node is below its cap would give its part away, and
        the next division take it back: its caps in two windows never both had room)."""
        nodes = set()
        for here in heres:
            for n, cap in self.caps.get(here, {}).items():
                used = self.nodes[n].used(*here) if n in self.nodes else None
                if used is not None and used >= cap:
                    nodes.add(n)
        return nodes

    def worth_sending(self, windows: list[WindowAllowance], pooled: bool, renew_s: float, now: float) -> bool:
        """Whether the division ``windows`` is worth publishing over the one the nodes hold
        (``sent``). Always when their shape differs (windows, settling, limits, listed nodes) or
        a window is pooled (pooled parts add up to more than the remainder: they hold only while
        re-divided as the count moves). A strict division's caps add up to the limit, and what a
        node admits within its cap is in them: the held one stays as safe as it was (a lower cap
        is never needed). So it goes out only for a node that gains from it (a higher cap, or the
        word that its cap will not grow: it refuses at once instead of waiting) and needs it now:
        it may reach its held cap within ``renew_s`` at its rate, or it is at that cap (it holds
        its next request, which the worker cannot see; the unit a node at its cap is given stays
        with it, ``starved``, so this does not flip between idle nodes)."""
        if [_shape(w) for w in windows] != [_shape(w) for w in self.sent]:
            return True
        for new, old in zip(windows, self.sent, strict=True):
            if pooled and (new.window, int(new.start.timestamp())) not in self.contended:
                return True
            if _loosened(old, new):
                return True
            for node_id, grant in new.grants.items():
                held = old.grants[node_id]
                final = old.may_grow(held) and not new.may_grow(grant)
                if grant.cap <= held.cap and not final:
                    continue
                # At its cap it holds its next request for the raise, however long it has been
                # silent (a node sending now and then); below it, it may reach it soon.
                if held.cap - grant.used <= self._ahead(node_id, renew_s, now):
                    return True
        return False

    def _ahead(self, node_id: str, renew_s: float, now: float) -> float:
        """What the node may admit within ``renew_s`` beyond what the worker has seen of it: at
        its rate, from its latest request on while its requests may still be in flight unseen
        (the key's requests take ``slowest``: a node silent longer than that has stopped)."""
        use = self.nodes[node_id]
        if now - use.at > self.slowest + renew_s:
            return use.rate_at(now) * renew_s
        return use.rate * (min(max(0.0, now - use.last_ts), self.slowest) + renew_s)

    def keep_sent(self) -> None:
        """The division just made is not published: the caps the nodes hold stay those sent."""
        for w in self.sent:
            self.caps[(w.window, int(w.start.timestamp()))] = {n: g.cap for n, g in w.grants.items()}
            # re-divided while the division in force held part back (``redivide``)
            self.held_back |= any(w.may_grow(g) for g in w.grants.values())

    def floors(
        self,
        here: tuple[Window, int],
        listed: Mapping[str, tuple[int, float]],
        now: float,
        hold_s: float,
        lag_s: float,
    ) -> dict[str, int]:
        """What each listed node may have admitted unseen before the next division reaches it,
        while its traffic reached the worker less than ``hold_s`` ago (its latest admissions may
        still be on their way: a worker that falls behind sees them late): the whole cap it was
        last given if it was holding requests then (it releases them the moment the cap
        arrives), else what its rate brings from its latest event until the new division
        reaches it (``lag_s``), up to that cap: a node below its cap holds nothing to release,
        and taking its whole cap (given while it carried the key alone, pooled) would leave
        nothing to a node that joins. What the worker has seen of it once it has been silent
        ``hold_s``."""
        given = self.caps.get(here, {})
        floors = {}
        for n, (used, _) in listed.items():
            use = self.nodes[n]
            if now - use.at >= hold_s:
                floors[n] = used
            elif n in self.holding:
                floors[n] = max(used, given.get(n, 0))
            else:
                unseen = use.rate * (max(0.0, min(now - use.last_ts, now - use.at + hold_s)) + lag_s)
                floors[n] = max(used, min(given.get(n, 0), used + math.ceil(unseen)))
        return floors

    def divide(
        self,
        here: tuple[Window, int],
        listed: Mapping[str, tuple[int, float]],
        limit: int,
        count: int,
        settling: tuple[int, int] | None,
        policy: AllowancePolicy,
        now: float,
        at_a_cap: Collection[str],
    ) -> Division:
        """Divide the window ``here`` among the listed nodes ``{node: (used, rate)}``, and
        remember the caps given. ``settling``: ``(share, unseen)`` while the window settles:
        every node may still be admitting its burst ``share`` (held for it; ``unseen``: the
        silent known nodes' shares), else None. ``at_a_cap``: the nodes at their caps in any
        of the key's windows (``HotKey.at_a_cap``).

        Pooling lets each node take the remainder less what the others admit within the lag,
        but nodes holding requests at their caps release them all the moment a division
        arrives, so pooled parts would let each of them take nearly the whole remainder at
        once. So a window is divided strictly (parts adding up to the remainder) once several
        nodes carry the key (contended, for the rest of the window), with what nodes may have
        admitted unseen held back for them (``floors``)."""
        share, unseen = settling or (0, 0)
        starved = self.starved(here, listed)  # this window's nodes at their cap: a part of at_a_cap
        # A node at the cap it was given (in any of the key's windows: a request counts in all)
        # holds its requests or refuses them: it sends nothing meanwhile, so its measured rate
        # fades though its demand does not. Its last rate stands for as long as it may hold a
        # request (MAX_DIVISION_WAIT_S since it last sent): for good, a key gone quiet would have
        # its remainder go to whichever node is at its cap, and the next division (no longer at
        # its cap, its rate faded) take it back, each time.
        waiting = {n for n in at_a_cap if n in listed and now - self.nodes[n].at < MAX_DIVISION_WAIT_S}
        listed = {
            n: (used, max(rate, self.nodes[n].rate)) if n in waiting else (used, rate)
            for n, (used, rate) in listed.items()
        }
        if len(listed) > 1:
            self.contended.add(here)
        contended = here in self.contended
        floors = dict.fromkeys(listed, share)
        if contended:
            may_have_taken = self.floors(here, listed, now, policy.settle_s, policy.lag_s)
            floors = {n: max(share, f) for n, f in may_have_taken.items()}
        division = divide(
            limit,
            count,
            listed,
            policy.lag_s,
            policy.pooled and settling is None and not contended,
            unseen,
            floors,
            starved if contended else (),
            # A node not listed yet (traffic that moved to it) has been silent: it holds
            # nothing unseen, and may use what the listed ones are not expected to.
            pool_others=policy.pooled and settling is None,
        )
        self.caps[here] = {n: g.cap for n, g in division.grants.items()}
        return division


def _shape(w: WindowAllowance) -> tuple[object, ...]:
    return w.window, w.start, w.limit, w.settling, sorted(w.grants)


def _loosened(held: WindowAllowance, new: WindowAllowance) -> bool:
    """Whether the division the nodes hold (``held``) lets them admit more than ``new`` in a way
    its own caps do not bound: room left under the held caps past both the remainder and the new
    caps' room (a starved node's extra unit, taken back in ``new``), or an ``others`` (what a node
    not listed may admit) that moved by more than a fiftieth of the limit. ``others`` is not part
    of the listed nodes' parts: a held one stays as large as when the key turned hot while they
    spend the remainder. Also when ``others`` rose from nothing: a node not listed waits for it."""
    held_room = sum(max(0, held.grants[n].cap - g.used) for n, g in new.grants.items())
    new_room = sum(max(0, g.cap - g.used) for g in new.grants.values())
    if held_room > max(new.limit - new.count, new_room):
        return True
    return abs(new.others - held.others) > max(1, new.limit // 50) or held.others == 0 < new.others


def _serving(reports: Mapping[str, NodeReport]) -> bool:
    # A loop, not any() over a generator: this runs for every key of every fetch (113 ns
    # against 271 for one report, measured).
    for report in reports.values():  # noqa: SIM110
        if report.in_flight:
            return True
    return False


def _hot_by_nodes(hk: HotKey | None, reports: Mapping[str, NodeReport], window: Window, start: int, bar: float) -> bool:
    """Whether ``window`` (from ``start``) is hot by the nodes' word though the worker's count
    is below ``bar``: a node's own count holds the requests it still serves, which the worker
    has not counted yet (with slow handlers it passes the threshold first). Hot once, the window
    stays hot (one node's next report may be lower than another's was)."""
    if hk is not None and (window, start) in hk.since:
        return True
    i = _NODE_INDEX[window]
    for report in reports.values():
        counts = report.counts
        if counts is not None and counts[i] >= bar and window_start(window, report.epoch) == start:
            return True
    return False


def partition_of(subject: str, partitions: int) -> int:
    """Kafka's default partitioner (murmur2 of the key), as the nodes' producers use it; a key
    on a route lives in its key's partition."""
    key_id = subject.partition(ROUTE_MARK)[0]
    return int(murmur2(key_id.encode()) & 0x7FFFFFFF) % partitions


def to_datetime(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@dataclass(slots=True)
class ActiveBlock:
    """A block in force on a key this worker owns (or one an operator set)."""

    window: Window
    until: float  # epoch seconds; inf for an open-ended operator block
    operator: bool = False
    shadow: bool = False  # decided under a shadow policy: nodes note it, refuse nothing


class LimitEngine:
    """Window counters, policies, blocks and allowances of the keys this worker owns; pure:
    ``observe`` / ``tick`` / ``evaluate_all`` return ``Verdicts``, the caller publishes them."""

    def __init__(
        self,
        policies: PolicyBook,
        clock: Callable[[], float] = time.time,
        allowance: AllowancePolicy | None = None,
        thresholds: ThresholdTracker | None = None,
    ) -> None:
        self.policies = policies
        self.thresholds = thresholds  # threshold notifications (None: none)
        self.clock = clock
        self.allowance = allowance or AllowancePolicy()
        self.hot: dict[str, HotKey] = {}
        self.nodes_seen: dict[str, float] = {}  # node id -> last time it sent anything (cluster members)
        # node id -> how long it takes to serve a request: the fastest of each fetch, smoothed
        # (its own clock's durations). A node whose requests all take long says nothing of a
        # key for that long after it admits them.
        self.node_serving: dict[str, float] = {}
        self.allowance_versions: dict[str, int] = {}
        self.allowances_issued = 0
        self.partitions: dict[int, WindowCounters] = {}
        self.blocks: dict[str, ActiveBlock] = {}
        self.pardons: dict[str, float] = {}  # operator unblocked: no automatic block until then
        self.versions: dict[str, int] = {}
        self._expiry: list[tuple[float, str]] = []
        self.decisions_published = 0
        # Keys whose events changed their account (a move, or a node that disagrees): for the
        # caller to report (``take_account_changes``) and for the metrics.
        self.account_changes = 0
        self.changed_accounts: list[AccountChange] = []
        self.published_by_action: dict[str, int] = {"block": 0, "unblock": 0}

    # -- ownership ---------------------------------------------------------------------
    def assign(self, partition: int, counts: Iterable[tuple[str, str, Window, int, int]]) -> None:
        """Own ``partition`` with counts rebuilt from ClickHouse: (key, account, window, start, n)."""
        counters = self.partitions.setdefault(partition, WindowCounters())
        for key_id, account, window, start, n in sorted(counts, key=lambda c: _REBUILD_ORDER[c[2]]):
            # A key with month rows only (idle today) is live only if a monthly quota applies to it.
            if window is Window.month and key_id not in counters.keys and not self._has_month(key_id, account):
                continue
            counters.set(key_id, account, window, start, n)

    def revoke(self, partition: int) -> None:
        counters = self.partitions.pop(partition, None)
        if counters is not None:
            if self.thresholds is not None:
                self.thresholds.forget(counters.keys)
            for key_id in counters.keys:
                self.hot.pop(key_id, None)
                held = self.blocks.get(key_id)
                if held is not None and not held.operator:  # operator blocks hold whoever owns the key
                    del self.blocks[key_id]

    def take_account_changes(self) -> list[AccountChange]:
        changes, self.changed_accounts = self.changed_accounts, []
        return changes

    def live_keys(self) -> int:
        return sum(len(c) for c in self.partitions.values())

    # -- events ------------------------------------------------------------------------
    def observe(self, counts: LimitCounts, nodes: NodeReports | None = None) -> Verdicts:
        """Add a batch's counts; return the blocks they trigger and the allowances of hot keys."""
        now = self.clock()
        this_minute = window_start(Window.minute, now)
        touched: dict[str, KeyWindows] = {}
        for (partition, key_id, account, minute), n in counts.items():
            counters = self.partitions.get(partition)
            if counters is None:  # a partition being revoked: its new owner counts it
                continue
            # A node clock a little ahead stamps events into a minute that has not begun:
            # count them in the live one, or they would move the window early and the
            # current minute's requests would escape the limit.
            held = counters.keys.get(key_id)
            before = held.account if held is not None else account
            kw = touched[key_id] = counters.add(key_id, account, min(minute, this_minute), n)
            if kw.account != before:
                self.account_changes += 1
                self.changed_accounts.append(AccountChange(key_id, before, kw.account, partition))
        verdicts = Verdicts()
        for key_id, kw in touched.items():
            if d := self._evaluate(key_id, kw, now):
                verdicts.decisions.append(d)
        verdicts.notifications = self._notifications(touched.items(), now)
        # Refused requests count nothing but say where the traffic is: they re-divide too.
        fastest: dict[str, float] = {}
        for reports in (nodes or {}).values():
            for node_id, report in reports.items():
                fastest[node_id] = min(fastest.get(node_id, math.inf), report.fastest_ms)
        for node_id, ms in fastest.items():
            self.nodes_seen[node_id] = now
            if ms < math.inf:
                took, was = ms / 1000.0, self.node_serving.get(node_id)
                self.node_serving[node_id] = took if was is None else was + (took - was) * _SERVING_WEIGHT
        for (partition, key_id), reports in (nodes or {}).items():
            found = touched.get(key_id) or self._in(partition, key_id)
            if found is not None and (a := self._allot(key_id, found, reports, now)):
                verdicts.allowances.append(a)
        self._log(verdicts)
        return verdicts

    def evaluate_all(self, partitions: Iterable[int]) -> list[Decision]:
        """After a rebuild: block keys already over a limit that hold no block yet."""
        now = self.clock()
        decisions = []
        for p in partitions:
            for key_id, kw in self.partitions.get(p, WindowCounters()).keys.items():
                if d := self._evaluate(key_id, kw, now):
                    decisions.append(d)
        self._log(Verdicts(decisions))
        return decisions

    def notify_all(self, partitions: Iterable[int]) -> list[Notification]:
        """After a rebuild (and the tracker's ``restore``): thresholds the keys of ``partitions``
        are past and that were not notified yet."""
        keys = [kv for p in partitions for kv in self.partitions.get(p, WindowCounters()).keys.items()]
        return self._notifications(keys, self.clock())

    def tick(self) -> list[Decision]:
        """Unblock (or re-block for a longer window) the keys whose block has run out."""
        now = self.clock()
        decisions = []
        while self._expiry and self._expiry[0][0] <= now:
            until, key_id = heapq.heappop(self._expiry)
            block = self.blocks.get(key_id)
            if block is None or block.operator or block.until != until:
                continue  # superseded by a longer block, an operator decision or a revoke
            del self.blocks[key_id]
            kw = self._find(key_id)
            follow_up = self._evaluate(key_id, kw, now) if kw is not None else None
            unblock = self._decision(key_id, DecisionAction.unblock, block.window, now, shadow=block.shadow)
            decisions.append(follow_up or unblock)
        for key_id in [k for k, t in self.pardons.items() if t <= now]:
            del self.pardons[key_id]
        for key_id in [k for k, hk in self.hot.items() if hk.until <= now]:
            del self.hot[key_id]  # its hot windows are over; nodes drop its allowances at their end
        ttl = self.allowance.node_ttl_s
        for node_id in [n for n, t in self.nodes_seen.items() if t < now - ttl]:
            del self.nodes_seen[node_id]
            self.node_serving.pop(node_id, None)
        self._log(Verdicts(decisions))
        return decisions

    def expire_idle(self) -> int:
        """Forget keys idle today, except those with a monthly quota and a count this month."""
        now = self.clock()
        if self.thresholds is not None:
            self.thresholds.expire(now)
        month = month_bounds(now)[0]

        def keep(key_id: str, kw: KeyWindows) -> bool:
            return kw.month == month and kw.month_n > 0 and self._has_month(key_id, kw.account)

        dropped = sum(c.expire(now, keep) for c in self.partitions.values())
        self._forget_versions()
        return dropped

    def _forget_versions(self) -> None:
        """The last versions of keys neither live nor blocked nor hot: one entry per key ever
        decided or allotted would grow without end. A later version of such a key is the clock in
        µs (``next_version``), newer than any it had as long as the clock moved on."""

        def idle(key_id: str) -> bool:
            return key_id not in self.blocks and key_id not in self.hot and self._find(key_id) is None

        for versions in (self.versions, self.allowance_versions):
            for key_id in [k for k in versions if idle(k)]:
                del versions[key_id]

    def _has_month(self, key_id: str, account: str) -> bool:
        return self.policies.resolve(key_id, account).per_month is not None

    def redivide(self) -> list[Allowance]:
        """Divide again the hot keys whose last division held part of the remainder back (a
        division settling, or reserves for nodes whose traffic may have stopped): nodes waiting
        at such a cap get the part that is no longer needed elsewhere."""
        now = self.clock()
        allowances = []
        for key_id in [k for k, hk in self.hot.items() if hk.held_back]:
            kw = self._find(key_id)
            if kw is not None and (a := self._allot(key_id, kw, {}, now)):
                allowances.append(a)
        self._log(Verdicts(allowances=allowances))
        return allowances

    def seen_allowance(self, allowance: Allowance | AllowanceVersion) -> None:
        """An allowance on the topic (ours or a previous owner's): versions keep rising."""
        held = self.allowance_versions.get(allowance.key_id, 0)
        self.allowance_versions[allowance.key_id] = max(held, allowance.version)

    # -- decisions seen on the topic (ours, other workers', operators') ----------------
    def seen(self, decision: Decision) -> None:
        key_id = decision.key_id
        if decision.version <= self.versions.get(key_id, 0):
            return
        self.versions[key_id] = decision.version
        until = decision.until.timestamp() if decision.until else float("inf")
        if decision.source == "operator":
            if decision.action is DecisionAction.block:
                self.blocks[key_id] = ActiveBlock(Window.manual, until, operator=True)
            else:
                self.blocks.pop(key_id, None)
                kw = self._find(key_id)
                if kw is not None:
                    self.pardons[key_id] = self._exceeded_until(key_id, kw, self.clock()) or 0.0
        else:
            self.restore(decision)

    def restore(self, decision: Decision) -> None:
        """Take over a worker-made block still in force for an owned key (after a rebuild),
        so it is not published again and its unblock comes at its end."""
        key_id = decision.key_id
        if decision.source == "operator":
            if decision.action is DecisionAction.block:
                until = decision.until.timestamp() if decision.until else float("inf")
                if until > self.clock():
                    self.blocks[key_id] = ActiveBlock(Window.manual, until, operator=True)
            return
        if self._find(key_id) is None:
            return
        self.versions[key_id] = max(self.versions.get(key_id, 0), decision.version)
        until = decision.until.timestamp() if decision.until else float("inf")
        held = self.blocks.get(key_id)
        if decision.action is DecisionAction.block:
            if until > self.clock() and (held is None or held.until < until):
                self._hold(key_id, ActiveBlock(decision.window, until, shadow=decision.shadow))
        elif held is not None and not held.operator:
            del self.blocks[key_id]

    # -- internals ---------------------------------------------------------------------
    def _in(self, partition: int, key_id: str) -> KeyWindows | None:
        counters = self.partitions.get(partition)
        return counters.keys.get(key_id) if counters is not None else None

    def _allot(self, key_id: str, kw: KeyWindows, reports: Mapping[str, NodeReport], now: float) -> Allowance | None:
        """The key's allowance if it is hot and a cap changed since the last one, else None."""
        if ROUTE_MARK in key_id:  # route limits are not divided: nodes count them on their own
            return None
        policy = self.policies.resolve(key_id, kw.account)
        threshold = self.allowance.threshold
        hot_windows = []
        if self.policies.is_shadow(policy):  # nodes refuse nothing under it: nothing to divide
            self.hot.pop(key_id, None)
            return None
        hk = self.hot.get(key_id)
        # A node's count runs ahead of the worker's by the requests it still serves: without
        # any (most keys, every fetch) the nodes' counts need no look.
        by_nodes = hk is not None or _serving(reports)
        for window in _ALLOWANCE_WINDOWS:
            limit = policy.limit(window)
            if limit is None:
                continue
            count, bar = kw.count(window, now), threshold * limit
            if count >= bar or (count and by_nodes and _hot_by_nodes(hk, reports, window, kw.start(window), bar)):
                hot_windows.append((window, limit, count))
        if not hot_windows:
            self.hot.pop(key_id, None)
            return None
        if hk is None:
            hk = self.hot[key_id] = HotKey()
        for node_id, report in reports.items():
            use = hk.nodes.get(node_id)
            if use is None:
                use = hk.nodes[node_id] = NodeUse()
            use.arrived(report.arrivals, report.first_ts, report.last_ts, now)
            hk.took(report.slowest_ms / 1000.0, now)
            if report.counts is not None:
                use.serving(window_start(Window.minute, report.epoch), report.in_flight)
                for window, n in zip(_NODE_WINDOWS, report.counts, strict=True):
                    use.report(window, window_start(window, report.epoch), n)
        hk.held_back = False
        at_a_cap = hk.at_a_cap([(window, kw.start(window)) for window, _, _ in hot_windows])
        windows = [
            self._divide_window(hk, kw, window, limit, count, now, at_a_cap) for window, limit, count in hot_windows
        ]
        hk.holding = frozenset(at_a_cap)  # for the next division's floors
        caps = tuple(
            (w.window, w.start, w.others, w.settling, tuple(sorted((n, g.cap) for n, g in w.grants.items())))
            for w in windows
        )
        if caps == hk.last:
            return None
        if hk.sent and not hk.worth_sending(windows, self.allowance.pooled, self.allowance.renew_s, now):
            hk.keep_sent()
            return None
        hk.last, hk.sent = caps, windows
        version = next_version(self.allowance_versions.get(key_id, 0), now)
        self.allowance_versions[key_id] = version
        self.allowances_issued += 1
        return Allowance(key_id=key_id, version=version, decided_at=to_datetime(now), windows=windows)

    def _divide_window(
        self, hk: HotKey, kw: KeyWindows, window: Window, limit: int, count: int, now: float, at_a_cap: set[str]
    ) -> WindowAllowance:
        """One hot window's division. While it settles (``settle_s`` after it turned hot, when a
        burst may be under way on several nodes at once), every node may still be admitting its
        burst share before the division reaches it: that is held back for each (the silent known
        nodes' whole shares, the listed ones' rest of it) and the remainder is divided strictly
        (the parts add up to it, no pooling): nodes bursting together cannot each take the same
        remainder, and together they admit at most the limit or their burst shares.

        Later divisions stay strict once the window is contended (``HotKey.divide``)."""
        start = kw.start(window)
        listed = {
            node_id: (used, use.rate_at(now))
            for node_id, use in hk.nodes.items()
            if (used := use.used(window, start)) is not None
        }
        hk.forget_windows_over(now)
        # The listed nodes' counts hold the requests they admitted and still serve; the worker's
        # count does not (their events come when they end): without these the caps would add
        # up to the limit plus the requests in flight.
        in_flight = sum(hk.nodes[node_id].in_flight_in(window, start) for node_id in listed)
        count += in_flight
        here = (window, start)
        settling = self._settling(hk, here, listed, in_flight > 0, now)
        held: tuple[int, int] | None = None
        if settling:
            share = math.ceil(self.allowance.burst_share * limit)
            held = (share, share * sum(1 for node_id in self.nodes_seen if node_id not in listed))
        division = hk.divide(here, listed, limit, count, held, self.allowance, now, at_a_cap)
        end = start + WINDOW_SECONDS[window]
        hk.until = max(hk.until, end)
        allowance = WindowAllowance(
            window=window,
            start=to_datetime(start),
            until=to_datetime(end),
            limit=limit,
            count=count,
            grants=division.grants,
            others=division.others,
            settling=settling,
        )
        hk.held_back |= any(allowance.may_grow(g) for g in division.grants.values())
        return allowance

    def _settling(
        self, hk: HotKey, here: tuple[Window, int], listed: Mapping[str, object], serving: bool, now: float
    ) -> bool:
        """Whether the division of ``here`` still settles: ``settle_s`` after the window turned
        hot, longer when a node not heard from may be serving its whole burst share of the key
        unseen (its events come when those requests end), up to ``serving_settle_s``: while the
        listed nodes still serve requests of the key, by the longest one of them took this minute;
        and by the time a silent node takes to serve a request (``node_serving``: a node whose
        requests all take long). Settled once, for the rest of the window."""
        if here in hk.settled:
            return False
        elapsed = now - hk.since.setdefault(here, now)
        settle_s = self.allowance.settle_s
        if elapsed < settle_s:
            return True
        silent = max((self.node_serving.get(n, 0.0) for n in self.nodes_seen if n not in listed), default=0.0)
        longest = settle_s + max(hk.slowest if serving else 0.0, silent)
        if elapsed < min(self.allowance.serving_settle_s, longest):
            return True
        hk.settled.add(here)
        return False

    def _notifications(self, keys: Iterable[tuple[str, KeyWindows]], now: float) -> list[Notification]:
        if self.thresholds is None:
            return []
        crossed, resolve = self.thresholds.crossed, self.policies.resolve
        return [n for key_id, kw in keys for n in crossed(key_id, kw, resolve(key_id, kw.account), now)]

    def _find(self, key_id: str) -> KeyWindows | None:
        for counters in self.partitions.values():
            kw = counters.keys.get(key_id)
            if kw is not None:
                return kw
        return None

    def _exceeded(self, key_id: str, kw: KeyWindows, now: float) -> tuple[Window, int, int, float] | None:
        """The exceeded window that ends last: (window, limit, count, end), if any."""
        policy = self.policies.resolve(key_id, kw.account)
        # Fast path for the common key far from its limits: a counter holds the count of its
        # window (or of an older one, which ``count`` reads as 0), so raw counts all below
        # their limits mean no current window is exceeded either.
        per_minute, per_hour, per_day, per_month = policy.per_minute, policy.per_hour, policy.per_day, policy.per_month
        if (
            (per_minute is None or kw.minute_n < per_minute)
            and (per_hour is None or kw.hour_n < per_hour)
            and (per_day is None or kw.day_n < per_day)
            and (per_month is None or kw.month_n < per_month)
        ):
            return None
        for window in AUTOMATIC_WINDOWS:  # longest first
            limit = policy.limit(window)
            if limit is None:
                continue
            count = kw.count(window, now)
            if count >= limit:
                return window, limit, count, window_end(window, kw.start(window))
        return None

    def _exceeded_until(self, key_id: str, kw: KeyWindows, now: float) -> float | None:
        hit = self._exceeded(key_id, kw, now)
        return hit[3] if hit else None

    def _evaluate(self, key_id: str, kw: KeyWindows, now: float) -> Decision | None:
        hit = self._exceeded(key_id, kw, now)
        if hit is None:
            return None
        window, limit, count, until = hit
        held = self.blocks.get(key_id)
        if held is not None and held.until > now and (held.operator or held.until >= until):
            return None  # already blocked at least that long (an operator block while it lasts)
        if self.pardons.get(key_id, 0.0) >= until:
            return None  # an operator lifted this block for the rest of the window
        shadow = self.policies.is_shadow(self.policies.resolve(key_id, kw.account))
        self._hold(key_id, ActiveBlock(window, until, shadow=shadow))
        return self._decision(
            key_id,
            DecisionAction.block,
            window,
            now,
            limit=limit,
            count=count,
            until=until,
            reason=f"{count} requests in the current {window.value} >= limit {limit} "
            f"({self.policies.source(key_id, kw.account)}{', shadow: nodes do not refuse' if shadow else ''})",
            shadow=shadow,
        )

    def guard_block(self, key_id: str, until: float, reason: str, shadow: bool) -> Decision | None:
        """An abuse guard's block of a key this worker owns (``worker.limits.guards``), unless a
        block is already in force on it (a guard's block is not extended while it lasts)."""
        now = self.clock()
        held = self.blocks.get(key_id)
        if self._find(key_id) is None or (held is not None and held.until > now):
            return None
        self._hold(key_id, ActiveBlock(Window.manual, until, shadow=shadow))
        return self._decision(
            key_id, DecisionAction.block, Window.manual, now, until=until, reason=reason, shadow=shadow, source="guard"
        )

    def _hold(self, key_id: str, block: ActiveBlock) -> None:
        self.blocks[key_id] = block
        heapq.heappush(self._expiry, (block.until, key_id))

    def _decision(
        self,
        key_id: str,
        action: DecisionAction,
        window: Window,
        now: float,
        limit: int | None = None,
        count: int | None = None,
        until: float | None = None,
        reason: str = "",
        shadow: bool = False,
        source: str = "worker",
    ) -> Decision:
        version = next_version(self.versions.get(key_id, 0), now)
        self.versions[key_id] = version
        return Decision(
            key_id=key_id,
            action=action,
            window=window,
            limit=limit,
            count=count,
            until=to_datetime(until) if until is not None else None,
            reason=reason or ("window rolled over" if action is DecisionAction.unblock else ""),
            version=version,
            decided_at=to_datetime(now),
            source=source,
            shadow=shadow,
        )

    def _log(self, verdicts: Verdicts) -> None:
        if verdicts.allowances and log.isEnabledFor(logging.DEBUG):
            for a in verdicts.allowances:
                caps = [
                    (w.window.value, w.count, w.others, {n: (g.used, g.cap) for n, g in w.grants.items()})
                    for w in a.windows
                ]
                log.debug("allowance %s v%d: %s", a.key_id, a.version, caps)
        if verdicts.decisions:
            self.decisions_published += len(verdicts.decisions)
            for d in verdicts.decisions:
                self.published_by_action[d.action.value] += 1
                log.info(
                    "%s %s (%s window, until %s): %s",
                    d.action.value,
                    d.key_id,
                    d.window.value,
                    d.until.isoformat() if d.until else "-",
                    d.reason,
                )
