#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis answer on 127.0.0.1 (SPEC DX-1).
#
# Already running: they are used as they are (never stopped or reconfigured).
# Missing on Debian/Ubuntu: installed from the distribution's packages and
# started; a PostgreSQL installed here is set to trust connections from
# 127.0.0.1 so the default URL postgres://postgres@127.0.0.1:5432 works.
# Finally the databases `crm` and `crm_test` are created if absent.
#
# Override with DATABASE_URL / TEST_DATABASE_URL / REDIS_URL if yours differ.
set -euo pipefail

PG_PORT=5432
REDIS_PORT=6379
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
say() { printf '[backing-services] %s\n' "$*"; }

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null; then
    say "cannot install $* here (no apt-get): install it yourself and start it on 127.0.0.1"; exit 1
  fi
  if [[ $apt_updated -eq 0 ]]; then as_root apt-get update -qq; apt_updated=1; fi
  say "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # name, command...
  local name=$1; shift
  for _ in $(seq 1 60); do "$@" && return 0; sleep 0.5; done
  say "$name did not come up"; exit 1
}

# --- PostgreSQL -------------------------------------------------------------
if ! port_open $PG_PORT; then
  installed_now=0
  if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql postgresql-client
    installed_now=1
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  if [[ $installed_now -eq 1 ]]; then
    hba=/etc/postgresql/$version/main/pg_hba.conf
    # Development machine just set up by us: trust local TCP connections.
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for PostgreSQL port_open $PG_PORT
fi

# --- Redis ------------------------------------------------------------------
if ! port_open $REDIS_PORT; then
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis"
  mkdir -p "${TMPDIR:-/tmp}/crm-redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port $REDIS_PORT --save "" --appendonly no \
    --dir "${TMPDIR:-/tmp}/crm-redis" --logfile "${TMPDIR:-/tmp}/crm-redis/redis.log"
  wait_for Redis port_open $REDIS_PORT
fi

# --- Databases --------------------------------------------------------------
command -v psql >/dev/null || apt_install postgresql-client
server_url=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:$PG_PORT}
if ! psql "$server_url/postgres" -qAtc 'SELECT 1' >/dev/null 2>&1; then
  wait_for "PostgreSQL login" psql "$server_url/postgres" -qAtc 'SELECT 1' >/dev/null 2>&1 || true
  if ! psql "$server_url/postgres" -qAtc 'SELECT 1' >/dev/null; then
    say "PostgreSQL is running but refuses $server_url; set TEST_DATABASE_URL and DATABASE_URL to a URL that works"
    exit 1
  fi
fi
for db in crm crm_test; do
  exists=$(psql "$server_url/postgres" -qAtc "SELECT 1 FROM pg_database WHERE datname = '$db'")
  [[ $exists == 1 ]] || psql "$server_url/postgres" -qc "CREATE DATABASE $db" >/dev/null
done
say "PostgreSQL 127.0.0.1:$PG_PORT and Redis 127.0.0.1:$REDIS_PORT are ready (databases crm, crm_test)"
