//! Firecracker's API for one VM of a lockstep host: Firecracker's paths, bodies and statuses, so
//! that its documentation's curl calls and its SDKs drive a lockstep VM unchanged. It sits on
//! [`HostControl`] like lockstep's own API; the VM it serves is the host's VM named `vm_name`.
//!
//! The pre-boot resources (`/boot-source`, `/machine-config`, `/drives/{id}`,
//! `/network-interfaces/{id}`, `/vsock`, `/entropy`, `/serial`) are gathered here while the VM
//! does not exist on the host; `InstanceStart` then asks the host to create and start it
//! (`create_vm(config, true)`), and `PUT /snapshot/load` on a fresh socket restores it instead
//! (`restore_vm` under the VM's name). For a VM the host has defined but is not running
//! (created, stopped or failed), the same calls change its config on the host (`get_vm`, change
//! one section, `update_vm`) and `InstanceStart` is `start_vm`. Each resource is checked when it
//! is put, as far as it can be without the others (the host checks the whole config again). Once
//! the VM runs, pre-boot resources are refused with Firecracker's message, and:
//!
//! | Firecracker | host |
//! |---|---|
//! | `PATCH /vm {"state": "Paused"}` / `"Resumed"` | `pause_vm` / `resume_vm` |
//! | `PUT /snapshot/create` (`Full` only) | `snapshot_vm` with its two paths |
//! | `PUT /actions {"action_type": "SendCtrlAltDel"}` | `shutdown_vm` (no force, [`CTRL_ALT_DEL_GRACE_S`]) on a thread of its own; the reply does not wait for the guest |
//! | `PUT /actions {"action_type": "FlushMetrics"}` | appends `vm_metrics` as a JSON line to the `PUT /metrics` file, if one was set |
//! | `GET /`, `GET /machine-config`, `GET /vm/config` | `get_vm` (the pending resources before the VM exists) |
//!
//! Success is 204 with no body (200 with JSON for the `GET`s); every error is 400 with
//! `{"fault_message": "..."}`, including an unknown path or method (as Firecracker answers),
//! except host failures (`ControlError::Internal`), which are 500. `GET /` reports the state as
//! Firecracker's three: `Not started` (also for a VM that stopped), `Running` (also while
//! shutting down) and `Paused`.
//!
//! Paths in the bodies are read by the lockstep process, whose working directory is not the
//! client's: give absolute paths (Firecracker's guide uses `./hello-vmlinux.bin` because
//! Firecracker runs in the client's directory). Request bodies are read as JSON whatever their
//! `Content-Type`, since scripts written for Firecracker often send `curl -d` without one.
//! `PUT /logger` is accepted but writes nothing: lockstep logs through the host's log.

mod api;
mod model;
mod pending;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use lockstep_seccomp::ThreadKind;

pub use api::{CTRL_ALT_DEL_GRACE_S, FIRECRACKER_API_VERSION};

use crate::control::HostControl;
use crate::http::{server, HttpError, Listeners, ServerHandle};

/// Starts Firecracker's API for the host's VM `vm_name` on a Unix socket at `socket`, on its
/// own thread and tokio runtime. The socket is bound when this returns; dropping or stopping
/// the handle ends the server and removes the socket.
pub fn spawn_firecracker(
    host: Arc<dyn HostControl>,
    vm_name: String,
    socket: &Path,
) -> Result<ServerHandle, HttpError> {
    let listeners = Listeners::new().bind_unix(socket)?;
    let handler = Arc::new(api::FirecrackerApi::new(host, vm_name));
    server::spawn(
        "lockstep-fc",
        ThreadKind::FirecrackerApi,
        handler,
        listeners,
    )
}
