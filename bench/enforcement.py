"""Enforcement benchmark: what 3 real API node processes admit of one key, driven over HTTP by `hey`.

    .venv/bin/python -m bench.enforcement [--repeat 3] [--no-write] [--keep-logs DIR]

Set-up, all on loopback (needs the Kafka broker: ``infra/kafka/kafka.sh start``, or
``METER_KAFKA_BOOTSTRAP``; default here ``127.0.0.1:19092``; and ``hey``, Debian's HTTP load
generator, which ``scripts/setup.sh`` installs):

* unique topics per run (events, decisions, limits, allowances, DLQ; ``meter topics``), its own
  consumer group, a fresh chDB directory, a random node secret and demo-key seed;
* ONE worker process, ``meter worker`` (product defaults: fast decision lane, allowances),
  ready when its log says ``limit counters rebuilt`` (partitions assigned);
* THREE node processes, ``meter node --port P --extra-keys 200`` (``METER_NODE_ID`` node-1..3,
  the demo API behind the meter middleware: local guard, decision cache, allowances), ready
  when ``GET /health`` answers 200; then 3 warm-up requests per node with a key of their own;
* load: ``hey -n N -c C [-q QPS per worker] -H "X-API-Key: ..." http://127.0.0.1:P/v0/rates``;
  "spread" means one ``hey`` per node started together, N/3 each. Admitted = ``[200]``,
  refused = ``[429]`` from hey's "Status code distribution"; anything else is reported apart;
* every scenario uses a fresh key (``demo_keys(seed, extra=200)``: k0000..k0199, so it starts
  at 0 in every window; only key names are printed, never raw keys) and starts only where at
  least ``--window-margin`` seconds (default 15) remain in the current UTC minute, else at the
  next minute + 1 s, so no burst straddles a window; ``--pause`` (1.5 s) between scenarios.

Scenarios (default limits 100/min, 1,000/h, 5,000/day; DESIGN.md "Targets"):

* a — one node, 300 requests as fast as possible (-c 20): exactly 100 admitted;
* b — 300 spread over 3 nodes at ~100 req/s in total (3 s): ≤ 105 admitted;
* c — 300 spread at ~600 req/s (0.5 s): ≤ 110;
* d — 300 spread as fast as possible (aim: within 0.1 s; the measured wall time is reported): ≤ 120;
* e1/e2/e3 — a key at 90% of its minute limit is never refused: 90 to one node as fast as
  possible; 90 spread over the three at once; 45 to node-1 then 45 to node-2 (two sequential
  hey runs): 90 × 200 each;
* e4/e5 — the same key at 90% over 3 s (30 req/s): 60 to node-1 and 30 to node-2 at once;
  30 to each node: 90 × 200 each;
* f-hour/f-day — the same 90 spread with the hour (day) limit scaled down by a per-key override
  (``meter limits set --key KEY_ID --per-minute unlimited --per-hour 100 --per-day 5000``, or
  ``--per-hour unlimited --per-day 100``), sent once the worker and all 3 nodes logged the
  override: 90 × 200; f-hour300 — 300 spread as fast as possible under the hour override: ≤ 120.

Per scenario the bench also reads each node's ``/health/details`` before and 0.5 s after: how many
allowances its guard and how many block/unblock decisions its cache applied meanwhile. An override
scenario whose override some node never logged is marked ``yes*`` (met, but proves nothing).

b, c and d run ``--repeat`` times (default 3), each with a fresh key; the table gives every
run's admitted count and the max. Figures go to ``bench/results.md`` ("## Enforcement",
machine-written block) unless ``--no-write``. All child processes are stopped on exit (also on
Ctrl-C), the chDB directory is deleted and the run's topics are dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from bench.common import machine, now_utc, replace_block, versions
from node.demo_api import demo_keys
from node.keys import derive_key_id

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"
NODES = 3
EXTRA_KEYS = 200
LIMIT_MINUTE, LIMIT_HOUR, LIMIT_DAY = 100, 1_000, 5_000
WORKER_READY = "limit counters rebuilt"
FAST_LANE_READY = "fast lane counting partitions"
URL_PATH = "/v0/rates"


# -- hey -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leg:
    """One hey process: ``n`` requests to node ``node`` (0-based) with ``c`` workers, each at ``q`` req/s."""

    node: int
    n: int
    c: int
    q: float | None = None

    def __post_init__(self) -> None:
        if self.n % self.c:  # hey gives every worker n // c requests and drops the rest
            raise ValueError(f"hey -n {self.n} is not a multiple of -c {self.c}")


@dataclass(slots=True)
class HeyResult:
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    total_s: float = 0.0  # hey's own "Total:" (its first request to its last response)
    rc: int = 0


_STATUS = re.compile(r"^\s*\[(\d{3})\]\s+(\d+) responses", re.M)
_TOTAL = re.compile(r"^\s*Total:\s+([0-9.]+) secs", re.M)


def parse_hey(text: str) -> HeyResult:
    """Status code distribution, error count and total time from hey's summary."""
    out = HeyResult()
    status_part, _, error_part = text.partition("Error distribution:")
    for code, count in _STATUS.findall(status_part):
        out.statuses[int(code)] += int(count)
    for line in error_part.splitlines():
        m = re.match(r"^\s*\[(\d+)\]\s", line)
        if m:
            out.errors += int(m.group(1))
    m = _TOTAL.search(text)
    if m:
        out.total_s = float(m.group(1))
    return out


