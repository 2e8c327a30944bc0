//! Links every guest program as a freestanding, static, non-PIE ELF at the fixed address chosen by the
//! kit's linker script. These arguments apply to this package's binaries only.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let script = manifest.join("../kit/link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rustc-link-arg-bins=-nostartfiles");
    println!("cargo:rustc-link-arg-bins=-static");
    println!("cargo:rustc-link-arg-bins=-Wl,--build-id=none");
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
