#!/usr/bin/env bash
# Install (Debian package), initialise and start a throw-away PostgreSQL server on 127.0.0.1,
# or stop it. `start` writes the SQLAlchemy URL to .ci/.postgres-url.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${TTL_SEARCH_PG_DATA:-/tmp/ttl-search-ci-pg}"

bindir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

cd /  # runuser as postgres cannot enter root-owned working folders
case "${1:-start}" in
  start)
    if [ -z "$(bindir)" ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq postgresql >/dev/null
    fi
    bin="$(bindir)"
    if [ -f "$data/postmaster.pid" ]; then
      runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast stop >/dev/null 2>&1 || true
    fi
    rm -rf "$data"
    mkdir -p "$data"
    chown postgres:postgres "$data"
    runuser -u postgres -- "$bin/initdb" -D "$data" -A trust -U postgres >/dev/null
    port="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
      -o "-h 127.0.0.1 -p $port -k $data" start >/dev/null
    runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres ttl_test
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/ttl_test" > "$here/.postgres-url"
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
    ;;
  stop)
    bin="$(bindir)"
    if [ -n "$bin" ] && [ -f "$data/postmaster.pid" ]; then
      runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast stop >/dev/null || true
    fi
    rm -f "$here/.postgres-url"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
