#!/usr/bin/env bash
# SPDX-License-Identifier: PostgreSQL
# Install a built tree the way a user or a distribution package would, then build and run
# small programs against the installed files only.
#
#   scripts/consumer.sh BUILD_DIR CONNINFO
#
# 1. DESTDIR=<tmp>/stage cmake --install BUILD_DIR --prefix /usr/local: every file must land
#    under the stage (nothing outside DESTDIR), headers, both libraries, the CMake package,
#    pkg-config file and man pages included; `man -w pgr_acquire` finds the page there.
# 2. tests/consumer with find_package(pgring) against that stage: the shared and the static
#    imported target and the C++17 program, each run.
# 3. cmake --install BUILD_DIR --prefix <tmp>/prefix, then consumer.c compiled with only
#    `pkg-config --cflags --libs pgring` (shared, then --static), each run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
(($# == 2)) || {
    echo "usage: $0 BUILD_DIR CONNINFO" >&2
    exit 2
}
build=$(cd "$1" && pwd)
conninfo=$2
tmp=$(mktemp -d /tmp/pgring-consumer.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

say() { echo "consumer: $*"; }
fail() {
    echo "consumer: FAILED: $*" >&2
    exit 1
}

# 1. DESTDIR and prefix
DESTDIR=$tmp/stage cmake --install "$build" --prefix /usr/local >"$tmp/install.log" ||
    fail "cmake --install with DESTDIR (log: $(cat "$tmp/install.log"))"
stage=$tmp/stage/usr/local
for f in include/pgring.h share/man/man3/pgr_acquire.3 share/man/man3/pgring.3 \
    share/doc/pgring/LICENSE share/doc/pgring/NEWS; do
    [[ -f $stage/$f ]] || fail "$f not installed under DESTDIR/prefix"
done
for pattern in 'libpgring.so.0' 'libpgring.a' 'pgring.pc' 'pgringConfig.cmake' \
    'pgringConfigVersion.cmake' 'pgringTargets.cmake'; do
    [[ -n $(find "$stage" -name "$pattern" -print -quit) ]] || fail "$pattern not installed"
done
outside=$(grep -v "^-- Installing: $tmp/stage/usr/local/\|^-- Up-to-date: $tmp/stage/usr/local/\|^-- Install configuration" "$tmp/install.log" || true)
[[ -z $outside ]] || fail "installed outside DESTDIR/prefix: $outside"
page=$(MANPATH=$stage/share/man man -w pgr_acquire) || fail "man -w pgr_acquire"
say "DESTDIR install complete; man pgr_acquire -> ${page#"$tmp"/}"

# 2. find_package(pgring)
cmake -S "$ROOT/tests/consumer" -B "$tmp/cmake-build" -DCMAKE_PREFIX_PATH="$stage" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$tmp/cmake.log" 2>&1 ||
    fail "configuring the find_package consumer: $(cat "$tmp/cmake.log")"
cmake --build "$tmp/cmake-build" -j"$(nproc)" >"$tmp/build.log" 2>&1 ||
    fail "building the find_package consumer: $(cat "$tmp/build.log")"
# The shared one must have picked the staged library, not one installed elsewhere. grep reads
# all of ldd's output (no -q): under pipefail, ldd killed by SIGPIPE after an early match would
# fail the check although the library was found.
ldd "$tmp/cmake-build/consumer_shared" | grep "$stage" >/dev/null ||
    fail "consumer_shared does not load the staged libpgring: $(ldd "$tmp/cmake-build/consumer_shared")"
"$tmp/cmake-build/consumer_shared" "$conninfo" || fail "consumer_shared (pgring::pgring)"
"$tmp/cmake-build/consumer_static" "$conninfo" || fail "consumer_static (pgring::pgring_static)"
"$tmp/cmake-build/consumer_cxx" || fail "consumer_cxx (C++17)"
say "find_package(pgring): shared, static and C++17 consumers built and ran"

# 3. pkg-config against a plain --prefix install
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null || fail "cmake --install --prefix"
pc=$(find "$tmp/prefix" -name pgring.pc -print -quit)
export PKG_CONFIG_PATH=${pc%/pgring.pc}
libdir=$(pkg-config --variable=libdir pgring)
[[ $(cd "$libdir" && pwd) == "$tmp/prefix/"* ]] || fail "pgring.pc libdir $libdir is not in the prefix"
# shellcheck disable=SC2046 # pkg-config's output is a list of flags
cc -std=c11 -Wall -Wextra -Werror "$ROOT/tests/consumer/consumer.c" -o "$tmp/pc_shared" \
    $(pkg-config --cflags --libs pgring) || fail "building with pkg-config"
LD_LIBRARY_PATH=$libdir "$tmp/pc_shared" "$conninfo" || fail "pkg-config consumer (shared)"
# Static: libpgring.a and the dependencies pgring.pc names (Requires.private). Not
# `pkg-config --static`: that also expands libpq's private libraries (-lpgcommon -lpgport),
# which Debian ships no static archives of.
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror "$ROOT/tests/consumer/consumer.c" -o "$tmp/pc_static" \
    $(pkg-config --cflags pgring) "$libdir/libpgring.a" \
    $(pkg-config --libs libpq liburing libssl) -lpthread || fail "building statically with pkg-config"
readelf -d "$tmp/pc_static" | grep 'libpgring\.so' >/dev/null && fail "pc_static needs libpgring.so"
"$tmp/pc_static" "$conninfo" || fail "pkg-config consumer (static)"
say "pkg-config: shared and static consumers built and ran"
