"""The node library's small exception hierarchy."""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error raised by ``node``."""


class MissingSecretError(NodeError, ValueError):
    """No node secret configured: key ids would be unkeyed hashes, guessable from the raw keys."""


def describe(exc: BaseException) -> str:
    """``Type: message`` once (aiokafka's errors already start with their type name)."""
    name, text = type(exc).__name__, str(exc)
    return text if text.startswith(name) else f"{name}: {text}" if text else name
