"""What a node is still serving of each key: requests admitted and counted, their events not
sent yet (the worker hears of a request when it ends). Each event tells the worker how much of
its minute's count that is (``node_in_flight``), and a request waiting for the worker's division
waits longer while there is some (``InFlight.deadline``)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from schemas.allowances import MAX_DIVISION_WAIT_S
from schemas.decisions import Window, window_start


@dataclass(frozen=True, slots=True)
class Serving:
    """A request admitted and counted, being served: ``InFlight.end`` takes it back."""

    key_id: str
    cost: int
    minute: int  # the start of the minute it was counted in


class InFlight:
    """The cost of each key's requests admitted, counted and still being served (their events
    not sent yet), per minute they were counted in: the worker has not counted them, and each
    event tells it how many of its minute there are. Also when each key's latest request
    ended (for ``deadline``), on ``clock`` (the event loop's)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_minute: dict[tuple[str, int], int] = {}  # (key id, minute start) -> cost; only while any
        self._by_key: dict[str, int] = {}  # key id -> requests being served, any minute
        self._ended: OrderedDict[str, float] = OrderedDict()  # key id -> its latest end, oldest first

    def start(self, key_id: str, cost: int, epoch: float) -> Serving:
        minute = window_start(Window.minute, epoch)
        slot = (key_id, minute)
        self._by_minute[slot] = self._by_minute.get(slot, 0) + cost
        self._by_key[key_id] = self._by_key.get(key_id, 0) + 1
        return Serving(key_id, cost, minute)

    def end(self, serving: Serving) -> None:
        slot = (serving.key_id, serving.minute)
        left = self._by_minute.get(slot, 0) - serving.cost
        if left > 0:
            self._by_minute[slot] = left
        else:
            self._by_minute.pop(slot, None)
        requests = self._by_key.get(serving.key_id, 0) - 1
        if requests > 0:
            self._by_key[serving.key_id] = requests
        else:
            self._by_key.pop(serving.key_id, None)
        now = self._clock()
        self._ended[serving.key_id] = now
        self._ended.move_to_end(serving.key_id)
        while self._ended and next(iter(self._ended.values())) < now - MAX_DIVISION_WAIT_S:
            self._ended.popitem(last=False)  # only the recent ends are ever read

    def of(self, key_id: str, epoch: float) -> int:
        """The cost being served of ``key_id``'s requests counted in the minute of ``epoch``."""
        return self._by_minute.get((key_id, window_start(Window.minute, epoch)), 0)

    def deadline(self, key_id: str, since: float, burst_wait_s: float, settling: bool = False) -> float:
        """Until when a request of ``key_id`` past its burst share, waiting since ``since``, may
        wait for a division: ``burst_wait_s`` after it came or after the key's latest request on
        this node ended, whichever is later (the worker divides once it has heard of them), and
        as long as the node still serves some or the division it holds is ``settling`` (the
        worker divides again once it has heard from the nodes it waits for, or stops waiting);
        never past ``MAX_DIVISION_WAIT_S``."""
        longest = since + max(burst_wait_s, MAX_DIVISION_WAIT_S)
        if settling or key_id in self._by_key:
            return longest
        return min(max(since, self._ended.get(key_id, since)) + burst_wait_s, longest)

    def __len__(self) -> int:
        return len(self._by_key)
