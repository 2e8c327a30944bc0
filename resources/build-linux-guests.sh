#!/usr/bin/env bash
# build-linux-guests.sh: build lockstep's Linux guest images with one command.
#
# Builds, from Debian packages and the configs/patches/scripts kept in
# resources/linux/:
#   vmlinux-kvm, bzImage-kvm   small guest kernel for hardware-KVM hosts
#   vmlinux-pvm, bzImage-pvm   variant that runs on the PVM (software KVM)
#                              development/CI hosts; see resources/README.md
#   initramfs.cpio             busybox initramfs (uncompressed)
#   rootfs.ext4                busybox ext4 root file system
# (both with /bin/lks-vsock, compiled from linux/tools/lks-vsock.c)
# into ${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/linux/<key>/ and writes
# manifest.env (KEY=path lines) there. <key> is a sha256 over every file in
# resources/linux, this script and the versions of the Debian packages used.
# The last line printed on stdout is the path of manifest.env; everything
# else goes to stderr. A complete cached build is reused without apt (fast
# path). Needs root only when packages are missing (apt-get install).
#
# Options:  --force       rebuild even if the cache has a complete build
#           --print-key   print the cache key and stop (the build packages must be
#                         installed: the key covers their versions); CI caches on it
#           --help        this text
# Environment: LOCKSTEP_CACHE (cache root), LKS_JOBS (make -j, default nproc)
set -euo pipefail

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
RES_DIR=$(dirname "$SCRIPT_PATH")
LINUX_SRC_DIR=$RES_DIR/linux
CACHE_ROOT=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}
CACHE=$CACHE_ROOT/linux
JOBS=${LKS_JOBS:-$(nproc)}

KERNEL_PKG=linux-source-6.12
KERNEL_TARBALL=/usr/src/$KERNEL_PKG.tar.xz
BACKPORTS_LINE='deb http://deb.debian.org/debian bookworm-backports main'
# Everything the build needs.
BUILD_PKGS=("$KERNEL_PKG" build-essential bc bison flex libelf-dev libssl-dev
	cpio busybox-static e2fsprogs xz-utils lz4 patch linux-libc-dev)
# Packages whose versions change the output: part of the cache key.
# (Not linux-libc-dev/libc6-dev: lks-vsock takes only ABI constants and
# struct layouts from their headers, which do not change, and keying them
# would rebuild everything at each of their frequent updates.)
KEY_PKGS=("$KERNEL_PKG" busybox-static e2fsprogs gcc-12 binutils lz4)
# Fixed time stamps for reproducible images (2000-01-01T00:00:00Z).
EPOCH=946684800
MANIFEST_KEYS=(LINUX_VMLINUX_KVM LINUX_VMLINUX_PVM LINUX_BZIMAGE_KVM
	LINUX_BZIMAGE_PVM LINUX_INITRAMFS LINUX_ROOTFS)

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

log() { printf 'build-linux-guests: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

FORCE=0
PRINT_KEY=0
for arg in "$@"; do
	case "$arg" in
	--force) FORCE=1 ;;
	--print-key) PRINT_KEY=1 ;;
	-h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SCRIPT_PATH"; exit 0 ;;
	*) die "unknown argument: $arg (see --help)" ;;
	esac
done

# ---------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------

# Names of BUILD_PKGS that are not installed.
missing_packages() {
	local installed
	installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${BUILD_PKGS[@]}" 2>/dev/null |
		awk '$2 == "ii" { print $1 }') || true
	local p
	for p in "${BUILD_PKGS[@]}"; do
		grep -qx -- "$p" <<<"$installed" || echo "$p"
	done
}

# Add bookworm-backports to the apt sources if no source names it (as root;
# otherwise only a note: it matters only when packages must be installed).
# True when it was added.
ensure_backports_source() {
	if grep -rqs -- 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
		return 1
	fi
	if [ "$(id -u)" != 0 ]; then
		log "note: bookworm-backports is not in the apt sources (not root: not adding it)"
		return 1
	fi
	log "adding bookworm-backports to the apt sources"
	echo "$BACKPORTS_LINE" >/etc/apt/sources.list.d/lockstep-bookworm-backports.list
	return 0
}

