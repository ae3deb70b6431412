#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the sweep tests (several workers, one study).
# Installs Debian's postgresql if needed, starts a server in $ADL_PG_DATA on $ADL_PG_PORT,
# creates user/database adl, and prints the URL on stdout (everything else goes to stderr):
#
#     export ADL_TEST_POSTGRES_URL=$(.ci/postgres.sh)
#     .venv/bin/python -m pytest -q tests/test_sweep_workers.py
#
# Rerunning it is harmless (an existing data folder / running server is reused).
# Stop it with: su postgres -c "$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/pg_ctl -D /tmp/adl-pg stop"
set -euo pipefail
PORT=${ADL_PG_PORT:-55432}
DATA=${ADL_PG_DATA:-/tmp/adl-pg}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing postgresql (apt-get)..." >&2
  $SUDO apt-get update -qq >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

# initdb/postgres refuse to run as root: run them as the postgres user then
if [ "$(id -u)" = 0 ]; then
  as_pg() { su postgres -s /bin/sh -c "$*"; }
  mkdir -p "$DATA" && chown postgres "$DATA" && chmod 700 "$DATA"
else
  as_pg() { sh -c "$*"; }
  mkdir -p "$DATA" && chmod 700 "$DATA"
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
  as_pg "$BIN/initdb -D $DATA -U postgres -A trust --no-sync" >&2
fi
if ! as_pg "$BIN/pg_ctl -D $DATA status" >/dev/null 2>&1; then
  as_pg "$BIN/pg_ctl -D $DATA -l $DATA/server.log -w -o \"-p $PORT -k /tmp -c listen_addresses=127.0.0.1\" start" >&2
fi

PSQL="$BIN/psql -h 127.0.0.1 -p $PORT -U postgres -v ON_ERROR_STOP=1 -qtA"
if [ "$($PSQL -c "SELECT 1 FROM pg_roles WHERE rolname = 'adl'")" != 1 ]; then
  $PSQL -c "CREATE USER adl PASSWORD 'adl'" >&2
fi
if [ "$($PSQL -c "SELECT 1 FROM pg_database WHERE datname = 'adl'")" != 1 ]; then
  $PSQL -c "CREATE DATABASE adl OWNER adl" >&2
fi
echo "postgresql://adl:adl@127.0.0.1:$PORT/adl"
