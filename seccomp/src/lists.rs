//! The allow lists: groups of system calls, and which groups each kind of thread gets.
//!
//! The lists come from what each kind of thread was seen to call (strace -f over the block,
//! network and vsock guest tests; the SIGSYS lines of test runs with the filters enforced),
//! widened by group where a path is rare (files and sockets for the control plane), and are
//! checked by running the whole test suite with the filters enforced. A filter is inherited by the threads its thread starts, and stacked filters
//! allow only what all of them allow; so a kind that starts threads of another kind (a control
//! plane thread building and launching a VM: the VM's owner thread, its vCPU threads) must allow
//! everything those threads need.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use crate::{SeccompError, ThreadKind};

/// A system call's number and its name (`SYS_` and the name, as in the libc crate).
pub(crate) type Syscall = (libc::c_long, &'static str);

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name))),*]
    };
}

/// Every thread: memory, futexes, time, its own exit, signals returning, reading and writing
/// descriptors it holds (logs go to stderr), identity queries.
const BASE: &[Syscall] = syscalls![
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_close,
    SYS_futex,
    SYS_sched_yield,
    SYS_nanosleep,
    SYS_clock_nanosleep,
    SYS_clock_gettime,
    SYS_clock_getres,
    SYS_gettimeofday,
    SYS_exit,
    SYS_exit_group,
    SYS_restart_syscall,
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    SYS_mprotect,
    SYS_brk,
    SYS_getrandom,
    SYS_getpid,
    SYS_gettid,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_sched_getaffinity,
    SYS_rseq,
    SYS_set_robust_list,
];

/// Starting threads (see [`filter`] for the `prctl` and `seccomp` calls they make under this
/// thread's filter), and the vCPU kick's signal handler, installed when the first vCPU starts.
const THREADS: &[Syscall] = syscalls![SYS_clone, SYS_clone3, SYS_rt_sigaction];

/// Files and folders: generous on purpose (state folders, snapshots written through a temp file
/// and a rename, permissions set explicitly, disk images, serial logs, metrics files).
const FILES: &[Syscall] = syscalls![
    SYS_open,
    SYS_openat,
    SYS_creat,
    SYS_lseek,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_stat,
    SYS_lstat,
    SYS_statfs,
    SYS_fstatfs,
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getdents64,
    SYS_getcwd,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_rmdir,
    SYS_unlink,
    SYS_unlinkat,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_link,
    SYS_linkat,
    SYS_symlink,
    SYS_symlinkat,
    SYS_chmod,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchmodat2,
    SYS_chown,
    SYS_fchown,
    SYS_fchownat,
    SYS_lchown,
    SYS_umask,
    SYS_utimensat,
    SYS_ftruncate,
    SYS_truncate,
    SYS_fallocate,
    SYS_fadvise64,
    SYS_fsync,
    SYS_fdatasync,
    SYS_sync_file_range,
    SYS_flock,
    SYS_fcntl,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_copy_file_range,
    SYS_sendfile,
    SYS_memfd_create,
    SYS_close_range,
];

/// Reading the few files name resolution reads (hosts, resolv.conf, nsswitch).
const READ_FILES: &[Syscall] = syscalls![
    SYS_open,
    SYS_openat,
    SYS_lseek,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_stat,
    SYS_access,
    SYS_faccessat,
    SYS_fcntl,
];

/// Waiting on descriptors, and the descriptors event loops are made of.
const EVENTS: &[Syscall] = syscalls![
    SYS_poll,
    SYS_ppoll,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_eventfd2,
    SYS_pipe2,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
];

/// Sockets: listening, accepting, connecting (vsock's Unix sockets, indication listeners).
const SOCKETS: &[Syscall] = syscalls![
    SYS_socket,
    SYS_socketpair,
    SYS_bind,
    SYS_listen,
    SYS_accept,
    SYS_accept4,
    SYS_connect,
    SYS_getsockname,
    SYS_getpeername,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendmmsg,
    SYS_recvmmsg,
    SYS_shutdown,
];

/// Device control: KVM (building a VM, running a vCPU), taps, the terminal.
const IOCTL: &[Syscall] = syscalls![SYS_ioctl];

/// Names for a few calls no list allows, for the violation message.
const NOTABLE: &[Syscall] = syscalls![
    SYS_execve,
    SYS_execveat,
    SYS_fork,
    SYS_vfork,
    SYS_ptrace,
    SYS_personality,
    SYS_kill,
    SYS_tkill,
    SYS_tgkill,
    SYS_prctl,
    SYS_mount,
    SYS_umount2,
    SYS_chroot,
    SYS_pivot_root,
    SYS_unshare,
    SYS_setns,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_kexec_load,
    SYS_init_module,
    SYS_finit_module,
    SYS_delete_module,
    SYS_reboot,
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    SYS_userfaultfd,
    SYS_setuid,
    SYS_setgid,
    SYS_setresuid,
    SYS_setresgid,
    SYS_setgroups,
    SYS_syslog,
    SYS_acct,
    SYS_seccomp,
];

/// The groups a kind of thread may use, besides [`BASE`] and the argument-checked rules of
/// [`filter`] (`tgkill` to this process only, `prctl` for thread names, the vCPU's ioctls).
fn groups(kind: ThreadKind) -> &'static [&'static [Syscall]] {
    match kind {
        // Sleeps and waits: the main thread once the host is up, the signal watcher; files for
        // cleaning its temporary state folder at the end.
        ThreadKind::Main => &[FILES, EVENTS],
        // The control plane builds, restores and launches VMs, so it needs what an owner
        // thread and its vCPUs need too (they inherit its filter).
        ThreadKind::Api | ThreadKind::FirecrackerApi | ThreadKind::Cim => {
            &[THREADS, FILES, EVENTS, SOCKETS, IOCTL]
        }
        // HTTP clients posting indications to subscribed listeners.
        ThreadKind::Indications => &[THREADS, READ_FILES, EVENTS, SOCKETS],
        // The device loop: disks, taps, vsock's sockets, the console socket, snapshots.
        ThreadKind::VmOwner => &[FILES, EVENTS, SOCKETS, IOCTL],
        // KVM_RUN and the exits it hands to the buses (serial output is a write).
        ThreadKind::Vcpu => &[VCPU_EXTRA],
    }
}

