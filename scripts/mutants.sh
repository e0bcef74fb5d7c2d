#!/usr/bin/env bash
# SPDX-License-Identifier: PostgreSQL
# Mutation check of the test suite: every deliberate breakage in scripts/mutants.txt must be
# caught by the tests listed with it.
#
#   scripts/mutants.sh [NAME...]     all mutants, or only those named
#
# Needs the throwaway server's PGR_TEST_* variables and PgBouncer's
# PGR_BENCH_PGBOUNCER_CONNINFO: run it as `./run.sh mutants [NAME...]`, which starts both first. The sources (tracked and untracked, not ignored) are copied to
# a temporary directory and built there once; the working tree is never modified. First every
# listed test runs on the unmodified copy (a test that fails there cannot kill anything); then
# each mutant is applied alone, the listed test binaries are rebuilt and run, and the file is
# restored. Fails when a mutant survives, no longer applies (its text is missing or not
# unique: re-target it), or does not compile.
#
# Environment: PGR_MUTANTS_KEEP=1 keeps the temporary directory; PGR_MUTANTS_TEST_TIMEOUT
# (seconds, default 180) bounds each test command; PGR_MUTANTS_LIST names another list;
# PGR_MUTANTS_ALL_TESTS=1 runs every listed test of a mutant instead of stopping at the first
# that kills it (to see which tests catch it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"
PGR_LOG_TAG=mutants.sh
LIST=${PGR_MUTANTS_LIST:-$ROOT/scripts/mutants.txt}
TEST_TIMEOUT=${PGR_MUTANTS_TEST_TIMEOUT:-180}

[[ -n ${PGR_TEST_CONNINFO:-} ]] ||
    pgr_die "PGR_TEST_CONNINFO is not set: run ./run.sh mutants, which starts a test cluster"

# ---------------------------------------------------------------------------
# The list

declare -a M_NAME=() M_BREAKS=() M_FILE=() M_TESTS=() M_FIND=() M_REPLACE=()

parse_list() {
    local line mode='' name='' breaks='' file='' tests='' find='' replace='' lineno=0
    while IFS= read -r line || [[ -n $line ]]; do
        lineno=$((lineno + 1))
        case $mode in
            find | replace)
                if [[ $line == '@@ replace' && $mode == find ]]; then
                    mode=replace
                    continue
                fi
                if [[ $line == '@@ end' && $mode == replace ]]; then
                    [[ -n $name && -n $file && -n $tests && -n $find ]] ||
                        pgr_die "$LIST:$lineno: mutant '$name' lacks file, test or find"
                    M_NAME+=("$name") M_BREAKS+=("$breaks") M_FILE+=("$file")
                    M_TESTS+=("$tests") M_FIND+=("${find%$'\n'}") M_REPLACE+=("${replace%$'\n'}")
                    mode='' name='' breaks='' file='' tests='' find='' replace=''
                    continue
                fi
                [[ $line == '@@ '* ]] && pgr_die "$LIST:$lineno: unexpected '$line' in $mode"
                if [[ $mode == find ]]; then find+=$line$'\n'; else replace+=$line$'\n'; fi
                ;;
            *)
                case $line in
                    '' | '#'*) ;;
                    '@@ mutant '*) name=${line#@@ mutant } ;;
                    '@@ breaks '*) breaks=${line#@@ breaks } ;;
                    '@@ file '*) file=${line#@@ file } ;;
                    '@@ test '*) tests+=${line#@@ test }$'\n' ;;
                    '@@ find') mode="find" ;;
                    *) pgr_die "$LIST:$lineno: unexpected line: $line" ;;
                esac
                ;;
        esac
    done <"$LIST"
    [[ -z $mode && -z $name ]] || pgr_die "$LIST: the last mutant ('$name') has no '@@ end'"
}

# The test binary named by a test command (the first word that is not env or VAR=value).
test_binary() {
    local w
    for w in $1; do
        [[ $w == env || $w == *=* ]] && continue
        echo "$w"
        return
    done
}

# run_test CMD: run one test command from the build's tests directory; 0 when it passed.
run_test() {
    local -a words=() cmd=()
    local w bin
    read -r -a words <<<"$1"
    bin=$(test_binary "$1")
    for w in "${words[@]}"; do
        if [[ $w == "$bin" ]]; then cmd+=("$BUILD/tests/$w"); else cmd+=("$w"); fi
    done
    (cd "$BUILD/tests" && CRITERION_JOBS=1 timeout -k 10 "$TEST_TIMEOUT" "${cmd[@]}") \
        >"$LOG" 2>&1
}

# ---------------------------------------------------------------------------
# Applying a mutant: exact text, exactly once

read_file() { # read_file PATH VAR: the whole file, trailing newlines kept
    IFS= read -r -d '' "$2" <"$1" || true
}

