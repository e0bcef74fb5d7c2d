#!/usr/bin/env bash
# SPDX-License-Identifier: PostgreSQL
# ABI check of the shared library against the baseline committed in abi/.
#
#   scripts/abi.sh check  LIB   compare LIB (build/libpgring.so) with abi/libpgring.abi;
#                               fails on an incompatible change, reports compatible ones
#   scripts/abi.sh update LIB   write LIB's ABI to abi/libpgring.abi (a deliberate change:
#                               commit the new baseline with the release that makes it)
#
# Only what the public header declares is compared: types defined in src/ (the layout behind
# the opaque pgr_pool, pgr_conn, pgr_loop handles) are dropped, so internal changes never trip
# the check. Source locations are kept short so the baseline does not depend on the checkout's
# path. LIB needs debug information (the RelWithDebInfo build has it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASELINE=$ROOT/abi/libpgring.abi

usage() {
    echo "usage: $0 check|update LIB" >&2
    exit 2
}

dump() {
    abidw --no-corpus-path --short-locs --headers-dir "$ROOT/include" --drop-private-types "$1"
}

(($# == 2)) || usage
lib=$2
[[ -f $lib ]] || {
    echo "abi: $lib not found (build the pgring target first)" >&2
    exit 1
}
command -v abidw >/dev/null || {
    echo "abi: abidw not found: apt-get install abigail-tools" >&2
    exit 1
}

case $1 in
    update)
        mkdir -p "$(dirname "$BASELINE")"
        dump "$lib" >"$BASELINE.tmp"
        mv "$BASELINE.tmp" "$BASELINE"
        echo "abi: wrote $BASELINE from $lib; commit it to make the change deliberate"
        ;;
    check)
        [[ -f $BASELINE ]] || {
            echo "abi: no baseline $BASELINE (./run.sh abi-update writes one)" >&2
            exit 1
        }
        cur=$(mktemp /tmp/pgring-abi.XXXXXX)
        trap 'rm -f "$cur"' EXIT
        dump "$lib" >"$cur"
        rc=0
        abidiff "$BASELINE" "$cur" >"$cur.diff" 2>&1 || rc=$?
        # abidiff's status is a bit set: 1 error, 2 usage, 4 a change, 8 an incompatible one
        # (a removed symbol). A changed layout of a public type (a member inserted, a type
        # changed) sets only bit 4, like an added function does, so the summary lines decide:
        # anything removed or changed fails; only additions pass. A member appended to
        # pgr_config or pgr_stats is not reported at all: libabigail counts it harmless,
        # which is what their struct_size makes true.
        if ((rc & 3)); then
            cat "$cur.diff" >&2
            rm -f "$cur.diff"
            echo "abi: abidiff failed (status $rc)" >&2
            exit 1
        fi
        if ((rc & 8)) || grep -qE '(^|[ ,])[1-9][0-9]* (Removed|Changed)' "$cur.diff"; then
            cat "$cur.diff" >&2
            rm -f "$cur.diff"
            echo "abi: INCOMPATIBLE with abi/libpgring.abi (above). If the break is deliberate," \
                "raise the SONAME, say so in NEWS and run ./run.sh abi-update." >&2
            exit 1
        fi
        if ((rc & 4)); then
            cat "$cur.diff"
            echo "abi: only additions (listed above); ./run.sh abi-update records them"
        else
            echo "abi: no change against abi/libpgring.abi"
        fi
        rm -f "$cur.diff"
        ;;
    *) usage ;;
esac
