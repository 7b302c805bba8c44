#!/usr/bin/env bash
# The local demo: set up, start a KRaft Kafka broker on 127.0.0.1:9092, create the topics,
# migrate the embedded ClickHouse (chDB, .data/clickhouse), then run a worker, three demo
# API nodes and a load generator, with a live table of which keys are allowed or blocked.
# Extra arguments go to `meter demo` (e.g. --duration 60).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
if [ -z "${METER_KAFKA_BOOTSTRAP:-}" ]; then
  port="${KAFKA_PORT:-9092}"
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: a Kafka broker already answers on 127.0.0.1:$port; using it"
  else
    infra/kafka/kafka.sh start
  fi
  export METER_KAFKA_BOOTSTRAP="127.0.0.1:$port"
fi
# Secrets never live in code: a random node secret (nodes refuse one under 32 bytes) and
# demo-key seed for this demo run, unless you set your own.
export METER_NODE_SECRET="${METER_NODE_SECRET:-$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(32))')}"
export METER_DEMO_SEED="${METER_DEMO_SEED:-$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(16))')}"
if [ -z "${METER_ADMIN_API_KEY:-}" ]; then
  METER_ADMIN_API_KEY="$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))')"
  export METER_ADMIN_API_KEY
  echo "demo: admin key for the dashboard (this run only): $METER_ADMIN_API_KEY"
fi
.venv/bin/meter --log-level WARNING topics
.venv/bin/meter --log-level WARNING migrate
.venv/bin/meter --log-level WARNING demo "$@"
echo
echo "demo: the broker keeps running (stop it with: infra/kafka/kafka.sh stop)."
