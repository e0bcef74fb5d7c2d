#!/usr/bin/env bash
# SPDX-License-Identifier: PostgreSQL
# A throwaway primary with streaming standbys on loopback, for the failover, role and replica
# tests. The primary is a scripts/pg_cluster.sh cluster; each standby is a pg_basebackup -R
# copy of it with its own port and socket directory, laid out the same way, so that
# pg_cluster.sh's server-start / server-stop / stop work on every node.
#
#   scripts/pg_replica.sh start DIR [STANDBYS] [sync]
#                                       primary in DIR/primary, STANDBYS (default 1) standbys
#                                       in DIR/standby1.., streaming from it; with `sync`,
#                                       standby1 is the primary's synchronous standby and
#                                       commits wait for its flush (synchronous_commit = on).
#                                       Prints `export` lines (see below)
#   scripts/pg_replica.sh stop DIR                      stop every node, remove DIR
#   scripts/pg_replica.sh kill DIR NODE                 stop NODE at once (-m immediate):
#                                                       a crash, as its clients see it
#   scripts/pg_replica.sh promote DIR NODE              promote a standby, wait until it
#                                                       accepts writes
#   scripts/pg_replica.sh read-only DIR NODE on|off     default_transaction_read_only for
#                                                       new transactions (ALTER SYSTEM +
#                                                       reload): a switchover's first step
#   scripts/pg_replica.sh pause DIR NODE                pg_wal_replay_pause() on a standby
#   scripts/pg_replica.sh resume DIR NODE               pg_wal_replay_resume()
#   scripts/pg_replica.sh sql DIR NODE SQL              run SQL on NODE as postgres, print
#                                                       the result unaligned
#   scripts/pg_replica.sh server-stop|server-start DIR NODE
#
# NODE is primary, standby1, standby2, ...
#
# Exports: PGR_REPL_DIR, PGR_REPL_CTL (this script), PGR_REPL_NODES (space-separated node
# names), and per node PGR_REPL_PORT_<NODE> and PGR_REPL_CONNINFO_<NODE> (NODE upper-cased:
# PRIMARY, STANDBY1, ...; user pgr_trust, TCP, no TLS), and PGR_REPL_HOSTS: the nodes as
# libpq multi-host "host=... port=..." (primary first).
set -euo pipefail
umask 022

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
PG_CLUSTER=$SCRIPT_DIR/pg_cluster.sh
# shellcheck source=scripts/common.sh
. "$SCRIPT_DIR/common.sh"
PGR_LOG_TAG=pg_replica.sh

MARKER=.pgring-cluster
REPL_MARKER=.pgring-replica
START_TIMEOUT=30

usage() {
    echo "usage: $0 start DIR [STANDBYS] [sync] | stop DIR | kill|promote|pause|resume|server-stop|server-start DIR NODE | read-only DIR NODE on|off | sql DIR NODE SQL" >&2
    exit 2
}

node_dir() { # node_dir DIR NODE
    [[ $2 =~ ^(primary|standby[0-9]+)$ ]] || pgr_die "unknown node '$2'"
    [[ -f $1/$2/$MARKER ]] || pgr_die "$1/$2 is not a node of a replica set"
    echo "$1/$2"
}

marker_get() { # marker_get NODEDIR KEY
    sed -n "s/^$2=//p" "$1/$MARKER" | tail -n 1
}

psql_node() { # psql_node NODEDIR ARGS...: psql as postgres over the node's socket
    local nd=$1 bindir port
    shift
    bindir=$(marker_get "$nd" bindir)
    port=$(marker_get "$nd" port)
    pgr_as_pg "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$nd/sock" -p "$port" -U postgres \
        -d postgres "$@"
}

pg_ctl_node() { # pg_ctl_node NODEDIR ARGS...
    local nd=$1 bindir
    shift
    bindir=$(marker_get "$nd" bindir)
    pgr_as_pg "$bindir/pg_ctl" -D "$nd/data" "$@"
}

