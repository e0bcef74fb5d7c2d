#!/usr/bin/env bash
# SPDX-License-Identifier: PostgreSQL
# A throwaway PostgreSQL cluster on loopback for the test suite and benchmarks.
#
#   scripts/pg_cluster.sh start DIR         create + start a cluster under DIR,
#                                           print `export` lines to eval
#   scripts/pg_cluster.sh stop DIR          stop the server, remove DIR (idempotent)
#   scripts/pg_cluster.sh server-stop DIR   stop the server (fast), keep the data
#   scripts/pg_cluster.sh server-start DIR  start it again, wait until it accepts
#                                           connections
#
# DIR must not exist or be an empty directory (e.g. from `mktemp -d`); it must
# be an absolute-able path without whitespace or quotes since it ends up in
# libpq conninfo strings and postgresql.conf. Keep it short (e.g. under /tmp):
# DIR/sock/.s.PGSQL.<port> must fit in a unix socket path (107 bytes).
#
# Only the export lines go to stdout; all diagnostics go to stderr. Use as:
#   exports=$(scripts/pg_cluster.sh start "$dir") && eval "$exports"
# (not `eval "$(...)"`, which would hide a failed start).
set -euo pipefail
umask 022

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
# shellcheck source=scripts/common.sh
. "$SCRIPT_DIR/common.sh"
PGR_LOG_TAG=pg_cluster.sh

# Written into DIR right after it is created. `stop` only deletes directories
# that carry it (or are empty), so a typo in DIR cannot wipe unrelated data.
# It also records the bin dir and port for the other sub-commands.
MARKER=.pgring-cluster
TEST_PASSWORD=pgr_test_secret
START_TIMEOUT=30
PORT_ATTEMPTS=5

usage() {
    echo "usage: $0 start|stop|server-start|server-stop DIR" >&2
    exit 2
}

# Absolute, normalised form of $1 (which need not exist yet), validated.
resolve_dir() {
    local d
    d=$(realpath -m -- "$1")
    [[ $d != / && $d != "$(realpath -m /tmp)" ]] || pgr_die "refusing to use '$d' as cluster directory"
    [[ $d =~ ^[A-Za-z0-9._/+-]+$ ]] ||
        pgr_die "cluster directory '$d' may only contain [A-Za-z0-9._/+-] (it goes into conninfo strings)"
    echo "$d"
}

marker_get() { # marker_get DIR KEY
    [[ -f $1/$MARKER ]] || return 0
    sed -n "s/^$2=//p" "$1/$MARKER" | tail -n 1
}

bindir_for() { # the bin dir recorded at start, else a fresh lookup
    local b
    b=$(marker_get "$1" bindir)
    if [[ -n $b && -x $b/pg_ctl ]]; then echo "$b"; else pgr_pg_bindir; fi
}

log_tail() { # print the end of the server log to stderr
    local log=$1/log/postgresql.log
    if [[ -s $log ]]; then
        echo "----- last lines of $log -----" >&2
        tail -n 40 "$log" >&2 || true
        echo "-----" >&2
    fi
}

server_running() { # pg_ctl status: 0 = running, 3 = not running, 4 = no data dir
    local dir=$1 bindir
    [[ -d $dir/data ]] || return 1
    bindir=$(bindir_for "$dir")
    pgr_as_pg "$bindir/pg_ctl" status -D "$dir/data" >/dev/null 2>&1
}

pg_start() { # start the server and wait until it accepts connections
    local dir=$1 bindir
    bindir=$(bindir_for "$dir")
    pgr_as_pg "$bindir/pg_ctl" -w -t "$START_TIMEOUT" start \
        -D "$dir/data" -l "$dir/log/postgresql.log" >&2
}

# ---------------------------------------------------------------------------

gen_tls() { # self-signed CA + server certificate for CN=localhost
    local tls=$1 ext
    # Keys must never be world-readable; postgres also insists on it.
    (
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 30 \
            -keyout "$tls/ca.key" -out "$tls/ca.crt" \
            -subj "/CN=pgring test CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req -new -newkey rsa:2048 -nodes -sha256 \
            -keyout "$tls/server.key" -out "$tls/server.csr" -subj "/CN=localhost"
        ext="$tls/server.ext"
        cat >"$ext" <<'EOF'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EOF
        openssl x509 -req -sha256 -days 30 -in "$tls/server.csr" \
            -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
            -extfile "$ext" -out "$tls/server.crt"
        rm -f "$tls/server.csr" "$ext" "$tls/ca.srl"
    ) >/dev/null 2>"$tls/openssl.err" || {
        cat "$tls/openssl.err" >&2
        pgr_die "generating TLS certificates failed"
    }
    rm -f "$tls/openssl.err"
    chmod 0644 "$tls/ca.crt" "$tls/server.crt"
    chmod 0600 "$tls/ca.key" "$tls/server.key"
}

