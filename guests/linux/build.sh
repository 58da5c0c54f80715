#!/usr/bin/env bash
#
# build.sh - build faultline's default Linux guest on a Debian/Ubuntu host.
#
# Usage: guests/linux/build.sh [OUT_DIR]      (default: guests/linux/out)
#
# Produces in OUT_DIR:
#   vmlinuz            Debian's cloud kernel, as shipped (bzImage)
#   vmlinux            the uncompressed ELF kernel extracted from vmlinuz
#                      (boot it through its PVH entry point)
#   initramfs.cpio.gz  busybox-static + /init + the static workload program
#   kernel.config      the kernel's build configuration, for reference
#   BUILD-INFO         kernel package/version, compression, PVH entry
#
# Needs root for apt-get (only when a package is missing) and to create
# /dev/console in the initramfs. Talks to the network only through apt.
#
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT_DIR=${1:-$SCRIPT_DIR/out}
KERNEL_META_PKG=linux-image-cloud-amd64

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Host packages
# ---------------------------------------------------------------------------

APT_UPDATED=no

# Run `apt-get update` at most once per build.
apt_update_once() {
	if [[ $APT_UPDATED == no ]]; then
		log "apt-get update"
		apt-get update -qq
		APT_UPDATED=yes
	fi
}

# ensure_pkg PKG... : install any of the given Debian packages that are
# not installed yet.
ensure_pkg() {
	local missing=() pkg
	for pkg in "$@"; do
		[[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == *'ok installed' ]] ||
			missing+=("$pkg")
	done
	((${#missing[@]} == 0)) && return 0
	[[ $EUID -eq 0 ]] || die "missing packages (${missing[*]}); install them or run as root"
	# Refresh the package lists if apt does not know a package yet.
	for pkg in "${missing[@]}"; do
		apt-cache show "$pkg" >/dev/null 2>&1 || { apt_update_once; break; }
	done
	log "apt-get install ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------------------
# Little-endian field readers (for the bzImage setup header and ELF header)
# ---------------------------------------------------------------------------

# read_uint FILE OFFSET BYTES : print the unsigned little-endian integer
# of BYTES bytes (1, 2, 4 or 8) at OFFSET, in decimal.
read_uint() {
	od -An -v -t "u$3" -j "$2" -N "$3" --endian=little "$1" | tr -d ' '
}

# read_hex FILE OFFSET BYTES : print BYTES raw bytes at OFFSET as hex.
read_hex() {
	od -An -v -t x1 -j "$2" -N "$3" "$1" | tr -d ' \n'
}

# ---------------------------------------------------------------------------
# vmlinuz -> vmlinux
# ---------------------------------------------------------------------------
#
# A bzImage is: real-mode setup sectors, then the 32/64-bit decompressor,
# which embeds the compressed kernel ("payload"). Since boot protocol 2.08
# the setup header says exactly where the payload is:
#   0x1f1  setup_sects     (1 byte)  number of 512-byte setup sectors
#   0x202  "HdrS"                    header magic
#   0x206  version         (2 bytes) boot protocol version
#   0x248  payload_offset  (4 bytes) relative to the protected-mode code,
#                                    which starts at (setup_sects + 1) * 512
#   0x24c  payload_length  (4 bytes)
# The payload format is then identified by its magic bytes. The
# decompressed data is vmlinux (stripped ELF), followed by the relocation
# table for KASLR; we cut the ELF back to its own end.

COMPRESSION=unknown

extract_vmlinux() {
	local bzimage=$1 dest=$2 tmp=$3

	[[ $(read_hex "$bzimage" 0x202 4) == 48647253 ]] || die "$bzimage: no bzImage 'HdrS' header"
	local version setup_sects pm_start offset length
	version=$(read_uint "$bzimage" 0x206 2)
	((version >= 0x0208)) || die "$bzimage: boot protocol $(printf '%#x' "$version") has no payload fields"
	setup_sects=$(read_uint "$bzimage" 0x1f1 1)
	((setup_sects == 0)) && setup_sects=4 # historical meaning of 0
	pm_start=$(((setup_sects + 1) * 512))
	offset=$((pm_start + $(read_uint "$bzimage" 0x248 4)))
	length=$(read_uint "$bzimage" 0x24c 4)
	log "payload: $length bytes at file offset $offset"

	local payload=$tmp/payload
	dd if="$bzimage" of="$payload" iflag=skip_bytes,count_bytes \
		skip="$offset" count="$length" status=none

	# The kernel build appends the uncompressed size (4 bytes, LE) to the
	# payload; for gzip it is the gzip trailer's ISIZE field, for the other
	# formats an extra word that their decompressors must not see.
	local expect_size magic strip=4 decompress
	expect_size=$(read_uint "$payload" $((length - 4)) 4)
	magic=$(read_hex "$payload" 0 6)
	case $magic in
	1f8b*) COMPRESSION=gzip; strip=0; decompress=(gzip -dc) ;;
	fd377a585a00) COMPRESSION=xz; decompress=(xz -dc --single-stream) ;;
	5d0000*) COMPRESSION=lzma; decompress=(xz -dc --format=lzma) ;;
	28b52ffd*) COMPRESSION=zstd; decompress=(zstd -dcq) ;;
	02214c18*) COMPRESSION=lz4; decompress=(lz4 -dcq) ;;
	425a68*) COMPRESSION=bzip2; decompress=(bzip2 -dc) ;;
	894c5a*) COMPRESSION=lzo; decompress=(lzop -dc) ;;
	*) die "unrecognised payload magic $magic" ;;
	esac
	log "payload compression: $COMPRESSION"
	command -v "${decompress[0]}" >/dev/null ||
		ensure_pkg "$(case $COMPRESSION in
			gzip) echo gzip ;; xz | lzma) echo xz-utils ;; zstd) echo zstd ;;
			lz4) echo lz4 ;; bzip2) echo bzip2 ;; lzo) echo lzop ;; esac)"

	head -c $((length - strip)) "$payload" | "${decompress[@]}" >"$tmp/decompressed"

	local got_size
	got_size=$(stat -c %s "$tmp/decompressed")
	((got_size % 4294967296 == expect_size)) ||
		die "decompressed $got_size bytes, header says $expect_size"

	# Must be a 64-bit little-endian ELF: "\x7fELF", class 2, data 1.
	[[ $(read_hex "$tmp/decompressed" 0 6) == 7f454c460201 ]] ||
		die "decompressed payload is not an ELF64 file"

	# The ELF ends with its section header table (objcopy output);
	# everything after that is the relocation table.
	local shoff shentsize shnum elf_end
	shoff=$(read_uint "$tmp/decompressed" 0x28 8)
	shentsize=$(read_uint "$tmp/decompressed" 0x3a 2)
	shnum=$(read_uint "$tmp/decompressed" 0x3c 2)
	elf_end=$((shoff + shentsize * shnum))
	if ((elf_end > 0 && elf_end <= got_size)); then
		head -c "$elf_end" "$tmp/decompressed" >"$dest"
		log "vmlinux: $elf_end bytes of ELF (+$((got_size - elf_end)) bytes of relocations dropped)"
	else
		cp "$tmp/decompressed" "$dest"
	fi
	[[ $(file -b "$dest") == 'ELF 64-bit LSB executable, x86-64'* ]] ||
		die "$dest: 'file' does not see an x86-64 ELF executable"
}

