#!/usr/bin/env bash
# Peer benchmark: the Linux KVM selftest `demand_paging_test`, run in
# userfaultfd MISSING mode, as a reference point for faultline's own
# demand-paging rate.
#
# Usage:
#   bench/peers/demand_paging_test.sh [--mem SIZE] [--pin] [-- EXTRA_ARGS...]
#
#   --mem SIZE   guest memory demand-paged by the (single) vCPU; a number with
#                an optional K/M/G/T suffix, as the selftest's -b accepts it
#                (default 64M)
#   --pin        run everything under `taskset -c 0`, so the vCPU thread and
#                the userfaultfd handler thread share one host CPU
#   -- ARGS      passed to demand_paging_test unchanged
#
# The test is not shipped as a binary anywhere handy, so on first use this
# script builds it from Debian's linux-source-6.1 package into a cache
# directory outside the repository:
#   PEERS_DIR (default: ${XDG_CACHE_HOME:-$HOME/.cache}/faultline-peers)
# Nothing from the kernel source is ever copied into this repository.
#
# Output: the test's own output, then one JSON line on stdout, e.g.
#   {"peer":"demand_paging_test","uffd_mode":"MISSING","mem_bytes":67108864,
#    "pages":16384,"pinned":false,"seconds":3.1,"pages_per_s":5285.2,
#    "printed_rate_raw":"..."}
# (on a single line). Progress messages go to stderr.
#
# Why we recompute the rate: 6.1's demand_paging_test converts the
# nanosecond part of the elapsed time with `tv_nsec / 100000000.0` (1e8, not
# 1e9), so its "Overall demand paging rate" is wrong (ten times too low when
# the run takes under a second). We take the "Total guest execution time" it
# prints and divide the page count by that ourselves.

# -E: let the ERR trap used around the build fire inside functions too.
set -Eeuo pipefail

# ---------------------------------------------------------------- settings --

PKG=linux-source-6.1
TARBALL=/usr/src/linux-source-6.1.tar.xz
TOPDIR=linux-source-6.1          # top-level directory inside the tarball
PAGE_SIZE=4096                   # default guest mode uses 4 KiB pages

PEERS_DIR=${PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/faultline-peers}
SRC="$PEERS_DIR/$TOPDIR"                         # unpacked kernel subset
KVM_DIR="$SRC/tools/testing/selftests/kvm"
BIN="$PEERS_DIR/bin/demand_paging_test"          # the cached result
BUILD_LOG="$PEERS_DIR/demand_paging_test.build.log"

log() { echo "[demand_paging_test.sh] $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    cat >&2 <<'EOF_USAGE'
usage: demand_paging_test.sh [--mem SIZE] [--pin] [-- EXTRA_ARGS...]
  --mem SIZE  memory demand-paged by the single vCPU (K/M/G/T suffix; default 64M)
  --pin       run under `taskset -c 0` (vCPU and uffd handler share one CPU)
  -- ARGS     passed on to demand_paging_test
environment: PEERS_DIR  build cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/faultline-peers)
EOF_USAGE
    exit "${1:-0}"
}

# -------------------------------------------------------------- arguments --

MEM=64M
PIN=false
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mem)   [[ $# -ge 2 ]] || die "--mem needs a value"; MEM=$2; shift 2 ;;
        --mem=*) MEM=${1#--mem=}; shift ;;
        --pin)   PIN=true; shift ;;
        -h|--help) usage 0 ;;
        --)      shift; EXTRA=("$@"); break ;;
        *)       log "unknown argument: $1"; usage 2 ;;
    esac
done