apply_mutant() { # apply_mutant INDEX: 0 applied, 1 text missing or not unique
    local path=$WORK/src/${M_FILE[$1]} content rest
    [[ -f $path ]] || return 1
    read_file "$path" content
    [[ $content == *"${M_FIND[$1]}"* ]] || return 1
    rest=${content#*"${M_FIND[$1]}"}
    [[ $rest != *"${M_FIND[$1]}"* ]] || return 1
    printf '%s' "${content/"${M_FIND[$1]}"/"${M_REPLACE[$1]}"}" >"$path"
}

# ---------------------------------------------------------------------------

main() {
    local -a only=("$@") pick=() targets=() cmds=() results=()
    local i t c start elapsed survived=0 broken=0 killed_by
    parse_list
    ((${#M_NAME[@]})) || pgr_die "no mutants in $LIST"
    for i in "${!M_NAME[@]}"; do
        if ((${#only[@]} == 0)) || [[ " ${only[*]} " == *" ${M_NAME[i]} "* ]]; then
            pick+=("$i")
        fi
    done
    ((${#pick[@]})) || pgr_die "no mutant named: ${only[*]}"

    WORK=$(mktemp -d /tmp/pgring-mutants.XXXXXX)
    BUILD=$WORK/build
    LOG=$WORK/test.log
    if [[ ${PGR_MUTANTS_KEEP:-0} == 1 ]]; then
        pgr_log "keeping $WORK"
    else
        trap 'rm -rf "$WORK"' EXIT
    fi
    start=$SECONDS
    mkdir -p "$WORK/src"
    (cd "$ROOT" && git ls-files -z -co --exclude-standard | tar -c --null -T - -f -) |
        tar -x -C "$WORK/src"

    for i in "${pick[@]}"; do
        while IFS= read -r c; do
            [[ -n $c ]] || continue
            [[ " ${cmds[*]-} " == *" $c "* ]] || cmds+=("$c")
            t=$(test_binary "$c")
            [[ " ${targets[*]-} " == *" $t "* ]] || targets+=("$t")
        done <<<"${M_TESTS[i]}"
    done

    pgr_log "building the unmodified copy in $BUILD (targets: ${targets[*]})"
    cmake -S "$WORK/src" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPGR_BUILD_TESTS=ON \
        -DPGR_BUILD_BENCH=OFF -DPGR_BUILD_EXAMPLES=OFF >"$WORK/cmake.log" 2>&1 ||
        { cat "$WORK/cmake.log" >&2; pgr_die "configure failed"; }
    cmake --build "$BUILD" -j"$(nproc)" --target "${targets[@]}" >"$WORK/build.log" 2>&1 ||
        { tail -n 40 "$WORK/build.log" >&2; pgr_die "the unmodified copy does not build"; }

    # A test that fails without any mutant would "kill" every mutant it is listed for. A
    # timing test can fail once on a loaded machine: one more try before giving up, since a
    # failure here ends the whole run (and fails CI) while telling nothing about the mutants.
    for c in "${cmds[@]}"; do
        pgr_log "baseline: $c"
        run_test "$c" || {
            pgr_warn "baseline failed once, trying again: $c"
            run_test "$c"
        } || {
            tail -n 30 "$LOG" >&2
            pgr_die "baseline test fails without any mutant: $c"
        }
    done

    for i in "${pick[@]}"; do
        local name=${M_NAME[i]} file=$WORK/src/${M_FILE[i]} t0=$SECONDS
        cp -p "$file" "$WORK/orig"
        if ! apply_mutant "$i"; then
            results+=("$name|NOT APPLIED|text not found exactly once in ${M_FILE[i]}: re-target it|0")
            broken=1
            continue
        fi
        # Only this mutant's test binaries: the others are rebuilt when a mutant needs them
        # (the restored file's fresh mtime makes the library and its users stale again).
        local -a mine=()
        while IFS= read -r c; do
            [[ -n $c ]] || continue
            t=$(test_binary "$c")
            [[ " ${mine[*]-} " == *" $t "* ]] || mine+=("$t")
        done <<<"${M_TESTS[i]}"
        if ! cmake --build "$BUILD" -j"$(nproc)" --target "${mine[@]}" \
            >"$WORK/build.log" 2>&1; then
            tail -n 20 "$WORK/build.log" >&2
            results+=("$name|NO BUILD|the mutated source does not compile: re-target it|$((SECONDS - t0))")
            broken=1
        else
            killed_by=
            while IFS= read -r c; do
                [[ -n $c ]] || continue
                if ! run_test "$c" 2>/dev/null; then
                    killed_by+=${killed_by:+; }$c
                    [[ ${PGR_MUTANTS_ALL_TESTS:-0} == 1 ]] || break
                fi
            done <<<"${M_TESTS[i]}"
            if [[ -n $killed_by ]]; then pgr_log "$name: killed by $killed_by"; else pgr_log "$name: SURVIVED"; fi
            if [[ -n $killed_by ]]; then
                results+=("$name|killed|$killed_by|$((SECONDS - t0))")
            else
                results+=("$name|SURVIVED|${M_BREAKS[i]}|$((SECONDS - t0))")
                survived=1
            fi
        fi
        # Restore with a fresh mtime so the next build recompiles the file.
        cp "$WORK/orig" "$file"
        touch "$file"
    done

    elapsed=$((SECONDS - start))
    printf '\n%-34s %-10s %5s  %s\n' mutant result secs 'killed by / why'
    local r n res why secs
    for r in "${results[@]}"; do
        IFS='|' read -r n res why secs <<<"$r"
        printf '%-34s %-10s %5s  %s\n' "$n" "$res" "$secs" "$why"
    done
    echo "mutants: ${#pick[@]} run in ${elapsed} s"
    if ((survived || broken)); then
        echo "mutants: FAILED (a mutant survived or no longer applies)" >&2
        return 1
    fi
    echo "mutants: all killed"
}

main "$@"
