//! Feeds arbitrary text to the WQL and CQL parsers and evaluates what parses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_cim::query::{Language, Query};
use lockstep_cim::value::{Instance, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let inst = Instance::new("LKS_VirtualComputerSystem")
        .with("Name", "vm1")
        .with("EnabledState", 2u16)
        .with("OperationalStatus", Value::u16_array(&[2]));
    for lang in [Language::Wql, Language::Cql] {
        if let Ok(q) = Query::parse(lang, text) {
            let _ = q.matches(&inst, &|a, b| a.eq_ignore_ascii_case(b));
            let _ = q.project(inst.clone());
        }
    }
});
