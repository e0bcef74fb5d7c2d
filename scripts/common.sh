# SPDX-License-Identifier: PostgreSQL
# shellcheck shell=bash
# Helpers shared by run.sh and scripts/pg_cluster.sh. Source it, don't run it.
#
# Everything here writes diagnostics to stderr only: pg_cluster.sh's stdout is
# reserved for the `export` lines its caller evals.

pgr_log()  { printf '%s: %s\n' "${PGR_LOG_TAG:-pgring}" "$*" >&2; }
pgr_warn() { printf '%s: warning: %s\n' "${PGR_LOG_TAG:-pgring}" "$*" >&2; }
pgr_die()  { printf '%s: error: %s\n' "${PGR_LOG_TAG:-pgring}" "$*" >&2; exit 1; }

pgr_is_root() { [[ $(id -u) -eq 0 ]]; }

# PostgreSQL and pgbouncer refuse to run as root, so when we are root their
# binaries run as the `postgres` system user (created by the Debian package).
# The working directory is switched to / first: the caller's cwd (e.g. /root)
# is often unreadable for that user and some tools complain about it.
pgr_as_pg() {
    if pgr_is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# The user the servers run as (for chown).
pgr_pg_user() {
    if pgr_is_root; then echo postgres; else id -un; fi
}

# Quote a string for safe use in shell code that is later eval'd.
pgr_shquote() {
    local s=$1
    printf "'%s'" "${s//\'/\'\\\'\'}"
}

# True if something listens on TCP port $1 (any address) or a connect to
# 127.0.0.1:$1 succeeds.
pgr_port_in_use() {
    local port=$1
    if command -v ss >/dev/null 2>&1; then
        [[ -n $(ss -Htln "sport = :$port" 2>/dev/null) ]] && return 0
    fi
    # Fallback / double check: a successful connect means it is taken.
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    return 1
}

# Print a TCP port that is currently free on 127.0.0.1, from 20000-39999 less the
# kernel's ephemeral range (ip_local_port_range, 32768-60999 by default). A port from that
# range can be taken while a server is down for a restart: by any outgoing connection, and
# even by a client retrying the downed port itself, since a connect whose ephemeral port
# equals the destination port connects to itself. Starts at a random point so that
# concurrent callers rarely pick the same port; callers that bind later must still cope with
# losing a race.
pgr_free_port() {
    local lo=32768 hi=60999 range start i port pass
    if [[ -r /proc/sys/net/ipv4/ip_local_port_range ]]; then
        read -r lo hi </proc/sys/net/ipv4/ip_local_port_range || true
    fi
    range=20000
    start=$((RANDOM % range))
    # A second pass takes ephemeral ports too, for a machine whose range covers 20000-39999.
    for pass in avoid any; do
        for ((i = 0; i < range; i++)); do
            port=$((20000 + (start + i) % range))
            [[ $pass == avoid ]] && ((port >= lo && port <= hi)) && continue
            if ! pgr_port_in_use "$port"; then
                echo "$port"
                return 0
            fi
        done
    done
    pgr_die "no free TCP port found in 20000-39999"
}

# Directory with the PostgreSQL server binaries: `pg_config --bindir` if it
# holds initdb (on Debian it usually points at /usr/bin, which only has the
# client wrappers), else the newest /usr/lib/postgresql/*/bin.
pgr_pg_bindir() {
    local d
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n $d && -x $d/initdb && -x $d/pg_ctl ]]; then
            echo "$d"
            return 0
        fi
    fi
    d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
        sort -V | tail -n 1)
    if [[ -n $d && -x $d/initdb && -x $d/pg_ctl ]]; then
        echo "$d"
        return 0
    fi
    pgr_die "cannot find the PostgreSQL server binaries (initdb, pg_ctl); install the 'postgresql' package"
}

# Wait until something listens on 127.0.0.1:$1, at most $2 seconds.
pgr_wait_port() {
    local port=$1 secs=${2:-10} i
    for ((i = 0; i < secs * 10; i++)); do
        pgr_port_in_use "$port" && return 0
        sleep 0.1
    done
    return 1
}
