//! Reuse of read responses. Most reads (enumerating computer systems, getting one, walking
//! the interop model) are built from nothing but the host's VM list and report plus state kept
//! here; when a request repeats and those inputs compare equal to the ones its response was
//! built from, the response body is copied instead of rebuilt. The inputs are fetched and
//! compared on every request, so a cached body is never stale; responses that read VM configs
//! or counters (settings, devices) are never cached.

use std::collections::HashMap;
use std::sync::Mutex;

use lockstep_api::control::{HostInfo, VmInfo};

use crate::cimom::Cimom;
use crate::model::Snapshot;
use crate::xml::Param;

/// Most bytes of response bodies kept.
const MAX_BYTES: usize = 2 << 20;
/// Most entries kept.
const MAX_ENTRIES: usize = 64;
/// Largest request key considered (longer requests are not cached).
const MAX_KEY: usize = 4096;

struct Entry {
    version: u64,
    info: Option<HostInfo>,
    vms: Option<Vec<VmInfo>>,
    body: Vec<u8>,
}

/// The cached bodies, by request.
#[derive(Default)]
pub struct ResponseCache {
    entries: Mutex<HashMap<String, Entry>>,
}

impl ResponseCache {
    /// The cache key of a read operation; `None` for operations that are never cached.
    pub fn key(name: &str, namespace: &str, params: &[(String, Param)]) -> Option<String> {
        if !crate::ops::is_cacheable(name) {
            return None;
        }
        let key = format!("{name}\u{0}{namespace}\u{0}{params:?}");
        (key.len() <= MAX_KEY).then_some(key)
    }

    /// Appends the cached body for `key` to `out` when its inputs are unchanged.
    pub fn reuse(&self, key: &str, cimom: &Cimom, out: &mut Vec<u8>) -> bool {
        let (needs_info, needs_vms) = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.get(key) {
                Some(e) => (e.info.is_some(), e.vms.is_some()),
                None => return false,
            }
        };
        // Fetch the inputs as a fresh response would, outside the lock.
        let version = cimom.state_version();
        let info = needs_info.then(|| cimom.host.host_info());
        let vms = needs_vms.then(|| cimom.host.list_vms());
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(key) {
            Some(e) if e.version == version && e.info == info && e.vms == vms => {
                out.extend_from_slice(&e.body);
                true
            }
            _ => false,
        }
    }

    /// Keeps a body built from `snap`'s inputs at state `version`, if it may be reused.
    pub fn store(&self, key: String, version: u64, snap: &Snapshot<'_>, body: &[u8]) {
        let Some((info, vms)) = snap.light_inputs() else {
            return;
        };
        if body.len() > MAX_BYTES / 4 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = entries.values().map(|e| e.body.len()).sum();
        if entries.len() >= MAX_ENTRIES || total + body.len() > MAX_BYTES {
            entries.clear();
        }
        entries.insert(
            key,
            Entry {
                version,
                info: info.cloned(),
                vms: vms.map(<[VmInfo]>::to_vec),
                body: body.to_vec(),
            },
        );
    }
}
