#!/usr/bin/env bash
# Make the test servers available: memcached, Redis, Valkey and PostgreSQL.
#
# Idempotent: a server that already answers is left alone. Never fails: a server that cannot be
# installed or started is reported, and the tests decide (skip locally, fail under CI=true).
#
# Addresses (the same variables the tests read):
#   DECLCACHE_TEST_MEMCACHED  host:port, default 127.0.0.1:11211
#   DECLCACHE_TEST_REDIS      host:port, default 127.0.0.1:6379
#   DECLCACHE_TEST_VALKEY     host:port, no default: the tests start a private valkey-server, or
#                             a private redis-server where Valkey cannot be installed
#   PostgreSQL is looked for on 127.0.0.1:5432 (DECLCACHE_TEST_POSTGRES_URL is read by the tests).
set -uo pipefail

MEMCACHED_ADDR="${DECLCACHE_TEST_MEMCACHED:-127.0.0.1:11211}"
REDIS_ADDR="${DECLCACHE_TEST_REDIS:-127.0.0.1:6379}"
PG_HOST=127.0.0.1
PG_PORT=5432
WAIT_SECONDS=10

say() { printf 'services: %s\n' "$*"; }

# listening HOST PORT: true when something accepts a TCP connection there.
listening() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

# wait_for NAME HOST PORT: poll for up to WAIT_SECONDS; report the outcome.
wait_for() {
    local name=$1 host=$2 port=$3 i
    for ((i = 0; i < WAIT_SECONDS * 5; i++)); do
        if listening "$host" "$port"; then
            say "$name is up on $host:$port"
            return 0
        fi
        sleep 0.2
    done
    say "WARNING: $name did not answer on $host:$port within ${WAIT_SECONDS}s"
    return 1
}

# is_local HOST: only servers on this machine can be started here.
is_local() {
    case "$1" in
        127.* | localhost | ::1 | '[::1]') return 0 ;;
        *) return 1 ;;
    esac
}

# as_root CMD...: run CMD as root (directly, or through sudo without a password prompt).
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        return 1
    fi
}

# --- memcached -------------------------------------------------------------------------------
ensure_memcached() {
    local host=${MEMCACHED_ADDR%:*} port=${MEMCACHED_ADDR##*:} user
    if listening "$host" "$port"; then
        say "memcached already answers on $host:$port"
        return 0
    fi
    if ! is_local "$host"; then
        say "WARNING: nothing answers on $host:$port (DECLCACHE_TEST_MEMCACHED) and it is not local"
        return 0
    fi
    if ! command -v memcached >/dev/null 2>&1; then
        say "memcached not found; installing the Debian package (apt-get)"
        if command -v apt-get >/dev/null 2>&1 \
            && as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq memcached \
                >/dev/null; then
            say "memcached installed"
        else
            say "WARNING: could not install memcached (need apt-get and root or passwordless sudo);" \
                "memcached tests will skip locally and fail under CI=true"
            return 0
        fi
        # The package's own init script may have started one on the default address already.
        if listening "$host" "$port"; then
            say "memcached already answers on $host:$port"
            return 0
        fi
    fi
    # memcached refuses to run as root without -u.
    local args=(-d -p "$port" -U 0 -l "$host" -m 64)
    if [[ $(id -u) -eq 0 ]]; then
        if id memcache >/dev/null 2>&1; then user=memcache; else user=nobody; fi
        args+=(-u "$user")
    fi
    say "starting memcached ${args[*]}"
    if memcached "${args[@]}"; then
        wait_for memcached "$host" "$port"
    else
        say "WARNING: memcached failed to start"
    fi
    return 0
}

# --- Redis -----------------------------------------------------------------------------------
ensure_redis() {
    local host=${REDIS_ADDR%:*} port=${REDIS_ADDR##*:}
    if listening "$host" "$port"; then
        say "redis already answers on $host:$port"
        return 0
    fi
    if ! is_local "$host"; then
        say "WARNING: nothing answers on $host:$port (DECLCACHE_TEST_REDIS) and it is not local"
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        say "WARNING: redis-server not installed and nothing answers on $host:$port;" \
            "tests that need Redis will skip locally and fail under CI=true"
        return 0
    fi
    say "starting redis-server on $host:$port"
    if redis-server --port "$port" --bind "$host" --save "" --appendonly no \
        --daemonize yes --dir /tmp --logfile "" >/dev/null; then
        wait_for redis "$host" "$port"
    else
        say "WARNING: redis-server failed to start"
    fi
    return 0
}

# --- Valkey ----------------------------------------------------------------------------------
# Nothing to start: without DECLCACHE_TEST_VALKEY the tests start a private valkey-server per
# run. Only the binary is wanted, and redis-server speaks the same protocol where the Debian
# release has no valkey-server package (bookworm): the tests then start that instead.
ensure_valkey() {
    local host port
    if [[ -n "${DECLCACHE_TEST_VALKEY:-}" ]]; then
        host=${DECLCACHE_TEST_VALKEY%:*} port=${DECLCACHE_TEST_VALKEY##*:}
        if listening "$host" "$port"; then
            say "valkey already answers on $host:$port"
            return 0
        fi
        say "WARNING: nothing answers on $host:$port (DECLCACHE_TEST_VALKEY);" \
            "the tests will start a private server instead"
    fi
    if command -v valkey-server >/dev/null 2>&1; then
        say "valkey-server is installed; the tests start a private one"
        return 0
    fi
    say "valkey-server not found; installing the Debian package (apt-get)"
    if command -v apt-get >/dev/null 2>&1 \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valkey-server \
            >/dev/null 2>&1 \
        && command -v valkey-server >/dev/null 2>&1; then
        say "valkey-server installed; the tests start a private one"
    elif command -v redis-server >/dev/null 2>&1; then
        say "could not install valkey-server (no package for this release, or no root);" \
            "the Valkey tests run on a private redis-server (same protocol)"
    else
        say "WARNING: neither valkey-server nor redis-server is installed;" \
            "Valkey tests will skip locally and fail under CI=true"
    fi
    return 0
}

# --- PostgreSQL ------------------------------------------------------------------------------
ensure_postgres() {
    local version
    if listening "$PG_HOST" "$PG_PORT"; then
        say "postgresql already answers on $PG_HOST:$PG_PORT"
        return 0
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [[ ! -d /etc/postgresql ]]; then
        say "WARNING: PostgreSQL does not answer on $PG_HOST:$PG_PORT and pg_ctlcluster is" \
            "not available; tests that need PostgreSQL will skip locally and fail under CI=true"
        return 0
    fi
    # The newest installed cluster version.
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL cluster $version/main"
    if as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start; then
        wait_for postgresql "$PG_HOST" "$PG_PORT"
    else
        say "WARNING: pg_ctlcluster $version main start failed"
    fi
    return 0
}

ensure_memcached
ensure_redis
ensure_valkey
ensure_postgres
exit 0
