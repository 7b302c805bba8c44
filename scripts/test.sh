#!/usr/bin/env bash
# Set up, start the services the tests need (a local KRaft Kafka broker; ClickHouse is
# embedded chDB), run the whole test suite, and fail if it fails or runs no test.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

export KAFKA_PORT="${KAFKA_PORT:-19092}"
started_here=0
if [ -z "${METER_KAFKA_BOOTSTRAP:-}" ]; then
  if (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; then
    echo "test: a broker already answers on 127.0.0.1:$KAFKA_PORT; using it"
  elif ! infra/kafka/kafka.sh status >/dev/null 2>&1; then
    infra/kafka/kafka.sh start
    started_here=1
  fi
  export METER_KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
fi
# The secured broker (KAFKA_SECURITY=sasl, port 19192) is started and stopped by
# tests/integration/test_kafka_security.py; if pytest dies first, it is stopped here.
secured() { KAFKA_SECURITY=sasl KAFKA_PORT=19192 infra/kafka/kafka.sh "$@"; }
secured_running=0
if secured status >/dev/null 2>&1; then secured_running=1; fi
cleanup() {
  if [ "${KEEP_KAFKA:-0}" = 1 ]; then return 0; fi
  if [ "$started_here" = 1 ]; then infra/kafka/kafka.sh stop >/dev/null; fi
  if [ "$secured_running" = 0 ]; then secured stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "test: lint, types and import contracts"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports  # the import layers in pyproject.toml ([tool.importlinter])

echo "test: pytest against Kafka at $METER_KAFKA_BOOTSTRAP and embedded ClickHouse (chDB)"
rm -f test-artifacts/faults.jsonl
mkdir -p test-artifacts
set +e
.venv/bin/pytest -p no:cacheprovider -ra "$@" 2>&1 | tee test-artifacts/pytest.log
rc=${PIPESTATUS[0]}
set -e
if [ -f test-artifacts/faults.jsonl ]; then
  echo "test: figures measured by the fault tests (test-artifacts/faults.jsonl):"
  cat test-artifacts/faults.jsonl
  # pytest's own summary line last, where CI readers look for it
  grep -E "^=+ .*(passed|failed|error).* =+$" test-artifacts/pytest.log | tail -n 1
fi
if [ "$rc" = 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
