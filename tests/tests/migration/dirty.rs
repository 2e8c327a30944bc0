//! A guest that dirties its memory while it migrates: every page it rewrote during pre-copy
//! arrives in its last version (the guest's own check of its block), and its counter goes on with
//! nothing lost or repeated.

use lockstep_tests::host::TestHost;
use lockstep_tests::{require_kvm, GuestReport};
use serde_json::json;

use super::*;

/// The block `memdirty` rewrites, MiB.
const BLOCK_MIB: u64 = 64;

#[test]
fn a_guest_dirtying_50_mib_s_migrates_with_its_memory_intact() {
    if !require_kvm("a_guest_dirtying_50_mib_s_migrates_with_its_memory_intact") {
        return;
    }
    // 64 MiB rewritten at 50 MiB/s for 12 s, a counter line every 100 ms.
    let script = format!("memdirty {BLOCK_MIB} 50 12 100");
    let source = TestHost::start(vec![vm_config("dirty", &script, 1, 256)]);
    let destination = TestHost::start(vec![]);
    source.wait_serial("dirty", "LKS counter=10 ", WAIT);
    let (in_id, listen, token) = incoming(&destination, "127.0.0.1:0", "dirty");
    let id = migrate(
        &source,
        "dirty",
        json!({ "destination": listen, "token": token, "auto_converge": true }),
    );
    let info = wait_ended(&source, &id, WAIT);
    assert_eq!(info["phase"], "completed", "{info}\n{}", source.log());
    assert_eq!(wait_ended(&destination, &in_id, WAIT)["phase"], "completed");
    eprintln!("migration of a dirtying guest: {info}");

    let before = source.serial("dirty");
    assert!(
        !before.contains("LKS memdirty mib="),
        "the guest was still dirtying memory when it left: {before}"
    );
    // Round 0 sends the block once; pages the guest rewrote meanwhile went again.
    let pages = info["pages"].as_u64().unwrap();
    assert!(
        pages > (BLOCK_MIB + 1) * 256,
        "rewritten pages were sent again: {info}"
    );

    let after = destination.wait_serial("dirty", "LKS run done", WAIT);
    let report = GuestReport::parse(&after);
    let result = report.all("memdirty").last().unwrap_or_default();
    assert!(
        result.contains("status=match") && result.contains("stopped_by=time"),
        "every page holds its last write on the destination: {result}\n{after}"
    );
    let all = counters(&format!("{before}{after}"));
    assert!(
        all.first() == Some(&1) && all.windows(2).all(|w| w[1] == w[0] + 1),
        "the guest's ticks go on with nothing lost or repeated: {all:?}"
    );
    assert!(!counters(&after).is_empty(), "it ticked on the destination");
}
