//! Files, folders and Unix sockets that only this user may reach, whatever the process's umask:
//! the host's state folders (0700), snapshot files, serial logs and tokens (0600), and the
//! sockets of the control API, Firecracker's API and the consoles (0600).
//!
//! Modes are set explicitly, never left to the umask: files are created with `O_EXCL` and mode
//! 0600 and then `fchmod`ed; sockets are bound, `chmod`ed and only then listen, so nobody can
//! connect while the mode is still the umask's. A socket path is never taken from someone else:
//! only a stale socket (nothing answers on it) is removed before binding; a live socket or any
//! other kind of file is an error naming the path.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The mode of private folders.
pub const DIR_MODE: u32 = 0o700;
/// The mode of private files and sockets.
pub const FILE_MODE: u32 = 0o600;

/// Why a socket path cannot be used.
#[derive(Debug, Error)]
pub enum SocketPathError {
    /// Another live server answers on the socket path.
    #[error("{}: another server is listening on this socket", .0.display())]
    InUse(PathBuf),
    /// The path exists and is something else (a file, a folder, a symbolic link...).
    #[error("{}: exists and is not a socket; remove it or choose another path", .0.display())]
    NotASocket(PathBuf),
    /// The path could not be checked, removed or bound.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

impl From<SocketPathError> for io::Error {
    fn from(e: SocketPathError) -> io::Error {
        let kind = match &e {
            SocketPathError::InUse(_) => io::ErrorKind::AddrInUse,
            SocketPathError::NotASocket(_) => io::ErrorKind::AlreadyExists,
            SocketPathError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// Creates `path` (and any missing parents) as a folder of mode 0700, and sets 0700 on it if it
/// existed with another mode. For folders the host owns (the state folder and those in it).
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    create_dirs(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a folder", path.display()),
        ));
    }
    if meta.permissions().mode() & 0o7777 != DIR_MODE {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Creates the missing folders of `path` with mode 0700 (the umask cannot widen it), leaving
/// folders that exist as they are. For the parents of paths a user chose.
pub fn create_dirs(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Creates a new file of mode 0600 for writing; an existing file (or symbolic link) at `path`
/// is an error (`AlreadyExists`), never truncated or followed.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Opens `path` for appending, creating it with mode 0600 if it does not exist (the umask can
/// only narrow that). A file that exists keeps its mode: it may be a user's own log.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Makes `path` free for a new socket: nothing there, or a stale socket (connecting is
/// refused), which is removed. A live socket or anything that is not a socket is left alone and
/// reported.
pub fn clear_stale_socket(path: &Path) -> Result<(), SocketPathError> {
    let io_error = |source| SocketPathError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(SocketPathError::NotASocket(path.into())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(SocketPathError::InUse(path.into())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("{}: replacing a stale socket", path.display());
                std::fs::remove_file(path).map_err(io_error)
            }
            Err(e) => Err(io_error(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(e)),
    }
}

/// Listens on a Unix socket at `path` with mode 0600, after [`clear_stale_socket`]. The socket
/// file gets its mode before the socket listens, so no one else can ever connect.
pub fn bind_private_socket(path: &Path) -> Result<UnixListener, SocketPathError> {
    clear_stale_socket(path)?;
    bind_then_listen(path).map_err(|source| SocketPathError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The file of a bound Unix socket: removed on drop unless something else has replaced it
/// since (another server's socket, a user's file).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Remembers which file is at `path` now (just bound by this process).
    pub fn track(path: &Path) -> io::Result<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("{}: cannot remove the socket: {e}", self.path.display());
            }
        }
    }
}

fn bind_then_listen(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a usable Unix socket path (empty, a NUL byte, or longer than 107 bytes)",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a plain socket(2) call; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, `len` is within its size.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }
    // Until listen(2), a connect is refused whatever the mode, so the umask's mode is harmless.
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: listen(2) on the socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// A private random secret: `bytes` bytes from the kernel's getrandom, as lowercase hex.
pub fn random_hex(bytes: usize) -> io::Result<String> {
    let mut buf = vec![0u8; bytes];
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    /// Runs `f` with umask 000 (tests that create files run in one process, so the old umask
    /// is put back at once).
    fn with_open_umask<T>(f: impl FnOnce() -> T) -> T {
        // SAFETY: umask only swaps the process's file-creation mask.
        let old = unsafe { libc::umask(0) };
        let out = f();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        out
    }

    #[test]
    fn modes_do_not_depend_on_the_umask() {
        let dir = TempDir::new().unwrap();
        let base = dir.as_path();
        with_open_umask(|| {
            create_private_dir(&base.join("a/b")).unwrap();
            create_private_file(&base.join("a/b/file")).unwrap();
            open_append(&base.join("a/b/log")).unwrap();
            drop(bind_private_socket(&base.join("a/b/sock")).unwrap());
        });
        assert_eq!(mode(&base.join("a")), 0o700);
        assert_eq!(mode(&base.join("a/b")), 0o700);
        assert_eq!(mode(&base.join("a/b/file")), 0o600);
        assert_eq!(mode(&base.join("a/b/log")), 0o600);
        assert_eq!(mode(&base.join("a/b/sock")) & 0o777, 0o600);
    }

    #[test]
    fn an_existing_folder_is_made_private() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        create_private_dir(&path).unwrap();
        assert_eq!(mode(&path), 0o700);
    }

    #[test]
    fn create_private_file_neither_truncates_nor_follows() {
        let dir = TempDir::new().unwrap();
        let target = dir.as_path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let err = create_private_file(&target).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        let link = dir.as_path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_private_file(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn append_keeps_the_mode_and_content_of_a_users_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("log");
        std::fs::write(&path, b"old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        open_append(&path).unwrap().write_all(b"new\n").unwrap();
        assert_eq!(mode(&path), 0o644);
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("s.sock");
        drop(UnixListener::bind(&path).unwrap());
        let live = bind_private_socket(&path).unwrap();
        let err = bind_private_socket(&path).unwrap_err();
        assert!(matches!(err, SocketPathError::InUse(_)), "{err}");
        assert!(err.to_string().contains("s.sock"), "{err}");
        assert!(
            UnixStream::connect(&path).is_ok(),
            "the live socket still answers"
        );
        drop(live);

        let file = dir.as_path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        let err = bind_private_socket(&file).unwrap_err();
        assert!(matches!(err, SocketPathError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");

        let link = dir.as_path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = bind_private_socket(&link).unwrap_err();
        assert!(matches!(err, SocketPathError::NotASocket(_)), "{err}");
        assert!(std::fs::symlink_metadata(&link).is_ok());

        let sub = dir.as_path().join("dir");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            bind_private_socket(&sub).unwrap_err(),
            SocketPathError::NotASocket(_)
        ));
    }

    #[test]
    fn random_hex_has_the_length_asked_and_varies() {
        let a = random_hex(32).unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(32).unwrap());
    }
}
