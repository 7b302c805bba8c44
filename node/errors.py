"""The node library's small exception hierarchy."""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error raised by ``node``."""


class MissingSecretError(NodeError, ValueError):
    """No node secret configured: key ids would be unkeyed hashes, guessable from the raw keys."""


class WeakSecretError(NodeError, ValueError):
    """A secret too short to resist brute force (one leaked key id and its raw key suffice to try)."""
