#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the distributed tuning tests
# (tests/test_tuning.py reads its URL from LIT_SURGERY_TEST_POSTGRES).
#
#   bash .ci/postgres.sh start   install PostgreSQL with apt if missing, start the server
#                                (idempotent), print its URL on stdout; all else on stderr
#   bash .ci/postgres.sh stop    stop it (the data directory stays for a fast restart)
#
# The cluster lives in $LIT_SURGERY_PG_DIR (default /tmp/lit-surgery-postgres), listens on
# 127.0.0.1 only, on a free port, with trust authentication and no fsync: test data only.
# PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user.
set -euo pipefail
DIR=${LIT_SURGERY_PG_DIR:-/tmp/lit-surgery-postgres}
DB=lit_surgery_test

log() { echo "postgres.sh: $*" >&2; }

# The newest server's bin folder (one with initdb: the client package alone has psql), or "".
bindir() {
  local f
  f=$( (ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null || true) | sort -V | tail -n 1)
  if [ -n "$f" ]; then dirname "$f"; fi
}

install_postgres() { bash "$(dirname "$0")/apt-install.sh" postgresql; }

# Run a server binary as the cluster's owner.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  BIN=$(bindir)
  if [ -z "$BIN" ]; then install_postgres; BIN=$(bindir); fi
  [ -n "$BIN" ] || { log "no PostgreSQL binaries under /usr/lib/postgresql after installing"; exit 1; }
  mkdir -p "$DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$DIR"; chmod 700 "$DIR"; fi
  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    log "initdb $DIR/data"
    as_owner "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 \
      || { cat "$DIR/initdb.log" >&2; exit 1; }
  fi
  if as_owner "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1 && [ -f "$DIR/port" ]; then
    PORT=$(cat "$DIR/port")
  else
    PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "$PORT" >"$DIR/port"
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100" >&2 \
      || { tail -n 20 "$DIR/server.log" >&2; exit 1; }
  fi
  if ! as_owner "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$DB'" postgres | grep -q 1; then
    as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
  fi
  echo "postgresql://postgres@127.0.0.1:$PORT/$DB"
}

stop() {
  BIN=$(bindir)
  if [ -n "$BIN" ] && [ -f "$DIR/data/PG_VERSION" ]; then
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
