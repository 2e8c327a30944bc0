//! The host as live migration sees it ([`MigrationHost`]): the VMs it sends and the VMs it
//! takes in. The migration logic itself is in `crate::migration`.

use std::sync::Arc;
use std::time::Duration;

use lockstep_api::control::{ControlError, HostControl, HostEvent};
use lockstep_api::VmConfig;

use super::{host_paths, internal, Host, Slot};
use crate::kvm::Hypervisor;
use crate::migration::{MigrationHost, Migrations};
use crate::vm::{Vm, VmCommand, VmReply};

impl Host {
    /// This host as migration threads hold it.
    pub(super) fn shared(&self) -> Result<Arc<dyn MigrationHost>, ControlError> {
        self.me
            .get()
            .and_then(|weak| weak.upgrade())
            .map(|host| host as Arc<dyn MigrationHost>)
            .ok_or_else(|| {
                internal("this host was not made for live migration (Host::into_shared)")
            })
    }
}

impl MigrationHost for Host {
    fn hypervisor(&self) -> &Hypervisor {
        &self.hv
    }

    fn migrations(&self) -> &Migrations {
        &self.migrations
    }

    fn vm_control(&self, name: &str) -> Result<crate::vm::VmControl, String> {
        let slot = self.slot(name).map_err(|e| e.to_string())?;
        let s = slot.lock();
        s.runtime
            .as_ref()
            .map(|r| r.control.clone())
            .ok_or_else(|| format!("VM {name:?} is not running"))
    }

    fn vm_exists(&self, name: &str) -> bool {
        self.vms().contains_key(name)
    }

    fn place_incoming(&self, name: &str, config: &mut VmConfig, local: bool) -> Result<(), String> {
        // Another host placed the serial log and console: they are placed afresh here.
        config.serial.output_path = None;
        config.serial.console_socket = None;
        host_paths::forget_host_managed(config, &self.state_dir);
        self.check_paths(name, config).map_err(|e| e.to_string())?;
        self.place(config, name).map_err(|e| e.to_string())?;
        // A same-host source on this state folder (a takeover) holds the console socket placed
        // here until the switch: it is not checked as someone else's.
        let console = local.then(|| config.serial.console_socket.take()).flatten();
        let checked = self.check_paths(name, config).map_err(|e| e.to_string());
        if console.is_some() {
            config.serial.console_socket = console;
        }
        checked
    }

    fn adopt(&self, name: &str, vm: Vm, paused: bool) -> Result<(), String> {
        let slot = Slot::new(name, vm.config().clone(), self.events.clone());
        let mut vms = self.vms();
        if vms.contains_key(name) {
            return Err(format!("a VM named {name:?} exists already"));
        }
        let mut s = slot.lock();
        self.launch(&slot, &mut s, vm, paused)
            .map_err(|e| e.to_string())?;
        drop(s);
        vms.insert(name.to_string(), slot);
        drop(vms);
        self.events.send(HostEvent::VmCreated {
            name: name.to_string(),
        });
        Ok(())
    }

    fn forget_incoming(&self, name: &str) {
        if !self.vms().contains_key(name) {
            // Only an empty folder: never what another VM or the user put there.
            let _ = std::fs::remove_dir(self.vm_dir(name));
        }
    }

    fn running_config(&self, name: &str) -> Result<VmConfig, ControlError> {
        let slot = self.slot(name)?;
        let s = slot.lock();
        if s.runtime.is_none() {
            return Err(ControlError::Conflict(format!(
                "VM {name:?} is not running"
            )));
        }
        Ok(s.config.clone())
    }

    fn vm_command(
        &self,
        name: &str,
        command: VmCommand,
        timeout: Duration,
    ) -> Result<VmReply, String> {
        let slot = self.slot(name).map_err(|e| e.to_string())?;
        let reply = self
            .command(&slot, command, timeout)
            .map_err(|e| e.to_string())?;
        if matches!(reply, VmReply::State(_)) {
            self.apply_reply(&slot, reply.clone());
        }
        Ok(reply)
    }

    fn remove_migrated(&self, name: &str) {
        log::info!("{name}: runs on its new host; removing it here");
        if let Err(e) = self.delete_vm(name) {
            log::warn!("{name}: {e}");
        }
    }
}
