#!/bin/bash
# Build the bundled pyhv guest (kernel + initramfs) from Debian 12 packages.
#
#   guest_images/build.sh            build, then install the outputs and MANIFEST
#   guest_images/build.sh --kunit    build the KUnit variant, then install its
#                                    bzImage and MANIFEST in kunit/
#   guest_images/build.sh --check    build into build/out-default/ only and
#                                    compare with the committed outputs
#   PYHV_GUEST_BUILD_DIR=DIR         build somewhere else than guest_images/build
#
# Inputs: /usr/src/linux-source-6.1.tar.xz (linux-source-6.1),
# /bin/busybox (busybox-static), kernel.config (+ kunit.config),
# patches/*.patch, init. No downloads. Needs: build-essential flex bison bc
# libelf-dev libssl-dev xz-utils lz4 (apt).
#
# Idempotent: the source tree is re-extracted only when the tarball or a
# patch changes, the kernel is reconfigured only when a fragment changes,
# and make rebuilds only what changed. Full build on 2 shared cores with
# `nice make -j2`: 4 minutes idle, 8-9 minutes on a busy shared machine;
# a no-change rerun: about 10 s.
#
# Reproducible: KBUILD_BUILD_* pin the banner, gen_init_cpio writes fixed
# mtimes and owners, xz runs single-threaded. Same package versions
# (MANIFEST) give the same sha256.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BUILD=${PYHV_GUEST_BUILD_DIR:-$HERE/build}
SOURCE_TARBALL=/usr/src/linux-source-6.1.tar.xz
BUSYBOX=/bin/busybox
JOBS=${JOBS:-2}
VARIANT=default
INSTALL=1
CHECK=0

usage() {
	sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
	exit "${1:-0}"
}

while [ $# -gt 0 ]; do
	case $1 in
	--kunit) VARIANT=kunit ;;
	--check) CHECK=1; INSTALL=0 ;;
	-h|--help) usage 0 ;;
	*) echo "build.sh: unknown option $1" >&2; usage 2 ;;
	esac
	shift
done

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

for tool in make gcc flex bison bc xz lz4 strip readelf sha256sum; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install build-essential flex bison bc xz-utils lz4)"
done
[ -r "$SOURCE_TARBALL" ] || die "$SOURCE_TARBALL missing (apt-get install linux-source-6.1)"
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
# A dynamic busybox would need a libc in the initramfs: no INTERP header allowed.
readelf -lW "$BUSYBOX" | grep -q 'Requesting program interpreter' &&
	die "$BUSYBOX is not statically linked (install busybox-static, not busybox)"
# The initramfs has no applet symlinks (section 4): its shell must run applets
# by name with nothing on PATH, as Debian's busybox-static does.
env -i PATH=/nonexistent "$BUSYBOX" sh -c 'ls / >/dev/null && setsid true' 2>/dev/null ||
	die "$BUSYBOX cannot run applets without their symlinks (needs FEATURE_SH_STANDALONE and FEATURE_PREFER_APPLETS)"

# Pinned build identity: the kernel banner and `uname -a` stay the same
# whoever builds it (Documentation/kbuild/reproducible-builds.rst).
export KBUILD_BUILD_TIMESTAMP='Mon Jan  1 00:00:00 UTC 2024'
export KBUILD_BUILD_USER=pyhv
export KBUILD_BUILD_HOST=pyhv-build
export KBUILD_BUILD_VERSION=1
export SOURCE_DATE_EPOCH=1704067200
export LC_ALL=C

SRC=$BUILD/linux-source-6.1
OBJ=$BUILD/obj-$VARIANT
OUT=$BUILD/out-$VARIANT
mkdir -p "$BUILD" "$OBJ" "$OUT"
started=$(date +%s)

