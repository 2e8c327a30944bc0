//! Where a VM on a host may put its files and sockets. A config (a new one, a changed one, or
//! one read from a snapshot, which may come from another host) must not reach into the host's
//! own files or another VM's: inside the state folder only the VM's own folder is open to it,
//! and no path may be one another VM uses. Sockets already there are never taken over.

use std::path::{Component, Path, PathBuf};

use lockstep_api::private_fs::{self, SocketPathError};
use lockstep_api::VmConfig;

/// The host-managed file names in a VM's folder.
const SERIAL_LOG: &str = "serial.log";
const CONSOLE_SOCKET: &str = "console.sock";

/// The files and sockets a config names, with their fields.
fn config_paths(config: &VmConfig) -> Vec<(&'static str, &Path)> {
    let mut paths = Vec::new();
    if let Some(p) = &config.serial.output_path {
        paths.push(("serial.output_path", p.as_path()));
    }
    if let Some(p) = &config.serial.console_socket {
        paths.push(("serial.console_socket", p.as_path()));
    }
    if let Some(v) = &config.vsock {
        paths.push(("vsock.uds_path", v.uds_path.as_path()));
    }
    paths
}

/// `path` made absolute, `.` and `..` taken out, and its folder's symbolic links resolved when
/// the folder exists, so two spellings of one file compare equal.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut clean = PathBuf::new();
    for part in absolute.components() {
        match part {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    match (clean.parent(), clean.file_name()) {
        (Some(dir), Some(name)) => match dir.canonicalize() {
            Ok(dir) => dir.join(name),
            Err(_) => clean,
        },
        _ => clean,
    }
}

/// Checks the paths of VM `name`'s config against the host's state folder and the configs of
/// the host's other VMs. The error names the field and the path.
pub(crate) fn check_vm_paths<'a>(
    state_dir: &Path,
    name: &str,
    config: &VmConfig,
    others: impl IntoIterator<Item = (&'a str, &'a VmConfig)>,
) -> Result<(), String> {
    let mine: Vec<(&str, &Path, PathBuf)> = config_paths(config)
        .into_iter()
        .map(|(field, path)| (field, path, resolved(path)))
        .collect();
    for (field, path, _) in &mine {
        check_in_own_folder(state_dir, name, field, path)?;
    }
    for (other, other_config) in others {
        if other == name {
            continue;
        }
        for (_, theirs) in config_paths(other_config) {
            let theirs = resolved(theirs);
            if let Some((field, path, _)) = mine.iter().find(|(_, _, real)| *real == theirs) {
                return Err(format!(
                    "{field}: {} is used by the VM {other:?}",
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

/// Checks that `path` (the value of `field`) is not in the host's state folder, or is in VM
/// `name`'s own folder there: the rest of it (other VMs' files, the token, the CIM key) is not
/// a VM's to write.
pub(crate) fn check_in_own_folder(
    state_dir: &Path,
    name: &str,
    field: &str,
    path: &Path,
) -> Result<(), String> {
    let state = resolved(state_dir);
    let own = state.join(name);
    let real = resolved(path);
    if real.starts_with(&state) && !real.starts_with(&own) {
        return Err(format!(
            "{field}: {} is in the host's state folder {} outside this VM's folder {}",
            path.display(),
            state.display(),
            own.display()
        ));
    }
    Ok(())
}

/// Checks that the config's console socket can be bound without taking over anyone's socket
/// or file: nothing there, or a stale socket (removed). The error names the path.
pub(crate) fn check_console_socket(config: &VmConfig) -> Result<(), SocketPathError> {
    match &config.serial.console_socket {
        Some(path) => private_fs::clear_stale_socket(path),
        None => Ok(()),
    }
}

/// Takes out of a restored config the serial log and console socket that its host placed
/// (in that host's folder for the VM, or anywhere in this host's state folder), so this host
/// places them afresh under its own state folder; paths the user chose elsewhere stay, to be
/// checked like a new config's.
pub(crate) fn forget_host_managed(config: &mut VmConfig, state_dir: &Path) {
    let state = resolved(state_dir);
    let saved_name = config.name.clone().unwrap_or_default();
    let host_managed = |path: &Path, file: &str| {
        let placed_by_a_host = path.file_name().is_some_and(|f| f == file)
            && path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|dir| !saved_name.is_empty() && dir == saved_name.as_str());
        placed_by_a_host || resolved(path).starts_with(&state)
    };
    let serial = &mut config.serial;
    for (path, file) in [
        (&mut serial.output_path, SERIAL_LOG),
        (&mut serial.console_socket, CONSOLE_SOCKET),
    ] {
        if path.as_deref().is_some_and(|p| host_managed(p, file)) {
            *path = None;
        }
    }
}

/// The default paths of the host-managed files in a VM's folder.
pub(crate) fn serial_log_in(dir: &Path) -> PathBuf {
    dir.join(SERIAL_LOG)
}

/// See [`serial_log_in`].
pub(crate) fn console_socket_in(dir: &Path) -> PathBuf {
    dir.join(CONSOLE_SOCKET)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    fn config(json: serde_json::Value) -> VmConfig {
        serde_json::from_value(json).unwrap()
    }

    fn with_serial(log: &Path, sock: &Path) -> VmConfig {
        config(serde_json::json!({
            "boot-source": {"kernel_image_path": "/k"},
            "name": "a",
            "serial": {"output_path": log, "console_socket": sock}
        }))
    }

    #[test]
    fn the_state_folder_is_open_only_in_the_vms_own_folder() {
        let dir = TempDir::new().unwrap();
        let state = dir.as_path();
        std::fs::create_dir_all(state.join("a")).unwrap();
        std::fs::create_dir_all(state.join("b")).unwrap();
        let own = with_serial(&state.join("a/serial.log"), &state.join("a/console.sock"));
        check_vm_paths(state, "a", &own, []).unwrap();
        for bad in [
            with_serial(&state.join("b/serial.log"), &state.join("a/c.sock")),
            with_serial(&state.join("a/x.log"), &state.join("a/../b/console.sock")),
            with_serial(&state.join("api.token"), &state.join("a/c.sock")),
        ] {
            let err = check_vm_paths(state, "a", &bad, []).unwrap_err();
            assert!(err.contains("state folder"), "{err}");
        }
    }

    #[test]
    fn another_vms_paths_are_refused() {
        let dir = TempDir::new().unwrap();
        let base = dir.as_path();
        let state = base.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let b = with_serial(&base.join("b.log"), &base.join("b.sock"));
        let a = with_serial(&base.join("./b.log"), &base.join("a.sock"));
        let err = check_vm_paths(&state, "a", &a, [("b", &b)]).unwrap_err();
        assert!(
            err.contains("serial.output_path") && err.contains("\"b\""),
            "{err}"
        );
        let a = with_serial(&base.join("a.log"), &base.join("a.sock"));
        check_vm_paths(&state, "a", &a, [("b", &b)]).unwrap();
        // A VM's own previous config does not count as another VM's.
        check_vm_paths(&state, "a", &a, [("a", &a)]).unwrap();
    }

    #[test]
    fn a_live_socket_or_a_file_is_not_a_console_socket() {
        let dir = TempDir::new().unwrap();
        let live = dir.as_path().join("live.sock");
        let _listener = UnixListener::bind(&live).unwrap();
        let file = dir.as_path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        for path in [&live, &file] {
            let c = with_serial(&dir.as_path().join("log"), path);
            let err = check_console_socket(&c).unwrap_err();
            assert!(err.to_string().contains(&path.display().to_string()));
        }
        assert!(std::os::unix::net::UnixStream::connect(&live).is_ok());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn host_managed_paths_of_a_snapshot_are_forgotten() {
        let dir = TempDir::new().unwrap();
        let state = dir.as_path();
        let mut c = with_serial(
            Path::new("/var/lib/other-host/a/serial.log"),
            Path::new("/var/lib/other-host/a/console.sock"),
        );
        forget_host_managed(&mut c, state);
        assert_eq!(c.serial.output_path, None);
        assert_eq!(c.serial.console_socket, None);
        let mut c = with_serial(&state.join("b/x.log"), Path::new("/srv/a-console.sock"));
        forget_host_managed(&mut c, state);
        assert_eq!(c.serial.output_path, None);
        assert_eq!(
            c.serial.console_socket.as_deref(),
            Some(Path::new("/srv/a-console.sock"))
        );
    }
}