ensure_packages() {
	local added=0 missing
	ensure_backports_source && added=1
	missing=$(missing_packages)
	[ -n "$missing" ] || return 0
	[ "$(id -u)" = 0 ] || die "missing packages (run as root to install): ${missing//$'\n'/ }"
	local apt=(apt-get -q -o DPkg::Lock::Timeout=900)
	log "installing: ${missing//$'\n'/ }"
	"${apt[@]}" update >&2 || { [ "$added" = 0 ] || die "apt-get update failed"; }
	# An empty DPkg::Post-Invoke keeps the image's clean-up hook from
	# deleting downloaded packages in the middle of the install.
	# shellcheck disable=SC2086
	"${apt[@]}" -o 'DPkg::Post-Invoke::=' install -y --no-install-recommends $missing >&2
	missing=$(missing_packages)
	[ -z "$missing" ] || die "still missing after apt-get install: ${missing//$'\n'/ }"
}

package_versions() {
	dpkg-query -W -f='${Package}=${Version}\n' "${KEY_PKGS[@]}"
}

# ---------------------------------------------------------------------------
# Cache key and manifest
# ---------------------------------------------------------------------------

compute_key() {
	{
		echo "script $(sha256sum <"$SCRIPT_PATH" | cut -d' ' -f1)"
		(cd "$LINUX_SRC_DIR" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
		package_versions
	} | sha256sum | cut -d' ' -f1
}

# True when $1/manifest.env names every artefact and all of them exist.
manifest_complete() {
	local m=$1/manifest.env k v
	[ -f "$m" ] || return 1
	for k in "${MANIFEST_KEYS[@]}"; do
		v=$(sed -n "s/^$k=//p" "$m")
		[ -n "$v" ] && [ -s "$v" ] || return 1
	done
}

point_current() {
	local key=$1
	[ "$(readlink "$CACHE/current" 2>/dev/null)" = "$key" ] && return 0
	ln -sfn "$key" "$CACHE/.current.$$"
	mv -T "$CACHE/.current.$$" "$CACHE/current"
}

finish() {
	local dir=$1
	point_current "$(basename "$dir")"
	log "images in $dir"
	echo "$dir/manifest.env"
}

# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------

# Check that every setting of the fragments ($2...) made it into $1 (.config).
check_config() {
	local config=$1 frag line key val bad=0
	shift
	for frag in "$@"; do
		while IFS= read -r line; do
			case "$line" in
			CONFIG_*=*) key=${line%%=*} val=${line#*=} ;;
			"# CONFIG_"*" is not set") key=${line#\# } key=${key%% *} val=n ;;
			*) continue ;;
			esac
			if [ "$val" = n ]; then
				grep -q "^$key=" "$config" && { log "$(basename "$frag"): $key=n did not stick: $(grep "^$key=" "$config")"; bad=1; }
			else
				grep -qxF -- "$line" "$config" || { log "$(basename "$frag"): '$line' did not stick: $(grep "^$key=\|^# $key is not set" "$config" || echo absent)"; bad=1; }
			fi
		done <"$frag"
	done
	return "$bad"
}

build_kernel() {
	local variant=$1 src=$WORK/linux-$1 cfg=$LINUX_SRC_DIR/config p
	local frags=("$cfg/common.config" "$cfg/$variant.config")
	log "[$variant] unpacking $KERNEL_TARBALL"
	mkdir -p "$src"
	tar -xf "$KERNEL_TARBALL" -C "$src" --strip-components=1
	# patches-common: both variants; patches-pvm: the pvm variant only.
	local patches=("$LINUX_SRC_DIR"/patches-common/*.patch)
	if [ "$variant" = pvm ]; then
		patches+=("$LINUX_SRC_DIR"/patches-pvm/*.patch)
	fi
	for p in "${patches[@]}"; do
		log "[$variant] patch $(basename "$(dirname "$p")")/$(basename "$p")"
		patch -d "$src" -p1 --batch --forward --quiet <"$p"
	done
	log "[$variant] configuring: tinyconfig + ${frags[*]##*/}"
	make -C "$src" -s tinyconfig >/dev/null
	(cd "$src" && scripts/kconfig/merge_config.sh -m .config "${frags[@]}" >/dev/null)
	make -C "$src" -s olddefconfig
	check_config "$src/.config" "${frags[@]}" || die "[$variant] kernel config does not match the fragments"
	log "[$variant] make -j$JOBS vmlinux bzImage (a few minutes)"
	local t0=$SECONDS
	make -C "$src" -s -j"$JOBS" \
		KBUILD_BUILD_TIMESTAMP="@$EPOCH" KBUILD_BUILD_USER=lockstep \
		KBUILD_BUILD_HOST=lockstep KBUILD_BUILD_VERSION=1 \
		vmlinux bzImage >&2
	log "[$variant] built in $((SECONDS - t0)) s ($(make -C "$src" -s kernelrelease))"
	cp "$src/vmlinux" "$STAGE/vmlinux-$variant"
	cp "$src/arch/x86/boot/bzImage" "$STAGE/bzImage-$variant"
	cp "$src/.config" "$STAGE/config-$variant"
	KERNEL_RELEASE[$variant]=$(make -C "$src" -s kernelrelease)
}

# ---------------------------------------------------------------------------
# Guest tools
# ---------------------------------------------------------------------------

# lks-vsock: static and freestanding (no C library, raw system calls): a
# few KB instead of ~700 KB of static glibc, which the PVM hosts would pay
# for in emulated initramfs unpacking and page faults. Deterministic output
# (no build id, stripped).
build_tools() {
	log "[tools] gcc -static -Os lks-vsock.c"
	gcc -static -Os -nostdlib -ffreestanding -fno-pie -no-pie \
		-fno-stack-protector -fno-asynchronous-unwind-tables -fno-ident \
		-Wall -Wextra -Werror \
		-Wl,--gc-sections -Wl,--build-id=none -Wl,-z,noseparate-code \
		-Wl,-z,norelro -s \
		-o "$GEN/lks-vsock" "$LINUX_SRC_DIR/tools/lks-vsock.c"
	if readelf -l "$GEN/lks-vsock" | grep -q INTERP; then
		die "lks-vsock is not statically linked"
	fi
}

# ---------------------------------------------------------------------------
# Initramfs and root file system
# ---------------------------------------------------------------------------

# Print the gen_init_cpio list $1 followed by one symlink per busybox applet
# that the list does not already provide (e.g. /sbin/init in the rootfs).
full_list() {
	local list=$1 path have
	sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$list"
	have=$(awk '!/^[[:space:]]*(#|$)/ { print $2 }' "$list")
	"$BUSYBOX" --list-full | sort | while IFS= read -r path; do
		grep -qxF -- "/$path" <<<"$have" && continue
		echo "slink /$path /bin/busybox 0777 0 0"
	done
}

# Expand the ${LKS_*} variables of a list location (literal patterns).
# shellcheck disable=SC2016
expand_location() {
	local s=$1
	s=${s//'${LKS_SRC}'/$LINUX_SRC_DIR}
	s=${s//'${LKS_BUSYBOX}'/$BUSYBOX}
	s=${s//'${LKS_GEN}'/$GEN}
	echo "$s"
}

build_initramfs() {
	log "[initramfs] gen_init_cpio from $(basename "$LINUX_SRC_DIR")/initramfs/files.list"
	gcc -O2 -o "$WORK/gen_init_cpio" "$WORK/linux-kvm/usr/gen_init_cpio.c"
	full_list "$LINUX_SRC_DIR/initramfs/files.list" >"$WORK/initramfs.list"
	LKS_SRC=$LINUX_SRC_DIR LKS_BUSYBOX=$BUSYBOX LKS_GEN=$GEN \
		"$WORK/gen_init_cpio" -t "$EPOCH" "$WORK/initramfs.list" >"$STAGE/initramfs.cpio"
}

build_rootfs() {
	local dir=$WORK/rootfs type name a b
	log "[rootfs] mkfs.ext4 -d from $(basename "$LINUX_SRC_DIR")/rootfs/files.list"
	mkdir -p "$dir"
	full_list "$LINUX_SRC_DIR/rootfs/files.list" >"$WORK/rootfs.list"
	while read -r type name a b _; do
		case "$type" in
		dir) mkdir -p "$dir$name"; chmod "$a" "$dir$name" ;;
		file) install -D -m "$b" "$(expand_location "$a")" "$dir$name" ;;
		slink) mkdir -p "$(dirname "$dir$name")"; ln -s "$a" "$dir$name" ;;
		*) die "rootfs list: unsupported entry type '$type'" ;;
		esac
	done <"$WORK/rootfs.list"
	find "$dir" -exec touch -h -d "@$EPOCH" {} +
	# File-system UUID and directory hash seed from the key: same inputs,
	# same image.
	local uuid=${KEY:0:8}-${KEY:8:4}-${KEY:12:4}-${KEY:16:4}-${KEY:20:12}
	E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -L lks-root -U "$uuid" \
		-E "root_owner=0:0,hash_seed=$uuid" -d "$dir" "$STAGE/rootfs.ext4" 64M >&2
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

# The whole run is one function, so bash has parsed all of it before it
# starts: editing this file while a build runs cannot derail that build.
main() {
	if [ "$PRINT_KEY" = 1 ]; then
		# The key depends on installed package versions: only meaningful once they are.
		[ -z "$(missing_packages)" ] || die "--print-key: build packages are not installed yet"
		compute_key
		exit 0
	fi
	mkdir -p "$CACHE"

	# Fast path: everything installed and the build for this key is complete.
	if [ "$FORCE" = 0 ] && [ -z "$(missing_packages)" ]; then
		KEY=$(compute_key)
		if manifest_complete "$CACHE/$KEY"; then
			finish "$CACHE/$KEY"
			exit 0
		fi
	fi

	# One build at a time per cache; the others wait and then reuse its result.
	exec 9>"$CACHE/.lock"
	if ! flock -n 9; then
		log "another build holds $CACHE/.lock; waiting"
		flock 9
	fi

	ensure_packages
	KEY=$(compute_key)
	FINAL=$CACHE/$KEY
	if [ "$FORCE" = 0 ] && manifest_complete "$FINAL"; then
		finish "$FINAL"
		return 0
	fi

	log "building Linux guest images, key $KEY"
	# Leftovers of interrupted builds (we hold the lock, so nobody uses them).
	rm -rf "$CACHE"/.stage-* "$CACHE"/.work-* "$CACHE"/.old-*
	STAGE=$(mktemp -d "$CACHE/.stage-$KEY.XXXXXX")
	chmod 755 "$STAGE"
	WORK=$(mktemp -d "$CACHE/.work-$KEY.XXXXXX")
	GEN=$WORK/gen
	cleanup() { rm -rf "$STAGE" "$WORK"; }
	trap cleanup EXIT
	trap 'exit 130' INT TERM
	mkdir -p "$GEN"
	echo "$KEY" >"$GEN/image-id"

	BUSYBOX=$(dpkg -L busybox-static | grep -m1 '/busybox$')
	[ -x "$BUSYBOX" ] || die "busybox-static binary not found"
	if readelf -l "$BUSYBOX" | grep -q INTERP; then
		die "$BUSYBOX is not statically linked"
	fi

	declare -gA KERNEL_RELEASE
	T0=$SECONDS
	build_tools
	build_kernel kvm
	build_kernel pvm
	build_initramfs
	build_rootfs

	{
		echo "# lockstep Linux guest images; written by resources/build-linux-guests.sh"
		echo "LINUX_CACHE_KEY=$KEY"
		echo "LINUX_DIR=$FINAL"
		echo "LINUX_VMLINUX_KVM=$FINAL/vmlinux-kvm"
		echo "LINUX_VMLINUX_PVM=$FINAL/vmlinux-pvm"
		echo "LINUX_BZIMAGE_KVM=$FINAL/bzImage-kvm"
		echo "LINUX_BZIMAGE_PVM=$FINAL/bzImage-pvm"
		echo "LINUX_INITRAMFS=$FINAL/initramfs.cpio"
		echo "LINUX_ROOTFS=$FINAL/rootfs.ext4"
		echo "LINUX_RELEASE_KVM=${KERNEL_RELEASE[kvm]}"
		echo "LINUX_RELEASE_PVM=${KERNEL_RELEASE[pvm]}"
		# e.g. LINUX_PKG_LINUX_SOURCE_6_12=6.12.117-1~deb12u1
		package_versions | awk -F= '{ k = toupper($1); gsub(/[^A-Z0-9]/, "_", k);
			print "LINUX_PKG_" k "=" substr($0, length($1) + 2) }'
	} >"$STAGE/manifest.env.tmp"
	mv "$STAGE/manifest.env.tmp" "$STAGE/manifest.env"
	sync -f "$STAGE"

	# Publish atomically: the key directory appears complete or not at all.
	if [ -e "$FINAL" ]; then
		mv -T "$FINAL" "$(mktemp -u "$CACHE/.old-$KEY.XXXXXX")"
	fi
	mv -T "$STAGE" "$FINAL"
	rm -rf "$CACHE"/.old-*

	# Keep the four most recent builds (and whatever `current` points at).
	ls -1dt "$CACHE"/*/ 2>/dev/null | sed 's:/$::' | while IFS= read -r d; do
		case "$(basename "$d")" in current) continue ;; esac
		echo "$d"
	done | tail -n +5 | while IFS= read -r d; do
		[ "$d" = "$FINAL" ] || [ "$(readlink -f "$CACHE/current")" = "$d" ] || rm -rf "$d"
	done

	log "done in $((SECONDS - T0)) s"
	finish "$FINAL"
}

main "$@"
