"""The API-node side of the usage meter: key ids, usage reporter, decision cache, ASGI middleware.

Imports only ``schemas`` (and ``worker.settings.Settings`` for configuration), so an API node
can embed it without pulling in the worker.
"""

from node.decision_cache import Block, CacheState, DecisionCache
from node.errors import MissingSecretError, NodeError
from node.keys import InMemoryKeyStore, KeyIdDeriver, KeyRecord, KeyStore, derive_key_id
from node.middleware import MeterMiddleware, RouteScope
from node.reporter import ReporterState, UsageReporter

__all__ = [
    "Block",
    "CacheState",
    "DecisionCache",
    "InMemoryKeyStore",
    "KeyIdDeriver",
    "KeyRecord",
    "KeyStore",
    "MeterMiddleware",
    "MissingSecretError",
    "NodeError",
    "ReporterState",
    "RouteScope",
    "UsageReporter",
    "derive_key_id",
]
