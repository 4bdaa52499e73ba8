#!/bin/sh
# Builds the libFuzzer harnesses (clang, -fsanitize=fuzzer,address,undefined) into OUT
# (default build-fuzz/): the C core once as a static library, then one binary per fuzz_*.c.
#   csrc/fuzz/build.sh [OUT]            build
#   csrc/fuzz/build.sh --seeds [OUT]    build, then rewrite the seed corpus in csrc/fuzz/corpus/
set -eu
cd "$(dirname "$0")/../.."
seeds=0
if [ "${1:-}" = --seeds ]; then seeds=1; shift; fi
OUT=${1:-build-fuzz}
CC=${FUZZ_CC:-clang}
command -v "$CC" >/dev/null || { echo "build.sh: $CC not found (scripts/bootstrap.sh installs it)" >&2; exit 1; }
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
# -Wno-gnu-...: KVM's UAPI idiom (struct kvm_msrs followed by its entries), which gcc takes as is.
CFLAGS="-std=gnu11 -g -O1 -Wall -Wextra -Werror -Wno-gnu-variable-sized-type-not-at-end -msse4.2 -D_GNU_SOURCE
        -pthread -Icsrc/include $SAN"
mkdir -p "$OUT/obj"

# Everything is rebuilt when any C source or header is newer than the last build: simple, and
# the whole core compiles in seconds.
stamp=$OUT/.built
if [ ! -f "$stamp" ] || [ -n "$(find csrc -name '*.[ch]' -newer "$stamp" | head -n1)" ]; then
    rm -f "$OUT"/obj/*.o "$OUT/libvfmig_fuzz.a"
    for src in csrc/*.c csrc/vmm/*.c csrc/dirty/*.c csrc/stream/*.c csrc/devices/*.c; do
        # Coverage for libFuzzer in the core, whose code the harnesses reach.
        $CC $CFLAGS -fsanitize=fuzzer-no-link -c "$src" -o "$OUT/obj/$(echo "$src" | tr / _).o"
    done
    ar rcs "$OUT/libvfmig_fuzz.a" "$OUT"/obj/*.o
    for h in csrc/fuzz/fuzz_*.c csrc/fuzz/canary/fuzz_*.c; do
        $CC $CFLAGS -fsanitize=fuzzer "$h" "$OUT/libvfmig_fuzz.a" -lzstd -o "$OUT/$(basename "$h" .c)"
    done
    $CC $CFLAGS csrc/fuzz/seeds.c "$OUT/libvfmig_fuzz.a" -lzstd -o "$OUT/seeds"
    touch "$stamp"
fi
if [ "$seeds" = 1 ]; then
    "$OUT/seeds" csrc/fuzz/corpus
fi