write_config() { # write_config DIR PORT: our settings + pg_hba.conf
    local dir=$1 port=$2 data=$1/data
    cat >"$data/pgring.conf" <<EOF
# Settings for the pgring test cluster (included from postgresql.conf).
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir/sock'
max_connections = 300
shared_buffers = 64MB
# Throwaway data: durability only costs time.
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
ssl = on
ssl_cert_file = '$dir/tls/server.crt'
ssl_key_file = '$dir/tls/server.key'
logging_collector = off
log_min_messages = warning
EOF
    grep -q "^include 'pgring.conf'" "$data/postgresql.conf" ||
        echo "include 'pgring.conf'" >>"$data/postgresql.conf"

    cat >"$data/pg_hba.conf" <<'EOF'
# TYPE  DATABASE  USER       ADDRESS        METHOD
local   all       all                       trust
# "host" lines match both TLS and plain TCP connections.
host    all       pgr_trust  127.0.0.1/32   trust
host    all       pgr_scram  127.0.0.1/32   scram-sha-256
host    all       all        127.0.0.1/32   scram-sha-256
EOF
    chown "$(pgr_pg_user)": "$data/pgring.conf" "$data/pg_hba.conf"
}

set_port() {
    sed -i "s/^port = .*/port = $2/" "$1/data/pgring.conf"
}

# Set by cmd_start so that its EXIT trap knows what to clean up.
START_DIR=
START_SERVER_UP=0
on_start_exit() {
    local rc=$?
    ((rc == 0)) && return 0
    pgr_log "start failed (exit $rc); DIR is left for inspection, remove it with: $SELF stop $START_DIR"
    [[ -n $START_DIR ]] && log_tail "$START_DIR"
    if ((START_SERVER_UP)) || server_running "$START_DIR" 2>/dev/null; then
        local bindir
        bindir=$(bindir_for "$START_DIR")
        pgr_as_pg "$bindir/pg_ctl" -w -t 20 stop -m immediate -D "$START_DIR/data" >&2 || true
    fi
    return "$rc"
}

