#!/usr/bin/env bash
# SPDX-License-Identifier: PostgreSQL
# Every exported symbol of the shared library and every public type of pgring.h has a man page
# in man/man3 that names it, and every page renders without a groff warning.
#
#   scripts/check_man.sh LIB     (LIB: build/libpgring.so)
#
# A page may be a one-line `.so man3/other.3` link; the page it points to must then list the
# name in its NAME section. Each missing or broken page is printed on its own line.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MAN=$ROOT/man/man3
(($# == 1)) || {
    echo "usage: $0 LIB" >&2
    exit 2
}
lib=$1
bad=0

# The NAME line of a page, following one .so link.
name_line() {
    local page=$1 first
    first=$(head -n 1 "$page")
    if [[ $first == .so\ * ]]; then
        page=$ROOT/man/${first#.so }
        [[ -f $page ]] || return 1
    fi
    grep -A1 '^\.SH NAME' "$page" | tail -n 1
}

check() {
    local name=$1 what=$2 line
    if [[ ! -f $MAN/$name.3 ]]; then
        echo "check_man: no man page for $what $name (add man/man3/$name.3)" >&2
        bad=1
        return
    fi
    if ! line=$(name_line "$MAN/$name.3"); then
        echo "check_man: man/man3/$name.3 links to a page that does not exist" >&2
        bad=1
        return
    fi
    # Names in NAME are separated by ", " and end at " \- ".
    if [[ ", ${line%% \\- *}," != *", ${name//_/_},"* ]]; then
        echo "check_man: the page man/man3/$name.3 leads to does not name $name in NAME" >&2
        bad=1
    fi
}

mapfile -t symbols < <(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRV]$/ {sub(/@.*/, "", $3); print $3}' | sort -u)
((${#symbols[@]})) || {
    echo "check_man: no exported symbols found in $lib" >&2
    exit 1
}
for s in "${symbols[@]}"; do
    check "$s" symbol
done
# Public types: typedef'd structs of the header.
mapfile -t types < <(sed -n -e 's/^typedef struct \([a-z_]*\) \1;$/\1/p' -e 's/^} \(pgr_[a-z_]*\);$/\1/p' \
    "$ROOT/include/pgring.h" | sort -u)
for t in "${types[@]}"; do
    check "$t" type
done
for page in "$MAN"/*.3; do
    out=$(cd "$ROOT/man" && groff -man -ww -z "man3/${page##*/}" 2>&1) || true
    if [[ -n $out ]]; then
        echo "check_man: ${page#"$ROOT"/}: $out" >&2
        bad=1
    fi
done
if ((bad)); then
    echo "check_man: FAILED" >&2
    exit 1
fi
echo "check_man: ${#symbols[@]} symbols and ${#types[@]} types, each with a page; $(find "$MAN" -name '*.3' | wc -l) pages render cleanly"
