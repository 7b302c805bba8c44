"""Cost of the ingest's client address counts (``worker/ingest/client_ips.py``): time per
(key, address) pair and memory per key, for one simulated day of many keys.

    .venv/bin/python -m bench.address_counts [--keys 1000000] [--second 0.05] [--no-write]

Every key comes twice (two batches' worth), in batches of 20,000 pairs as the ingest passes
them; a share ``--second`` of the second visits comes from another address. Time: the whole
feed, one thread, no tracing. Memory: the tables' bytes, and what ``tracemalloc`` sees the
counts keep (tables and the sets of the keys with a second address) in a second, traced run,
and its peak (a table and its doubled copy while it grows).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc
from typing import Any

from bench.common import commit, environment_lines, now_utc, replace_block
from worker.ingest.client_ips import ClientAddressCounts
from worker.store.rollup import CLIENT_IPS_CAP

MEASURED = ("worker/ingest/client_ips.py", "bench/address_counts.py")
BATCH = 20_000
DAY = 86_400 * 20_000  # any UTC day start


Inputs = tuple[list[str], list[str], list[str]]


def inputs(keys: int, second: float) -> Inputs:
    """Key ids, each key's first address, and its address on its second visit."""
    rnd = random.Random(1)
    names = [f"cf_liv_{i:016x}" for i in range(keys)]
    first = [f"198.51.{i % 250}.{i % 199}" for i in range(keys)]
    return names, first, [a if rnd.random() >= second else "203.0.113.7" for a in first]


def feed(data: Inputs) -> tuple[float, ClientAddressCounts]:
    """Seconds to count every key twice; the counts."""
    names, first, other = data
    counts = ClientAddressCounts(CLIENT_IPS_CAP)
    half = BATCH // 2
    started = time.perf_counter()
    for s in range(0, len(names), half):
        batch_keys = names[s : s + half]
        counts.observe(batch_keys * 2, [DAY] * (2 * len(batch_keys)), first[s : s + half] + other[s : s + half])
    return time.perf_counter() - started, counts


def measure(keys: int, second: float) -> dict[str, Any]:
    data = inputs(keys, second)
    seconds, counts = feed(data)
    del counts
    tracemalloc.start()
    _, traced = feed(data)
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "keys": keys,
        "pairs": 2 * keys,
        "seconds": seconds,
        "table_bytes": traced.nbytes,
        "kept": kept,
        "peak": peak,
        "multi": traced.multi_address_keys,
    }


def report(r: dict[str, Any], command: str) -> str:
    return "\n".join(
        [
            f"Run {now_utc()} — `{command}` (commit {commit(*MEASURED)}).",
            "",
            "| keys | pairs fed | µs per pair | table bytes per key | kept per key (traced) | peak while growing "
            "| keys with a 2nd address |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {r['keys']:,} | {r['pairs']:,} | {r['seconds'] / r['pairs'] * 1e6:.2f} | "
            f"{r['table_bytes'] / r['keys']:.1f} B | {r['kept'] / r['keys']:.1f} B | {r['peak'] / 2**20:.0f} MiB | "
            f"{r['multi']:,} |",
            "",
            "One day's table from empty (it doubles as it fills; a new day starts at the size of the "
            "newest), so the time includes every growth step.",
            *environment_lines("numpy"),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.address_counts", description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--second", type=float, default=0.05, help="share of keys seen from a second address")
    parser.add_argument("--no-write", action="store_true", help="do not write results.md")
    args: Any = parser.parse_args(argv)
    body = report(
        measure(args.keys, args.second), f"python -m bench.address_counts --keys {args.keys} --second {args.second}"
    )
    print(body)
    if not args.no_write:
        replace_block("address_counts", "Queries", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
