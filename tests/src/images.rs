//! The binaries a guest test needs: `lockstep` itself, the test-guest kit's images and the Linux
//! guest images. Each is built on first use in a test process (a no-op when up to date).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's root folder.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
}

/// The cargo target folder and profile this test was built with (e.g. `target`, `debug`).
fn target_and_profile() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>, or target/<profile>/<binary> for the harness's own
    // programs (src/bin).
    let parent = exe.parent().expect("test binary in a folder");
    let profile_dir = if parent.file_name().is_some_and(|n| n == "deps") {
        parent
            .parent()
            .expect("test binary under target/<profile>/deps")
    } else {
        parent
    };
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let target = profile_dir
        .parent()
        .expect("profile dir under target")
        .to_path_buf();
    (target, profile)
}

/// Runs a build step; its output (paths, progress) goes to stderr, which the test harness
/// captures, rather than to the terminal.
fn run_checked(cmd: &mut Command, what: &str) {
    let status = cmd
        .stdout(std::io::stderr())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}

/// The `lockstep` binary of this test's profile, built if needed; or the one named by
/// `LKS_LOCKSTEP_BIN` (the benchmarks' release build), used as it is.
pub fn lockstep_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("LKS_LOCKSTEP_BIN") {
            let bin = PathBuf::from(bin);
            assert!(bin.exists(), "LKS_LOCKSTEP_BIN: no {}", bin.display());
            return bin;
        }
        let (target, profile) = target_and_profile();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "--quiet", "--bin", "lockstep"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        run_checked(&mut cmd, "cargo build --bin lockstep");
        let bin = target.join(&profile).join("lockstep");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// The test-guest kit's images.
#[derive(Debug, Clone)]
pub struct GuestImages {
    /// ELF with a 64-bit entry and a PVH note.
    pub elf: PathBuf,
    /// The same program as a bzImage.
    pub bzimage: PathBuf,
}

/// Builds the test-guest kit (tests/guest/build.sh) once per process and returns its images.
pub fn guest_images() -> &'static GuestImages {
    static IMAGES: OnceLock<GuestImages> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let (target, _) = target_and_profile();
        let out = target.join("guest-images");
        run_checked(
            crate::programs::command("bash")
                .arg(workspace_root().join("tests/guest/build.sh"))
                .arg(&out),
            "tests/guest/build.sh",
        );
        let images = GuestImages {
            elf: out.join("guest.elf"),
            bzimage: out.join("guest.bzimage"),
        };
        assert!(
            images.elf.exists() && images.bzimage.exists(),
            "guest images missing in {}",
            out.display()
        );
        images
    })
}

/// The Linux guest images built by resources/build-linux-guests.sh.
#[derive(Debug, Clone)]
pub struct LinuxImages {
    /// The kernel for this host: the PVM variant on PVM hosts, the ordinary one elsewhere.
    pub kernel: PathBuf,
    /// The busybox initramfs (uncompressed cpio).
    pub initramfs: PathBuf,
    /// The ext4 root filesystem image.
    pub rootfs: PathBuf,
}

/// Runs the Linux image build (a no-op when its cache is complete) and picks the kernel that
/// suits this host's KVM backend, as `lockstep backend` reports it.
pub fn linux_images() -> &'static LinuxImages {
    static IMAGES: OnceLock<LinuxImages> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let script = workspace_root().join("resources/build-linux-guests.sh");
        let output = crate::programs::output(crate::programs::command("bash").arg(&script));
        assert!(
            output.status.success(),
            "resources/build-linux-guests.sh failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let manifest = stdout
            .lines()
            .last()
            .expect("the script prints its manifest path")
            .trim()
            .to_string();
        let text =
            std::fs::read_to_string(&manifest).unwrap_or_else(|e| panic!("read {manifest}: {e}"));
        let get = |key: &str| -> PathBuf {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(|v| PathBuf::from(v.trim().trim_matches('"')))
                .unwrap_or_else(|| panic!("{key} missing from {manifest}"))
        };
        let backend = Command::new(lockstep_bin())
            .arg("backend")
            .output()
            .expect("lockstep backend");
        let backend = String::from_utf8_lossy(&backend.stdout).trim().to_string();
        let kernel = if backend == "pvm" {
            get("LINUX_VMLINUX_PVM")
        } else {
            get("LINUX_VMLINUX_KVM")
        };
        LinuxImages {
            kernel,
            initramfs: get("LINUX_INITRAMFS"),
            rootfs: get("LINUX_ROOTFS"),
        }
    })
}
