"""A discrete-event model of a cluster on one simulated clock: N nodes (the real ``LocalGuard``
and the middleware's admission loop: a request past a cap that may still grow waits for the next
allowance, at most ``burst_wait`` s (longer while it serves requests of the key), then gets a
final answer) and
one worker (the real fast lane grouping, ``group_batch``, and ``LimitEngine``). Requests take
``serve`` s to serve; each one's event is published when it ends, with the node's counts then and
what of them is still being served (``node_in_flight``), as the middleware reports them.
Deterministic: no wall clock.

The middleware's loop is modelled, not imported (it awaits the decision cache); keep the two in
step (node/middleware.py ``_admit``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from node.guard import LocalGuard, RefusedBy
from node.in_flight import InFlight
from schemas.allowances import Allowance
from schemas.limits import LimitPolicy, PolicyBook
from tests.clock import Clock
from tests.unit.event_records import NOW, VALIDATOR, Rec, record
from worker.limits.engine import AllowancePolicy, LimitEngine
from worker.limits.fastlane import RecentRequests, group_batch
from worker.records import RecordChecker

BASE = NOW + timedelta(seconds=5)  # 5 s into a minute
T0 = BASE.timestamp()


@dataclass(eq=False)
class _Waiting:
    rid: int
    ts: float
    serve: float
    settling: bool = False  # the division it waits on settles (``Refusal.settling``)


@dataclass
class Cluster:
    nodes: int = 3
    limit: int = 100
    per_hour: int = 1_000
    burst_share: float = 0.34  # the product's defaults
    burst_wait: float = 0.25
    publish_lag: float = 0.003  # node -> topic -> the worker's fetch
    fetch_every: float = 0.01
    apply_lag: float = 0.005  # allowance -> every node
    redivide_every: float = 0.03
    admitted: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)  # how long each admitted request was held
    allowances_sent: int = 0

    def __post_init__(self) -> None:
        book = PolicyBook(LimitPolicy(per_minute=self.limit, per_hour=self.per_hour))
        self.clock = Clock(T0)
        policy = AllowancePolicy(threshold=0.3, lag_s=0.03, pooled=True, burst_share=self.burst_share, settle_s=0.12)
        self.engine = LimitEngine(book, self.clock, policy)
        self.engine.assign(0, [])
        self.guards = {
            f"n{i + 1}": LocalGuard(book, f"n{i + 1}", burst_share=self.burst_share) for i in range(self.nodes)
        }
        self.engine.nodes_seen.update(dict.fromkeys(self.guards, T0))  # the worker knows the cluster
        self.waiting: dict[str, list[_Waiting]] = {n: [] for n in self.guards}
        self.in_flight = {n: InFlight(lambda: self.clock.now) for n in self.guards}
        self.topic: list[tuple[float, Rec]] = []
        self.checker, self.recent = RecordChecker(VALIDATOR, None, None), RecentRequests(100_000)
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._offset = itertools.count()

    def request(self, node: str, rid: int, at: float, serve: float) -> None:
        """Key "k" asks ``node`` at ``at`` (s after the start) and takes ``serve`` s to serve."""
        ts = T0 + at
        self._at(ts, lambda: self._arrive(node, rid, ts, serve))

    def run(self, seconds: float = 5.0) -> None:
        self._at(T0 + 0.001, self._fetch)
        self._at(T0 + 0.002, self._redivide)
        while self._queue and self._queue[0][0] <= T0 + seconds:
            t, _, step = heapq.heappop(self._queue)
            self.clock.now = max(self.clock.now, t)
            step()

    # -- nodes ---------------------------------------------------------------------------
    def _at(self, t: float, step: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (t, next(self._seq), step))

    def _arrive(self, node: str, rid: int, ts: float, serve: float) -> None:
        self._try(node, _Waiting(rid, ts, serve), final=False)

    def _due(self, node: str, w: _Waiting) -> float:
        return self.in_flight[node].deadline("k", w.ts, self.burst_wait, w.settling)  # as the middleware's _admit

    def _deadline(self, node: str, w: _Waiting) -> None:
        if w not in self.waiting[node]:
            return
        due = self._due(node, w)  # it moves as the node's requests of the key end
        if due > self.clock.now:  # read again at least every burst wait, as the middleware does
            self._at(min(due, self.clock.now + self.burst_wait), lambda: self._deadline(node, w))
        else:
            self._try(node, w, final=True)

    def _try(self, node: str, w: _Waiting, final: bool) -> None:
        guard = self.guards[node]
        refusal = guard.admit("k", "acct", w.ts, final=final)
        if refusal is not None and refusal.by is RefusedBy.awaiting and not final:
            w.settling = refusal.settling
            if w not in self.waiting[node]:
                self.waiting[node].append(w)
                # read again at least every burst wait, as the middleware does
                self._at(min(self._due(node, w), self.clock.now + self.burst_wait), lambda: self._deadline(node, w))
            return
        if w in self.waiting[node]:
            self.waiting[node].remove(w)
        if refusal is not None:
            self.refused.append((w.rid, node))
            self._publish(node, w, 429)
            return
        self.admitted += 1
        self.waited.append(self.clock.now - w.ts)
        serving = self.in_flight[node].start("k", 1, w.ts)

        def end() -> None:
            self.in_flight[node].end(serving)
            self._publish(node, w, 200)

        self._at(self.clock.now + w.serve, end)

    def background(self, node: str, serve: float, every: float = 0.02, keys: int = 200) -> None:
        """Other keys' calls on ``node`` from the start, one every ``every`` s over ``keys`` keys
        (far below their limits), each taking ``serve`` s, their events published as they end:
        what the worker learns of how long the node's requests take."""
        calls = itertools.count()

        def call() -> None:
            i, ts = next(calls), self.clock.now
            key = f"b{i % keys}"
            self.guards[node].admit(key, "acct", ts)
            serving = self.in_flight[node].start(key, 1, ts)

            def end() -> None:
                self.in_flight[node].end(serving)
                self._publish_of(node, key, f"{node}-b{i}", ts, 200)

            self._at(ts + serve, end)
            self._at(ts + every, call)

        self._at(T0, call)

    def _publish(self, node: str, w: _Waiting, status: int) -> None:
        self._publish_of(node, "k", f"r{w.rid}", w.ts, status)

    def _publish_of(self, node: str, key: str, request_id: str, ts: float, status: int) -> None:
        counts = self.guards[node].counts(key, ts)
        rec = record(
            0,
            next(self._offset),
            request_id=request_id,
            key_id=key,
            account_id="acct",
            node_id=node,
            status=status,
            ts=BASE + timedelta(seconds=ts - T0),
            node_counts=counts,
            node_in_flight=self.in_flight[node].of(key, ts) if counts is not None else None,
            latency_ms=(self.clock.now - ts) * 1000.0,
        )
        self.topic.append((self.clock.now + self.publish_lag, rec))

    # -- the worker ----------------------------------------------------------------------
    def _fetch(self) -> None:
        now = self.clock.now
        ready = [r for t, r in self.topic if t <= now]
        self.topic = [(t, r) for t, r in self.topic if t > now]
        if ready:
            batch = group_batch(ready, self.checker, self.recent, now)
            self._send(self.engine.observe(batch.counts, batch.nodes).allowances)
        self._at(now + self.fetch_every, self._fetch)

    def _redivide(self) -> None:
        self._send(self.engine.redivide())
        self._at(self.clock.now + self.redivide_every, self._redivide)

    def _send(self, allowances: list[Allowance]) -> None:
        self.allowances_sent += len(allowances)
        for allowance in allowances:
            for node in self.guards:
                self._at(self.clock.now + self.apply_lag, self._deliver(node, allowance))

    def _deliver(self, node: str, allowance: Allowance) -> Callable[[], Any]:
        def step() -> None:
            self.guards[node].apply(allowance, self.clock.now)
            for w in list(self.waiting[node]):  # held requests are asked again at once
                if w in self.waiting[node]:
                    self._try(node, w, final=False)

        return step
