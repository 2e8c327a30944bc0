//! The snapshot's files as untrusted objects on the host: opened without blocking and refused
//! unless they are regular files of a plausible size, identified by device and inode (not by
//! spelling) so that a snapshot never overwrites a file a running VM stands on, and written
//! beside their destination then renamed over it, so a failure leaves the old file whole.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::SnapshotError;

/// A file as the kernel knows it: the same pair means the same file, whatever path reaches it
/// (symlinks, hard links, `..`, bind mounts of one filesystem).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// The device holding the file.
    pub dev: u64,
    /// Its inode on that device.
    pub ino: u64,
}

impl FileId {
    /// The identity of an open file.
    pub fn of_file(file: &File) -> std::io::Result<FileId> {
        let meta = file.metadata()?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The identity of the file `path` leads to (following symlinks), or None when nothing is
    /// there.
    pub fn of_path(path: &Path) -> Option<FileId> {
        std::fs::metadata(path).ok().map(|meta| FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A file that a running VM reads or maps while it runs: overwriting it would change the VM
/// under its feet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    /// What the VM uses it for ("snapshot memory file", "drive rootfs").
    pub role: String,
    /// The path it was opened by.
    pub path: PathBuf,
    /// The file itself.
    pub id: FileId,
}

/// Opens `path` for reading, refusing anything but a regular file of at most `max_len` bytes
/// before a single byte is read. O_NONBLOCK keeps a FIFO from blocking the open itself; the
/// type is then taken from the open descriptor, so the path cannot be swapped in between.
pub fn open_regular(path: &Path, what: &str, max_len: u64) -> Result<(File, u64), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(SnapshotError::NotRegular {
            path: path.to_owned(),
            what: what.to_string(),
        });
    }
    if meta.len() > max_len {
        return Err(SnapshotError::TooLarge {
            path: path.to_owned(),
            what: what.to_string(),
            len: meta.len(),
            max: max_len,
        });
    }
    Ok((file, meta.len()))
}

/// Reads exactly `len` bytes (the size fstat gave), refusing a file that grew or shrank since.
pub fn read_exact_len(file: &mut File, path: &Path, len: u64) -> Result<Vec<u8>, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let len = usize::try_from(len).map_err(|_| SnapshotError::Corrupt {
        path: path.to_owned(),
        what: format!("{len} bytes do not fit this host's address space"),
    })?;
    let mut bytes = vec![0u8; len];
    file.read_exact(&mut bytes).map_err(io)?;
    let mut extra = [0u8; 1];
    if file.read(&mut extra).map_err(io)? != 0 {
        return Err(SnapshotError::Corrupt {
            path: path.to_owned(),
            what: "the file grew while it was read".into(),
        });
    }
    Ok(bytes)
}

/// Where a snapshot file would land: the destination's own identity if something is there, and
/// its canonical path (for two destinations that do not exist yet).
fn landing(path: &Path) -> (Option<FileId>, PathBuf) {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_owned());
        match path.file_name() {
            Some(name) => parent.join(name),
            None => parent,
        }
    });
    (FileId::of_path(path), canonical)
}

