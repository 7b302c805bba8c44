"""``meter why``: a key's limits, block and allowances of the current windows, in plain words.

Pure: it reads what the topics hold (given by the caller) and the time.
"""

from __future__ import annotations

from schemas.allowances import Allowance
from schemas.decisions import Decision, DecisionAction
from schemas.limits import LimitPolicy


def _limits(policy: LimitPolicy) -> str:
    cells = [
        f"{'unlimited' if v is None else v}/{u}" for v, u in zip(policy.limit_tuple(), ("min", "h", "day"), strict=True)
    ]
    if policy.per_month is not None:
        cells.append(f"{policy.per_month}/month")
    return ", ".join(cells)


_DECIDED_BY = {
    "operator": "an operator",
    "worker": "the worker that owns the key",
    "guard": "the abuse guards of the worker that owns the key",
}


def explain(
    key_id: str, policy: LimitPolicy, source: str, decision: Decision | None, allowance: Allowance | None, now: float
) -> list[str]:
    lines = [f"key {key_id}: limits {_limits(policy)} ({source})"]
    if decision is None:
        lines.append("no block or unblock decision has ever been published for this key")
    elif decision.blocks_at(now):
        left = "until an explicit unblock" if decision.until is None else f"until {decision.until.isoformat()}"
        by = _DECIDED_BY.get(decision.source, f"{decision.source!r}")
        what = (
            "a SHADOW block (dry run): nodes serve the key and count what they would have refused,"
            if decision.shadow
            else "BLOCKED on every node"
        )
        lines.append(
            f"{what} {left} (decision {decision.version} by {by}, {decision.window.value} window): "
            f"{decision.reason or 'no reason given'}"
        )
    else:
        what = "unblocked" if decision.action is DecisionAction.unblock else "its last block has run out"
        lines.append(f"not blocked: {what} (decision {decision.version}, {decision.decided_at.isoformat()})")
    live = [w for w in (allowance.windows if allowance else []) if w.until.timestamp() > now]
    if allowance is None or not live:
        lines.append("no allowance in force: every node admits up to the limit on its own count (local guard)")
        return lines
    lines.append(f"allowance {allowance.version} (decided {allowance.decided_at.isoformat()}):")
    for w in live:
        room = max(0, w.limit - w.count)
        lines.append(
            f"  {w.window.value} window from {w.start.isoformat()}: {w.count} of {w.limit} counted, {room} left; "
            "each node admits while its own count is below its cap:"
        )
        for node, grant in sorted(w.grants.items()):
            state = "used up: refusing" if grant.used >= grant.cap else f"{grant.cap - grant.used} more"
            lines.append(f"    {node}: used {grant.used}, cap {grant.cap} ({state})")
        lines.append(f"    any other node: {w.others} more from when it first holds this allowance")
    return lines
