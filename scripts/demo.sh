#!/usr/bin/env bash
# The local demo: set up, start a KRaft Kafka broker on 127.0.0.1:9092, create topics,
# migrate the embedded ClickHouse (chDB, .data/clickhouse), run a worker, simulate API
# traffic and print the usage read back. Extra arguments go to `meter demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
infra/kafka/kafka.sh start
export METER_KAFKA_BOOTSTRAP="${METER_KAFKA_BOOTSTRAP:-127.0.0.1:${KAFKA_PORT:-9092}}"
.venv/bin/meter topics
.venv/bin/meter migrate
.venv/bin/meter --log-level WARNING demo "$@"
echo
echo "demo: the broker keeps running (stop it with: infra/kafka/kafka.sh stop)."
echo "demo: query a key yourself, e.g.: .venv/bin/meter usage --key KEY_ID --granularity hour"
