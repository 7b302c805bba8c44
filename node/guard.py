"""The node's own guard: what this node admitted per key and window, checked before admitting.

Pure and synchronous (no I/O, the caller passes the time). Every window of a key is checked
before any is counted (a request refused by one window uses up none). A node never admits
past a key's limit on its own, whatever it has heard from the worker, so one node alone is
exact; across nodes, the allowances the worker publishes cap what this node may take of the
key's remainder. Before the worker has divided a window (no allowance yet), a node admits only
its ``burst_share`` of the limit on its own; past it the request *waits* (``RefusedBy.awaiting``:
the caller holds it for the division, a few ms, then asks again), so a burst spread over many
nodes cannot spend the limit several times over before the worker hears of it, while one node
bursting alone is only delayed. A node at a cap that may still grow (it is not listed yet, or
part of the remainder was held back from it) waits too, for the next division. Memory is
bounded: past ``max_keys`` the least recently seen key is forgotten (its counts start again
from zero here; the worker's count and blocks still hold).

The calendar month (a quota, ``LimitPolicy.per_month``) is a fourth window of this node's own
count, checked like the others, but never divided into allowances and never subject to the
burst share (the worker does not divide it): across nodes, the worker's block decision
enforces it. A node's month count starts from zero when it restarts or forgets the key, so
it only ever refuses later than the cluster-wide count would.

Counts are sums of cost: a request spends its route's cost (default 1) of every window. A
route with limits of its own (``PolicyBook``: key x route) is a second subject, ``key@route``,
counted here beside the key: checked like the month, on this node's own count only (no
allowances, no burst share); across nodes, the worker's block decision on the subject holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from schemas.allowances import MAX_DIVISION_WAIT_S, Allowance, WindowAllowance
from schemas.decisions import Window, month_bounds, window_end, window_seconds, window_start
from schemas.limits import LimitPolicy, PolicyBook, route_subject

# The windows a node counts: the first three in the order of an event's node_counts (and the
# only ones divided into allowances), then the calendar month.
_WINDOWS = (Window.minute, Window.hour, Window.day, Window.month)
_DIVIDED = 3  # _WINDOWS[:_DIVIDED]: reported in node_counts, divided into allowances
_MONTH = 3
# A time this far before a key's current minute is a clock set back, not a late request (a
# request waits for the division at most node_burst_wait_ms, 10 s).
_CLOCK_STEP_S = 15.0


class RefusedBy(StrEnum):
    local_limit = "local_limit"  # this node alone has admitted the limit
    allowance = "allowance"  # this node has used its share of what remains cluster-wide
    awaiting = "awaiting"  # not final: wait for the worker's division, then ask again


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the guard refused: enough for a 429 that explains itself."""

    by: RefusedBy
    window: Window
    limit: int
    count: int  # this node's count in the window (local limit) or the key's count the cap was made from
    until: float  # epoch seconds: the window's end
    version: int | None = None  # the allowance's version
    cap: int | None = None  # the node's cap from that allowance
    shadow: bool = False  # the policy is a dry run: the request is admitted (and counted) anyway
    route: str | None = None  # a route limit refused (the key's own limits admitted)
    # Awaiting a division that settles: the worker holds back shares for nodes it has not heard
    # from, and divides again once it has (or its settling ends): worth waiting longer for.
    settling: bool = False


@dataclass(frozen=True, slots=True)
class Headroom:
    """The tightest window as this node sees it (for ``RateLimit-*`` headers)."""

    limit: int
    remaining: int
    reset_s: int
    window: Window
    window_s: int = 0  # the window's length (a month's varies): RateLimit-Policy's w=


class _KeyState:
    __slots__ = ("account", "allowance", "anchors", "applied", "counts", "starts", "waived")

    def __init__(self, account: str) -> None:
        self.account = account
        self.starts = [0, 0, 0, 0]  # window starts (epoch s) of minute, hour, day, month
        self.counts = [0, 0, 0, 0]
        self.allowance: Allowance | None = None
        self.applied = 0.0  # when this node applied it (its own clock: the worker's may be skewed)
        self.waived = [0, 0, 0, 0]  # windows (by start) where waiting gave up: no burst share there
        # (window index, window start) -> this node's count when it first held an allowance of
        # that window without being listed: ``others`` is counted from there.
        self.anchors: dict[tuple[int, int], int] | None = None

    def roll(self, now: float) -> None:
        """Start the windows ``now`` is past. Forward only: a time a little before the current
        windows (a request that waited for the division while another moved the key on) is
        counted in them; going back to its windows would forget the current ones' counts. A
        time further back than a window's start is the clock set back out of that window: it
        starts over from ``now`` (else one request seen while the clock ran ahead would hold the
        key in that future window). The windows ``now`` is still in keep their counts."""
        for i in range(4):
            if now < self.starts[i] - _CLOCK_STEP_S:
                self.starts[i], self.counts[i] = 0, 0
                if self.anchors:
                    self.anchors = {at: n for at, n in self.anchors.items() if at[0] != i} or None
        rolled = False
        for i in range(_DIVIDED):
            start = window_start(_WINDOWS[i], now)
            if start > self.starts[i]:
                self.starts[i], self.counts[i] = start, 0
                rolled = True
        if rolled and self.anchors:
            # Only the current windows' anchors are ever read: a busy key kept every window's.
            self.anchors = {at: n for at, n in self.anchors.items() if at[1] == self.starts[at[0]]} or None
        month = month_bounds(now)[0]  # cached: no calendar arithmetic within a month
        if month > self.starts[_MONTH]:
            self.starts[_MONTH], self.counts[_MONTH] = month, 0


