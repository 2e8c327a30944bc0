//! The SIGSYS handler: one clear line on stderr for a forbidden system call, then the end of the
//! process. It runs in a signal handler, on the thread that made the call and under its
//! filter, so it allocates nothing and makes only calls every filter allows (`write`,
//! `exit_group`).

use std::io;

use crate::{identity, lists, EXIT_SECCOMP_VIOLATION};

/// Where `si_syscall` sits in a SIGSYS `siginfo_t` on x86-64: after `si_signo`, `si_errno`,
/// `si_code`, the union's alignment padding and `_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

/// Installs [`on_sigsys`] for the whole process.
pub(crate) fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the fields set below make it a SA_SIGINFO handler.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a valid sigset_t to empty.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler that only reads its arguments and thread-local data, writes to
    // stderr and exits.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A fixed buffer a line is put together in without allocating.
struct Line {
    bytes: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, text: &[u8]) {
        let room = self.bytes.len() - self.len;
        let n = text.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = value.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if value < 0 {
            self.push(b"-");
        }
        self.push(&digits[at..]);
    }
}

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a SIGSYS siginfo_t, whose `si_syscall` is an int at this
        // offset; read unaligned to make no assumption about the pointer.
        i64::from(unsafe {
            std::ptr::read_unaligned(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>())
        })
    };
    let (kind, name) = identity();
    let mut line = Line {
        bytes: [0; 256],
        len: 0,
    };
    line.push(b"lockstep: seccomp: thread \"");
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    line.push(&name[..end]);
    line.push(b"\" (");
    match kind {
        Some(kind) => {
            line.push(kind.name().as_bytes());
            line.push(b" filter");
        }
        None => line.push(b"a filter inherited from its parent"),
    }
    line.push(b") made a forbidden system call: ");
    line.push_number(nr);
    if let Some(syscall) = lists::name(nr) {
        line.push(b" (");
        line.push(syscall.as_bytes());
        line.push(b")");
    }
    line.push(b"; ending the process with exit code ");
    line.push_number(i64::from(EXIT_SECCOMP_VIOLATION));
    line.push(b"\n");
    // SAFETY: writes our own buffer to stderr, then ends the process; both are async-signal-safe.
    unsafe {
        libc::write(2, line.bytes.as_ptr().cast(), line.len);
        libc::_exit(EXIT_SECCOMP_VIOLATION);
    }
}

#[cfg(test)]
mod tests {
    use super::Line;

    #[test]
    fn numbers_without_allocating() {
        let mut line = Line {
            bytes: [0; 256],
            len: 0,
        };
        line.push_number(0);
        line.push(b" ");
        line.push_number(135);
        line.push(b" ");
        line.push_number(-7);
        assert_eq!(&line.bytes[..line.len], b"0 135 -7");
    }

    #[test]
    fn long_lines_are_cut_not_overrun() {
        let mut line = Line {
            bytes: [0; 256],
            len: 0,
        };
        line.push(&[b'x'; 300]);
        line.push_number(1);
        assert_eq!(line.len, 256);
    }
}