# pvh_entry VMLINUX : print the PVH entry address (Xen ELF note type 0x12,
# XEN_ELFNOTE_PHYS32_ENTRY) as hex, or nothing if the note is absent.
pvh_entry() {
	# readelf -W prints each note on one line, e.g.
	#   Xen  0x00000008  Unknown note type: (0x00000012)  description data: 50 08 00 01 00 00 00 00
	# (without -W the description data is on the following line).
	readelf -n "$1" | awk '
		function print_le(line,    n, b, i, v) {
			sub(/.*description data: */, "", line)
			n = split(line, b, " "); v = ""
			for (i = n; i >= 1; i--) v = v b[i]   # little-endian
			sub(/^0+/, "", v); print "0x" (v == "" ? "0" : v); done = 1
		}
		done { next }
		want && /description data:/ { print_le($0); next }
		{ want = 0 }
		/^ *Xen / && /\(0x0*12\)/ {
			if (/description data:/) print_le($0); else want = 1
		}'
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# apt-get download fetches as the unprivileged _apt user when it can, which
# needs a download directory that user may write to.
chmod 755 "$TMP"
mkdir "$TMP/download"
if [[ $EUID -eq 0 ]] && id _apt >/dev/null 2>&1; then
	chown _apt "$TMP/download"
fi

ensure_pkg binutils coreutils cpio file gcc gzip libc6-dev busybox-static dpkg

# 1. The kernel: resolve the cloud meta-package to the real image package.
log "resolving $KERNEL_META_PKG"
resolve_kernel() {
	apt-cache depends "$KERNEL_META_PKG" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}
KERNEL_PKG=$(resolve_kernel || true)
if [[ -z $KERNEL_PKG ]]; then
	apt_update_once
	KERNEL_PKG=$(resolve_kernel || true)
fi
[[ -n $KERNEL_PKG ]] || die "apt does not know $KERNEL_META_PKG (not a Debian/Ubuntu amd64 host?)"

log "downloading $KERNEL_PKG"
(cd "$TMP/download" && apt-get download -qq "$KERNEL_PKG")
DEB=$(ls "$TMP/download/$KERNEL_PKG"_*.deb)
KERNEL_VERSION=$(dpkg-deb -f "$DEB" Version)
dpkg -x "$DEB" "$TMP/pkg"

VMLINUZ_SRC=$(ls "$TMP"/pkg/boot/vmlinuz-*)
[[ $(wc -l <<<"$VMLINUZ_SRC") -eq 1 ]] || die "expected one boot/vmlinuz-* in $DEB"
KERNEL_RELEASE=${VMLINUZ_SRC##*/vmlinuz-}
cp "$VMLINUZ_SRC" "$OUT_DIR/vmlinuz"
cp "$TMP/pkg/boot/config-$KERNEL_RELEASE" "$OUT_DIR/kernel.config" 2>/dev/null || true
log "kernel $KERNEL_PKG $KERNEL_VERSION (release $KERNEL_RELEASE)"

# 2. vmlinuz -> vmlinux, and look for the PVH entry note.
extract_vmlinux "$OUT_DIR/vmlinuz" "$OUT_DIR/vmlinux" "$TMP"
PVH_ENTRY=$(pvh_entry "$OUT_DIR/vmlinux")
if [[ -n $PVH_ENTRY ]]; then
	log "vmlinux has a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): $PVH_ENTRY"
else
	warn "vmlinux has NO PVH entry note; it cannot be booted through PVH"
fi

# 3. The workload program.
log "building workload"
gcc -static -O2 -Wall -Wextra -o "$TMP/workload" "$SCRIPT_DIR/workload.c"
[[ $(file -b "$TMP/workload") == *'statically linked'* ]] || die "workload is not statically linked"

# 4. The initramfs.
log "assembling initramfs"
ROOT=$TMP/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root}
cp /bin/busybox "$ROOT/bin/busybox"
# One symlink per busybox applet, at the path busybox itself reports.
"$ROOT/bin/busybox" --list-full | while read -r applet; do
	[[ -e $ROOT/$applet ]] || ln -s /bin/busybox "$ROOT/$applet"
done
install -m 755 "$TMP/workload" "$ROOT/bin/workload"

# The kernel opens /dev/console for init's stdin/out/err *before* /init
# runs, so the node must exist in the archive. (init re-opens it after
# mounting devtmpfs as well, so a non-root build still works.)
if [[ $EUID -eq 0 ]]; then
	mknod -m 600 "$ROOT/dev/console" c 5 1
	mknod -m 666 "$ROOT/dev/null" c 1 3
else
	warn "not root: no /dev/console in the initramfs; early init output may be lost"
fi

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# faultline default guest: PID 1.
#
# Kernel command line knobs (dotted names, so the kernel ignores them):
#   faultline.mib=N          workload size in MiB (default 16)
#   faultline.exit=reboot    how to leave: reboot (default; i8042 reset with
#                            reboot=k), poweroff, or halt
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
exec </dev/console >/dev/console 2>&1

echo "faultline-guest: init started"
echo "faultline-guest: kernel $(uname -r), $(nproc) cpu(s)," \
	"$(awk '/^MemTotal/ { print $2 " kB" }' /proc/meminfo) memory"

mib=16
exit_mode=reboot
for arg in $(cat /proc/cmdline); do
	case $arg in
	faultline.mib=*) mib=${arg#*=} ;;
	faultline.exit=*) exit_mode=${arg#*=} ;;
	esac
done

echo "faultline-guest: running workload ($mib MiB)"
/bin/workload "$mib"
status=$?
echo "faultline-guest: workload exit status $status"
if [ "$status" -eq 0 ]; then
	echo "faultline-guest: result PASS"
else
	echo "faultline-guest: result FAIL"
fi

sync
echo "faultline-guest: $exit_mode"
case $exit_mode in
poweroff) poweroff -f ;;
halt) halt -f ;;
*) reboot -f ;;
esac
# Not reached; if it is, PID 1 exiting panics the kernel (panic=-1 reboots).
sleep 5
EOF
chmod 755 "$ROOT/init"

# Fixed timestamps and owners, sorted names: the archive is reproducible.
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
	gzip -9 -n >"$OUT_DIR/initramfs.cpio.gz"

# 5. Record what was built and report.
cat >"$OUT_DIR/BUILD-INFO" <<EOF
kernel_package=$KERNEL_PKG
kernel_version=$KERNEL_VERSION
kernel_release=$KERNEL_RELEASE
compression=$COMPRESSION
pvh_entry=${PVH_ENTRY:-none}
EOF

log "done"
echo
echo "kernel:      $KERNEL_PKG $KERNEL_VERSION ($COMPRESSION-compressed)"
echo "PVH entry:   ${PVH_ENTRY:-none}"
for f in vmlinuz vmlinux initramfs.cpio.gz kernel.config BUILD-INFO; do
	if [[ -e $OUT_DIR/$f ]]; then
		printf '%-60s %10s bytes\n' "$OUT_DIR/$f" "$(stat -c %s "$OUT_DIR/$f")"
	fi
done
