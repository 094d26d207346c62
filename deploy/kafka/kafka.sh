#!/usr/bin/env bash
# A local single-node KRaft Kafka without Docker: jars from Maven Central, data and
# logs under a git-ignored state folder. Every command is idempotent.
#
#   deploy/kafka/kafka.sh fetch|start|stop|status|ensure
#
# Environment: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093),
# KAFKA_HOME_DIR (<repo>/.cache/kafka), KAFKA_HEAP (512m).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
port=${KAFKA_PORT:-9092}
controller_port=${KAFKA_CONTROLLER_PORT:-9093}
home=${KAFKA_HOME_DIR:-$repo/.cache/kafka}
libs=$home/libs
state=$home/state-$port
pidfile=$state/kafka.pid
# Fixed so that `format --ignore-formatted` is a no-op on every later start.
cluster_id=c3RyZWFtZXRsLWxvY2Fs00

log() { echo "[kafka] $*" >&2; }

answers() {
  # True when something accepts TCP connections on the bootstrap port.
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

ready() {
  # Ready means a client can read cluster metadata, not merely that the port is open.
  # kafka_2.13's runtime classpath has no admin CLI, so the venv's aiokafka asks.
  answers || return 1
  [ -x "$repo/.venv/bin/python" ] || return 0
  "$repo/.venv/bin/python" - "$port" <<'PY' >/dev/null 2>&1
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient
async def main():
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{sys.argv[1]}", request_timeout_ms=3000)
    await admin.start()
    try:
        await admin.describe_cluster()
    finally:
        await admin.close()
asyncio.run(main())
PY
}

fetch() {
  if [ -f "$libs/.complete" ]; then return 0; fi
  log "collecting Kafka jars from Maven Central into $libs"
  mkdir -p "$libs"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs"
  touch "$libs/.complete"
}

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  if running_pid >/dev/null; then
    log "already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"
    wait_ready
    return 0
  fi
  if answers; then
    log "something already answers on 127.0.0.1:$port; using it"
    return 0
  fi
  fetch
  mkdir -p "$state/data"
  sed -e "s#@PORT@#$port#g" -e "s#@CONTROLLER_PORT@#$controller_port#g" \
      -e "s#@DATA_DIR@#$state/data#g" "$here/server.properties.in" > "$state/server.properties"
  java -cp "$libs/*" -Dlog4j2.configurationFile="$here/log4j2.yaml" kafka.tools.StorageTool \
    format -t "$cluster_id" -c "$state/server.properties" --ignore-formatted >"$state/format.log" 2>&1 \
    || { cat "$state/format.log" >&2; exit 1; }
  log "starting broker on 127.0.0.1:$port (logs: $state/kafka.log)"
  nohup java -Xms256m -Xmx"${KAFKA_HEAP:-512m}" -XX:+UseG1GC \
    -Dlog4j2.configurationFile="$here/log4j2.yaml" \
    -cp "$libs/*" kafka.Kafka "$state/server.properties" >"$state/kafka.log" 2>&1 &
  echo $! > "$pidfile"
  wait_ready
}

wait_ready() {
  for _ in $(seq 1 120); do
    if ready; then log "ready on 127.0.0.1:$port"; return 0; fi
    if ! running_pid >/dev/null; then
      log "broker exited; last log lines:"; tail -30 "$state/kafka.log" >&2; exit 1
    fi
    sleep 1
  done
  log "broker not ready after 120 s"; tail -30 "$state/kafka.log" >&2; exit 1
}

stop() {
  local pid
  if ! pid=$(running_pid); then log "not running"; rm -f "$pidfile"; return 0; fi
  log "stopping pid $pid"
  kill "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; log "stopped"; return 0; }
    sleep 1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

status() {
  if pid=$(running_pid); then echo "running (pid $pid) on 127.0.0.1:$port"; return 0; fi
  if answers; then echo "an external broker answers on 127.0.0.1:$port"; return 0; fi
  echo "not running"; return 3
}

case "${1:-}" in
  fetch) fetch ;;
  start|ensure) start ;;
  stop) stop ;;
  status) status ;;
  reset) stop; rm -rf "$state" ;;
  *) echo "usage: $0 fetch|start|stop|status|reset" >&2; exit 2 ;;
esac
