"""Allowances (capacity leases): how much of a hot key's remaining limit each node may admit.

The worker that owns a key publishes one ``Allowance`` per key (message key = key_id) on a
compacted topic when the key's count passes a fraction of a limit, and a new version each
time it re-divides. Counts are the node's own: a node admits a request in ``window`` only
while its own count of the key in that window is below its ``cap`` (absolute, so requests
it admitted before the allowance arrived are charged to it). A node not listed may admit
``others`` more, counted from the moment it first holds an allowance of that window; while the
division is ``settling`` (the worker holds back the burst shares of nodes it has not heard from
yet), a node not listed may admit its own burst share and no more until it is listed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.bounds import Count, Identifier, Timestamp, Version
from schemas.decisions import Window

# The longest a node holds a request for the worker's division while the node still serves
# requests of its key (the worker hears of a request when it ends) or the division it holds
# is ``settling``. The worker settles a division within half of it, so the requests held
# meanwhile get it in time.
MAX_DIVISION_WAIT_S = 2.0


class NodeGrant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    used: Count  # the node's own count in the window, as its latest event reported it
    cap: Count  # the node admits while its own count is below this


class WindowAllowance(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    window: Window
    start: Timestamp
    until: Timestamp  # the window's end: the allowance is void after it
    limit: Count
    count: Count  # the key's count in the window as the worker has seen it
    grants: dict[Identifier, NodeGrant] = Field(default_factory=dict, max_length=1024)
    others: Count = 0
    # The division is settling: nodes not listed admit their burst share (which the worker holds
    # back for them), not ``others``; records without it parse as before (False).
    settling: bool = False

    def may_grow(self, grant: NodeGrant) -> bool:
        """Whether part of the remainder was held back from the node of ``grant``: at that cap
        it waits for the next division instead of refusing (the node's guard), and the worker
        divides again what it held back (its re-division)."""
        return grant.cap < grant.used + self.limit - self.count


class Allowance(BaseModel):
    """The allowances of one key for its hot windows; a node applies only a newer ``version``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key_id: Identifier
    version: Version
    decided_at: Timestamp
    windows: list[WindowAllowance] = Field(default_factory=list, max_length=3)

    def for_window(self, window: Window) -> WindowAllowance | None:
        for w in self.windows:
            if w.window is window:
                return w
        return None


class AllowanceVersion(BaseModel):
    """What a worker needs of an allowance on the topic: whose and which version (so the next one
    it publishes for that key is newer). Parsing only these is ~4× cheaper than the whole
    ``Allowance``, and every worker reads every allowance any worker publishes."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key_id: Identifier
    version: Version