/// What a vCPU thread adds to the base: KVM ioctls (restricted below) and duplicating
/// descriptors when a driver activates a device.
const VCPU_EXTRA: &[Syscall] = syscalls![SYS_fcntl];

/// KVM's ioctl type (`KVMIO`), the second byte of the request number.
const KVMIO: u64 = 0xAE;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// The name of system call `nr`, if it is one lockstep knows of (`SYS_` stripped).
pub(crate) fn name(nr: libc::c_long) -> Option<&'static str> {
    [
        BASE, THREADS, FILES, EVENTS, SOCKETS, IOCTL, VCPU_EXTRA, NOTABLE,
    ]
    .iter()
    .flat_map(|g| g.iter())
    .find(|(n, _)| *n == nr)
    .map(|(_, name)| name.strip_prefix("SYS_").unwrap_or(name))
}

/// A rule that one argument equals a value (compared as 32 bits, as the kernel passes ints).
fn arg_eq(arg: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// The filter for `kind`: its groups allowed, everything else `mismatch`.
pub(crate) fn filter(
    kind: ThreadKind,
    mismatch: SeccompAction,
    pid: u32,
) -> Result<SeccompFilter, SeccompError> {
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for group in std::iter::once(&BASE).chain(groups(kind)) {
        for (nr, _) in group.iter() {
            rules.insert(*nr, Vec::new());
        }
    }
    // Signals to this process's own threads only (a vCPU kick, abort): never another process.
    rules.insert(
        libc::SYS_tgkill,
        vec![arg_eq(0, u64::from(pid)).map_err(build)?],
    );
    // A new thread names itself under the filter of the thread that started it, and every
    // thread reads its name when it installs its own filter.
    let mut prctl = vec![
        arg_eq(0, libc::PR_SET_NAME as u64).map_err(build)?,
        arg_eq(0, libc::PR_GET_NAME as u64).map_err(build)?,
    ];
    if groups(kind).contains(&THREADS) {
        // The threads this one starts install their own filters under this one's: only ever
        // more restrictions (no_new_privs, then a filter without flags such as a listener).
        prctl.push(arg_eq(0, libc::PR_SET_NO_NEW_PRIVS as u64).map_err(build)?);
        let add_filter = SeccompRule::new(vec![
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::from(libc::SECCOMP_SET_MODE_FILTER),
            )
            .map_err(build)?,
            SeccompCondition::new(1, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)
                .map_err(build)?,
        ])
        .map_err(build)?;
        rules.insert(libc::SYS_seccomp, vec![add_filter]);
    }
    rules.insert(libc::SYS_prctl, prctl);
    if kind == ThreadKind::Vcpu {
        // Only KVM's own ioctls, and the tap's offloads a virtio-net driver's features set when
        // it activates the device: no terminal (TIOCSTI), socket or other tap ioctls.
        let kvm = SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            KVMIO << 8,
        )
        .map_err(build)?])
        .map_err(build)?;
        rules.insert(
            libc::SYS_ioctl,
            vec![kvm, arg_eq(1, TUNSETOFFLOAD).map_err(build)?],
        );
        // Serial output to a connected console client (std sends with MSG_NOSIGNAL), on the
        // connection it already has: no address.
        let console = SeccompRule::new(vec![
            SeccompCondition::new(
                3,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::MSG_NOSIGNAL as u64,
            )
            .map_err(build)?,
            SeccompCondition::new(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)
                .map_err(build)?,
        ])
        .map_err(build)?;
        rules.insert(libc::SYS_sendto, vec![console]);
    }
    if kind == ThreadKind::Indications {
        // std's connect with a timeout switches the socket to non-blocking and back.
        rules.insert(
            libc::SYS_ioctl,
            vec![arg_eq(1, libc::FIONBIO).map_err(build)?],
        );
    }
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch()).map_err(build)
}

fn arch() -> TargetArch {
    TargetArch::x86_64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            let filter = filter(kind, SeccompAction::Trap, 1).unwrap();
            let program: seccompiler::BpfProgram = filter.try_into().unwrap();
            assert!(!program.is_empty());
        }
    }

    #[test]
    fn no_kind_may_exec_or_fork() {
        for kind in ThreadKind::ALL {
            for group in std::iter::once(&BASE).chain(groups(kind)) {
                for forbidden in [libc::SYS_execve, libc::SYS_fork, libc::SYS_ptrace] {
                    assert!(group.iter().all(|(nr, _)| *nr != forbidden), "{kind:?}");
                }
            }
        }
    }

    #[test]
    fn vcpu_threads_get_no_files_or_sockets() {
        let vcpu: Vec<_> = std::iter::once(&BASE)
            .chain(groups(ThreadKind::Vcpu))
            .flat_map(|g| g.iter())
            .map(|(nr, _)| *nr)
            .collect();
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_clone,
        ] {
            assert!(!vcpu.contains(&nr), "{:?}", name(nr));
        }
    }

    #[test]
    fn names() {
        assert_eq!(name(libc::SYS_personality), Some("personality"));
        assert_eq!(name(libc::SYS_read), Some("read"));
        assert_eq!(name(100_000), None);
    }
}