/// Refuses snapshot destinations that would destroy something: the state and memory file being
/// one file, a destination that exists and is not a regular file (a device node, a FIFO, a
/// folder), or a file that backs a running VM of this host (however it is named).
pub fn check_destinations(
    state: &Path,
    memory: &Path,
    backing: &[(String, BackingFile)],
) -> Result<(), SnapshotError> {
    let refuse = |path: &Path, why: String| SnapshotError::Destination {
        path: path.to_owned(),
        why,
    };
    let (state_id, state_canon) = landing(state);
    let (memory_id, memory_canon) = landing(memory);
    let same = match (state_id, memory_id) {
        (Some(a), Some(b)) => a == b,
        _ => state_canon == memory_canon,
    };
    if same {
        return Err(refuse(
            state,
            format!(
                "it is the same file as the memory file {}; a snapshot needs two files",
                memory.display()
            ),
        ));
    }
    for (path, id) in [(state, state_id), (memory, memory_id)] {
        if let Ok(meta) = std::fs::metadata(path) {
            if !meta.file_type().is_file() {
                return Err(refuse(
                    path,
                    "it exists and is not a regular file (a folder, device, FIFO or socket)".into(),
                ));
            }
        }
        let Some(id) = id else { continue };
        if let Some((vm, file)) = backing.iter().find(|(_, f)| f.id == id) {
            return Err(refuse(
                path,
                format!(
                    "it is the {} of the running VM {vm:?} (opened as {}); overwriting it would \
                     change that VM's memory or disk under it",
                    file.role,
                    file.path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A file being written beside its destination; [`AtomicFile::commit`] renames it over the
/// destination, and dropping it uncommitted removes it.
pub struct AtomicFile {
    file: Option<File>,
    temp: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    /// Creates a new, private (0600) temporary file in the destination's folder.
    pub fn create(dest: &Path) -> std::io::Result<AtomicFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = dest
            .file_name()
            .ok_or_else(|| std::io::Error::other("the destination has no file name"))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let temp = parent.join(temp_name);
        let file = crate::private_fs::create_private_file(&temp)?;
        Ok(AtomicFile {
            file: Some(file),
            temp,
            dest: dest.to_owned(),
        })
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        // Only `commit` takes the file, and it consumes `self`.
        self.file
            .as_ref()
            .unwrap_or_else(|| unreachable!("the file is present until commit"))
    }

    /// Flushes the file to disk and renames it over the destination.
    pub fn commit(mut self) -> std::io::Result<()> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
        }
        std::fs::rename(&self.temp, &self.dest)?;
        self.temp = PathBuf::new();
        if let Some(parent) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The rename itself reaches the disk with the folder; a failure here loses nothing
            // that the rename did not already make visible.
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = self.file();
        file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut file = self.file();
        file.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Files a restore created, removed again unless the restore succeeds.
#[derive(Default)]
pub struct CreatedFiles {
    paths: Vec<PathBuf>,
}

impl CreatedFiles {
    /// Remembers `path` for removal if nothing is there yet (it is about to be created).
    pub fn note_if_new(&mut self, path: &Path) {
        if std::fs::symlink_metadata(path).is_err() {
            self.paths.push(path.to_owned());
        }
    }

    /// The restore succeeded: keep everything.
    pub fn keep(mut self) {
        self.paths.clear();
    }
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backing(path: &Path) -> Vec<(String, BackingFile)> {
        vec![(
            "vm1".to_string(),
            BackingFile {
                role: "snapshot memory file".into(),
                path: path.to_owned(),
                id: FileId::of_path(path).unwrap(),
            },
        )]
    }

    #[test]
    fn fifos_directories_and_devices_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for path in [fifo.as_path(), dir.path(), Path::new("/dev/zero")] {
            let err = open_regular(path, "state file", 1 << 20).unwrap_err();
            assert!(
                matches!(err, SnapshotError::NotRegular { .. }),
                "{path:?}: {err}"
            );
        }
    }

    #[test]
    fn oversized_files_are_refused_and_exact_lengths_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 100]).unwrap();
        assert!(matches!(
            open_regular(&path, "state file", 99).unwrap_err(),
            SnapshotError::TooLarge { len: 100, .. }
        ));
        let (mut file, len) = open_regular(&path, "state file", 100).unwrap();
        assert_eq!(
            read_exact_len(&mut file, &path, len).unwrap(),
            vec![7u8; 100]
        );
    }

    #[test]
    fn a_backing_file_is_refused_under_any_name() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("vm.mem");
        std::fs::write(&mem, b"guest memory").unwrap();
        let link = dir.path().join("link.mem");
        std::os::unix::fs::symlink(&mem, &link).unwrap();
        let hard = dir.path().join("hard.mem");
        std::fs::hard_link(&mem, &hard).unwrap();
        let dotted = dir.path().join(".").join("vm.mem");
        let state = dir.path().join("new.state");
        for dest in [&mem, &link, &hard, &dotted] {
            let err = check_destinations(&state, dest, &backing(&mem)).unwrap_err();
            assert!(err.to_string().contains("running VM \"vm1\""), "{err}");
            let err =
                check_destinations(dest, &dir.path().join("x.mem"), &backing(&mem)).unwrap_err();
            assert!(err.to_string().contains("snapshot memory file"), "{err}");
        }
        check_destinations(&state, &dir.path().join("fresh.mem"), &backing(&mem)).unwrap();
    }

    #[test]
    fn state_and_memory_must_be_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        assert!(check_destinations(&a, &dir.path().join(".").join("a"), &[]).is_err());
        std::fs::write(&a, b"x").unwrap();
        let b = dir.path().join("b");
        std::fs::hard_link(&a, &b).unwrap();
        assert!(check_destinations(&a, &b, &[]).is_err());
        assert!(check_destinations(&a, dir.path(), &[])
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
    }

    #[test]
    fn an_uncommitted_file_leaves_the_destination_alone() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("d");
        std::fs::write(&dest, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(b"half").unwrap();
        }
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut f = AtomicFile::create(&dest).unwrap();
        f.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