# Set by cmd_start so that its EXIT trap can take down what it started.
START_DIR=
on_start_exit() {
    local rc=$?
    ((rc == 0)) && return 0
    pgr_log "start failed (exit $rc); removing $START_DIR"
    cmd_stop "$START_DIR" || true
    return "$rc"
}

make_standby() { # make_standby DIR N PRIMARYDIR
    local dir=$1 n=$2 pd=$3 nd=$1/standby$2 bindir owner port pport
    bindir=$(marker_get "$pd" bindir)
    pport=$(marker_get "$pd" port)
    owner=$(pgr_pg_user)
    mkdir -m 0755 "$nd" "$nd/sock" "$nd/log"
    printf 'bindir=%s\n' "$bindir" >"$nd/$MARKER"
    chown -R "$owner": "$nd"
    # -R writes primary_conninfo and standby.signal; application_name names the standby in
    # synchronous_standby_names and pg_stat_replication.
    pgr_as_pg "$bindir/pg_basebackup" -D "$nd/data" -h "$pd/sock" -p "$pport" -U postgres \
        -X stream -R --no-sync -c fast \
        -d "application_name=standby$n" >"$nd/log/basebackup.log" 2>&1 || {
        cat "$nd/log/basebackup.log" >&2
        pgr_die "pg_basebackup for standby$n failed"
    }
    port=$(pgr_free_port)
    # The copied pgring.conf names the primary's port and socket directory.
    sed -i -e "s/^port = .*/port = $port/" \
        -e "s|^unix_socket_directories = .*|unix_socket_directories = '$nd/sock'|" \
        "$nd/data/pgring.conf"
    pg_ctl_node "$nd" -w -t "$START_TIMEOUT" start -l "$nd/log/postgresql.log" >&2 || {
        tail -n 30 "$nd/log/postgresql.log" >&2 || true
        pgr_die "standby$n did not start"
    }
    printf 'port=%s\n' "$port" >>"$nd/$MARKER"
}

cmd_start() {
    local dir=$1 nstandby=${2:-1} sync=${3:-} pd exports i nd port nodes hosts ports
    [[ $nstandby =~ ^[0-9]+$ ]] || usage
    [[ -z $sync || $sync == sync ]] || usage
    if [[ -e $dir ]]; then
        [[ -d $dir && -z $(ls -A "$dir") ]] || pgr_die "$dir exists and is not an empty directory"
    else
        mkdir -p -- "$dir"
    fi
    chmod 0755 "$dir"
    : >"$dir/$REPL_MARKER"
    START_DIR=$dir
    trap on_start_exit EXIT

    pd=$dir/primary
    exports=$("$PG_CLUSTER" start "$pd")
    # Replication connections over the socket need their own hba line; streaming needs
    # nothing else from a 15 default (wal_level replica, max_wal_senders 10). A short
    # status interval keeps pg_stat_replication's lag columns fresh.
    echo 'local   replication  all  trust' >>"$pd/data/pg_hba.conf"
    cat >>"$pd/data/pgring.conf" <<'EOF'
wal_receiver_status_interval = 1s
hot_standby_feedback = on
EOF
    psql_node "$pd" -c 'select pg_reload_conf()' >/dev/null
    for ((i = 1; i <= nstandby; i++)); do
        pgr_log "creating standby$i"
        make_standby "$dir" "$i" "$pd"
    done
    if [[ $sync == sync ]]; then
        ((nstandby >= 1)) || pgr_die "sync needs a standby"
        # Set after the base backups, so that the standbys do not inherit it: a promoted
        # standby then commits without waiting for a standby it does not have.
        psql_node "$pd" >/dev/null <<'EOF'
ALTER SYSTEM SET synchronous_standby_names = 'standby1';
ALTER SYSTEM SET synchronous_commit = 'on';
SELECT pg_reload_conf();
EOF
        # Until standby1 is reported sync, a commit would wait for it anyway; wait here so
        # that the first test commit does not carry the catch-up.
        for ((i = 0; i < 100; i++)); do
            [[ $(psql_node "$pd" -At -c "select count(*) from pg_stat_replication where sync_state = 'sync'") == 1 ]] && break
            sleep 0.1
        done
        ((i < 100)) || pgr_die "standby1 did not become synchronous"
    fi
    trap - EXIT

    nodes=primary
    for ((i = 1; i <= nstandby; i++)); do nodes+=" standby$i"; done
    echo "$exports"
    printf 'export PGR_REPL_DIR=%s\n' "$(pgr_shquote "$dir")"
    printf 'export PGR_REPL_CTL=%s\n' "$(pgr_shquote "$SELF")"
    printf 'export PGR_REPL_NODES=%s\n' "$(pgr_shquote "$nodes")"
    hosts="" ports=""
    for i in $nodes; do
        nd=$dir/$i
        port=$(marker_get "$nd" port)
        printf 'export PGR_REPL_PORT_%s=%s\n' "${i^^}" "$port"
        printf 'export PGR_REPL_CONNINFO_%s=%s\n' "${i^^}" \
            "$(pgr_shquote "host=127.0.0.1 port=$port user=pgr_trust dbname=postgres sslmode=disable")"
        hosts+=${hosts:+,}127.0.0.1
        ports+=${ports:+,}$port
    done
    printf 'export PGR_REPL_HOSTS=%s\n' "$(pgr_shquote "host=$hosts port=$ports")"
    pgr_log "replica set ready in $dir: $nodes"
}

