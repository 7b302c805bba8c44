"""Shared helpers of the benchmarks: machine description, versions, results-file sections."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results.md"

# Every topic a worker reads or writes. A run gets its own of each: a topic shared between runs
# is read again by the next run's worker and nodes from its start (the compacted allowances
# topic grew to 48 MB on a development broker, which every bench.decisions and bench.ingest
# worker then read while it was being measured).
WORKER_TOPICS = ("events", "decisions", "dlq", "limits", "allowances", "notifications", "notifications_dlq")


def run_topics(prefix: str) -> dict[str, str]:
    """Settings overrides for one run: ``<name>_topic`` = ``<prefix>.<name>`` for each of ``WORKER_TOPICS``."""
    return {f"{name}_topic": f"{prefix}.{name}" for name in WORKER_TOPICS}


def machine() -> dict[str, str]:
    """nproc, CPU model and RAM of this machine (Linux /proc; best effort elsewhere)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count() or "?"),
        "usable cpus": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else "?",
        "cpu": cpu,
        "ram": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def reference_loop_seconds(n: int = 10_000_000) -> float:
    """CPU seconds of a fixed pure-Python loop: how fast this (shared, virtual) machine runs now.
    Its speed moves by ~2x from hour to hour here; figures of runs far apart compare through it."""
    started = time.process_time()
    total = 0
    for i in range(n):
        total += i
    return time.process_time() - started


def versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment_lines(*packages: str) -> list[str]:
    """The "- Machine: …" and "- Versions: …" lines of a results block."""
    m = machine()
    return [
        f"- Machine: {m['nproc']} CPUs ({m['usable cpus']} usable), {m['cpu']}, {m['ram']} RAM, {m['os']}, "
        f"Python {m['python']}.",
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in versions(*packages).items()) + ".",
    ]


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak RSS (VmHWM) since start or since ``reset_peak_rss``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False if not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (0 if unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat (0, 0 if unavailable)."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return float(sum(values) - idle), float(sum(values))


def broker_pid(bootstrap: str) -> int | None:
    """The pid of the broker ``infra/kafka/kafka.sh`` started for a local ``bootstrap``
    (its pid file under ``.data/kafka-<port>``), or None (a remote or foreign broker)."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        return None
    try:
        pid = int((BENCH_DIR.parent / ".data" / f"kafka-{port}" / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


class CpuMeter:
    """Core-seconds spent by the whole machine and by one other process (e.g. the broker)
    between ``start`` and ``stop``, from /proc."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.machine = 0.0
        self.process: float | None = None
        self._at: tuple[float, float] = (0.0, 0.0)

    def start(self) -> None:
        self._at = (system_cpu()[0], cpu_seconds(self.pid) if self.pid else 0.0)

    def stop(self) -> None:
        self.machine = (system_cpu()[0] - self._at[0]) / os.sysconf("SC_CLK_TCK")
        self.process = cpu_seconds(self.pid) - self._at[1] if self.pid else None


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def replace_block(name: str, section: str, body: str, path: Path = RESULTS) -> None:
    """Write ``body`` between the markers of block ``name`` under ``## section`` in the results file.

    Only that block is replaced; the rest of the file (other sections, notes written by
    hand around the block) is kept. The section and the markers are created if missing.
    """
    begin, end = f"<!-- bench:{name}:begin (machine-written; re-runs replace it) -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin.split(" (")[0]) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        heading = f"## {section}"
        lines = text.rstrip("\n").split("\n")
        if heading in lines:
            # insert right after the heading's paragraph of text, i.e. at the end of the section
            i = lines.index(heading) + 1
            while i < len(lines) and not lines[i].startswith("## "):
                i += 1
            lines[i:i] = ["", block, ""]
            text = "\n".join(lines)
        else:
            text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    path.write_text(text.rstrip("\n") + "\n")


def commit(*paths: str) -> str:
    """Short hash of HEAD, and whether ``paths`` (default: the whole tree) have uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=BENCH_DIR.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if status else head
