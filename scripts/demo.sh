#!/usr/bin/env bash
# SPDX-License-Identifier: PostgreSQL
# The pgring demo: examples/pgr_http_server answering GET /user/<id> from PostgreSQL, driven by
# wrk, first on the pool (pgring's async API on each worker's io_uring ring), then with a new
# PostgreSQL connection per request, for contrast.
#
#   scripts/demo.sh [BUILD_DIR]
#
# Run through `./run.sh demo`, which builds, starts a throwaway cluster and exports
# PGR_TEST_CONNINFO (and PGR_DEMO_BUILD_DIR). BUILD_DIR defaults to $PGR_DEMO_BUILD_DIR, else
# ./build. Loopback only; about 15 seconds (PGR_DEMO_SECONDS sets each wrk run's length, 5).
#
# It (re)creates the table pgr_demo_users in the database it is pointed at.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"
PGR_LOG_TAG=demo.sh

BUILD=${1:-${PGR_DEMO_BUILD_DIR:-$ROOT/build}}
SERVER=$BUILD/examples/pgr_http_server
SECONDS_PER_RUN=${PGR_DEMO_SECONDS:-5}
ROWS=10000
POOL_SIZE=8 # backends share the 2 cores with the server and wrk; more only adds switching

[[ -n ${PGR_TEST_CONNINFO:-} ]] ||
    pgr_die "PGR_TEST_CONNINFO is not set: run ./run.sh demo (it starts a throwaway cluster)"
[[ -x $SERVER ]] || pgr_die "$SERVER not found: build first (cmake --build $BUILD)"
command -v wrk >/dev/null 2>&1 || pgr_die "wrk not found (apt-get install wrk)"
command -v psql >/dev/null 2>&1 || pgr_die "psql not found (apt-get install postgresql-client)"
[[ $SECONDS_PER_RUN =~ ^[1-9][0-9]?$ ]] || pgr_die "PGR_DEMO_SECONDS must be 1..99"

WORK=$(mktemp -d /tmp/pgring-demo.XXXXXX)
SERVER_PID=

stop_server() {
    local i
    [[ -n $SERVER_PID ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

cleanup() {
    local rc=$?
    trap - EXIT
    stop_server
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_server MODE ARGS...: start it in the background on a port the kernel picks, wait until
# it prints its "listening on" line, then set PORT.
PORT=
start_server() {
    local mode=$1 i
    shift
    : >"$WORK/server-$mode.log"
    "$SERVER" --listen 127.0.0.1:0 --conninfo "$PGR_TEST_CONNINFO" --mode "$mode" "$@" \
        2>"$WORK/server-$mode.log" &
    SERVER_PID=$!
    PORT=
    for ((i = 0; i < 150; i++)); do
        PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/server-$mode.log")
        [[ -n $PORT ]] && break
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $PORT ]]; then
        cat "$WORK/server-$mode.log" >&2
        pgr_die "the server ($mode mode) did not start"
    fi
    sed 's/^/  /' "$WORK/server-$mode.log"
}

# http_get PATH: one request over bash's /dev/tcp, printed without the CRs.
http_get() {
    local path=$1
    exec 3<>"/dev/tcp/127.0.0.1/$PORT"
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
    timeout 5 cat <&3 | tr -d '\r'
    exec 3<&-
}

# run_wrk NAME CONNECTIONS: wrk with random ids; prints its report and keeps it in
# $WORK/wrk-NAME.txt.
run_wrk() {
    local name=$1 conns=$2
    local -a cmd=(wrk -t2 "-c$conns" "-d${SECONDS_PER_RUN}s" --latency -s "$WORK/random_user.lua"
        "http://127.0.0.1:$PORT/")
    echo "  \$ ${cmd[*]}"
    timeout $((SECONDS_PER_RUN + 15)) "${cmd[@]}" >"$WORK/wrk-$name.txt" ||
        pgr_die "wrk failed: $(cat "$WORK/wrk-$name.txt")"
    sed 's/^/  /' "$WORK/wrk-$name.txt"
}

# wrk_field NAME WHAT: requests/s, or a latency percentile (50%, 99%) from the report.
wrk_field() {
    local f=$WORK/wrk-$1.txt
    case $2 in
        rps) awk '/^Requests\/sec:/ { print $2 }' "$f" ;;
        errors) awk '/Non-2xx or 3xx responses:/ { n += $NF } /Socket errors:/ { n += 1 }
                     END { print n + 0 }' "$f" ;;
        *) awk -v p="$2" '$1 == p { print $2 }' "$f" ;;
    esac
}

