#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft mode, no ZooKeeper) for development, demo and tests.
#
#   infra/kafka/kafka.sh fetch    download the broker jars from Maven Central (once, cached)
#   infra/kafka/kafka.sh start    fetch if needed, format storage if new, start, wait until it answers
#   infra/kafka/kafka.sh stop     stop the broker started from this data folder
#   infra/kafka/kafka.sh status   say whether it runs
#
# Environment: KAFKA_PORT (default 9092; the controller uses KAFKA_PORT+1),
#              KAFKA_DATA_DIR (default <repo>/.data/kafka-$KAFKA_PORT),
#              KAFKA_LIB_DIR (default <repo>/.data/kafka-lib), KAFKA_HEAP (default 512m),
#              KAFKA_SECURITY=sasl: a secured broker instead (below; default plaintext).
#
# KAFKA_SECURITY=sasl (development and tests only): one SASL_PLAINTEXT listener with the PLAIN
# mechanism, ACLs enforced (KRaft StandardAuthorizer, nothing allowed without an ACL,
# super user User:admin). Users admin, node, worker, operator and analytics, each with the
# password in KAFKA_SASL_<USER>_PASSWORD (default "<user>-secret"). Default port 9192 and
# data folder <repo>/.data/kafka-sasl-$KAFKA_PORT, so it runs next to the plain broker.
# Apply the project's ACLs per role with `meter kafka-acls --apply` as admin.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
security="${KAFKA_SECURITY:-plaintext}"
case "$security" in
  plaintext) port="${KAFKA_PORT:-9092}"; data_dir="${KAFKA_DATA_DIR:-$repo/.data/kafka-${KAFKA_PORT:-9092}}" ;;
  sasl) port="${KAFKA_PORT:-9192}"; data_dir="${KAFKA_DATA_DIR:-$repo/.data/kafka-sasl-${KAFKA_PORT:-9192}}" ;;
  *) echo "kafka.sh: KAFKA_SECURITY must be plaintext or sasl, not '$security'" >&2; exit 2 ;;
esac
controller_port=$((port + 1))
lib_dir="${KAFKA_LIB_DIR:-$repo/.data/kafka-lib}"
heap="${KAFKA_HEAP:-512m}"
pid_file="$data_dir/broker.pid"
config="$data_dir/server.properties"
log_file="$data_dir/broker.log"

die() { echo "kafka.sh: $*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is required but not found on PATH ($2)"
}

fetch() {
  if [ -f "$lib_dir/.complete" ]; then return 0; fi
  need java "install a Java 17+ runtime, e.g. apt-get install openjdk-17-jre-headless"
  need mvn "install Maven, e.g. apt-get install maven"
  echo "kafka.sh: fetching the Kafka broker jars with Maven into $lib_dir"
  mkdir -p "$lib_dir"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$lib_dir" -DincludeScope=runtime \
    || die "Maven could not fetch the broker jars (see the output above)"
  touch "$lib_dir/.complete"
}

java_run() {
  java -Xms"$heap" -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/log4j2.properties" -Dkafka.log.file="$log_file" \
    -cp "$lib_dir/*" "$@"
}

running() {
  # The pid file's process, if it is still this broker: after a reboot or a container restart
  # the pid may belong to something else, which must be neither trusted nor killed.
  [ -f "$pid_file" ] || return 1
  local pid; pid="$(cat "$pid_file")"
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $config"
}

answers() {
  # The broker answers when its port accepts a TCP connection and the log says it started.
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && grep -q "Kafka Server started\|\[KafkaRaftServer nodeId=1\] Kafka Server started" "$log_file" 2>/dev/null
}

sasl_password() {
  # KAFKA_SASL_<USER>_PASSWORD, else "<user>-secret" (a development broker's password)
  local var; var="KAFKA_SASL_$(echo "$1" | tr '[:lower:]' '[:upper:]')_PASSWORD"
  local value="${!var:-$1-secret}"
  case "$value" in *'"'*|*'\\'*|*' '*) die "$var must not contain quotes, backslashes or spaces" ;; esac
  echo "$value"
}

listener_config() {
  if [ "$security" = plaintext ]; then
    cat <<PROPS
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
PROPS
    return 0
  fi
  # Clients, the broker itself and the controller all authenticate; the broker and the
  # controller as admin, the only super user. No ACL, no access.
  local users="" user admin_password
  admin_password="$(sasl_password admin)"
  for user in admin node worker operator analytics; do
    users="$users user_$user=\"$(sasl_password "$user")\""
  done
  local jaas="org.apache.kafka.common.security.plain.PlainLoginModule required username=\"admin\" password=\"$admin_password\"$users;"
  cat <<PROPS
listeners=SASL_PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=SASL_PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_PLAINTEXT
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT
sasl.enabled.mechanisms=PLAIN
sasl.mechanism.inter.broker.protocol=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=$jaas
listener.name.controller.plain.sasl.jaas.config=$jaas
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin
allow.everyone.if.no.acl.found=false
PROPS
}

write_config() {
  mkdir -p "$data_dir/logs"
  local listeners; listeners="$(listener_config)"
  ( umask 077; : > "$config" )  # the secured broker's file holds its users' passwords
  cat > "$config" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
$listeners
log.dirs=$data_dir/logs
num.partitions=6
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.hours=168
log.cleaner.backoff.ms=1000
PROPS
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  if running; then echo "kafka.sh: broker already running on 127.0.0.1:$port (pid $(cat "$pid_file"))"; return 0; fi
  for p in "$port" "$controller_port"; do
    port_open "$p" && die "port $p is already in use by another process (another broker? choose KAFKA_PORT)"
  done
  fetch
  write_config
  if [ ! -f "$data_dir/logs/meta.properties" ]; then
    cluster_id="$(java_run kafka.tools.StorageTool random-uuid | tail -n 1)"
    java_run kafka.tools.StorageTool format -t "$cluster_id" -c "$config" >/dev/null \
      || die "formatting KRaft storage in $data_dir/logs failed"
  fi
  : > "$log_file"
  nohup java -Xms"$heap" -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/log4j2.properties" -Dkafka.log.file="$log_file" \
    -cp "$lib_dir/*" kafka.Kafka "$config" > "$data_dir/stdout.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$pid_file"
  for _ in $(seq 1 120); do
    if answers; then
      echo "kafka.sh: broker up on 127.0.0.1:$port ($security, pid $pid, data $data_dir)"
      return 0
    fi
    # Liveness of the child itself, not running()'s command-line check: until the forked
    # shell has exec'd java its command line is this script's, which read as "exited" once
    # (empty logs) on a busy machine.
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$data_dir/stdout.log" "$log_file" >&2; die "broker exited during start"; }
    sleep 0.5
  done
  die "broker did not answer on 127.0.0.1:$port within 60 s (see $log_file)"
}

stop() {
  if ! running; then echo "kafka.sh: no broker running from $data_dir"; rm -f "$pid_file"; return 0; fi
  local pid; pid="$(cat "$pid_file")"
  kill "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; echo "kafka.sh: broker stopped"; return 0; }
    sleep 0.5
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pid_file"
  echo "kafka.sh: broker did not stop in 30 s; killed"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) if running; then echo "running (pid $(cat "$pid_file"), 127.0.0.1:$port)"; else echo "stopped"; exit 1; fi ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