# --- 1. Source tree: extract and patch when the inputs change -------------
shopt -s nullglob
patches=("$HERE"/patches/*.patch)
source_stamp=$( (sha256sum "$SOURCE_TARBALL" | cut -d' ' -f1
	for p in "${patches[@]}"; do sha256sum "$p" | cut -d' ' -f1; done) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$BUILD/source.stamp" 2>/dev/null)" != "$source_stamp" ]; then
	log "extracting $SOURCE_TARBALL"
	rm -rf "$SRC" "$BUILD"/obj-* "$BUILD/source.stamp"
	tar -C "$BUILD" -xf "$SOURCE_TARBALL"
	for p in "${patches[@]}"; do
		log "applying patches/$(basename "$p")"
		patch -d "$SRC" -p1 --quiet --no-backup-if-mismatch <"$p"
	done
	echo "$source_stamp" >"$BUILD/source.stamp"
	mkdir -p "$OBJ"
fi

# --- 2. Configuration: tinyconfig + fragments, verified -------------------
fragments=("$HERE/kernel.config")
[ "$VARIANT" = kunit ] && fragments+=("$HERE/kunit.config")
config_stamp=$( (echo "$source_stamp"; cat "${fragments[@]}") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$OBJ/config.stamp" 2>/dev/null)" != "$config_stamp" ] || [ ! -f "$OBJ/.config" ]; then
	log "configuring ($VARIANT): tinyconfig + ${fragments[*]##*/}"
	# Kconfig's "override" and "redefined" notes are expected; keep them
	# in config.log for when the check below fails.
	{
		make -s -C "$SRC" O="$OBJ" ARCH=x86_64 tinyconfig
		(cd "$SRC" && scripts/kconfig/merge_config.sh -m -O "$OBJ" "$OBJ/.config" "${fragments[@]}")
		make -s -C "$SRC" O="$OBJ" ARCH=x86_64 olddefconfig
	} >"$OBJ/config.log" 2>&1 || die "configuring failed, see $OBJ/config.log"
	# merge_config only warns when Kconfig drops a requested option (an
	# unmet dependency); a silently different kernel is worse than no kernel.
	missing=0
	while IFS= read -r line; do
		case $line in
		CONFIG_*=*) want=$line ;;
		"# CONFIG_"*" is not set") want=$line ;;
		*) continue ;;
		esac
		if [[ $want == "# "* ]]; then
			name=${want#\# }
			name=${name%% *}
			grep -q "^$name=" "$OBJ/.config" && { log "config: $name should be off"; missing=1; }
		else
			grep -qx -- "$want" "$OBJ/.config" || { log "config: $want did not stick"; missing=1; }
		fi
	done < <(cat "${fragments[@]}")
	[ $missing = 0 ] || die "kernel configuration does not match the fragments (see $OBJ/config.log)"
	echo "$config_stamp" >"$OBJ/config.stamp"
fi

# --- 3. Kernel ------------------------------------------------------------
log "building vmlinux and bzImage ($VARIANT, make -j$JOBS)"
# gcc inlines many fixed-size memset/memcpy calls as byte-wide REP STOSB/
# MOVSB (557 sites in this kernel, among them the init-memory poisoning,
# memblock's zeroing and the page-cache copy that unpacks the initramfs). A
# kvm_pvm host emulates a REP string instruction one element per step, so
# quadword strings are eight times fewer steps: about 7.5 s of the boot to
# the shell there (docs/performance.md); on hardware the difference is noise.
STRING_CFLAGS="-mstringop-strategy=rep_8byte"
nice -n 10 make -s -C "$SRC" O="$OBJ" ARCH=x86_64 -j"$JOBS" KCFLAGS="$STRING_CFLAGS" vmlinux bzImage
# Stripped: pyhv only needs the PT_LOAD segments and the PVH note (.notes
# is an allocated section, so strip keeps it).
strip --strip-all -o "$OUT/vmlinux" "$OBJ/vmlinux"
xz -9 --check=crc64 -T1 -c "$OUT/vmlinux" >"$OUT/vmlinux.xz"
cp "$OBJ/arch/x86/boot/bzImage" "$OUT/bzImage"

# --- 4. initramfs: busybox + init + /bin/sh ------------------------------
gcc -O2 -o "$BUILD/gen_init_cpio" "$SRC/usr/gen_init_cpio.c"
# gen_init_cpio's -t sets the mtime of what it creates, but a "file" entry
# keeps its source's mtime (the checkout's time): stage the files with the
# pinned one, so a fresh clone builds the same bytes.
STAGE=$BUILD/initramfs-files
rm -rf "$STAGE" && mkdir -p "$STAGE"
cp "$BUSYBOX" "$STAGE/busybox"
cp "$HERE/init" "$HERE/fstab" "$STAGE/"
touch -h -d "@$SOURCE_DATE_EPOCH" "$STAGE"/*
cpio_list=$OUT/initramfs.list
{
	echo "dir /dev 0755 0 0"
	# The kernel opens /dev/console for init before anything is mounted.
	echo "nod /dev/console 0600 0 0 c 5 1"
	for d in /proc /sys /tmp /mnt /newroot /root /bin /sbin /usr /usr/bin /usr/sbin /etc; do
		echo "dir $d 0755 0 0"
	done
	echo "file /bin/busybox $STAGE/busybox 0755 0 0"
	echo "file /init $STAGE/init 0755 0 0"
	# init's `mount -a`: /proc, /sys and /dev in one process.
	echo "file /etc/fstab $STAGE/fstab 0644 0 0"
	# No applet symlinks but /bin/sh: creating the 268 others is about 12-17 s
	# of an emulated boot on a kvm_pvm host (docs/performance.md), and
	# Debian's busybox-static runs applets by name without them
	# (FEATURE_SH_STANDALONE, FEATURE_PREFER_APPLETS). /bin/sh stays for
	# "#!/bin/sh" scripts and system(3).
	echo "slink /bin/sh /bin/busybox 0777 0 0"
} >"$cpio_list"
"$BUILD/gen_init_cpio" -t "$SOURCE_DATE_EPOCH" "$cpio_list" >"$OUT/initramfs.cpio"
# Also loadable by the kernel itself (CONFIG_RD_XZ): CRC32 and a bounded
# dictionary, as scripts/xz_wrap.sh and Documentation/staging/xz.rst advise.
xz --check=crc32 --lzma2=preset=9,dict=4MiB -T1 -c "$OUT/initramfs.cpio" >"$OUT/initramfs.cpio.xz"

# --- 5. Install and manifest ------------------------------------------------
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }
write_manifest() {
	local dir=$1
	{
		echo "# pyhv bundled guest: inputs and outputs (guest_images/build.sh)"
		echo "linux-source-6.1 $(pkg_version linux-source-6.1)"
		echo "busybox-static $(pkg_version busybox-static)"
		echo "gcc $(pkg_version gcc) ($(gcc -dumpfullversion))"
		echo "binutils $(pkg_version binutils)"
		echo "xz-utils $(pkg_version xz-utils)"
		echo "kernel $(make -s -C "$SRC" O="$OBJ" ARCH=x86_64 kernelrelease)"
		echo "#"
		echo "# sha256sum of the outputs (initramfs.cpio is what the guest gets)"
		(cd "$dir" && sha256sum vmlinux.xz bzImage initramfs.cpio.xz)
		echo "$(sha256sum "$OUT/initramfs.cpio" | cut -d' ' -f1)  initramfs.cpio (uncompressed, not stored)"
		echo "$(sha256sum "$OUT/vmlinux" | cut -d' ' -f1)  vmlinux (uncompressed, not stored)"
	}
}

if [ $INSTALL = 1 ] && [ "$VARIANT" = kunit ]; then
	# Only the bzImage: `pyhv kunit` boots it without an initramfs (the
	# suites run in the kernel before init).
	mkdir -p "$HERE/kunit"
	cp "$OUT/bzImage" "$HERE/kunit/"
	write_manifest "$OUT" | grep -v 'vmlinux.xz\|initramfs\|vmlinux (' >"$HERE/kunit/MANIFEST"
	log "installed bzImage and MANIFEST in $HERE/kunit"
elif [ $INSTALL = 1 ]; then
	cp "$OUT/vmlinux.xz" "$OUT/bzImage" "$OUT/initramfs.cpio.xz" "$HERE/"
	write_manifest "$HERE" >"$HERE/MANIFEST"
	log "installed vmlinux.xz, bzImage, initramfs.cpio.xz and MANIFEST in $HERE"
else
	write_manifest "$OUT" >"$OUT/MANIFEST"
fi
if [ $CHECK = 1 ]; then
	if diff <(grep -v '^#' "$HERE/MANIFEST") <(grep -v '^#' "$OUT/MANIFEST"); then
		log "check: rebuilt outputs match the committed MANIFEST"
	else
		die "check: rebuilt outputs differ from the committed MANIFEST"
	fi
fi
log "done in $(($(date +%s) - started)) s; outputs in $OUT"
ls -l "$OUT"/vmlinux.xz "$OUT"/bzImage "$OUT"/initramfs.cpio "$OUT"/initramfs.cpio.xz >&2