def hey_argv(leg: Leg, port: int, raw_key: str) -> list[str]:
    argv = ["hey", "-n", str(leg.n), "-c", str(leg.c)]
    if leg.q:
        argv += ["-q", f"{leg.q:.4f}"]
    return [*argv, "-H", f"X-API-Key: {raw_key}", f"http://127.0.0.1:{port}{URL_PATH}"]


def shown(argv: Sequence[str], key_name: str) -> str:
    """The command line with the raw key replaced by its name."""
    return shlex.join(f"X-API-Key: <{key_name}>" if a.startswith("X-API-Key:") else a for a in argv)


@dataclass(slots=True)
class StepResult:
    legs: list[HeyResult]
    wall_s: float  # first hey started -> last hey exited (includes hey's process start-up)


def run_legs(legs: Sequence[Leg], ports: Sequence[int], raw_key: str) -> StepResult:
    """Start one hey per leg at once, wait for all; parse each summary."""
    procs: list[subprocess.Popen[str]] = []
    try:
        t0 = time.perf_counter()
        for leg in legs:
            procs.append(
                subprocess.Popen(
                    hey_argv(leg, ports[leg.node], raw_key),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = []
        for proc in procs:
            text, _ = proc.communicate(timeout=120)
            outputs.append((text, proc.returncode))
        wall = time.perf_counter() - t0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for text, rc in outputs:
        r = parse_hey(text)
        r.rc = rc
        if rc != 0 or not (r.statuses or r.errors):
            raise RuntimeError(f"hey failed (exit {rc}):\n{text[-2000:]}")
        results.append(r)
    return StepResult(results, wall)


# -- child processes -----------------------------------------------------------------------


def meter_argv(*args: str) -> list[str]:
    exe = VENV_BIN / "meter"
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "worker.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Stack:
    """The worker and the nodes of one run, their environment, logs and clean-up."""

    def __init__(self, bootstrap: str, extra_env: Sequence[str], log_dir: Path | None) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-enforcement-"))
        self.log_dir = log_dir or (self.tmp / "logs")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.secret = secrets.token_hex(32)
        self.health_token = secrets.token_hex(32)  # the nodes' /health/details
        self.seed = secrets.token_hex(16)
        self.worker_port = free_port()
        self.topics = {
            "METER_EVENTS_TOPIC": f"bench.enf.{self.tag}.events",
            "METER_DECISIONS_TOPIC": f"bench.enf.{self.tag}.decisions",
            "METER_LIMITS_TOPIC": f"bench.enf.{self.tag}.limits",
            "METER_ALLOWANCES_TOPIC": f"bench.enf.{self.tag}.allowances",
            "METER_DLQ_TOPIC": f"bench.enf.{self.tag}.dlq",
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
        env.update(self.topics)
        env.update(
            {
                "METER_KAFKA_BOOTSTRAP": bootstrap,
                "METER_CONSUMER_GROUP": f"bench-enf-{self.tag}",
                "METER_CLICKHOUSE_DSN": f"chdb://{self.tmp / 'chdb'}",
                "METER_NODE_SECRET": self.secret,
                "METER_NODE_HEALTH_TOKEN": self.health_token,
                "METER_DEMO_SEED": self.seed,
                "METER_LIMIT_PER_MINUTE": str(LIMIT_MINUTE),
                "METER_LIMIT_PER_HOUR": str(LIMIT_HOUR),
                "METER_LIMIT_PER_DAY": str(LIMIT_DAY),
                "METER_HTTP_PORT": str(self.worker_port),
                "METER_LOG_LEVEL": "INFO",
                "METER_LOG_JSON": "false",
            }
        )
        env.update(dict(kv.split("=", 1) for kv in extra_env))
        self.env = env
        self.children: list[Child] = []
        self.worker: Child | None = None
        self.nodes: list[Child] = []
        self.ports: list[int] = []

    # -- commands

    def meter(self, *args: str, timeout: float = 60.0) -> str:
        done = subprocess.run(
            meter_argv(*args), env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"meter {args[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        path = self.log_dir / f"{name}.log"
        log_file = path.open("wb")
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only the bench, which stops them in order
        )
        child = Child(name, proc, path, log_file)
        self.children.append(child)
        return child

    # -- start-up

    def start_worker(self, timeout: float = 90.0) -> dict[str, float]:
        t0 = time.monotonic()
        self.worker = self.spawn("worker", meter_argv("worker"), self.env)
        ready = wait_for_log(self.worker, WORKER_READY, timeout)
        fast = None
        with contextlib.suppress(TimeoutError):
            fast = wait_for_log(self.worker, FAST_LANE_READY, 10.0)
        return {"ready_s": ready - t0, "fast_lane_s": (fast - t0) if fast else -1.0}

    def start_nodes(self, timeout: float = 90.0) -> float:
        t0 = time.monotonic()
        for i in range(NODES):
            port = free_port()
            env = {**self.env, "METER_NODE_ID": f"node-{i + 1}"}
            argv = meter_argv("node", "--port", str(port), "--extra-keys", str(EXTRA_KEYS))
            self.nodes.append(self.spawn(f"node-{i + 1}", argv, env))
            self.ports.append(port)
        for child, port in zip(self.nodes, self.ports, strict=True):
            wait_healthy(child, f"http://127.0.0.1:{port}/health", timeout - (time.monotonic() - t0))
        return time.monotonic() - t0

    # -- shutdown

    def stop(self) -> dict[str, int | None]:
        """Nodes first (their reporters flush), then the worker: SIGTERM, then SIGKILL after 15 s."""
        codes: dict[str, int | None] = {}
        order = [*self.nodes, *([self.worker] if self.worker else [])]
        for child in order:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        for child in order:
            try:
                child.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait()
            codes[child.name] = child.proc.returncode
            child.log_file.close()
        return codes

    def cleanup(self) -> None:
        """Delete the chDB directory (and the logs unless kept elsewhere) and drop the run's topics."""
        shutil.rmtree(self.tmp, ignore_errors=True)  # kept logs live outside it
        with contextlib.suppress(Exception):
            asyncio.run(delete_topics(self.env["METER_KAFKA_BOOTSTRAP"], list(self.topics.values())))


async def delete_topics(bootstrap: str, topics: list[str]) -> None:
    from common import kafka_clients

    admin = kafka_clients.admin(bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


def wait_for_log(child: Child, needle: str, timeout: float) -> float:
    """Monotonic time at which ``needle`` was first seen in the child's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in child.log():
            return time.monotonic()
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log())}")
        time.sleep(0.1)
    raise TimeoutError(f"{child.name}: no {needle!r} in its log after {timeout:.0f} s:\n{tail(child.log())}")


def wait_healthy(child: Child, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log())}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{child.name}: {url} not 200 after {timeout:.0f} s:\n{tail(child.log())}")


def get_json(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503 still carries the body
        return json.loads(exc.read() or b"null")
    except (OSError, ValueError) as exc:
        return {"error": repr(exc)}


def get_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            body: bytes = resp.read()
            return body.decode(errors="replace")
    except OSError as exc:
        return f"error: {exc!r}"


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def log_problems(text: str, max_lines: int = 40) -> list[str]:
    """ERROR/CRITICAL lines and Traceback blocks of a log, in order, at most ``max_lines`` lines."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines) and len(out) < max_lines:
        line = lines[i]
        if line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                j += 1
            block = lines[i : j + 1]  # the indented frames and the exception line after them
            out += block
            i = j + 1
            continue
        if re.search(r"\b(ERROR|CRITICAL)\b", line):
            out.append(line)
        i += 1
    return out[:max_lines]


# -- scenarios -----------------------------------------------------------------------------


Override = Literal["hour", "day"]


@dataclass(frozen=True)
class Scenario:
    sid: str
    title: str
    steps: tuple[tuple[Leg, ...], ...]  # sequential steps; the legs of a step run at once
    kind: Literal["eq", "le"]
    target: int
    override: Override | None = None
    repeated: bool = False
    limit: int = LIMIT_MINUTE  # the limit the key meets (for "under the limit" notes)

    @property
    def sent(self) -> int:
        return sum(leg.n for step in self.steps for leg in step)

    def target_text(self) -> str:
        return f"= {self.target}" if self.kind == "eq" else f"≤ {self.target}"

    def met(self, admitted: int) -> bool:
        return admitted == self.target if self.kind == "eq" else admitted <= self.target


def spread(total: int, c: int, rate: float | None = None) -> tuple[Leg, ...]:
    """``total`` requests split evenly over the nodes, one hey each; ``rate`` req/s in total."""
    per_node = total // NODES
    q = rate / NODES / c if rate else None
    return tuple(Leg(i, per_node, c, q) for i in range(NODES))


def scenarios(burst_c: int) -> list[Scenario]:
    return [
        Scenario("a", "1 node, 300 as fast as possible (-c 20)", ((Leg(0, 300, 20),),), "eq", 100),
        Scenario("b", "3 nodes, 300 spread, ~100 req/s (3 s)", (spread(300, 2, 100.0),), "le", 105, repeated=True),
        Scenario("c", "3 nodes, 300 spread, ~600 req/s (0.5 s)", (spread(300, 4, 600.0),), "le", 110, repeated=True),
        Scenario(
            "d", f"3 nodes, 300 spread, all at once (-c {burst_c} each)", (spread(300, burst_c),), "le", 120,
            repeated=True,
        ),
        Scenario("e1", "90 to 1 node as fast as possible", ((Leg(0, 90, 10),),), "eq", 90),
        Scenario("e2", "90 spread over 3 nodes at once", (spread(90, 10),), "eq", 90),
        Scenario("e3", "45 to node-1, then 45 to node-2", ((Leg(0, 45, 5),), (Leg(1, 45, 5),)), "eq", 90),
        Scenario(
            "e4", "90 in 3 s (30 req/s): 60 to node-1, 30 to node-2", ((Leg(0, 60, 2, 10.0), Leg(1, 30, 1, 10.0)),),
            "eq", 90,
        ),
        Scenario("e5", "90 spread over 3 nodes in 3 s (30 req/s)", (spread(90, 1, 30.0),), "eq", 90),
        Scenario("f-hour", "hour limit 100 (override): 90 spread", (spread(90, 10),), "eq", 90, "hour"),
        Scenario("f-day", "day limit 100 (override): 90 spread", (spread(90, 10),), "eq", 90, "day"),
        Scenario(
            "f-hour300", f"hour limit 100 (override): 300 spread at once (-c {burst_c})", (spread(300, burst_c),),
            "le", 120, "hour",
        ),
    ]  # fmt: skip


OVERRIDE_ARGS: dict[Override, list[str]] = {
    "hour": ["--per-minute", "unlimited", "--per-hour", "100", "--per-day", str(LIMIT_DAY)],
    "day": ["--per-minute", "unlimited", "--per-hour", "unlimited", "--per-day", "100"],
}


@dataclass
class Outcome:
    sid: str
    run: int
    key_name: str
    sent: int
    admitted: int
    refused: int
    other: dict[int, int]
    errors: int
    wall_s: float  # sum of the steps' walls (first hey start -> last hey exit)
    hey_total_s: float  # per step the longest hey "Total", summed
    per_node_admitted: list[int]
    started_at: str
    second_of_minute: float
    override_applied_s: float | None = None
    override_missing: list[str] = field(default_factory=list)  # processes that never logged the override
    allowances_applied: list[int] = field(default_factory=list)  # per node, during the scenario (+ settle)
    decisions_applied: list[int] = field(default_factory=list)  # per node, block/unblock decisions
    met: bool = False
    why: list[str] = field(default_factory=list)


class KeyPool:
    def __init__(self, seed: str, secret: str) -> None:
        self._keys = demo_keys(seed, extra=EXTRA_KEYS)
        self._secret = secret.encode()
        self._next = 0

    def take(self) -> tuple[str, str, str]:
        """A fresh (name, raw key, key id)."""
        if self._next >= EXTRA_KEYS - 1:  # the last one is the warm-up key
            raise RuntimeError("out of fresh demo keys")
        name = f"k{self._next:04d}"
        self._next += 1
        raw = self._keys[name]
        return name, raw, derive_key_id(raw, self._secret)

    def warmup(self) -> tuple[str, str]:
        name = f"k{EXTRA_KEYS - 1:04d}"
        return name, self._keys[name]


def wait_for_window(margin: float) -> None:
    """Return at once if ``margin`` seconds remain in this UTC minute, else at the next minute + 1 s."""
    left = 60.0 - time.time() % 60.0
    if left < margin:
        print(f"  ({left:.1f} s left in this minute: waiting for the next one)", flush=True)
        time.sleep(left + 1.0)


def apply_override(stack: Stack, key_id: str, which: Override, timeout: float = 10.0) -> tuple[float | None, list[str]]:
    """Set the override; (seconds until the worker and every node logged it, or None; who did not)."""
    t0 = time.monotonic()
    stack.meter("limits", "set", "--key", key_id, *OVERRIDE_ARGS[which], "--note", f"bench.enforcement {which}")
    needle = f"limit override key:{key_id}"
    watch = [*stack.nodes, *([stack.worker] if stack.worker else [])]
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if all(needle in c.log() for c in watch):
            time.sleep(0.3)  # logged just before it is applied: a little slack
            return time.monotonic() - t0, []
        time.sleep(0.05)
    missing = [c.name for c in watch if needle not in c.log()]
    print(f"  override not logged by {missing} within {timeout:.0f} s; going on", flush=True)
    return None, missing


def node_counters(stack: Stack) -> list[tuple[int, int]]:
    """Per node: (allowances applied by its guard, decisions applied by its cache), from /health/details."""
    out = []
    for port in stack.ports:
        h = get_json(f"http://127.0.0.1:{port}/health/details", stack.health_token)
        h = h if isinstance(h, dict) else {}
        guard, cache = h.get("guard") or {}, h.get("cache") or {}
        out.append((int(guard.get("allowances_applied") or 0), int(cache.get("applied") or 0)))
    return out


def run_scenario(stack: Stack, pool: KeyPool, sc: Scenario, run: int, margin: float, settle: float) -> Outcome:
    name, raw, key_id = pool.take()
    applied: float | None = None
    missing: list[str] = []
    if sc.override:
        applied, missing = apply_override(stack, key_id, sc.override)
    wait_for_window(margin)
    before = node_counters(stack)
    started = time.time()
    admitted = refused = errors = 0
    other: Counter[int] = Counter()
    per_node = [0] * NODES
    wall = hey_total = 0.0
    for step in sc.steps:
        res = run_legs(step, stack.ports, raw)
        wall += res.wall_s
        hey_total += max(r.total_s for r in res.legs)
        for leg, r in zip(step, res.legs, strict=True):
            admitted += r.statuses.get(200, 0)
            refused += r.statuses.get(429, 0)
            per_node[leg.node] += r.statuses.get(200, 0)
            errors += r.errors
            other.update({k: v for k, v in r.statuses.items() if k not in (200, 429)})
    time.sleep(settle)  # allowances and decisions that were under way
    after = node_counters(stack)
    out = Outcome(
        sid=sc.sid,
        run=run,
        key_name=name,
        sent=sc.sent,
        admitted=admitted,
        refused=refused,
        other=dict(other),
        errors=errors,
        wall_s=wall,
        hey_total_s=hey_total,
        per_node_admitted=per_node,
        started_at=time.strftime("%H:%M:%S", time.gmtime(started)),
        second_of_minute=started % 60.0,
        override_applied_s=applied,
        override_missing=missing,
        allowances_applied=[a[0] - b[0] for a, b in zip(after, before, strict=True)],
        decisions_applied=[a[1] - b[1] for a, b in zip(after, before, strict=True)],
    )
    out.met = sc.met(admitted) and not other and not errors
    if not out.met:
        time.sleep(1.0)  # let the last events reach the worker before asking it
        with contextlib.suppress(Exception):
            out.why = stack.meter("why", key_id, "--account", f"acct-{name}", timeout=30).splitlines()
    return out


def print_outcome(sc: Scenario, o: Outcome) -> None:
    extra = f", other {o.other}" if o.other else ""
    extra += f", errors {o.errors}" if o.errors else ""
    extra += f", override applied in {o.override_applied_s:.2f} s" if o.override_applied_s is not None else ""
    extra += f", override NOT applied by {', '.join(o.override_missing)}" if o.override_missing else ""
    extra += f"; nodes applied {'/'.join(map(str, o.allowances_applied))} allowances"
    extra += f", {'/'.join(map(str, o.decisions_applied))} decisions"
    print(
        f"  {sc.sid:9} run {o.run} key {o.key_name} at :{o.second_of_minute:04.1f}: "
        f"{o.admitted} admitted ({'/'.join(map(str, o.per_node_admitted))} per node), {o.refused} × 429{extra}; "
        f"wall {o.wall_s:.3f} s (hey {o.hey_total_s:.3f} s) -> target {sc.target_text()}: "
        f"{'met' if o.met else 'NOT MET'}",
        flush=True,
    )
    for line in o.why:
        print(f"      why: {line}", flush=True)


# -- the run -------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("hey") is None:
        raise SystemExit("bench.enforcement: `hey` not found (scripts/setup.sh installs it: apt-get install hey)")
    log_dir = args.keep_logs.resolve() if args.keep_logs else None
    stack = Stack(args.bootstrap, args.env, log_dir)
    result: dict[str, Any] = {"tag": stack.tag, "bootstrap": args.bootstrap, "outcomes": []}
    print(f"bench.enforcement: run {stack.tag}, Kafka {args.bootstrap}, logs in {stack.log_dir}", flush=True)
    try:
        print("  " + stack.meter("topics").strip().replace("\n", "\n  "), flush=True)
        result["worker_start"] = stack.start_worker()
        print(f"  worker ready in {result['worker_start']['ready_s']:.1f} s", flush=True)
        result["nodes_start_s"] = stack.start_nodes()
        print(f"  3 nodes healthy on ports {stack.ports} in {result['nodes_start_s']:.1f} s", flush=True)
        pool = KeyPool(stack.seed, stack.secret)
        warm_name, warm_raw = pool.warmup()
        run_legs([Leg(i, 3, 1) for i in range(NODES)], stack.ports, warm_raw)
        print(f"  warm-up: 3 requests per node with {warm_name}", flush=True)
        chosen = [
            sc
            for sc in scenarios(args.burst_concurrency)
            if sc.sid not in args.skip and (not args.only or sc.sid in args.only)
        ]
        # a, then the repeats interleaved (b1 c1 d1 b2 c2 d2 ...), then the others in order.
        plan = [(sc, 1) for sc in chosen if sc.sid == "a"]
        plan += [(sc, r + 1) for r in range(args.repeat) for sc in chosen if sc.repeated]
        plan += [(sc, 1) for sc in chosen if not sc.repeated and sc.sid != "a"]
        print(f"  {len(plan)} scenario runs; limit {LIMIT_MINUTE}/min (fresh key each)", flush=True)
        example = plan[0][0].steps[0][0]
        print(f"  e.g. {shown(hey_argv(example, stack.ports[0], 'x'), pool.warmup()[0])}", flush=True)
        try:
            for i, (sc, run) in enumerate(plan):
                if i:
                    time.sleep(args.pause)
                outcome = run_scenario(stack, pool, sc, run, args.window_margin, args.settle)
                print_outcome(sc, outcome)
                result["outcomes"].append(asdict(outcome))
                dead = [c.name for c in stack.children if c.proc.poll() is not None]
                if dead:
                    raise RuntimeError(f"child process(es) exited during the run: {dead}")
        except Exception as exc:  # report what was measured, and why the run stopped
            result["failure"] = f"{type(exc).__name__}: {exc}"
            print(f"run stopped: {result['failure']}", file=sys.stderr, flush=True)
        time.sleep(1.0)
        result["after"] = snapshot(stack)
    finally:
        print("stopping nodes and worker ...", flush=True)
        result["exit_codes"] = stack.stop()
        result["problems"] = {c.name: log_problems(c.log()) for c in stack.children}
        result["log_lines"] = {c.name: len(c.log().splitlines()) for c in stack.children}
        stack.cleanup()
    return result


def snapshot(stack: Stack) -> dict[str, Any]:
    """Nodes' /health/details and a few worker metrics after the run."""
    nodes = {}
    for child, port in zip(stack.nodes, stack.ports, strict=True):
        h = get_json(f"http://127.0.0.1:{port}/health/details", stack.health_token)
        if isinstance(h, dict):
            cache = h.get("cache") or {}
            reporter = h.get("reporter") or {}
            nodes[child.name] = {
                "status": h.get("status"),
                "guard": h.get("guard"),
                "cache_applied": cache.get("applied"),
                "cache_stale_ignored": cache.get("stale_ignored"),
                "cache_invalid": cache.get("invalid"),
                "reporter": {k: v for k, v in reporter.items() if isinstance(v, int | float | bool | None)},
            }
    metrics = get_text(f"http://127.0.0.1:{stack.worker_port}/metrics")
    wanted = (
        "meter_events_consumed",
        "meter_events_counted",
        "meter_events_duplicate",
        "meter_events_dead_lettered",
        "meter_decisions_published",
        "meter_blocked_keys",
        "meter_live_keys",
    )
    picked = [
        line for line in metrics.splitlines() if line.startswith(wanted) and not line.startswith("#")
    ]  # counters and gauges, no help text
    ready = get_json(f"http://127.0.0.1:{stack.worker_port}/health/ready")
    return {"nodes": nodes, "worker_metrics": picked, "worker_ready": ready}


# -- report --------------------------------------------------------------------------------


def code_version() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def hey_version() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        v = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "hey"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if v:
            return f"hey {v} (Debian)"
    return "hey (version unknown)"


@dataclass
class Row:
    sc: Scenario
    runs: list[Outcome]

    @property
    def met(self) -> bool:
        return bool(self.runs) and all(o.met for o in self.runs)

    def admitted(self) -> str:
        cells = ", ".join(str(o.admitted) for o in self.runs)
        return f"{cells} (max {max(o.admitted for o in self.runs)})" if len(self.runs) > 1 else cells

    def refused(self) -> str:
        return ", ".join(str(o.refused) for o in self.runs)

    def wall(self) -> str:
        return ", ".join(f"{o.wall_s:.2f}" for o in self.runs)

    def hey_total(self) -> str:
        return ", ".join(f"{o.hey_total_s:.2f}" for o in self.runs)

    def per_node(self) -> str:
        return "; ".join("/".join(map(str, o.per_node_admitted)) for o in self.runs)

    def allowances(self) -> str:
        return "; ".join("/".join(map(str, o.allowances_applied)) for o in self.runs)

    def decisions(self) -> str:
        return "; ".join("/".join(map(str, o.decisions_applied)) for o in self.runs)

    @property
    def vacuous(self) -> bool:
        """An override scenario whose override some node never applied: its figure proves nothing."""
        return any(o.override_missing for o in self.runs)

    def met_text(self, md: bool = False) -> str:
        if not self.met:
            return "**NO**" if md else "NO"
        return "yes*" if self.vacuous else "yes"

    def notes(self) -> str:
        out = []
        for o in self.runs:
            tag = f"run {o.run}: " if len(self.runs) > 1 else ""
            if o.other:
                out.append(f"{tag}other statuses {o.other}")
            if o.errors:
                out.append(f"{tag}{o.errors} hey errors")
            if self.sc.kind == "le" and o.admitted < self.sc.limit:
                out.append(f"{tag}{self.sc.limit - o.admitted} under the limit (false refusals)")
            if o.override_missing:
                out.append(
                    f"{tag}* override never applied by {', '.join(o.override_missing)}: "
                    "those nodes kept the default limits, the check is not meaningful"
                )
        return "; ".join(out)


def rows_of(result: dict[str, Any], burst_c: int) -> list[Row]:
    outcomes = [Outcome(**o) for o in result["outcomes"]]
    rows = []
    for sc in scenarios(burst_c):
        runs = sorted((o for o in outcomes if o.sid == sc.sid), key=lambda o: o.run)
        if runs:
            rows.append(Row(sc, runs))
    return rows


def render_text(rows: list[Row]) -> str:
    head = (
        "scenario",
        "target",
        "admitted (per run)",
        "429s",
        "wall s",
        "hey s",
        "met",
        "admitted per node",
        "allowances applied per node",
    )
    table = [head] + [
        (
            f"{r.sc.sid}: {r.sc.title}",
            r.sc.target_text(),
            r.admitted(),
            r.refused(),
            r.wall(),
            r.hey_total(),
            r.met_text(),
            r.per_node(),
            r.allowances(),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.sc.sid}: {r.notes()}" for r in rows if r.notes()]
    return "\n".join(lines + (["notes:", *notes] if notes else []))


def render_markdown(result: dict[str, Any], rows: list[Row], args: argparse.Namespace) -> str:
    m = machine()
    v = versions("aiokafka", "faststream", "chdb", "clickhouse-connect", "pydantic", "starlette", "uvicorn")
    met = sum(r.met and not r.vacuous for r in rows)
    lines: list[str] = []
    add = lines.append
    add(f"Run {now_utc()} with `{result['command']}`.")
    add("")
    add(
        f"Machine: {m['nproc']} CPUs ({m['usable cpus']} usable), {m['cpu']}, {m['ram']} RAM, {m['os']}, "
        f"Python {m['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; {result['hey']}. "
        f"Code measured: commit {result['code']}."
    )
    add("")
    add(
        f"**{met} of {len(rows)} scenarios met their target** (* = met only because the override never reached "
        f"the nodes: not counted). Limit {LIMIT_MINUTE}/min (default); every scenario "
        f"uses a fresh key; b, c, d repeated {args.repeat}×. Wall = first `hey` started → last `hey` exited "
        '(includes hey\'s start-up); hey s = the longest `hey` "Total" (its first request → last response).'
    )
    add("")
    add(
        "| scenario | target | admitted (per run) | 429s | wall s | hey s | met | admitted per node "
        "| allowances / decisions applied per node | notes |"
    )
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        add(
            f"| {r.sc.sid}: {r.sc.title} | {r.sc.target_text()} | {r.admitted()} | {r.refused()} | {r.wall()} | "
            f"{r.hey_total()} | {r.met_text(md=True)} | {r.per_node()} | {r.allowances()} / {r.decisions()} "
            f"| {r.notes()} |"
        )
    add("")
    after = result.get("after") or {}
    if after:
        guards = []
        for name, n in after.get("nodes", {}).items():
            g = n.get("guard") or {}
            guards.append(
                f"{name} {n.get('status')}, guard keys {g.get('keys')}, allowances applied "
                f"{g.get('allowances_applied')}, decisions applied {n.get('cache_applied')}"
            )
        add("After the run: " + "; ".join(guards) + ".")
        if after.get("worker_metrics"):
            add("Worker metrics: " + ", ".join(f"`{line}`" for line in after["worker_metrics"]) + ".")
        add("")
    problems = {k: v for k, v in result.get("problems", {}).items() if v}
    if problems:
        add("Errors in the processes' logs (first lines):")
        add("")
        add("```")
        for name, excerpt in problems.items():
            add(f"[{name}]")
            lines.extend(excerpt[:15])
        add("```")
    else:
        add("No ERROR line or traceback in the worker's or the nodes' logs.")
    add("")
    if result.get("failure"):
        add(f"**The run stopped early:** {result['failure']}")
        add("")
    add(METHOD)
    return "\n".join(lines)


METHOD = """\
Method: one `meter worker` process (fresh chDB directory, unique topics and group, product
defaults) and three `meter node --extra-keys 200` processes (node-1..3, demo API behind the meter
middleware), all on loopback with the local Kafka broker; load from `hey` (Go) over real HTTP,
`GET /v0/rates` with `X-API-Key`, one `hey` per node started together for "spread" scenarios
(`-q` is per hey worker: total rate = nodes × c × q). Admitted = `[200]`, refused = `[429]` in
hey's status distribution. Each scenario uses a fresh demo key and starts only with ≥ 15 s left
in the UTC minute. e3 runs the two hey processes one after the other with no pause. f-*: the
override is set with `meter limits set` and the scenario starts once the worker and all three
nodes logged it (10 s at most). "Allowances / decisions applied per node" = the growth of each
node's `/health/details` counters `guard.allowances_applied` and `cache.applied` from just before the
scenario to 0.5 s after it: whether the cluster mechanisms took part at all."""


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m bench.enforcement", description=doc.split("\n\n")[0])
    p.add_argument("--bootstrap", default=os.environ.get("METER_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    p.add_argument("--repeat", type=int, default=3, help="runs of each overshoot scenario (b, c, d)")
    p.add_argument("--burst-concurrency", type=int, default=50, help="hey -c per node in the all-at-once bursts")
    p.add_argument("--window-margin", type=float, default=15.0, help="seconds that must remain in the minute")
    p.add_argument("--pause", type=float, default=1.5, help="seconds between scenarios")
    p.add_argument("--settle", type=float, default=0.5, help="seconds after a scenario before reading node counters")
    p.add_argument("--skip", action="append", default=[], metavar="ID", help="skip a scenario (a, b, ..., f-day)")
    p.add_argument("--only", action="append", default=[], metavar="ID", help="run only this scenario (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="METER_X=V", help="extra env for worker and nodes")
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="write the processes' logs here and keep them")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results.md")
    p.add_argument("--json", type=Path, help="also dump the raw figures as JSON here")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if 100 % args.burst_concurrency:
        p.error("--burst-concurrency must divide 100 (hey drops the remainder of -n / -c)")
    return args


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to the bench unwinds like Ctrl-C, so the children are stopped."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join([".venv/bin/python -m bench.enforcement", *([shlex.join(given)] if given else [])])
    try:
        with sigterm_as_interrupt():
            result = bench(args)
    except KeyboardInterrupt:
        print("interrupted; children stopped", file=sys.stderr)
        return 130
    result["command"] = command
    result["code"] = code_version()
    result["hey"] = hey_version()
    rows = rows_of(result, args.burst_concurrency)
    print()
    print(render_text(rows))
    problems = {k: v for k, v in result["problems"].items() if v}
    for name, excerpt in problems.items():
        print(f"\n[{name}] errors in its log:\n  " + "\n  ".join(excerpt))
    print(f"\nexit codes: {result['exit_codes']}")
    if result.get("failure"):
        print(f"the run stopped early: {result['failure']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if not args.no_write:
        replace_block("enforcement", "Enforcement", render_markdown(result, rows, args))
        print("written to bench/results.md (## Enforcement)")
    ok = rows and all(r.met and not r.vacuous for r in rows) and not result.get("failure")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
