"""Memory benchmark: bytes of worker state per active key (target ≤ 300 B at 1,000,000 keys).

The state a worker keeps per active key is its live window counters (minute, hour, day
counts and window starts, the key's account) in the limit engine. This feeds the engine
the way the ingest path does (limit counts of batches of 20,000 events) for N distinct
keys and measures what it allocated (tracemalloc) and the process RSS growth. The key
strings are counted too: the counters keep them alive after the batch is gone.

    .venv/bin/python -m bench.memory [--keys 1000000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import tracemalloc

from bench.common import machine, now_utc, replace_block, rss_bytes
from schemas.limits import LimitPolicy, PolicyBook
from worker.limits.engine import LimitEngine, partition_of

PARTITIONS = 6
BATCH = 20_000


async def feed(keys: int, traced: bool) -> tuple[float, float, int]:
    """(bytes per key, seconds, live keys): traced = tracemalloc's count, else RSS growth."""

    now = time.time()
    minute = int(now) // 60 * 60
    engine = LimitEngine(PolicyBook(LimitPolicy()), clock=lambda: now)
    for p in range(PARTITIONS):
        engine.assign(p, [])
    gc.collect()
    rss_before = rss_bytes()
    if traced:
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
    started = time.perf_counter()
    for start in range(0, keys, BATCH):
        counts: dict[tuple[int, str, str, int], int] = {}
        for i in range(start, min(start + BATCH, keys)):
            key_id = f"cfxliv_{i:024x}"  # 31 chars, the shape of a node-derived key id
            counts[(partition_of(key_id, PARTITIONS), key_id, f"acct-{i % 50_000}", minute)] = 1 + i % 7
        engine.observe(counts)
        del counts
    elapsed = time.perf_counter() - started
    gc.collect()
    if traced:
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = float(sum(stat.size_diff for stat in after.compare_to(before, "filename")))
    else:
        grown = float(rss_bytes() - rss_before)
    return grown / keys, elapsed, engine.live_keys()


async def measure(keys: int) -> dict[str, float]:
    # RSS first, without tracemalloc (its own bookkeeping would inflate the RSS).
    rss_per_key, seconds, live = await feed(keys, traced=False)
    assert live == keys, live
    gc.collect()
    traced_per_key, _, live = await feed(keys, traced=True)
    assert live == keys, live
    return {"keys": keys, "traced_bytes_per_key": traced_per_key, "rss_bytes_per_key": rss_per_key, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/results.md")
    args = parser.parse_args()
    r = asyncio.run(measure(args.keys))
    verdict = "met" if r["traced_bytes_per_key"] <= 300 else "NOT met"
    text = (
        f"Run {now_utc()} — `python -m bench.memory --keys {args.keys}`\n\n"
        f"| active keys | traced bytes / key | RSS growth / key | feed time |\n| ---: | ---: | ---: | ---: |\n"
        f"| {r['keys']:,.0f} | {r['traced_bytes_per_key']:.0f} | {r['rss_bytes_per_key']:.0f} "
        f"| {r['seconds']:.1f} s |\n\n"
        f"Target ≤ 300 bytes of worker state per active key: **{verdict}** (traced: what the limit "
        "engine allocated and keeps, key strings included; RSS growth also counts allocator slack).\n\n"
        f"- Machine: {machine()['nproc']} CPUs, {machine()['cpu']}, {machine()['ram']} RAM, "
        f"Python {machine()['python']}.\n"
        "- Not per key, so not in this figure: the recent-hash cache of the dedup path holds "
        "request hashes (~60 B each, bounded by `METER_DEDUP_CACHE_MAX_HASHES`, default 2,000,000)."
    )
    print(text)
    if not args.no_write:
        replace_block("memory", "Memory", text)


if __name__ == "__main__":
    main()
