#!/usr/bin/env bash
# Install (Debian package), initialise and start a throw-away PostgreSQL server on 127.0.0.1, or
# stop it and delete its data. Each `start` makes a fresh data folder with mktemp (remembered in
# .ci/.postgres-data beside this script, so `stop` finds it) and writes the SQLAlchemy URL to
# .ci/.postgres-url: two clones can run CI on one machine without touching each other's server.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="$here/.postgres-data"

bindir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

stop() {
  local bin data
  [ -f "$state" ] || return 0
  data="$(cat "$state")"
  bin="$(bindir)"
  if [ -n "$bin" ] && [ -f "$data/postmaster.pid" ]; then
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast stop >/dev/null || true
  fi
  case "$data" in
    "${TMPDIR:-/tmp}"/ttl-search-ci-pg.*) rm -rf "$data" ;;  # only a folder this script made
  esac
  rm -f "$state" "$here/.postgres-url"
}

cd /  # runuser as postgres cannot enter root-owned working folders
case "${1:-start}" in
  start)
    stop  # a server this clone started earlier
    if [ -z "$(bindir)" ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq postgresql >/dev/null
    fi
    bin="$(bindir)"
    data="$(mktemp -d "${TMPDIR:-/tmp}/ttl-search-ci-pg.XXXXXX")"
    echo "$data" > "$state"
    chown postgres:postgres "$data"
    runuser -u postgres -- "$bin/initdb" -D "$data" -A trust -U postgres >/dev/null
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
      -o "-h 127.0.0.1 -p $port -k $data" start >/dev/null
    runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres ttl_test
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/ttl_test" > "$here/.postgres-url"
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, data in $data"
    ;;
  stop)
    stop
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
