//! Feeds arbitrary bytes to the CIM-XML request parser, and what parses to the object manager
//! over a fake host (every operation, parameter and value path a body can reach).

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use lockstep_cim::cimom::{Cimom, Limits};
use lockstep_cim::fake_host::FakeHost;

fn cimom() -> &'static Arc<Cimom> {
    static CIMOM: OnceLock<Arc<Cimom>> = OnceLock::new();
    CIMOM.get_or_init(|| {
        Cimom::new(Arc::new(FakeHost::with_vms(3)), "fuzz".into(), None, Limits::default())
            .expect("schema loads")
    })
}

fuzz_target!(|data: &[u8]| {
    if lockstep_cim::xml::parse_request(data).is_ok() {
        // Methods that change VMs are fine here: the fake host is in memory.
        let _ = cimom().handle(data, None, None);
    }
});