class LocalGuard:
    def __init__(self, policies: PolicyBook, node_id: str, max_keys: int = 200_000, burst_share: float = 1.0) -> None:
        self.policies = policies
        self.node_id = node_id
        self.max_keys = max_keys
        self.burst_share = burst_share
        self.shadow_refusals = 0  # requests a shadow policy would have refused, served all the same
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()
        self.forgotten = 0
        self.allowances_applied = 0
        self.allowances_stale = 0

    def __len__(self) -> int:
        return len(self._keys)

    # -- the request path ----------------------------------------------------------------

    def admit(
        self, key_id: str, account: str, now: float, final: bool = False, cost: int = 1, route: str | None = None
    ) -> Refusal | None:
        """Count one request of ``key_id`` (``cost`` in every window; its route's too, if the
        route has limits) if every window has room; else say which refused.

        ``final``: the caller has waited for the division long enough: the burst share is
        waived for the rest of the window (only the limit holds) and an unlisted node's used-up
        part refuses."""
        state = self._state(key_id, account, now)
        policy = self.policies.resolve(key_id, state.account)
        shadow = self.policies.is_shadow(policy)
        # A dry run never makes a request wait: the first answer is the final one.
        refusal = self._check(policy, state, now, final or shadow, cost)
        if refusal is not None and not shadow:
            return refusal
        on_route: _KeyState | None = None
        if route is not None:
            subject = route_subject(key_id, route)
            route_policy = self.policies.resolve(subject, state.account)
            if _limited(route_policy):
                on_route = self._state(subject, state.account, now)
                # Checked on this node's count alone (``on_route`` never holds an allowance).
                by_route = self._check(route_policy, on_route, now, True, cost)
                if by_route is not None:
                    by_route = dataclasses.replace(by_route, route=route)
                    if not self.policies.is_shadow(route_policy):
                        return by_route  # refused: counts nothing, the key's windows neither
                    refusal = refusal or dataclasses.replace(by_route, shadow=True)
        for counted in (state, on_route):
            if counted is not None:
                for i in range(4):
                    counted.counts[i] += cost
        if refusal is not None and shadow:
            return dataclasses.replace(refusal, shadow=True)
        return refusal

    def record(self, key_id: str, account: str, now: float) -> None:
        """Count a request that is not subject to the check (e.g. a 403: the worker counts it too)."""
        state = self._state(key_id, account, now)
        for i in range(4):
            state.counts[i] += 1

    def counts(self, key_id: str, now: float) -> list[int] | None:
        """This node's own minute/hour/day counts of the key in the windows of ``now`` (what its
        events report); None if the key has moved on to a later minute since (a request that
        ended after others started the next window: the counts of its windows are gone)."""
        state = self._keys.get(key_id)
        if state is None or window_start(_WINDOWS[0], now) < state.starts[0]:
            return None
        state.roll(now)
        return state.counts[:_DIVIDED]

    def headroom(self, key_id: str, now: float) -> Headroom | None:
        state = self._keys.get(key_id)
        if state is None:
            return None
        state.roll(now)
        policy = self.policies.resolve(key_id, state.account)
        best: Headroom | None = None
        for i, window in enumerate(_WINDOWS):
            limit = policy.limit(window)
            if limit is None:
                continue
            room = limit - state.counts[i]
            capped = self._cap(state, i, now)
            if capped is not None:
                room = min(room, capped[0] - state.counts[i])
            reset = max(1, int(window_end(window, state.starts[i]) - now + 0.999))
            if best is None or room < best.remaining:
                best = Headroom(limit, max(0, room), reset, window, window_seconds(window, state.starts[i]))
        return best

    # -- allowances ----------------------------------------------------------------------

    def apply(self, allowance: Allowance, now: float) -> bool:
        """Hold ``allowance`` if it is newer than the one held and not over; return whether it was."""
        live = [w for w in allowance.windows if w.until.timestamp() > now]
        state = self._keys.get(allowance.key_id)
        if state is not None and state.allowance is not None and allowance.version <= state.allowance.version:
            self.allowances_stale += 1
            return False
        if not live:
            return False
        if state is None:
            state = self._state(allowance.key_id, "", now)
        state.roll(now)
        state.allowance, state.applied = allowance, now
        self.allowances_applied += 1
        for w in live:
            if w.window not in _WINDOWS[:_DIVIDED]:
                continue  # the worker divides minute, hour and day only
            i = _WINDOWS.index(w.window)
            if int(w.start.timestamp()) != state.starts[i]:
                continue
            grant = w.grants.get(self.node_id)
            if grant is not None:
                # What the worker has seen of this node cannot be more than it admitted: a node
                # that restarted takes its count back from there.
                state.counts[i] = max(state.counts[i], grant.used)
            else:
                anchors = state.anchors if state.anchors is not None else {}
                anchors.setdefault((i, state.starts[i]), state.counts[i])
                state.anchors = anchors
        return True

    def allowance(self, key_id: str) -> Allowance | None:
        state = self._keys.get(key_id)
        return state.allowance if state is not None else None

    # -- internals -----------------------------------------------------------------------

    def _state(self, key_id: str, account: str, now: float) -> _KeyState:
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState(account)
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
                self.forgotten += 1
        else:
            self._keys.move_to_end(key_id)
            if account and state.account != account:
                state.account = account
        state.roll(now)
        return state

    def _check(self, policy: LimitPolicy, state: _KeyState, now: float, final: bool, cost: int) -> Refusal | None:
        """The final refusal (for a request of ``cost``) whose window ends last (waiting for an
        earlier end would only be refused again), else a reason to wait, else None."""
        refusal: Refusal | None = None
        wait: Refusal | None = None
        settling = False  # some window awaits a division that settles: worth waiting longer for
        for i, window in enumerate(_WINDOWS):
            limit = policy.limit(window)
            if limit is None:
                continue
            until = window_end(window, state.starts[i])
            count = state.counts[i]
            if count + cost > limit:
                refusal = Refusal(RefusedBy.local_limit, window, limit, count, until)
                continue
            capped = self._cap(state, i, now)
            if capped is not None:
                cap, held, version = capped
                if count + cost > cap:
                    # Not final while the next division may give more: this node is not listed
                    # yet, or part of the remainder was held back from it (for other nodes'
                    # requests in flight, or while the division settles).
                    grant = held.grants.get(self.node_id)
                    may_grow = grant is None or held.may_grow(grant)
                    by = RefusedBy.awaiting if may_grow and not final else RefusedBy.allowance
                    found = Refusal(by, window, held.limit, held.count, until, version, cap)
                    if by is RefusedBy.awaiting:
                        wait = found
                        settling |= _settles(held, state.applied, now)
                    else:
                        refusal = found
            elif i < _DIVIDED and state.waived[i] != state.starts[i] and count + cost > self._share(limit):
                if final:
                    state.waived[i] = state.starts[i]
                else:
                    wait = Refusal(RefusedBy.awaiting, window, limit, count, until)
        if refusal is None and wait is not None and settling:
            return dataclasses.replace(wait, settling=True)
        return refusal or wait

    def _share(self, limit: int) -> int:
        """What this node admits of ``limit`` on its own before the worker divides the window."""
        return math.ceil(self.burst_share * limit)

    def _cap(self, state: _KeyState, i: int, now: float) -> tuple[int, WindowAllowance, int] | None:
        """(this node's cap, the window's allowance, its version) if one holds for window ``i`` now."""
        allowance = state.allowance
        if allowance is None or i >= _DIVIDED:
            return None
        held = allowance.for_window(_WINDOWS[i])
        if held is None or int(held.start.timestamp()) != state.starts[i] or held.until.timestamp() <= now:
            return None
        grant = held.grants.get(self.node_id)
        if grant is not None:
            return grant.cap, held, allowance.version
        # Counted from this node's count when it first holds the allowance in the window: also
        # one applied before this node reached the window (its clock a little behind), which
        # ``apply`` could not anchor. Read without an anchor, the cap would move with every
        # admission.
        if state.anchors is None:
            state.anchors = {}
        base = state.anchors.setdefault((i, state.starts[i]), state.counts[i])
        if held.settling:  # the worker holds this node's burst share back for it: that, no more
            return max(base, self._share(held.limit)), held, allowance.version
        return base + held.others, held, allowance.version


def _settles(held: WindowAllowance, applied: float, now: float) -> bool:
    """Whether ``held``, applied here at ``applied``, is a division still settling: the worker
    settles one within half of ``MAX_DIVISION_WAIT_S``, so an older one is not waited on (a
    worker gone quiet since must not hold every request of the key that long)."""
    return held.settling and now - applied < MAX_DIVISION_WAIT_S


def _limited(policy: LimitPolicy) -> bool:
    """Whether ``policy`` limits any window (a route without limits is not counted apart)."""
    return (
        policy.per_minute is not None
        or policy.per_hour is not None
        or policy.per_day is not None
        or policy.per_month is not None
    )