# ---------------------------------------------------------------------------

echo "== loading $ROWS rows into pgr_demo_users"
psql -X -q -v ON_ERROR_STOP=1 "$PGR_TEST_CONNINFO" <<EOF
set client_min_messages = warning;
drop table if exists pgr_demo_users;
create table pgr_demo_users(id int primary key, name text, email text);
insert into pgr_demo_users
    select g, 'user ' || g, 'user' || g || '@example.com' from generate_series(1, $ROWS) g;
analyze pgr_demo_users;
EOF

# Each wrk thread seeds its own generator, so the two threads ask for different ids.
cat >"$WORK/random_user.lua" <<EOF
local counter = 1
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  math.randomseed(os.time() * 1000 + id * 7919)
end
function request()
  return wrk.format("GET", "/user/" .. math.random(1, $ROWS))
end
EOF

echo
echo "== pool mode: one pgring pool, each worker thread checks out on its own io_uring ring"
start_server pool --pool-size "$POOL_SIZE"
echo "  one request, for a look at it:"
http_get /user/42 | sed 's/^/    /'
echo
run_wrk pool 64
echo "  pool counters after the run (GET /metrics):"
http_get /metrics | grep -E '^pgring_(connections|acquires_total|acquired_immediately_total|waits_total|handoffs_total|acquire_timeouts_total|connects_total)\{' |
    sed 's/^/    /' || true
stop_server

echo
echo "== exec mode: pgr_loop_exec, no checkout per request, pipelined, prepared after 5 uses"
start_server exec --pool-size "$POOL_SIZE"
run_wrk exec 64
stop_server

echo
echo "== connect mode: PQconnectdb + PQexecParams + PQfinish for every request"
start_server connect
run_wrk connect 8
stop_server

pool_rps=$(wrk_field pool rps)
conn_rps=$(wrk_field connect rps)
echo
echo "== summary (wrk -t2, ${SECONDS_PER_RUN}s each, random ids 1..$ROWS, loopback, $(nproc) CPUs)"
printf '  %-22s %10s req/s   p50 %-9s p99 %-9s errors %s\n' \
    "pool (64 conns)" "$pool_rps" "$(wrk_field pool 50%)" "$(wrk_field pool 99%)" \
    "$(wrk_field pool errors)"
printf '  %-22s %10s req/s   p50 %-9s p99 %-9s errors %s\n' \
    "exec (64 conns)" "$(wrk_field exec rps)" "$(wrk_field exec 50%)" "$(wrk_field exec 99%)" \
    "$(wrk_field exec errors)"
printf '  %-22s %10s req/s   p50 %-9s p99 %-9s errors %s\n' \
    "connect (8 conns)" "$conn_rps" "$(wrk_field connect 50%)" "$(wrk_field connect 99%)" \
    "$(wrk_field connect errors)"
awk -v a="$(wrk_field exec rps)" -v b="$pool_rps" 'BEGIN {
    if (b > 0) printf "  pgr_loop_exec served %.2fx the requests per second of a checkout per request\n", a / b
}'
awk -v a="$pool_rps" -v b="$conn_rps" 'BEGIN {
    if (b > 0) printf "  the pool served %.1fx the requests per second of connect-per-request\n", a / b
}'