cmd_start() {
    local dir=$1 bindir owner port attempt psql

    if [[ -e $dir ]]; then
        [[ -d $dir ]] || pgr_die "$dir exists and is not a directory"
        [[ -z $(ls -A "$dir") ]] || pgr_die "$dir exists and is not empty"
    else
        mkdir -p -- "$dir"
    fi
    START_DIR=$dir
    trap on_start_exit EXIT

    bindir=$(pgr_pg_bindir)
    printf 'bindir=%s\n' "$bindir" >"$dir/$MARKER"
    chmod 0755 "$dir"
    owner=$(pgr_pg_user)

    if ((${#dir} + 30 > 107)); then
        pgr_die "cluster directory path too long for a unix socket path: $dir"
    fi

    chown "$owner": "$dir"
    # Every ancestor must be searchable by the server user (a directory under
    # a 0700 home directory would not be).
    pgr_as_pg test -w "$dir" -a -x "$dir" ||
        pgr_die "user '$owner' cannot access $dir (check the permissions of its parent directories)"

    mkdir -m 0755 "$dir/sock" "$dir/log" "$dir/tls"
    gen_tls "$dir/tls"
    chown -R "$owner": "$dir"

    pgr_log "initdb in $dir/data ($bindir)"
    pgr_as_pg "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 \
        --locale=C --no-sync --no-instructions >"$dir/log/initdb.log" 2>&1 || {
        cat "$dir/log/initdb.log" >&2
        pgr_die "initdb failed"
    }

    # Pick a free port and start. Another process may grab the port between
    # the check and the bind; then pick another one and retry.
    port=$(pgr_free_port)
    write_config "$dir" "$port"
    for ((attempt = 1; ; attempt++)); do
        set_port "$dir" "$port"
        pgr_log "starting server on 127.0.0.1:$port"
        if pg_start "$dir"; then
            START_SERVER_UP=1
            break
        fi
        if ((attempt < PORT_ATTEMPTS)) &&
            grep -qE 'could not bind|Address already in use|could not create any TCP/IP sockets' \
                "$dir/log/postgresql.log" 2>/dev/null; then
            pgr_warn "port $port was taken, retrying with another one"
            # Keep the failed attempt's log lines out of the next diagnosis.
            mv "$dir/log/postgresql.log" "$dir/log/postgresql.log.attempt$attempt"
            port=$(pgr_free_port)
            continue
        fi
        pgr_die "server did not start"
    done
    printf 'port=%s\n' "$port" >>"$dir/$MARKER"

    psql=("$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir/sock" -p "$port" -U postgres -d postgres)
    pgr_as_pg "${psql[@]}" >&2 <<EOF
SET password_encryption = 'scram-sha-256';
CREATE ROLE pgr_trust LOGIN SUPERUSER;
CREATE ROLE pgr_scram LOGIN SUPERUSER PASSWORD '$TEST_PASSWORD';
EOF
    [[ $(pgr_as_pg "${psql[@]}" -At -c \
        "select rolpassword like 'SCRAM-SHA-256\$%' from pg_authid where rolname = 'pgr_scram'") == t ]] ||
        pgr_die "pgr_scram did not get a SCRAM password"

    trap - EXIT
    pgr_log "cluster ready in $dir (port $port)"

    local -a kv=(
        PGR_TEST_HOST 127.0.0.1
        PGR_TEST_PORT "$port"
        PGR_TEST_SOCKDIR "$dir/sock"
        PGR_TEST_DIR "$dir"
        PGR_TEST_CA "$dir/tls/ca.crt"
        PGR_TEST_PASSWORD "$TEST_PASSWORD"
        PGR_TEST_CONNINFO "host=127.0.0.1 port=$port user=pgr_trust dbname=postgres sslmode=disable"
        PGR_TEST_CONNINFO_SCRAM "host=127.0.0.1 port=$port user=pgr_scram password=$TEST_PASSWORD dbname=postgres sslmode=disable"
        PGR_TEST_CONNINFO_TLS "host=localhost hostaddr=127.0.0.1 port=$port user=pgr_trust dbname=postgres sslmode=verify-full sslrootcert=$dir/tls/ca.crt"
        PGR_TEST_CONNINFO_UNIX "host=$dir/sock port=$port user=pgr_trust dbname=postgres"
        PGR_TEST_CTL "$SELF"
        PGR_TEST_CTL_DIR "$dir"
    )
    local i
    for ((i = 0; i < ${#kv[@]}; i += 2)); do
        printf 'export %s=%s\n' "${kv[i]}" "$(pgr_shquote "${kv[i + 1]}")"
    done
}

cmd_server_stop() {
    local dir=$1 bindir
    [[ -f $dir/$MARKER && -d $dir/data ]] || pgr_die "$dir is not a cluster created by $0"
    if ! server_running "$dir"; then
        pgr_log "server in $dir is not running"
        return 0
    fi
    bindir=$(bindir_for "$dir")
    pgr_as_pg "$bindir/pg_ctl" -w -t 30 stop -m fast -D "$dir/data" >&2 || {
        log_tail "$dir"
        pgr_die "server did not stop"
    }
}

cmd_server_start() {
    local dir=$1
    [[ -f $dir/$MARKER && -d $dir/data ]] || pgr_die "$dir is not a cluster created by $0"
    if server_running "$dir"; then
        pgr_log "server in $dir is already running"
        return 0
    fi
    # The port must stay the one clients know, so a bind that fails is retried rather than
    # moved: what holds the port while the server was down (a client socket that got it as
    # its ephemeral port) is short-lived.
    local attempt
    for ((attempt = 1; ; attempt++)); do
        pg_start "$dir" && return 0
        if ((attempt < PORT_ATTEMPTS * 2)) &&
            tail -n 20 "$dir/log/postgresql.log" 2>/dev/null |
            grep -qE 'could not bind|Address already in use|could not create any TCP/IP sockets'; then
            pgr_warn "port $(marker_get "$dir" port) is taken, retrying in 1 s"
            sleep 1
            continue
        fi
        log_tail "$dir"
        pgr_die "server did not start"
    done
}

# Kill the postmaster from postmaster.pid directly: the last resort when
# pg_ctl is gone or does not manage.
kill_postmaster() {
    local dir=$1 pid i
    pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    # Only if that pid still is a postgres process using this data dir.
    [[ -d /proc/$pid && $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$dir/data" ]] || return 0
    pgr_warn "killing postmaster $pid"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
}

cmd_stop() {
    local dir=$1 bindir
    [[ -e $dir ]] || return 0
    [[ -d $dir ]] || pgr_die "$dir is not a directory"
    if [[ ! -f $dir/$MARKER ]]; then
        # An empty dir (mktemp -d, start never got going) is fine to remove.
        [[ -z $(ls -A "$dir") ]] || pgr_die "$dir is not a cluster created by $0; not removing it"
        rmdir -- "$dir"
        return 0
    fi
    if [[ -f $dir/data/postmaster.pid ]]; then
        bindir=$(bindir_for "$dir" 2>/dev/null || true)
        if [[ -n $bindir ]]; then
            pgr_as_pg "$bindir/pg_ctl" -w -t 20 stop -m fast -D "$dir/data" >/dev/null 2>&1 ||
                pgr_as_pg "$bindir/pg_ctl" -w -t 10 stop -m immediate -D "$dir/data" >/dev/null 2>&1 ||
                true
        fi
        kill_postmaster "$dir"
    fi
    rm -rf -- "$dir"
}

# ---------------------------------------------------------------------------

(($# == 2)) || usage
cmd=$1
dir=$(resolve_dir "$2")
case $cmd in
    start) cmd_start "$dir" ;;
    stop) cmd_stop "$dir" ;;
    server-stop) cmd_server_stop "$dir" ;;
    server-start) cmd_server_start "$dir" ;;
    *) usage ;;
esac
