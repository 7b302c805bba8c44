"""Allowances (capacity leases): how much of a hot key's remaining limit each node may admit.

The worker that owns a key publishes one ``Allowance`` per key (message key = key_id) on a
compacted topic when the key's count passes a fraction of a limit, and a new version each
time it re-divides. Counts are the node's own: a node admits a request in ``window`` only
while its own count of the key in that window is below its ``cap`` (absolute, so requests
it admitted before the allowance arrived are charged to it). A node not listed may admit
``others`` more, counted from the moment it first holds an allowance of that window.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from schemas.decisions import Window

MAX_COUNT = 10**12  # far above any real window count; bounds what a bad record can claim
_Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
_NodeId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class NodeGrant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    used: _Count  # the node's own count in the window, as its latest event reported it
    cap: _Count  # the node admits while its own count is below this


class WindowAllowance(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    window: Window
    start: AwareDatetime
    until: AwareDatetime  # the window's end: the allowance is void after it
    limit: _Count
    count: _Count  # the key's count in the window as the worker has seen it
    grants: dict[_NodeId, NodeGrant] = Field(default_factory=dict, max_length=1024)
    others: _Count = 0


class Allowance(BaseModel):
    """The allowances of one key for its hot windows; a node applies only a newer ``version``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    version: Annotated[int, Field(ge=1, lt=2**63)]
    decided_at: AwareDatetime
    windows: list[WindowAllowance] = Field(default_factory=list, max_length=3)

    def for_window(self, window: Window) -> WindowAllowance | None:
        for w in self.windows:
            if w.window is window:
                return w
        return None
