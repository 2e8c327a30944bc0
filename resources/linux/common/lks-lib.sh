# lockstep guest images: shell functions shared by the initramfs /init and
# the ext4 root file system's /sbin/init (busybox ash). Installed as
# /lib/lks/lib.sh in both images.
#
# Console protocol (read by lockstep's tests): every machine-readable line
# starts with "LKS-LINUX " and is either "key=value" or a single word
# ("ready", "ctrl-alt-del", "reboot").
#
# Written to fork as little as possible: on the PVM hosts every fork/exec
# costs emulated kernel work (page faults, page clearing), so values are
# read with the `read` builtin into variables, not with $(cat ...).

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
export TERM="${TERM:-vt100}"

lks_say() {
	echo "LKS-LINUX $*"
}

# First line of file $2 into variable $1 (empty if unreadable).
lks_read() {
	local _v=
	read -r _v <"$2" 2>/dev/null
	eval "$1=\$_v"
}

# True when something is mounted on $1.
lks_is_mounted() {
	local dev mnt rest
	while read -r dev mnt rest; do
		[ "$mnt" = "$1" ] && return 0
	done </proc/mounts
	return 1
}

lks_mount_basics() {
	[ -e /proc/self ] || mount -t proc proc /proc
	lks_is_mounted /sys || mount -t sysfs sysfs /sys
	# The kernel mounts devtmpfs on /dev by itself for a disk root
	# (DEVTMPFS_MOUNT), but not inside an initramfs.
	lks_is_mounted /dev || mount -t devtmpfs devtmpfs /dev
	lks_read LKS_CMDLINE /proc/cmdline
	lks_catch_ctrlaltdel
}

# Ctrl-Alt-Del on the keyboard: until PID 1 turns the kernel's immediate
# reboot off, the kernel resets at once; afterwards it sends PID 1 SIGINT.
# Busybox init does that and runs /lib/lks/ctrlaltdel; the shell script
# before it (this /init or /sbin/init) does the same with a trap, so that
# Ctrl-Alt-Del is an orderly shutdown from the moment PID 1 runs.
# Builtins only: no fork.
lks_catch_ctrlaltdel() {
	echo 0 >/proc/sys/kernel/ctrl-alt-del 2>/dev/null
	trap lks_ctrlaltdel INT
}

# Before PID 1 execs another program: the trap does not survive the exec,
# and PID 1 without a handler ignores SIGINT, so give Ctrl-Alt-Del back to
# the kernel (immediate reset) until the next init takes it over.
lks_release_ctrlaltdel() {
	trap - INT
	echo 1 >/proc/sys/kernel/ctrl-alt-del 2>/dev/null
}

lks_ctrlaltdel() {
	lks_say ctrl-alt-del
	lks_reset
}

# Number of online CPUs into LKS_NPROC, counted from the kernel's list
# (e.g. "0-3,5,7-8").
lks_count_cpus() {
	local list r lo hi IFS=,
	lks_read list /sys/devices/system/cpu/online
	LKS_NPROC=0
	for r in $list; do
		lo=${r%-*}
		hi=${r#*-}
		LKS_NPROC=$((LKS_NPROC + hi - lo + 1))
	done
}

# Value of NAME=VALUE on the kernel command line ($1 = NAME) into LKS_VALUE;
# false (and LKS_VALUE empty) if absent.
lks_arg() {
	local w
	LKS_VALUE=
	set -f
	for w in $LKS_CMDLINE; do
		case "$w" in
		"$1="*) LKS_VALUE=${w#*=}; set +f; return 0 ;;
		esac
	done
	set +f
	return 1
}

# True when the bare word $1 is on the kernel command line.
lks_flag() {
	local w
	set -f
	for w in $LKS_CMDLINE; do
		[ "$w" = "$1" ] && { set +f; return 0; }
	done
	set +f
	return 1
}

# Print the report and "ready". $1 = the root file system (initramfs|ext4),
# $2 = file holding the image id.
lks_report() {
	local v names d key rest
	lks_count_cpus
	lks_say "nproc=$LKS_NPROC"
	lks_say "cmdline=$LKS_CMDLINE"
	lks_read v /proc/sys/kernel/osrelease
	lks_say "kernel=$v"
	lks_read v /proc/sys/kernel/arch
	lks_say "arch=${v:-x86_64}"
	lks_say "root=$1"
	lks_read v "$2"
	lks_say "image_id=$v"
	read -r key v rest </proc/meminfo
	lks_say "mem_kb=$v"
	names=
	for d in /sys/block/*; do
		[ -e "$d" ] && names="$names ${d##*/}"
	done
	lks_say "block=${names# }"
	names=
	for d in /sys/class/net/*; do
		[ -e "$d" ] && [ "${d##*/}" != lo ] && names="$names ${d##*/}"
	done
	lks_say "net=${names# }"
	lks_read v /sys/class/misc/hw_random/rng_current
	lks_say "hwrng=$v"
	if [ -e /dev/vsock ]; then lks_say "vsock=yes"; else lks_say "vsock=no"; fi
	v=none
	for d in /sys/class/input/input*; do
		[ -e "$d/name" ] && lks_read v "$d/name" && break
	done
	lks_say "keyboard=$v"
	read -r v rest </proc/uptime
	lks_say "uptime=$v"
	lks_say ready
}

# Leave the VM: there is no ACPI (and so no power-off), so every way out is
# a reset, which a VMM (or QEMU -no-reboot) turns into the end of the VM.
lks_reset() {
	local dev mnt type rest
	sync
	while read -r dev mnt type rest; do
		if [ "$mnt" = / ] && [ "$type" = ext4 ]; then
			mount -o remount,ro /
		fi
	done </proc/mounts
	lks_say reboot
	/bin/busybox reboot -f
}

# Hand PID 1 over to busybox init, which runs the console shell from
# /etc/inittab (/lib/lks/console-shell) and turns `reboot`, `halt` and
# `poweroff` (signals to PID 1) into lks_reset. A shell script cannot do
# that job itself: it only runs a trap once its foreground command has
# ended, and a shell it starts in the background has ^C (SIGINT) ignored.
lks_start_console() {
	lks_release_ctrlaltdel
	exec /bin/busybox init
}