cmd_stop() {
    local dir=$1 nd
    [[ -e $dir ]] || return 0
    [[ -d $dir ]] || pgr_die "$dir is not a directory"
    if [[ ! -f $dir/$REPL_MARKER ]]; then
        [[ -z $(ls -A "$dir") ]] || pgr_die "$dir is not a replica set created by $0; not removing it"
        rmdir -- "$dir"
        return 0
    fi
    # Standbys first: a primary that stops first makes them log reconnect attempts.
    for nd in "$dir"/standby* "$dir"/primary; do
        [[ -d $nd ]] || continue
        "$PG_CLUSTER" stop "$nd" || pgr_warn "could not remove $nd"
    done
    rm -rf -- "$dir"
}

cmd_kill() {
    local nd
    nd=$(node_dir "$1" "$2")
    pg_ctl_node "$nd" -w -t 20 stop -m immediate >&2
}

cmd_promote() {
    local nd
    nd=$(node_dir "$1" "$2")
    # -w waits until the server leaves recovery and accepts read-write connections.
    pg_ctl_node "$nd" -w -t "$START_TIMEOUT" promote >&2
}

cmd_read_only() {
    local nd
    nd=$(node_dir "$1" "$2")
    [[ $3 == on || $3 == off ]] || usage
    psql_node "$nd" >/dev/null <<EOF
ALTER SYSTEM SET default_transaction_read_only = $3;
SELECT pg_reload_conf();
EOF
}

cmd_sql() {
    local nd
    nd=$(node_dir "$1" "$2")
    psql_node "$nd" -At -c "$3"
}

(($# >= 2)) || usage
cmd=$1
dir=$(realpath -m -- "$2")
[[ $dir != / && $dir =~ ^[A-Za-z0-9._/+-]+$ ]] || pgr_die "refusing to use '$dir'"
case $cmd in
    start)
        (($# <= 4)) || usage
        cmd_start "$dir" "${3:-1}" "${4:-}"
        ;;
    stop) cmd_stop "$dir" ;;
    kill) (($# == 3)) || usage; cmd_kill "$dir" "$3" ;;
    promote) (($# == 3)) || usage; cmd_promote "$dir" "$3" ;;
    read-only) (($# == 4)) || usage; cmd_read_only "$dir" "$3" "$4" ;;
    pause) (($# == 3)) || usage; cmd_sql "$dir" "$3" 'select pg_wal_replay_pause()' >/dev/null ;;
    resume) (($# == 3)) || usage; cmd_sql "$dir" "$3" 'select pg_wal_replay_resume()' >/dev/null ;;
    sql) (($# == 4)) || usage; cmd_sql "$dir" "$3" "$4" ;;
    server-stop | server-start)
        (($# == 3)) || usage
        "$PG_CLUSTER" "$cmd" "$(node_dir "$dir" "$3")"
        ;;
    *) usage ;;
esac
