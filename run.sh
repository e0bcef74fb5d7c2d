#!/usr/bin/env bash
# SPDX-License-Identifier: PostgreSQL
# pgring developer entry point.
#
#   ./run.sh test             build, then run the whole test suite against a
#                             throwaway PostgreSQL cluster, then the stress
#                             tests under ThreadSanitizer and the whole suite
#                             under AddressSanitizer + UndefinedBehaviorSanitizer
#   ./run.sh bench [ARGS...]  Release build, cluster + pgbouncer, the peer
#                             pools' runtimes (Java, Python, Node), then
#                             build-bench/bench/pgr_bench ARGS...
#   ./run.sh bench --idle [ARGS...]
#                             Release build, cluster + pgbouncer (room for
#                             1000 idle pools), then
#                             build-bench/bench/pgr_idle_bench ARGS...
#   ./run.sh demo             build, start a cluster and run scripts/demo.sh:
#                             examples/pgr_http_server driven by wrk, on the
#                             pool and then with a connection per request
#   ./run.sh mutants [NAME...]
#                             start a cluster and run scripts/mutants.sh: each
#                             deliberate breakage in scripts/mutants.txt must
#                             make one of its tests fail (about 10 minutes)
#   ./run.sh abi-update       build, then rewrite the ABI baseline
#                             abi/libpgring.abi from build/libpgring.so (a
#                             deliberate ABI change: commit it, see NEWS)
#
# Missing Debian packages are installed when running as root; otherwise the
# apt-get command to run is printed.
#
# Environment:
#   PGR_SKIP_SANITIZERS=1     skip the TSan/ASan stages of `test` (for quick
#                             local iterations only; CI runs them)
#   PGR_SKIP_MUTANTS=1        skip the mutants stage of `test` (likewise)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"
PGR_LOG_TAG=run.sh
PG_CLUSTER=$ROOT/scripts/pg_cluster.sh

BASE_PKGS=(build-essential cmake pkg-config liburing-dev libpq-dev libck-dev
    libcriterion-dev postgresql postgresql-contrib openssl iproute2
    abigail-tools clang-format shellcheck groff-base man-db pgbouncer)
BENCH_PKGS=(libzdb-dev pgbouncer)
# The peers in pgr_bench: HikariCP + pgjdbc (slf4j-nop keeps HikariCP quiet), psycopg 3's
# pool, SQLAlchemy over psycopg2. Java also needs a JDK (the peer runs as a single-file
# source program, compiled at launch) and node-postgres needs Node and npm; see
# ensure_peer_deps.
PEER_PKGS=(libhikaricp-java libpostgresql-jdbc-java libslf4j-java python3-psycopg-pool
    python3-sqlalchemy python3-psycopg2)
NODE_PG_SPEC=pg@8
DEMO_PKGS=(wrk)

usage() {
    cat >&2 <<'EOF'
usage: ./run.sh test | bench [--idle] [args...] | demo | mutants [name...] | abi-update
  test        build and run all test suites (plain, TSan stress, ASan+UBSan)
              and the checks: format, shellcheck, ABI, man pages, install
  bench       build in Release mode and run the benchmarks (pgr_bench --help for
              its flags; --long for a longer run; --idle: what idle pools cost,
              pgr_idle_bench, about 2 minutes)
  demo        build and run the demo (HTTP server on the pool vs a
              connection per request, driven by wrk; about 15 s)
  mutants     apply each breakage of scripts/mutants.txt to a copy of the
              sources and check that its tests catch it
  abi-update  rewrite abi/libpgring.abi from a fresh build (deliberate
              ABI changes only; commit the result)
EOF
    exit 2
}

# ---------------------------------------------------------------------------
# Dependencies

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

APT_UPDATED=0
# apt-get install, running `apt-get update` once if the install fails without
# it (fresh containers often have empty package lists).
apt_install() {
    local -a cmd=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@")
    pgr_log "installing: $*"
    "${cmd[@]}" >&2 && return 0
    ((APT_UPDATED)) && return 1
    APT_UPDATED=1
    pgr_log "retrying after apt-get update"
    apt-get update >&2 || return 1
    "${cmd[@]}" >&2
}