# Convert SIZE to bytes the same way the selftest's parse_size() does
# (decimal number, optional single-letter binary suffix).
size_to_bytes() {
    local s=${1,,} num suffix shift_by
    [[ $s =~ ^([0-9]+)([kmgtb]?)$ ]] || die "bad size '$1' (want e.g. 64M)"
    num=${BASH_REMATCH[1]}; suffix=${BASH_REMATCH[2]}
    case "$suffix" in
        t) shift_by=40 ;; g) shift_by=30 ;; m) shift_by=20 ;; k) shift_by=10 ;;
        *) shift_by=0 ;;
    esac
    echo $(( 10#$num << shift_by ))
}
MEM_BYTES=$(size_to_bytes "$MEM")
(( MEM_BYTES >= PAGE_SIZE )) || die "--mem must be at least one page"
PAGES=$(( MEM_BYTES / PAGE_SIZE ))

# ------------------------------------------------------------------ build --

# Make sure the Debian kernel source tarball (and a compiler) are installed.
# `apt-get update` is only run if the first install attempt fails, e.g.
# because the package lists are missing or stale.
ensure_packages() {
    local pkgs=()
    [[ -f $TARBALL ]] || pkgs+=("$PKG")
    command -v gcc  >/dev/null || pkgs+=(gcc)
    command -v make >/dev/null || pkgs+=(make)
    command -v xz   >/dev/null || pkgs+=(xz-utils)
    [[ ${#pkgs[@]} -eq 0 ]] && return 0

    [[ $(id -u) -eq 0 ]] || die "need root to apt-get install ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    log "installing ${pkgs[*]}"
    if ! apt-get install -y "${pkgs[@]}" >>"$BUILD_LOG" 2>&1; then
        log "install failed; running apt-get update and retrying"
        apt-get update >>"$BUILD_LOG" 2>&1
        apt-get install -y "${pkgs[@]}" >>"$BUILD_LOG" 2>&1
    fi
    [[ -f $TARBALL ]] || die "$PKG installed but $TARBALL is missing"
}

# Unpack only the parts of the tree that `make headers` and the KVM selftests
# need (~135 MB instead of ~1.4 GB). xz still has to decompress the whole
# archive, which is most of the time spent here.
unpack_source() {
    local tmp="$PEERS_DIR/unpack.tmp"
    rm -rf "$tmp" "$SRC"
    mkdir -p "$tmp"
    log "unpacking $TARBALL (subset) into $SRC"
    tar -xJf "$TARBALL" -C "$tmp" \
        "$TOPDIR/Makefile" "$TOPDIR/Kbuild" "$TOPDIR/Kconfig" \
        "$TOPDIR/scripts" "$TOPDIR/include" "$TOPDIR/arch/x86" \
        "$TOPDIR/tools" "$TOPDIR/usr"
    mv "$tmp/$TOPDIR" "$SRC"
    rmdir "$tmp"
}

# Fix for this machine: the guest's instructions are emulated (kvm_pvm, no
# hardware virtualisation) and the emulator cannot execute SSE. gcc zeroes
# the `struct ucall` in ucall() (guest code) with pxor/movups on %xmm0, so
# the guest dies with KVM_EXIT_INTERNAL_ERROR at its first ucall. Compile
# that one file with general-purpose registers only. Idempotent.
patch_source() {
    local f="$KVM_DIR/lib/x86_64/ucall.c"
    local pragma='#pragma GCC target("general-regs-only")'
    if ! grep -qF "$pragma" "$f"; then
        log "patching $f: $pragma"
        sed -i "1i $pragma" "$f"
    fi
}

build() {
    local t0=$SECONDS jobs
    jobs=$(nproc)
    mkdir -p "$PEERS_DIR/bin"
    : >"$BUILD_LOG"

    ensure_packages
    [[ -f $KVM_DIR/demand_paging_test.c ]] || unpack_source
    patch_source

    # The selftests compile against the exported UAPI headers in
    # $SRC/usr/include; 6.1's selftest Makefile does not create them itself.
    log "make headers"
    make -C "$SRC" -j"$jobs" headers >>"$BUILD_LOG" 2>&1

    # Build only this test (and libkvm). lib.mk names its targets by
    # absolute path ($(OUTPUT)/name, OUTPUT defaulting to the test dir).
    log "make demand_paging_test"
    make -C "$KVM_DIR" -j"$jobs" "$KVM_DIR/demand_paging_test" >>"$BUILD_LOG" 2>&1

    # Refuse to cache a binary whose guest-side ucall still uses SSE.
    if objdump -d "$KVM_DIR/lib/x86_64/ucall.o" 2>/dev/null | grep -q '%xmm'; then
        die "ucall.o still contains SSE instructions; patch did not apply"
    fi

    cp "$KVM_DIR/demand_paging_test" "$BIN.tmp"
    mv "$BIN.tmp" "$BIN"
    log "built $BIN in $(( SECONDS - t0 ))s (log: $BUILD_LOG)"
}

on_build_error() {
    log "build failed; last lines of $BUILD_LOG:"
    tail -n 40 "$BUILD_LOG" >&2 || true
    exit 1
}

mkdir -p "$PEERS_DIR"
if [[ ! -x $BIN ]]; then
    # Serialise concurrent first runs on the cache directory.
    exec 9>"$PEERS_DIR/.lock"
    flock 9
    if [[ ! -x $BIN ]]; then
        trap on_build_error ERR
        build
        trap - ERR
    fi
    flock -u 9
fi

# -------------------------------------------------------------------- run --

[[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm is not accessible"

cmd=("$BIN" -u MISSING -b "$MEM" "${EXTRA[@]}")
$PIN && cmd=(taskset -c 0 "${cmd[@]}")
log "running: ${cmd[*]}"

out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
"${cmd[@]}" 2>&1 | tee "$out" || status=$?
[[ $status -eq 0 ]] || die "demand_paging_test exited with status $status"

# ------------------------------------------------------------------ parse --

# "Total guest execution time: 3.123456789s" -- wall time from starting the
# vCPU threads until all of them joined.
seconds=$(sed -n 's/^Total guest execution time: \([0-9.]*\)s$/\1/p' "$out")
# "Overall demand paging rate: 524.288000 pgs/sec" -- kept only for reference.
printed_rate=$(sed -n 's/^Overall demand paging rate: \(.*\)$/\1/p' "$out")
[[ -n $seconds ]] || die "could not find 'Total guest execution time' in output"

# Pages per second. PAGES assumes the defaults of one vCPU and 4 KiB pages;
# extra args such as -v or -s would change the page count.
pages_per_s=$(awk -v p="$PAGES" -v s="$seconds" \
    'BEGIN { if (s > 0) printf "%.1f", p / s; else print "null" }')

printf '{"peer":"demand_paging_test","uffd_mode":"MISSING","mem_bytes":%d,"pages":%d,"pinned":%s,"seconds":%s,"pages_per_s":%s,"printed_rate_raw":"%s"}\n' \
    "$MEM_BYTES" "$PAGES" "$PIN" "$seconds" "$pages_per_s" "$printed_rate"
