//! `lockstep host --user USER`: giving up root once the host holds what only root may open
//! (`/dev/kvm`, the control API's sockets, the state folder, chowned to the user).

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Who the host becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's name (or its number when the system has no entry for it).
    pub name: String,
    /// The user ID.
    pub uid: libc::uid_t,
    /// The primary group ID.
    pub gid: libc::gid_t,
    /// The supplementary groups (the user's groups in the group database).
    pub groups: Vec<libc::gid_t>,
}

/// Why the identity could not be found or taken.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// No such user.
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    /// The user database could not be read.
    #[error("--user {user}: cannot read the user database: {source}")]
    Lookup {
        /// The user asked for.
        user: String,
        /// The reason.
        #[source]
        source: io::Error,
    },
    /// The state folder could not be given to the user.
    #[error("cannot give {path} to {user}: {source}")]
    Chown {
        /// The path.
        path: String,
        /// The user.
        user: String,
        /// The reason.
        #[source]
        source: io::Error,
    },
    /// A step of the switch failed.
    #[error("cannot switch to {user}: {step} failed: {source}")]
    Switch {
        /// The user.
        user: String,
        /// setgroups, setgid or setuid.
        step: &'static str,
        /// The reason.
        #[source]
        source: io::Error,
    },
    /// Root could be taken back after the switch.
    #[error("switched to {0} but root can still be taken back; refusing to run")]
    NotDropped(String),
}

/// Reads a user's IDs and groups from the system's user database; a number without an entry
/// stands for itself (its group the same number, no supplementary groups).
pub fn lookup(user: &str) -> Result<Identity, PrivilegeError> {
    let lookup_err = |source| PrivilegeError::Lookup {
        user: user.to_string(),
        source,
    };
    let c_user = CString::new(user).map_err(|_| PrivilegeError::NoSuchUser(user.to_string()))?;
    // SAFETY: a zeroed passwd is a valid out parameter.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let numeric: Option<libc::uid_t> = user.parse().ok();
    // SAFETY: every pointer is valid for the call, the buffer's length is passed with it.
    let rc = unsafe {
        match numeric {
            Some(uid) => libc::getpwuid_r(
                uid,
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut result,
            ),
            None => libc::getpwnam_r(
                c_user.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut result,
            ),
        }
    };
    if rc != 0 {
        return Err(lookup_err(io::Error::from_raw_os_error(rc)));
    }
    if result.is_null() {
        return match numeric {
            Some(uid) => Ok(Identity {
                name: user.to_string(),
                uid,
                gid: uid,
                groups: Vec::new(),
            }),
            None => Err(PrivilegeError::NoSuchUser(user.to_string())),
        };
    }
    // SAFETY: getpw*_r filled `entry`; pw_name points into `buffer`, NUL-terminated.
    let name = unsafe { CStr::from_ptr(entry.pw_name) }.to_owned();
    let (uid, gid) = (entry.pw_uid, entry.pw_gid);
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut count = groups.len() as libc::c_int;
    // SAFETY: `groups` has room for `count` entries; the call says how many it wrote.
    let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
    if rc < 0 {
        return Err(lookup_err(io::Error::other(
            "the user is in more than 256 groups",
        )));
    }
    groups.truncate(count.max(0) as usize);
    Ok(Identity {
        name: name.to_string_lossy().into_owned(),
        uid,
        gid,
        groups,
    })
}

/// Gives `dir` and everything in it to `who` (symbolic links themselves, never their targets).
pub fn chown_tree(dir: &Path, who: &Identity) -> Result<(), PrivilegeError> {
    let fail = |path: &Path, source| PrivilegeError::Chown {
        path: path.display().to_string(),
        user: who.name.clone(),
        source,
    };
    let c_path =
        CString::new(dir.as_os_str().as_bytes()).map_err(|e| fail(dir, io::Error::other(e)))?;
    // SAFETY: a valid NUL-terminated path; lchown never follows a link.
    if unsafe { libc::lchown(c_path.as_ptr(), who.uid, who.gid) } != 0 {
        return Err(fail(dir, io::Error::last_os_error()));
    }
    let metadata = std::fs::symlink_metadata(dir).map_err(|e| fail(dir, e))?;
    if metadata.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(|e| fail(dir, e))? {
            let entry = entry.map_err(|e| fail(dir, e))?;
            chown_tree(&entry.path(), who)?;
        }
    }
    Ok(())
}

/// Becomes `who` for good: supplementary groups, group, then user (the order that keeps the
/// right to change the next), and checks that root cannot be taken back. Call it before any
/// thread installs a seccomp filter: glibc makes every thread of the process take the new IDs,
/// a call the filters do not allow (the host calls it before it starts any thread).
pub fn become_user(who: &Identity) -> Result<(), PrivilegeError> {
    let step = |step: &'static str, rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(PrivilegeError::Switch {
                user: who.name.clone(),
                step,
                source: io::Error::last_os_error(),
            })
        }
    };
    // SAFETY: `groups` holds `len` IDs.
    step("setgroups", unsafe {
        libc::setgroups(who.groups.len(), who.groups.as_ptr())
    })?;
    // SAFETY: plain ID changes.
    step("setgid", unsafe { libc::setgid(who.gid) })?;
    // SAFETY: as above.
    step("setuid", unsafe { libc::setuid(who.uid) })?;
    // SAFETY: as above; this must fail once root is given up.
    if who.uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(PrivilegeError::NotDropped(who.name.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_numbers_resolve() {
        let root = lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup("0").unwrap().name, "root");
        let unknown = lookup("4000000").unwrap();
        assert_eq!((unknown.uid, unknown.gid), (4_000_000, 4_000_000));
        assert!(matches!(
            lookup("no-such-user-here"),
            Err(PrivilegeError::NoSuchUser(_))
        ));
    }
}