# ensure_deps test|bench|demo
ensure_deps() {
    local mode=$1 p
    local -a want=("${BASE_PKGS[@]}") missing=()
    [[ $mode == bench ]] && want+=("${BENCH_PKGS[@]}")
    [[ $mode == demo ]] && want+=("${DEMO_PKGS[@]}")

    if ! command -v dpkg-query >/dev/null 2>&1; then
        pgr_warn "dpkg-query not found (not Debian?); not checking packages: ${want[*]}"
    else
        for p in "${want[@]}"; do
            pkg_installed "$p" || missing+=("$p")
        done
    fi
    if ((${#missing[@]})); then
        if pgr_is_root; then
            apt_install "${missing[@]}" || pgr_die "could not install: ${missing[*]}"
        else
            pgr_log "missing packages: ${missing[*]}; install them with:"
            echo "sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
            exit 1
        fi
    fi

    # promtool (from the `prometheus` package) is used by the tests to check
    # the metrics exposition format. Not fatal here: the tests that need it
    # fail loudly on their own.
    if [[ $mode == test ]] && ! command -v promtool >/dev/null 2>&1; then
        if pgr_is_root; then
            apt_install prometheus ||
                pgr_warn "could not install 'prometheus' (promtool); tests that need it will fail"
        else
            pgr_warn "promtool not found; tests that need it will fail. Install it with:"
            echo "sudo apt-get install -y --no-install-recommends prometheus" >&2
        fi
        command -v promtool >/dev/null 2>&1 ||
            pgr_warn "promtool still not available"
    fi
}

# The peers are optional: a runtime or package that is missing and cannot be
# installed makes its rows read "skipped (why)" in pgr_bench, so nothing here
# stops the run.
ensure_peer_deps() {
    local p node_dir=$ROOT/build-bench/node
    local -a missing=()
    if command -v dpkg-query >/dev/null 2>&1; then
        for p in "${PEER_PKGS[@]}"; do
            pkg_installed "$p" || missing+=("$p")
        done
    fi
    command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    if [[ ! -d $node_dir/node_modules/pg ]] && ! command -v npm >/dev/null 2>&1; then
        missing+=(npm)
    fi
    if ((${#missing[@]})); then
        if pgr_is_root && command -v apt-get >/dev/null 2>&1; then
            apt_install "${missing[@]}" ||
                pgr_warn "could not install ${missing[*]}; the peers that need them will read skipped"
        else
            pgr_warn "peers need: ${missing[*]}; without them their rows read skipped. Install with:"
            echo "sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        fi
    fi
    # node-postgres comes from npm, into the build tree (ignored by git); pgr_bench
    # finds it there (PGR_BENCH_NODE_PATH overrides).
    if [[ ! -d $node_dir/node_modules/pg ]] && command -v npm >/dev/null 2>&1; then
        pgr_log "installing node-postgres ($NODE_PG_SPEC) into $node_dir"
        mkdir -p "$node_dir"
        timeout 300 npm install --prefix "$node_dir" --no-audit --no-fund --loglevel=error \
            "$NODE_PG_SPEC" >&2 ||
            pgr_warn "npm install $NODE_PG_SPEC failed; node_pg will read skipped"
    fi
}

# ---------------------------------------------------------------------------
# Build

# build_tree DIR CMAKE_ARGS...: configure (if needed) and build.
build_tree() {
    local dir=$1
    shift
    pgr_log "building $dir ($*)"
    # The build log goes to stderr: stdout carries only what the command produces
    # (pgr_bench's tables and JSON lines).
    {
        cmake -S "$ROOT" -B "$ROOT/$dir" "$@" &&
            cmake --build "$ROOT/$dir" -j"$(nproc)"
    } >&2
}

# ---------------------------------------------------------------------------
# Cluster, pgbouncer, cleanup

CLUSTER_DIR=
PGB_PIDFILE=

cleanup() {
    local rc=$?
    # Ignore further signals so a second Ctrl-C cannot leave the cluster
    # behind (stopping it is bounded by pg_ctl's timeouts).
    trap - EXIT
    trap '' INT TERM HUP
    stop_pgbouncer || true
    if [[ -n $CLUSTER_DIR ]]; then
        "$PG_CLUSTER" stop "$CLUSTER_DIR" ||
            pgr_warn "could not remove test cluster $CLUSTER_DIR"
    fi
    exit "$rc"
}

# A signal ends the script with the conventional 128+N status; the EXIT trap
# then removes the cluster.
install_traps() {
    trap cleanup EXIT
    trap 'pgr_log "interrupted"; exit 130' INT
    trap 'pgr_log "terminated"; exit 143' TERM
    trap 'pgr_log "hangup"; exit 129' HUP
}

# Clear libpq's environment variables (PGHOST, PGPASSWORD, PGSSLMODE, ...)
# so that the tests see exactly the conninfo strings they are given; a stray
# PGPASSWORD could e.g. make an authentication test pass for the wrong reason.
# Our own PGR_* variables are kept.
scrub_libpq_env() {
    local v
    for v in $(compgen -e); do
        if [[ $v =~ ^PG[A-Z] && $v != PGR_* ]]; then
            unset "$v"
        fi
    done
}

# Start a fresh cluster and export its PGR_TEST_* variables. Requires
# install_traps to have run (the trap removes the cluster).
start_cluster() {
    local exports
    scrub_libpq_env
    CLUSTER_DIR=$(mktemp -d /tmp/pgring-test.XXXXXX)
    # Not `eval "$(...)"`: that would ignore a failed start.
    exports=$("$PG_CLUSTER" start "$CLUSTER_DIR")
    eval "$exports"
    pgr_log "PostgreSQL test cluster on 127.0.0.1:$PGR_TEST_PORT in $CLUSTER_DIR"
}

# Tests may stop the server to simulate an outage; make sure a test that
# died half-way does not leave the next stage without a server.
ensure_server_up() {
    "$PGR_TEST_CTL" server-start "$PGR_TEST_CTL_DIR"
}

# Start pgbouncer (transaction pooling) in front of the test cluster and
# export PGR_BENCH_PGBOUNCER_PORT / PGR_BENCH_PGBOUNCER_CONNINFO. pgbouncer
# refuses to run as root, so it runs as the cluster's user.
start_pgbouncer() {
    local dir=$CLUSTER_DIR/pgbouncer port attempt bin
    # Absolute path: runuser may run the command with a different PATH.
    bin=$(command -v pgbouncer) || {
        pgr_warn "pgbouncer not installed"
        return 1
    }
    mkdir -p "$dir"
    chmod 0755 "$dir"
    # trust auth still needs the user listed in auth_file.
    echo '"pgr_trust" ""' >"$dir/userlist.txt"
    for ((attempt = 1; attempt <= 3; attempt++)); do
        port=$(pgr_free_port)
        cat >"$dir/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PGR_TEST_PORT dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir = $dir
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
max_client_conn = ${PGB_MAX_CLIENT_CONN:-500}
default_pool_size = 20
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
EOF
        chown -R "$(pgr_pg_user)": "$dir"
        PGB_PIDFILE=$dir/pgbouncer.pid
        if pgr_as_pg "$bin" -d "$dir/pgbouncer.ini" >&2 && pgr_wait_port "$port" 10; then
            export PGR_BENCH_PGBOUNCER_PORT=$port
            export PGR_BENCH_PGBOUNCER_CONNINFO="host=127.0.0.1 port=$port user=pgr_trust dbname=postgres sslmode=disable"
            pgr_log "pgbouncer on 127.0.0.1:$port"
            return 0
        fi
        stop_pgbouncer || true
        pgr_warn "pgbouncer did not start on port $port"
        tail -n 20 "$dir/pgbouncer.log" >&2 2>/dev/null || true
        # Only a lost race for the port is worth another try.
        grep -qiE 'address already in use|bind' "$dir/pgbouncer.log" 2>/dev/null || return 1
        mv "$dir/pgbouncer.log" "$dir/pgbouncer.log.attempt$attempt"
    done
    return 1
}

stop_pgbouncer() {
    local pid i
    [[ -n $PGB_PIDFILE && -f $PGB_PIDFILE ]] || return 0
    pid=$(head -n 1 "$PGB_PIDFILE" 2>/dev/null || true)
    # Only signal the pid if it really is a pgbouncer (pid files go stale).
    if [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == pgbouncer ]]; then
        kill -TERM "$pid" 2>/dev/null || true # TERM = immediate shutdown
        for ((i = 0; i < 50; i++)); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        if [[ -d /proc/$pid ]]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PGB_PIDFILE"
    PGB_PIDFILE=
    # Tests read these to find PgBouncer: a stopped one must not look available.
    unset PGR_BENCH_PGBOUNCER_PORT PGR_BENCH_PGBOUNCER_CONNINFO
}

# PgBouncer is running (the one start_pgbouncer started), or is started now: Debian 12's
# PgBouncer 1.18 can exit on a cancel request, and a later stage must not inherit a dead one.
ensure_pgbouncer_up() {
    local pid
    if [[ -n $PGB_PIDFILE && -f $PGB_PIDFILE ]]; then
        pid=$(head -n 1 "$PGB_PIDFILE" 2>/dev/null || true)
        if [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == pgbouncer ]]; then
            return 0
        fi
        stop_pgbouncer || true
    fi
    start_pgbouncer
}

# ---------------------------------------------------------------------------
# Commands

# Without ASLR where the kernel randomises mmap more than older TSan
# runtimes cope with ("FATAL: ThreadSanitizer: unexpected memory mapping").
tsan_wrapper() {
    local bits
    bits=$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 0)
    if ((bits > 28)) && setarch "$(uname -m)" -R true 2>/dev/null; then
        echo setarch "$(uname -m)" -R
    fi
}

stage_main() {
    ensure_server_up || return 1
    # test_pooler checks the pool's pooler detection through PgBouncer as well.
    ensure_pgbouncer_up || return 1
    PGR_TEST_NEED_PGBOUNCER=1 \
        ctest --test-dir "$ROOT/build" --output-on-failure --no-tests=error -j1 --timeout 300
}

# The checkout, lifecycle and async tests once more through PgBouncer in transaction mode,
# where each transaction may run on a different server connection. Left out, because they
# look at the server connection behind the pool's, which PgBouncer hides or replaces: a
# backend killed with pg_terminate_backend (PgBouncer drops that server connection and gives
# the pool's connection another one, which is right but not what those tests assert),
# session-level SET default_transaction_read_only and reset_sql (session state does not
# follow a client connection in transaction mode). README, "Running in a fleet", says what
# holds behind PgBouncer.
stage_pgbouncer() {
    local rc=0
    ensure_pgbouncer_up || return 1
    local ci=$PGR_BENCH_PGBOUNCER_CONNINFO dir=$ROOT/build/tests
    PGR_TEST_CONNINFO=$ci "$dir/test_checkout" --jobs 1 || rc=1
    PGR_TEST_CONNINFO=$ci "$dir/test_lifecycle" --jobs 1 \
        --filter 'lifecycle/connection_returned_in_*' || rc=1
    # The two deadline tests end in a cancel request, which Debian 12's PgBouncer (1.18) can
    # answer by exiting (FATAL "disconnect_client(): bad client state: 0"): it would take the
    # rest of the stage down with it. They run against the server directly in the main stage.
    PGR_TEST_CONNINFO=$ci "$dir/test_async" --jobs 1 \
        --filter 'async/!(prepings_run_on_the_loop_ring_and_dead_backends_never_reach_the_caller|*_past_*deadline*)' ||
        rc=1
    # The pool detects PgBouncer and then prepares nothing by name (it also checks the server
    # itself, through PGR_TEST_CONNINFO, for the opposite).
    PGR_TEST_NEED_PGBOUNCER=1 "$dir/test_pooler" --jobs 1 || rc=1
    return "$rc"
}

# The sources follow .clang-format, and the scripts pass shellcheck.
stage_hygiene() {
    local rc=0
    local -a sources scripts
    mapfile -t sources < <(cd "$ROOT" && git ls-files -- 'src/*.[ch]' 'include/*.h' \
        'tests/*.[ch]' 'tests/*.cpp' 'bench/*.[ch]' 'examples/*.[ch]')
    mapfile -t scripts < <(cd "$ROOT" && git ls-files -- '*.sh' .ci/run)
    ((${#sources[@]})) || {
        pgr_warn "no sources found (not a git checkout?)"
        return 1
    }
    if ! (cd "$ROOT" && clang-format --dry-run --Werror "${sources[@]}"); then
        pgr_warn "clang-format: the files above are not formatted (clang-format -i FILE)"
        rc=1
    fi
    # -x: follow the scripts' `. scripts/common.sh`.
    (cd "$ROOT" && shellcheck -x "${scripts[@]}") || rc=1
    if ((rc == 0)); then
        pgr_log "clang-format: ${#sources[@]} files clean; shellcheck: ${#scripts[@]} scripts clean"
    fi
    return "$rc"
}

# The library against the committed ABI baseline, the man pages against the exported symbols,
# and an install used the way a user would (find_package and pkg-config, shared and static,
# C11 and C++17).
stage_adopt() {
    local rc=0
    "$ROOT/scripts/abi.sh" check "$ROOT/build/libpgring.so" || rc=1
    "$ROOT/scripts/check_man.sh" "$ROOT/build/libpgring.so" || rc=1
    ensure_server_up || return 1
    "$ROOT/scripts/consumer.sh" "$ROOT/build" "$PGR_TEST_CONNINFO" || rc=1
    return "$rc"
}

stage_tsan() {
    build_tree build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPGR_TSAN=ON \
        -DPGR_BUILD_TESTS=ON -DPGR_BUILD_BENCH=OFF || return 1
    ensure_server_up || return 1
    local -a wrap
    read -r -a wrap <<<"$(tsan_wrapper)"
    TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1${TSAN_OPTIONS:+ $TSAN_OPTIONS}" \
        "${wrap[@]}" ctest --test-dir "$ROOT/build-tsan" -L stress --output-on-failure \
        --no-tests=error -j1 --timeout 600
}

# AddressSanitizer and UndefinedBehaviorSanitizer share one build and one pass over the whole
# suite: UBSan aborts on the first finding (-fno-sanitize-recover), so a finding fails a test.
stage_asan() {
    build_tree build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPGR_ASAN=ON -DPGR_UBSAN=ON \
        -DPGR_BUILD_TESTS=ON -DPGR_BUILD_BENCH=OFF || return 1
    ensure_server_up || return 1
    ensure_pgbouncer_up || return 1
    PGR_TEST_NEED_PGBOUNCER=1 \
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
        ctest --test-dir "$ROOT/build-asan" --output-on-failure --no-tests=error -j1 --timeout 300
}

cmd_test() {
    local -a failed=()
    ensure_deps test
    # A compile error would break the sanitizer builds the same way, so a
    # failed main build ends the run; failed tests do not.
    # -Werror here (not in the sanitizer builds, whose instrumentation may add warnings of its
    # own): a warning fails the run.
    build_tree build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPGR_BUILD_TESTS=ON -DPGR_BUILD_BENCH=ON \
        -DPGR_WERROR=ON || pgr_die "build failed"

    install_traps
    start_cluster

    # Stages run as `stage || ...`, where set -e is off inside them; they
    # report failure through their return status.
    pgr_log "=== stage: test suite (build) ==="
    stage_main || failed+=("test suite")
    pgr_log "=== stage: checkout, lifecycle and async tests through PgBouncer ==="
    stage_pgbouncer || failed+=("pgbouncer")
    pgr_log "=== stage: format and shellcheck ==="
    stage_hygiene || failed+=("hygiene")
    pgr_log "=== stage: ABI, man pages, install and consumers ==="
    stage_adopt || failed+=("adoption")
    if [[ ${PGR_SKIP_SANITIZERS:-0} == 1 ]]; then
        pgr_warn "PGR_SKIP_SANITIZERS=1: skipping the ThreadSanitizer and AddressSanitizer stages"
    else
        pgr_log "=== stage: stress tests under ThreadSanitizer (build-tsan) ==="
        stage_tsan || failed+=("tsan stress")
        pgr_log "=== stage: test suite under AddressSanitizer + UBSan (build-asan) ==="
        stage_asan || failed+=("asan+ubsan suite")
    fi
    # Every deliberate breakage of scripts/mutants.txt must make one of its tests fail (about
    # 7 minutes on 2 CPUs; the whole `test` stays well inside CI's 25-minute budget).
    if [[ ${PGR_SKIP_MUTANTS:-0} == 1 ]]; then
        pgr_warn "PGR_SKIP_MUTANTS=1: skipping the mutants stage"
    else
        pgr_log "=== stage: mutants (scripts/mutants.txt) ==="
        # PgBouncer too: the pooler-detection mutant is killed by a test through it.
        { ensure_server_up && ensure_pgbouncer_up && bash "$ROOT/scripts/mutants.sh"; } ||
            failed+=("mutants")
    fi

    if ((${#failed[@]})); then
        local IFS=,
        echo "run.sh test: FAILED: ${failed[*]}" >&2
        return 1
    fi
    if [[ ${PGR_SKIP_SANITIZERS:-0} == 1 ]]; then
        echo "run.sh test: test suite passed (sanitizer stages skipped)"
    else
        echo "run.sh test: all suites passed"
    fi
}

cmd_bench() {
    local idle=0
    if [[ ${1:-} == --idle ]]; then
        idle=1
        shift
    fi
    ensure_deps bench
    build_tree build-bench -DCMAKE_BUILD_TYPE=Release -DPGR_BUILD_BENCH=ON -DPGR_BUILD_TESTS=OFF ||
        pgr_die "build failed"
    if ((idle)); then
        local idle_bench=$ROOT/build-bench/bench/pgr_idle_bench
        [[ -x $idle_bench ]] || pgr_die "$idle_bench was not built"
        install_traps
        start_cluster
        # A thousand idle pools hold a thousand client connections; the server allows 300.
        PGB_MAX_CLIENT_CONN=2500 start_pgbouncer ||
            pgr_warn "pgbouncer did not start; pgr_idle_bench runs its largest counts with min_idle 0"
        "$idle_bench" "$@"
        return
    fi
    local bench=$ROOT/build-bench/bench/pgr_bench
    [[ -x $bench ]] || pgr_die "$bench was not built"
    ensure_peer_deps

    install_traps
    start_cluster
    start_pgbouncer ||
        pgr_warn "pgbouncer did not start; continuing without PGR_BENCH_PGBOUNCER_*"
    "$bench" "$@"
}

cmd_demo() {
    # scripts/demo.sh runs examples/pgr_http_server against the cluster
    # (PGR_TEST_* and PGR_DEMO_BUILD_DIR are exported).
    if [[ ! -d $ROOT/examples || ! -f $ROOT/scripts/demo.sh ]]; then
        echo "demo: not available yet" >&2
        exit 2
    fi
    ensure_deps demo
    # Same configuration as `test`, so the two share ./build without reconfiguring.
    build_tree build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPGR_BUILD_TESTS=ON -DPGR_BUILD_BENCH=ON \
        -DPGR_WERROR=ON -DPGR_BUILD_EXAMPLES=ON || pgr_die "build failed"
    [[ -x $ROOT/build/examples/pgr_http_server ]] ||
        pgr_die "build/examples/pgr_http_server was not built"
    install_traps
    start_cluster
    export PGR_DEMO_BUILD_DIR=$ROOT/build
    bash "$ROOT/scripts/demo.sh" "$PGR_DEMO_BUILD_DIR"
}

cmd_mutants() {
    ensure_deps test
    install_traps
    start_cluster
    start_pgbouncer || pgr_die "pgbouncer did not start (a mutant's test runs through it)"
    bash "$ROOT/scripts/mutants.sh" "$@"
}

cmd_abi_update() {
    ensure_deps test
    # The same configuration as `test`, whose ABI check compares this build.
    build_tree build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPGR_BUILD_TESTS=ON -DPGR_BUILD_BENCH=ON \
        -DPGR_WERROR=ON || pgr_die "build failed"
    "$ROOT/scripts/abi.sh" update "$ROOT/build/libpgring.so"
}

main() {
    (($# >= 1)) || usage
    local sub=$1
    shift
    cd "$ROOT"
    case $sub in
        test) (($# == 0)) || usage; cmd_test ;;
        bench) cmd_bench "$@" ;;
        demo) (($# == 0)) || usage; cmd_demo ;;
        mutants) cmd_mutants "$@" ;;
        abi-update) (($# == 0)) || usage; cmd_abi_update ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

# Sourcing the script (e.g. to try start_pgbouncer on its own) defines the
# functions without running anything.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
