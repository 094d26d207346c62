#!/usr/bin/env bash
# A local PostgreSQL for tests and local runs, started the way deploy/kafka/kafka.sh
# starts Kafka: initdb + pg_ctl on a git-ignored data folder, no system service.
#
#   deploy/postgres/postgres.sh start|stop|status|reset|dsn
#
# Environment: PG_PORT (5433), PG_HOME_DIR (<repo>/.cache/postgres). Uses the server
# binaries under /usr/lib/postgresql/<version>/bin, and installs Debian's postgresql-15
# package when there are none. As root, the server runs as the `postgres` user (initdb
# refuses root). The database `streametl` is created at first start; the DSN is
# postgresql://postgres@127.0.0.1:$PG_PORT/streametl (trust authentication, loopback only).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
port=${PG_PORT:-5433}
home=${PG_HOME_DIR:-$repo/.cache/postgres}
data=$home/data-$port
logfile=$home/postgres-$port.log

log() { echo "[postgres] $*" >&2; }

bindir() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$found" ]; then
    log "no PostgreSQL server binaries: installing Debian's postgresql-15"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
    found=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  fi
  echo "$found"
}

# Run a server command as the user that owns the data folder.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

dsn() { echo "postgresql://postgres@127.0.0.1:$port/streametl"; }

running() { [ -f "$data/postmaster.pid" ] && as_owner "$(bindir)/pg_ctl" -D "$data" status >/dev/null 2>&1; }

start() {
  local bin
  bin=$(bindir)
  if running; then log "already running on 127.0.0.1:$port"; return 0; fi
  mkdir -p "$home"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$home"; chmod 755 "$home"; fi
  if [ ! -f "$data/PG_VERSION" ]; then
    as_owner "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >"$home/initdb-$port.log" 2>&1 \
      || { cat "$home/initdb-$port.log" >&2; exit 1; }
  fi
  log "starting on 127.0.0.1:$port (log: $logfile)"
  as_owner "$bin/pg_ctl" -D "$data" -l "$logfile" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -k /tmp -c fsync=off -c max_connections=200" start >/dev/null
  if ! as_owner "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'streametl'" postgres | grep -q 1; then
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres streametl
  fi
  log "ready: $(dsn)"
}

stop() {
  if ! running; then log "not running"; return 0; fi
  as_owner "$(bindir)/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  log "stopped"
}

status() {
  if running; then echo "running on 127.0.0.1:$port ($(dsn))"; return 0; fi
  echo "not running"; return 3
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  reset) stop; rm -rf "$data" "$logfile" ;;
  dsn) dsn ;;
  *) echo "usage: $0 start|stop|status|reset|dsn" >&2; exit 2 ;;
esac
