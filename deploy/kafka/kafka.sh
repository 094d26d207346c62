#!/usr/bin/env bash
# A local single-node KRaft Kafka without Docker: jars from Maven Central, data and
# logs under a git-ignored state folder. Every command is idempotent.
#
#   deploy/kafka/kafka.sh fetch|start|stop|status|ensure
#
# Environment: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093),
# KAFKA_HOME_DIR (<repo>/.cache/kafka), KAFKA_HEAP (1g, the heap's fixed size),
# KAFKA_GC_OPTS (the collector's JVM options: -XX:+UseG1GC, plus transparent huge pages
# and a pre-touched heap where the kernel offers them; see default_gc_opts).
#
# KAFKA_SECURITY=sasl_ssl starts a broker whose only client listener is SASL_SSL: a CA and
# a broker certificate (for 127.0.0.1 and localhost) are made with openssl into
# <state>/tls, and SCRAM users are created when the storage is formatted. Clients trust
# <state>/tls/ca.pem and log in as KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD
# (streametl / streametl-secret) with PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
port=${KAFKA_PORT:-9092}
controller_port=${KAFKA_CONTROLLER_PORT:-9093}
home=${KAFKA_HOME_DIR:-$repo/.cache/kafka}
security=${KAFKA_SECURITY:-plaintext}
sasl_user=${KAFKA_SASL_USERNAME:-streametl}
sasl_password=${KAFKA_SASL_PASSWORD:-streametl-secret}
# The broker's own login on its SASL_SSL listener (inter-broker traffic).
admin_password=admin-secret
libs=$home/libs
case "$security" in
  plaintext) state=$home/state-$port ;;
  sasl_ssl) state=$home/state-$port-sasl_ssl ;;
  *) echo "KAFKA_SECURITY must be plaintext or sasl_ssl, not $security" >&2; exit 2 ;;
esac
tls=$state/tls
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
  "$repo/.venv/bin/python" - "$port" "$security" "$tls/ca.pem" "$sasl_user" "$sasl_password" <<'PY' >/dev/null 2>&1
import asyncio, ssl, sys
from aiokafka.admin import AIOKafkaAdminClient
async def main():
    port, security, cafile, user, password = sys.argv[1:]
    auth = {}
    if security == "sasl_ssl":
        auth = dict(security_protocol="SASL_SSL", ssl_context=ssl.create_default_context(cafile=cafile),
                    sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=user, sasl_plain_password=password)
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=3000, **auth)
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

make_certificates() {
  # A CA and a broker certificate signed by it, valid for 127.0.0.1 and localhost.
  [ -f "$tls/broker.p12" ] && return 0
  log "making a CA and a broker certificate in $tls"
  mkdir -p "$tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=streametl-local-ca" \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$tls/broker.key" -out "$tls/broker.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$tls/san.ext"
  openssl x509 -req -in "$tls/broker.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 3650 -extfile "$tls/san.ext" -out "$tls/broker.pem" 2>/dev/null
  openssl pkcs12 -export -in "$tls/broker.pem" -inkey "$tls/broker.key" -certfile "$tls/ca.pem" \
    -name broker -out "$tls/broker.p12" -passout pass:changeit
}

write_properties() {
  sed -e "s#@PORT@#$port#g" -e "s#@CONTROLLER_PORT@#$controller_port#g" \
      -e "s#@DATA_DIR@#$state/data#g" "$here/server.properties.in" > "$state/server.properties"
  [ "$security" = sasl_ssl ] || return 0
  # Replace the plaintext client listener by SASL_SSL (the controller's stays internal).
  sed -i -e "s#^listeners=.*#listeners=SASL_SSL://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port#" \
      -e "s#^advertised.listeners=.*#advertised.listeners=SASL_SSL://127.0.0.1:$port#" \
      -e "s#^inter.broker.listener.name=.*#inter.broker.listener.name=SASL_SSL#" \
      -e "s#^listener.security.protocol.map=.*#listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT#" \
      "$state/server.properties"
  cat >> "$state/server.properties" <<PROPS
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_password";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$admin_password" user_admin="$admin_password" user_$sasl_user="$sasl_password";
ssl.keystore.type=PKCS12
ssl.keystore.location=$tls/broker.p12
ssl.keystore.password=changeit
ssl.key.password=changeit
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
PROPS
}

# G1, with the heap on transparent huge pages, touched once at start, when the kernel
# offers them (THP "always" or "madvise"; the flag is Linux-only). On the 2-core test
# machine a young collection copied its survivors about twice as fast, and the transform
# benchmark's p50 and median p99 fell by ~0.3 and ~1.3 ms (docs/performance.md,
# "Session 29"). Elsewhere: G1 alone.
default_gc_opts() {
  local thp=/sys/kernel/mm/transparent_hugepage/enabled
  if [ -r "$thp" ] && ! grep -q '\[never\]' "$thp"; then
    echo "-XX:+UseG1GC -XX:+UseTransparentHugePages -XX:+AlwaysPreTouch"
  else
    echo "-XX:+UseG1GC"
  fi
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
  local users=()
  if [ "$security" = sasl_ssl ]; then
    make_certificates
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
      users+=(--add-scram "$mechanism=[name=admin,password=$admin_password]"
              --add-scram "$mechanism=[name=$sasl_user,password=$sasl_password]")
    done
  fi
  write_properties
  java -cp "$libs/*" -Dlog4j2.configurationFile="$here/log4j2.yaml" kafka.tools.StorageTool \
    format -t "$cluster_id" -c "$state/server.properties" --ignore-formatted "${users[@]}" >"$state/format.log" 2>&1 \
    || { cat "$state/format.log" >&2; exit 1; }
  log "starting broker on 127.0.0.1:$port (logs: $state/kafka.log)"
  # A fixed heap of Kafka's own default size (1 GB, as kafka-server-start.sh): with a
  # 256-512 MB heap the broker's young collections came every ~1.3 s at 5,000 events/s
  # and each stopped it for 7-14 ms, about 1 % of every latency sample (the p99).
  # docs/performance.md, "Issue 22, session 15". G1 keeps its own pause goal (200 ms):
  # kafka-run-class.sh's 20 ms goal gave more, shorter young pauses and a worse
  # transform p99 here ("Issue 22, session 16").
  local gc_opts=${KAFKA_GC_OPTS:-$(default_gc_opts)}
  # shellcheck disable=SC2086  # gc_opts is a list of JVM options
  nohup java -Xms"${KAFKA_HEAP:-1g}" -Xmx"${KAFKA_HEAP:-1g}" $gc_opts \
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
