"""The wire contract shared by API nodes, workers and readers. Imports nothing of ours."""

from schemas.decisions import Decision, DecisionAction, Window
from schemas.events import EVENT_SCHEMA_VERSION, RequestEvent, dump_event, make_event, parse_event
from schemas.limits import LimitOverride, LimitPolicy, OverrideScope
from schemas.usage import Granularity, UsagePoint

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "Decision",
    "DecisionAction",
    "Granularity",
    "LimitOverride",
    "LimitPolicy",
    "OverrideScope",
    "RequestEvent",
    "UsagePoint",
    "Window",
    "dump_event",
    "make_event",
    "parse_event",
]
