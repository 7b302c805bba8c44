"""Aggregate one batch of valid events into rollup rows (minute, hour, day, client IPs),
the dedup memory of the batch and the offsets it covers, as one Arrow table."""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import xxhash

from schemas.events import RequestEvent
from worker.store.rollup import LEVELS, ROLLUP_SCHEMA

# One tuple of every dimension per distinct event shape; the levels are derived from these.
_Dims = tuple[str, str, int, str, int, str, str]  # key, account, minute, endpoint, status, node, ip


def request_hash(key_id: str, request_id: str) -> int:
    """Stable 64-bit identity of a request for the dedup memory."""
    return int(xxhash.xxh3_64_intdigest(f"{key_id}\x00{request_id}".encode()))


class BatchAggregate:
    """Accumulates events; ``to_arrow`` renders every level's rows for one atomic insert."""

    def __init__(self) -> None:
        self._shapes: dict[_Dims, list[float]] = {}
        self._hashes: dict[tuple[int, int], list[int]] = defaultdict(list)  # (partition, minute)
        self.offsets: dict[int, int] = {}  # partition -> last offset of this batch
        self.first_offsets: dict[int, int] = {}
        self.events = 0

    def add(self, partition: int, event: RequestEvent, epoch: float, digest: int) -> None:
        minute = int(epoch) // 60 * 60
        dims = (
            event["key_id"],
            event.get("account_id") or "",
            minute,
            event["endpoint"],
            event["status"],
            event["node_id"],
            event.get("client_ip") or "",
        )
        acc = self._shapes.get(dims)
        if acc is None:
            acc = self._shapes[dims] = [0, 0, 0.0]
        acc[0] += 1
        acc[1] += event.get("bytes_out") or 0
        acc[2] += event.get("latency_ms") or 0.0
        self._hashes[(partition, minute)].append(digest)
        self.events += 1

    def cover(self, partition: int, offset: int) -> None:
        """Record that ``offset`` of ``partition`` is part of this batch (counted or not)."""
        if offset > self.offsets.get(partition, -1):
            self.offsets[partition] = offset
        if offset < self.first_offsets.get(partition, offset + 1):
            self.first_offsets[partition] = offset

    def token(self, topic: str) -> str:
        """Deterministic identity of the batch: the same records give the same token."""
        spans = ",".join(f"{p}:{self.first_offsets[p]}-{o}" for p, o in sorted(self.offsets.items()))
        return f"{topic}|{spans}"

    def minutes_by_partition(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = defaultdict(set)
        for partition, minute in self._hashes:
            out[partition].add(minute)
        return out

    def key_minute_counts(self) -> dict[tuple[str, int], int]:
        """Requests per (key_id, minute) — what the limit counters add."""
        out: dict[tuple[str, int], int] = defaultdict(int)
        for dims, acc in self._shapes.items():
            out[(dims[0], dims[2])] += int(acc[0])
        return out

    def to_arrow(self, topic: str) -> pa.Table:
        levels: dict[tuple[int, str, str, int, str, int, str, str], list[float]] = {}

        def bump(row: tuple[int, str, str, int, str, int, str, str], acc: list[float]) -> None:
            cur = levels.get(row)
            if cur is None:
                levels[row] = [acc[0], acc[1], acc[2]]
            else:
                cur[0] += acc[0]
                cur[1] += acc[1]
                cur[2] += acc[2]

        minute_l, hour_l, day_l, client_l = LEVELS["minute"], LEVELS["hour"], LEVELS["day"], LEVELS["client_hour"]
        for (key, account, minute, endpoint, status, node, ip), acc in self._shapes.items():
            hour = minute // 3600 * 3600
            bump((minute_l, key, account, minute, endpoint, status, "", ""), acc)
            bump((hour_l, key, account, hour, endpoint, status, node, ""), acc)
            bump((day_l, key, account, minute // 86400 * 86400, endpoint, status, node, ""), acc)
            if ip:
                bump((client_l, key, account, hour, "", status, "", ip), acc)

        n = len(levels)
        cols: list[list[object]] = [[] for _ in range(8)]
        sums: list[list[float]] = [[], [], []]
        for row, acc in levels.items():
            for i in range(8):
                cols[i].append(row[i])
            sums[0].append(acc[0])
            sums[1].append(acc[1])
            sums[2].append(acc[2])
        level, key_id, account_id, bucket, endpoint_c, status_c, node_id, client_ip = cols
        partition: list[int] = [0] * n
        last_offset: list[int] = [0] * n
        hashes: list[list[int]] = [[] for _ in range(n)]

        def extra(lvl: int, key: str, bkt: int, part: int, off: int, hs: list[int]) -> None:
            level.append(lvl)
            key_id.append(key)
            account_id.append("")
            bucket.append(bkt)
            endpoint_c.append("")
            status_c.append(0)
            node_id.append("")
            client_ip.append("")
            partition.append(part)
            last_offset.append(off)
            hashes.append(hs)
            for s in sums:
                s.append(0)

        for (part, minute), digests in self._hashes.items():
            extra(LEVELS["dedup"], "", minute, part, 0, digests)
        for part, off in self.offsets.items():
            extra(LEVELS["offset"], topic, 0, part, off, [])

        return pa.Table.from_arrays(
            [
                pa.array(level, pa.int8()),
                pa.array(key_id, pa.string()),
                pa.array(bucket, pa.uint32()),
                pa.array(endpoint_c, pa.string()),
                pa.array(status_c, pa.uint16()),
                pa.array(node_id, pa.string()),
                pa.array(client_ip, pa.string()),
                pa.array(account_id, pa.string()),
                pa.array(partition, pa.uint16()),
                pa.array(sums[0], pa.uint64()),
                pa.array(sums[1], pa.uint64()),
                pa.array(sums[2], pa.float64()),
                pa.array(last_offset, pa.int64()),
                pa.array(hashes, pa.list_(pa.uint64())),
            ],
            schema=ROLLUP_SCHEMA,
        )
