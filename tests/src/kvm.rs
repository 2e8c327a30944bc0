//! Whether guest tests can run here.

use std::io::Write;
use std::path::Path;

/// True when `/dev/kvm` can be used. Without it a test must not pretend to pass: under `CI=true`
/// this panics, elsewhere it says loudly that the test is skipped (straight to the process's
/// stderr, which the test harness does not capture) and returns false.
pub fn require_kvm(test: &str) -> bool {
    let usable = Path::new("/dev/kvm").exists()
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    if usable {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: /dev/kvm is missing or not usable, and CI=true: guest tests must run in CI"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n!!! SKIPPED {test}: /dev/kvm is missing or not usable on this machine; guest tests did NOT run !!!\n"
    );
    false
}
