"""Per-event cost of validating a batch of event values: the worker's per-record check against
whole-batch candidates (issue 11, item 1), on the bytes ``bench.ingest`` produces.

    .venv/bin/python -m bench.validation_candidates [--events 200000] [--repeat 5] [--no-write]

Each candidate turns the batch's raw values into what the ingest path needs per event (the
typed fields and the event time in epoch seconds); the median of ``--repeat`` runs, in µs per
event, on this one thread. Only ``per-record`` and ``pydantic list`` apply the whole contract
(``schemas/events.py``: patterns, bounds, address check, strict types); the pyarrow and chDB
readers only parse and type the JSON, so their figure is a floor for what they would cost
with the contract's checks added.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import clickhouse_connect
import pyarrow as pa
import pyarrow.json as pj
from pydantic import TypeAdapter

from bench.common import commit, environment_lines, now_utc, replace_block
from bench.ingest import generate
from schemas.events import RequestEvent
from worker.records import Validator
from worker.settings import Settings

_LIST: TypeAdapter[list[RequestEvent]] = TypeAdapter(list[RequestEvent])
# The wire fields as JSON types (pyarrow reads ``ts`` as text: its ISO-8601 parser does not
# take the "+00:00" offsets the nodes write).
_ARROW_SCHEMA = pa.schema(
    [
        ("v", pa.int64()),
        ("request_id", pa.string()),
        ("key_id", pa.string()),
        ("node_id", pa.string()),
        ("method", pa.string()),
        ("endpoint", pa.string()),
        ("status", pa.int64()),
        ("ts", pa.string()),
        ("account_id", pa.string()),
        ("latency_ms", pa.float64()),
        ("client_ip", pa.string()),
        ("bytes_out", pa.int64()),
        ("node_counts", pa.list_(pa.int64())),
        ("cost", pa.int64()),
        ("route", pa.string()),
    ]
)
_CHDB_STRUCTURE = (
    "v UInt8, request_id String, key_id String, node_id String, method String, endpoint String, "
    "status UInt16, ts DateTime64(6), account_id Nullable(String), latency_ms Nullable(Float64), "
    "client_ip Nullable(String), bytes_out Nullable(UInt64), node_counts Array(UInt64), cost Nullable(UInt32), "
    "route Nullable(String)"
)


_engine: list[Any] = []  # one in-memory chDB engine, opened on first use


def _chdb() -> Any:
    if not _engine:
        _engine.append(clickhouse_connect.get_client(interface="chdb"))
    return _engine[0]


class _Record:
    """What the validator reads of a Kafka record."""

    __slots__ = ("key", "offset", "partition", "topic", "value")

    def __init__(self, key: bytes, value: bytes, offset: int) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = "events", 0, offset, key, value


def per_record(records: Sequence[_Record], values: Sequence[bytes], now: float) -> int:
    check = Validator.from_settings(Settings()).check  # the worker's bounds
    return sum(1 for r in records if isinstance(check(r, now), tuple))


def pydantic_list(records: Sequence[_Record], values: Sequence[bytes], now: float) -> int:
    events = _LIST.validate_json(b"[" + b",".join(values) + b"]")
    return sum(1 for e in events if e["ts"].timestamp() <= now)


def pyarrow_json(records: Sequence[_Record], values: Sequence[bytes], now: float) -> int:
    options = pj.ParseOptions(explicit_schema=_ARROW_SCHEMA, unexpected_field_behavior="error")
    table = pj.read_json(io.BytesIO(b"\n".join(values)), parse_options=options)
    return int(table.num_rows)


def chdb_json_each_row(records: Sequence[_Record], values: Sequence[bytes], now: float) -> int:
    # chDB reads the batch from a file in memory (/dev/shm); writing it is part of the figure.
    with tempfile.NamedTemporaryFile(dir="/dev/shm", suffix=".jsonl") as batch:
        batch.write(b"\n".join(values))
        batch.flush()
        query = f"SELECT count() FROM file('{batch.name}', JSONEachRow, '{_CHDB_STRUCTURE}')"
        return int(_chdb().query(query).result_rows[0][0])


CANDIDATES: dict[str, Callable[[Sequence[_Record], Sequence[bytes], float], int]] = {
    "per-record (the worker's Validator.check)": per_record,
    "pydantic list[RequestEvent] of the joined batch": pydantic_list,
    "pyarrow.json, explicit schema (parse and type only)": pyarrow_json,
    "chDB JSONEachRow (parse and type only)": chdb_json_each_row,
}


def measure(events: int, repeat: int) -> list[tuple[str, float, int]]:
    now = time.time()
    preload = generate(events, max(events // 10, 1), 1, 42, now)
    pairs = preload.partitions[0]
    records = [_Record(k, v, i) for i, (k, v) in enumerate(pairs)]
    values = [v for _, v in pairs]
    out = []
    for name, candidate in CANDIDATES.items():
        times, counted = [], 0
        for _ in range(repeat):
            started = time.perf_counter()
            counted = candidate(records, values, now + 60)
            times.append(time.perf_counter() - started)
        out.append((name, statistics.median(times) / len(values) * 1e6, counted))
        print(f"{name}: {out[-1][1]:.2f} µs/event ({counted:,} events)", flush=True)
    return out


def report(results: list[tuple[str, float, int]], command: str) -> str:
    lines = [
        f"Run {now_utc()} — `{command}` (commit {commit()}).",
        "",
        "| candidate | µs per event (median) | events typed |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {us:.2f} | {n:,} |" for name, us, n in results),
        "",
        *environment_lines("pydantic", "pydantic-core", "pyarrow", "chdb"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.validation_candidates", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not write results.md")
    args: Any = parser.parse_args(argv)
    results = measure(args.events, args.repeat)
    body = report(results, f"python -m bench.validation_candidates --events {args.events} --repeat {args.repeat}")
    print(body)
    if not args.no_write:
        replace_block("validation_candidates", "Ingest", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
