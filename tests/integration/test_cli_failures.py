"""Every ``meter`` subcommand against each expected failure: the embedded store held by another
process, a ClickHouse server that does not answer, a broker that is down. A command that fails
says so in one line on stderr and exits non-zero; none prints a traceback. A long-running
command the failure does not concern (an API node runs without Kafka: it fails open) may keep
running; it is stopped after a while and must not have printed a traceback either. The
long-running commands (worker, node, demo, serve-api) log as they go: their timestamped log
records are allowed beside the one line, one-shot commands print nothing else."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.helpers import cli_env
from worker.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

COMMANDS: list[list[str]] = [
    ["worker"],
    ["migrate"],
    ["topics"],
    ["kafka-acls", "--apply"],
    ["usage", "--key", "k1"],
    ["block", "k1", "--for", "1m"],
    ["unblock", "k1"],
    ["limits", "show"],
    ["limits", "set", "--key", "k1", "--per-minute", "5"],
    ["limits", "reset", "--key", "k1"],
    ["why", "k1"],
    ["demo", "--duration", "2", "--dashboard-port", "0"],
    ["node", "--port", "0"],
    ["top"],
    ["key-usage", "--key", "k1"],
    ["account-usage", "--account", "a1"],
    ["key-state", "--key", "k1"],
    ["blocked"],
    ["signals"],
    ["serve-api", "--port", "0"],
    ["analytics-sample"],
    ["dlq", "show"],
    ["dlq", "replay", "--reason", "invalid_json", "--dry-run"],
]
LONG_RUNNING = {"worker", "node", "demo", "serve-api"}
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")
RUNS_FOR_S = 12.0
FRESH = (
    "fresh"  # placeholder: a new embedded store per command  # a long-running command still up after this did not fail
)


@dataclass
class Outcome:
    argv: list[str]
    failure: str
    code: int | None  # None: still running when stopped
    stderr: str


@pytest.fixture(scope="module")
def held_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded store held by another process (as a running worker holds it)."""
    path = tmp_path_factory.mktemp("held") / "clickhouse"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from worker.settings import Settings\n"
            "from worker.store.client import connect\n"
            "from worker.store.migrations import migrate\n"
            # As a worker does: open and migrate, and keep the client (chDB holds the directory
            # while a client on it is open).
            f"client = connect('chdb://{path}', 'meter')\n"
            f"migrate(client, Settings(clickhouse_dsn='chdb://{path}'))\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    yield f"chdb://{path}"
    holder.kill()
    holder.wait()


@pytest.fixture(scope="module")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store as a user has it after a first worker run: migrated, no process holding it."""
    path = tmp_path_factory.mktemp("template") / "clickhouse"
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "migrate"],
        env=env | {"METER_CLICKHOUSE_DSN": f"chdb://{path}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return path


def _run(argv: list[str], failure: str, env: dict[str, str], template: Path, scratch: Path) -> Outcome:
    if env["METER_CLICKHOUSE_DSN"] == FRESH:  # each command its own copy: none holds another's
        copy = Path(tempfile.mkdtemp(prefix="store-", dir=scratch)) / "clickhouse"  # pytest's, cleaned up
        shutil.copytree(template, copy)
        env = env | {"METER_CLICKHOUSE_DSN": f"chdb://{copy}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=RUNS_FOR_S)
        return Outcome(argv, failure, proc.returncode, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        return Outcome(argv, failure, None, err)


def test_every_command_fails_in_one_line_without_a_traceback(
    topics: Settings, held_store: str, migrated_store: Path, tmp_path: Path
) -> None:
    base = cli_env(
        topics,
        METER_CLICKHOUSE_DSN=FRESH,
        METER_HTTP_PORT="0",
        METER_NODE_SECRET=secrets.token_urlsafe(32),
        METER_DEMO_SEED=secrets.token_urlsafe(16),
        METER_ADMIN_API_KEY=secrets.token_urlsafe(32),
    )
    failures = {
        "store locked": {"METER_CLICKHOUSE_DSN": held_store},
        "store down": {"METER_CLICKHOUSE_DSN": "http://127.0.0.1:1"},
        "broker down": {"METER_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
    }
    jobs = [(argv, name, base | extra) for name, extra in failures.items() for argv in COMMANDS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda job: _run(job[0], job[1], job[2], migrated_store, tmp_path), jobs))

    problems = []
    for o in outcomes:
        what = f"meter {' '.join(o.argv)} ({o.failure})"
        lines = [line for line in o.stderr.splitlines() if line.strip()]
        if o.argv[0] in LONG_RUNNING:  # they log as they run: their log records are not the message
            lines = [line for line in lines if not LOG_RECORD.match(line)]
        if "Traceback" in o.stderr:
            problems.append(f"{what}: traceback\n{o.stderr[-1500:]}")
        elif o.code not in (None, 0) and (len(lines) != 1 or not lines[0].startswith("meter ")):
            problems.append(f"{what}: exit {o.code} with {len(lines)} stderr lines:\n" + "\n".join(lines[-8:]))
    assert problems == [], "\n\n".join(problems)
    # The matrix is not vacuous: each failure stopped the commands that need what it breaks.
    failed = {(tuple(o.argv), o.failure) for o in outcomes if o.code not in (None, 0)}
    for needs_store in (["top"], ["migrate"], ["key-state", "--key", "k1"], ["worker"]):
        assert (tuple(needs_store), "store locked") in failed
        assert (tuple(needs_store), "store down") in failed
    for needs_kafka in (["why", "k1"], ["block", "k1", "--for", "1m"], ["topics"], ["dlq", "show"]):
        assert (tuple(needs_kafka), "broker down") in failed
