# Shared by scripts/test and scripts/run-feed: make PostgreSQL and Redis answer on loopback,
# starting them, or installing Debian's packages first on a fresh machine.
# shellcheck shell=bash

export LOADLAB_TEST_POSTGRES_URL="${LOADLAB_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
export LOADLAB_TEST_REDIS_URL="${LOADLAB_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

log() { printf '\033[1m%s:\033[0m %s\n' "${0##*/}" "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root for: $*"; return 1; fi
}

apt_updated=""
apt_install() {
  command -v apt-get >/dev/null || { log "apt-get not found; install $* yourself"; return 1; }
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq >/dev/null; apt_updated=1; fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_answers() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
psql_test() { psql -X -q -v ON_ERROR_STOP=1 "$LOADLAB_TEST_POSTGRES_URL" "$@"; }

ensure_postgres() {
  command -v pg_isready >/dev/null && command -v psql >/dev/null || apt_install postgresql postgresql-client
  if ! pg_answers; then
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$version" ]; then apt_install postgresql; version=$(ls /etc/postgresql | sort -V | tail -n1); fi
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 50); do pg_answers && break; sleep 0.2; done
  fi
  pg_answers || { log "PostgreSQL does not answer on 127.0.0.1:5432"; exit 1; }
  if ! psql_test -c 'select 1' >/dev/null 2>&1; then
    # A fresh Debian cluster: allow trust auth on loopback and create the test database.
    log "configuring PostgreSQL for tests (trust on loopback, database test)"
    local hba
    hba=$(as_root runuser -u postgres -- psql -At -c 'show hba_file')
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    as_root runuser -u postgres -- psql -q -c 'select pg_reload_conf()' >/dev/null
    as_root runuser -u postgres -- createdb test 2>/dev/null || true
    sleep 0.5
    psql_test -c 'select 1' >/dev/null
  fi
}

redis_answers() { [ "$(redis-cli -u "$LOADLAB_TEST_REDIS_URL" ping 2>/dev/null)" = PONG ]; }

ensure_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server redis-tools
  if ! redis_answers; then
    log "starting Redis"
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 1 50); do redis_answers && break; sleep 0.1; done
  fi
  redis_answers || { log "Redis does not answer at $LOADLAB_TEST_REDIS_URL"; exit 1; }
}

# The HTML report's tests open it in headless Chromium; Debian's package puts it at /usr/bin/chromium.
ensure_chromium() {
  [ -x /usr/bin/chromium ] || apt_install chromium
}

# Removes what crashed test runs left behind: test schemas and test-prefixed Redis keys.
cleanup_test_leftovers() {
  psql_test -At -c "select nspname from pg_namespace where nspname like 'test\_%'" |
    while read -r schema; do psql_test -c "drop schema if exists \"$schema\" cascade" >/dev/null 2>&1 || true; done
  redis-cli -u "$LOADLAB_TEST_REDIS_URL" --scan --pattern 'loadlab-test:*' |
    xargs -r -n 500 redis-cli -u "$LOADLAB_TEST_REDIS_URL" unlink >/dev/null || true
}
