"""Argument types shared by the ``meter`` subcommands (worker/cli.py, worker/analytics/cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from node.keys import MAX_KEY_ID_CHARS

# ClickHouse DateTime covers 1970-01-01 .. 2106-02-07 UTC; times outside cannot be stored or queried.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2106, 2, 7, tzinfo=UTC)

N = TypeVar("N", int, float)


def parse_time(text: str) -> datetime:
    """RFC 3339 (``2026-11-27T12:00:00Z``); a value without offset is refused, not guessed."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r} (example: 2026-11-27T12:00:00Z)") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"time needs an offset or Z: {text!r}")
    value = value.astimezone(UTC)
    if not EARLIEST <= value < LATEST:
        raise argparse.ArgumentTypeError(f"time out of range (1970-01-01 .. 2106-02-06): {text!r}")
    return value


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``1d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 90s, 15m, 2h, 1d)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return timedelta(seconds=value * unit)


def count_between(low: int, high: int) -> Callable[[str], int]:
    """An argument type: a whole number from ``low`` to ``high``, refused with the range otherwise."""
    return _number_between(int, "a whole number", low, high)


def seconds_between(low: float, high: float) -> Callable[[str], float]:
    """An argument type: seconds (a decimal number) from ``low`` to ``high``."""
    return _number_between(float, "a number of seconds", low, high)


def _number_between(kind: Callable[[str], N], noun: str, low: N, high: N) -> Callable[[str], N]:
    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}: {text!r}")
        return value

    return parse


def describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """Each subcommand's ``--help`` starts with its one-line summary (argparse shows that only in
    the parent's list) unless it has a description of its own; nested subcommands too."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for choice in action._choices_actions:
            sub = action.choices[choice.dest]
            if sub.description is None:
                sub.description = choice.help
            describe_subcommands(sub)


def key_id(text: str) -> str:
    """A key id as the nodes derive it (or a route subject, ``KEY_ID@route``). One longer than a
    key id can be is refused without being repeated: it is most likely a raw API key pasted by
    mistake, which would otherwise be published to the control topics, audited or sent as a
    query (it must never leave the node)."""
    key = text.split("@", 1)[0]
    if not key or len(key) > MAX_KEY_ID_CHARS:
        raise argparse.ArgumentTypeError(
            f"not a key id (at most {MAX_KEY_ID_CHARS} characters, e.g. cfxali_cf2a91d59aea986a542ccbf3, as "
            "`meter top` and the dashboard show them); a raw API key is never an argument here"
        )
    return text
