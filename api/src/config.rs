//! The VM configuration file read by `lockstep run`.
//!
//! Keys and meanings follow Firecracker's `--config-file` JSON where the two overlap
//! (`boot-source`, `machine-config`), so a Firecracker config with those sections runs unchanged.
//! lockstep's own keys (`name`, `serial`) sit beside them at the top level.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices;
use crate::devices::{DriveConfig, EntropyConfig, NetConfig, VsockConfig};
use crate::error::ConfigError;

/// The most vCPUs a lockstep VM may have (the MP table and topology are laid out for this many).
pub const MAX_VCPUS: u32 = 32;
/// The least guest memory lockstep accepts, in MiB: below this not even a tiny kernel fits.
pub const MIN_MEM_MIB: u64 = 16;
/// The longest kernel command line the x86 boot protocol carries, excluding the final NUL.
pub const MAX_CMDLINE_LEN: usize = 2047;
/// Firecracker's defaults when `machine-config` is left out.
const DEFAULT_VCPUS: u32 = 1;
const DEFAULT_MEM_MIB: u64 = 128;

/// A whole VM description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel, its command line and its initrd.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Block devices (virtio-blk).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveConfig>,
    /// Network cards (virtio-net on host tap devices).
    #[serde(
        rename = "network-interfaces",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub network_interfaces: Vec<NetConfig>,
    /// A socket device (virtio-vsock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// An entropy device (virtio-rng).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// lockstep: a name for the VM, shown in logs and (later) by the management endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// lockstep: where the guest's serial console goes.
    #[serde(default, skip_serializing_if = "SerialConfig::is_default")]
    pub serial: SerialConfig,
    /// Firecracker sections lockstep has no counterpart for. Accepted so that Firecracker's own
    /// config files run unchanged; see [`FirecrackerExtras`].
    #[serde(flatten)]
    pub firecracker: FirecrackerExtras,
}

/// Firecracker top-level sections lockstep does not implement. `null` (as Firecracker writes
/// them) is accepted; a balloon, MMDS or CPU template is refused by name; `logger` and `metrics`
/// are accepted and ignored with a notice, since lockstep logs to stderr and serves metrics
/// through its API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerExtras {
    /// Firecracker's memory balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<serde_json::Value>,
    /// Firecracker's log file settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<serde_json::Value>,
    /// Firecracker's metrics file settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
    /// Firecracker's microVM metadata service.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<serde_json::Value>,
    /// Firecracker's CPU templates.
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<serde_json::Value>,
}

impl FirecrackerExtras {
    fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("balloon", &self.balloon),
            ("mmds-config", &self.mmds_config),
            ("cpu-config", &self.cpu_config),
        ] {
            if value.is_some() {
                return Err(ConfigError::invalid(
                    field,
                    "is not supported by lockstep; remove it or set it to null".into(),
                ));
            }
        }
        Ok(())
    }

    /// Notices about sections accepted but not acted on.
    pub fn notices(&self) -> Vec<&'static str> {
        let mut notes = Vec::new();
        if self.logger.is_some() {
            notes.push("logger: lockstep logs to stderr (LOCKSTEP_LOG sets the level); the section is ignored");
        }
        if self.metrics.is_some() {
            notes.push("metrics: lockstep serves metrics through its API; the section is ignored");
        }
        notes
    }
}

/// Firecracker's `boot-source` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Path of the guest kernel: an ELF (vmlinux, optionally with a PVH note) or a bzImage.
    pub kernel_image_path: PathBuf,
    /// The kernel command line; lockstep's default is used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initial ramdisk loaded into guest memory and announced to the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// lockstep: how to enter an ELF kernel that offers both a 64-bit entry and a PVH note.
    #[serde(default, skip_serializing_if = "BootProtocol::is_auto")]
    pub boot_protocol: BootProtocol,
}

/// Which boot protocol enters the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the ELF has a PVH note, otherwise the Linux 64-bit entry.
    #[default]
    Auto,
    /// The Linux x86-64 boot protocol's 64-bit entry (always used for bzImages).
    Linux64,
    /// The PVH entry; an error for kernels without a PVH note.
    Pvh,
}

impl BootProtocol {
    fn is_auto(&self) -> bool {
        *self == BootProtocol::Auto
    }
}

/// Firecracker's `machine-config` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Two hardware threads per core in the topology the guest sees.
    #[serde(default)]
    pub smt: bool,
    /// Accepted for Firecracker compatibility; lockstep always tracks dirty pages.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Back guest memory with 2 MiB huge pages.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Firecracker's CPU templates; only `"None"` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: DEFAULT_VCPUS,
            mem_size_mib: DEFAULT_MEM_MIB,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
        }
    }
}

/// Page size backing guest memory (Firecracker's `huge_pages`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Ordinary 4 KiB pages.
    #[default]
    None,
    /// 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// lockstep's `serial` section: where COM1 output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Append the guest's serial output to this file instead of the process's stdout. With a file
    /// the console takes no input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_path: Option<PathBuf>,
    /// An interactive console on this Unix socket: a client that connects sees the output from
    /// then on and types into the guest (one client at a time; a new one takes over). The output
    /// still goes to `output_path` (or stdout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_socket: Option<PathBuf>,
}

impl SerialConfig {
    fn is_default(&self) -> bool {
        *self == SerialConfig::default()
    }
}

/// What the host offers, against which a config is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Physical memory of the host, in MiB.
    pub mem_mib: u64,
    /// The most vCPUs KVM allows in one VM.
    pub max_vcpus: u32,
}

impl VmConfig {
    /// Reads and parses a config file; errors name the file, the field, and the line and column.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses a config from JSON text.
    pub fn from_json(text: &str) -> Result<VmConfig, ConfigError> {
        crate::error::parse_json(text.as_bytes())
    }

    /// Checks every value against lockstep's and the host's limits, and that the files it names
    /// can be read. Checks nothing that needs KVM; writes nothing.
    pub fn validate(&self, host: &HostLimits) -> Result<(), ConfigError> {
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        self.firecracker.validate()?;
        self.machine_config.validate(host)?;
        self.boot_source.validate()?;
        devices::validate(self)?;
        if let Some(path) = &self.serial.output_path {
            validate_output_path("serial.output_path", path)?;
        }
        if let Some(path) = &self.serial.console_socket {
            validate_output_path("serial.console_socket", path)?;
        }
        Ok(())
    }

    /// The name logs and endpoints use for this VM.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("vm")
    }
}

impl MachineConfig {
    fn validate(&self, host: &HostLimits) -> Result<(), ConfigError> {
        let max_vcpus = MAX_VCPUS.min(host.max_vcpus);
        if self.vcpu_count == 0 || self.vcpu_count > max_vcpus {
            return Err(ConfigError::invalid(
                "machine-config.vcpu_count",
                format!(
                    "{} is out of range: a VM has 1 to {max_vcpus} vCPUs here",
                    self.vcpu_count
                ),
            ));
        }
        if self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2) {
            return Err(ConfigError::invalid(
                "machine-config.vcpu_count",
                format!(
                    "{} vCPUs with \"smt\": true; SMT needs 1 or an even number of vCPUs",
                    self.vcpu_count
                ),
            ));
        }
        if self.mem_size_mib < MIN_MEM_MIB {
            return Err(ConfigError::invalid(
                "machine-config.mem_size_mib",
                format!(
                    "{} MiB is too small: a VM needs at least {MIN_MEM_MIB} MiB",
                    self.mem_size_mib
                ),
            ));
        }
        if self.mem_size_mib > host.mem_mib {
            return Err(ConfigError::invalid(
                "machine-config.mem_size_mib",
                format!(
                    "{} MiB is more than this host's {} MiB of memory",
                    self.mem_size_mib, host.mem_mib
                ),
            ));
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => Ok(()),
            Some(other) => Err(ConfigError::invalid(
                "machine-config.cpu_template",
                format!("\"{other}\" is not supported; lockstep offers only \"None\""),
            )),
        }
    }
}

impl BootSource {
    fn validate(&self) -> Result<(), ConfigError> {
        validate_input_file("boot-source.kernel_image_path", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            validate_input_file("boot-source.initrd_path", initrd)?;
        }
        if let Some(args) = &self.boot_args {
            if args.contains('\0') {
                return Err(ConfigError::invalid(
                    "boot-source.boot_args",
                    "contains a NUL character".to_string(),
                ));
            }
            if args.len() > MAX_CMDLINE_LEN {
                return Err(ConfigError::invalid(
                    "boot-source.boot_args",
                    format!(
                        "is {} bytes long; the kernel command line holds at most {MAX_CMDLINE_LEN}",
                        args.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A VM name: 1 to 64 of A-Z a-z 0-9 - _ .
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > 64 || !ok_chars {
        return Err(ConfigError::invalid(
            "name",
            format!("{name:?} is not a valid VM name: use 1 to 64 of A-Z a-z 0-9 - _ ."),
        ));
    }
    Ok(())
}

/// A file the VM reads must exist, be a regular file and be readable by this process. The type
/// is checked before opening so that a FIFO cannot block the check.
pub(crate) fn validate_input_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ConfigError::invalid(field, format!("cannot open {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(ConfigError::invalid(
            field,
            format!("{} is not a regular file", path.display()),
        ));
    }
    File::open(path)
        .map_err(|e| ConfigError::invalid(field, format!("cannot open {}: {e}", path.display())))?;
    Ok(())
}

/// A file the VM will write must be creatable: its folder exists and it is not itself a folder.
fn validate_output_path(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.is_dir() {
        return Err(ConfigError::invalid(
            field,
            format!("{} is a directory", path.display()),
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(ConfigError::invalid(
            field,
            format!("the directory {} does not exist", parent.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    pub(crate) const HOST: HostLimits = HostLimits {
        mem_mib: 4096,
        max_vcpus: 255,
    };

    pub(crate) fn kernel_file() -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().write_all(b"\x7fELF").unwrap();
        f
    }

    fn config_with(kernel: &Path, machine: &str) -> String {
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "machine-config": {machine}}}"#,
            kernel.display()
        )
    }

    #[test]
    fn firecracker_sections_parse() {
        let text = r#"{
            "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
                               "track_dirty_pages": true, "huge_pages": "None"}
        }"#;
        let c = VmConfig::from_json(text).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.machine_config.mem_size_mib, 256);
        assert_eq!(c.boot_source.boot_args.as_deref(), Some("console=ttyS0"));
        assert_eq!(c.boot_source.initrd_path.as_deref(), Some(Path::new("/i")));
    }

    #[test]
    fn machine_config_defaults_to_firecrackers() {
        let c = VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k"}}"#).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 1);
        assert_eq!(c.machine_config.mem_size_mib, 128);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let err =
            VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k", "bootargs": "x"}}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("boot-source"), "{err}");
        assert!(err.contains("unknown field `bootargs`"), "{err}");
    }

    #[test]
    fn unknown_top_level_key_is_refused_and_firecracker_nulls_accepted() {
        let err =
            VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k"}, "bogus": 1}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("unknown field `bogus`"), "{err}");
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "balloon": null, "logger": null, "metrics": null,
                "mmds-config": null, "cpu-config": null}"#,
        )
        .unwrap();
        assert_eq!(c.firecracker, FirecrackerExtras::default());
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "balloon": {"amount_mib": 1}}"#,
        )
        .unwrap();
        let k = kernel_file();
        let mut c = c;
        c.boot_source.kernel_image_path = k.as_path().to_owned();
        assert!(c
            .validate(&HOST)
            .unwrap_err()
            .to_string()
            .starts_with("balloon:"));
    }

    #[test]
    fn syntax_error_gives_line_and_column() {
        let err = VmConfig::from_json("{\n  \"boot-source\": {,\n}").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("column"), "{text}");
    }

    #[test]
    fn wrong_type_names_field() {
        let err = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": "two", "mem_size_mib": 1}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("machine-config.vcpu_count"), "{err}");
    }

    #[test]
    fn trailing_garbage_is_refused() {
        assert!(VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k"}} x"#).is_err());
    }

    #[test]
    fn vcpu_count_limits() {
        let k = kernel_file();
        for (n, ok) in [(0, false), (1, true), (32, true), (33, false)] {
            let c = VmConfig::from_json(&config_with(
                k.as_path(),
                &format!(r#"{{"vcpu_count": {n}, "mem_size_mib": 64}}"#),
            ))
            .unwrap();
            let r = c.validate(&HOST);
            assert_eq!(r.is_ok(), ok, "{n}: {r:?}");
            if let Err(e) = r {
                let text = e.to_string();
                assert!(text.contains("machine-config.vcpu_count"), "{text}");
                assert!(text.contains(&n.to_string()), "{text}");
            }
        }
        let small_host = HostLimits {
            max_vcpus: 2,
            ..HOST
        };
        let c = VmConfig::from_json(&config_with(
            k.as_path(),
            r#"{"vcpu_count": 4, "mem_size_mib": 64}"#,
        ))
        .unwrap();
        assert!(c.validate(&small_host).is_err());
    }

    #[test]
    fn memory_limits() {
        let k = kernel_file();
        for (mib, needle) in [(1, "too small"), (8192, "more than this host's 4096 MiB")] {
            let c = VmConfig::from_json(&config_with(
                k.as_path(),
                &format!(r#"{{"vcpu_count": 1, "mem_size_mib": {mib}}}"#),
            ))
            .unwrap();
            let text = c.validate(&HOST).unwrap_err().to_string();
            assert!(text.contains("machine-config.mem_size_mib"), "{text}");
            assert!(text.contains(needle), "{text}");
        }
    }

    #[test]
    fn missing_kernel_is_named() {
        let c =
            VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/no/such/vmlinux"}}"#)
                .unwrap();
        let text = c.validate(&HOST).unwrap_err().to_string();
        assert!(text.contains("boot-source.kernel_image_path"), "{text}");
        assert!(text.contains("/no/such/vmlinux"), "{text}");
    }

    #[test]
    fn kernel_that_is_a_directory_is_refused() {
        let c = VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/tmp"}}"#).unwrap();
        let text = c.validate(&HOST).unwrap_err().to_string();
        assert!(text.contains("not a regular file"), "{text}");
    }

    #[test]
    fn serial_output_needs_an_existing_directory() {
        let k = kernel_file();
        let text = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "serial": {{"output_path": "/no/such/dir/log"}}}}"#,
            k.as_path().display()
        );
        let c = VmConfig::from_json(&text).unwrap();
        let err = c.validate(&HOST).unwrap_err().to_string();
        assert!(err.contains("serial.output_path"), "{err}");
    }

    #[test]
    fn bad_name_and_template_are_refused() {
        let k = kernel_file();
        let text = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "name": "a b"}}"#,
            k.as_path().display()
        );
        let err = VmConfig::from_json(&text)
            .unwrap()
            .validate(&HOST)
            .unwrap_err();
        assert!(err.to_string().starts_with("name:"), "{err}");

        let c = VmConfig::from_json(&config_with(
            k.as_path(),
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}"#,
        ))
        .unwrap();
        let err = c.validate(&HOST).unwrap_err().to_string();
        assert!(err.contains("machine-config.cpu_template"), "{err}");
    }

    #[test]
    fn smt_needs_even_vcpus() {
        let k = kernel_file();
        let c = VmConfig::from_json(&config_with(
            k.as_path(),
            r#"{"vcpu_count": 3, "mem_size_mib": 64, "smt": true}"#,
        ))
        .unwrap();
        assert!(c.validate(&HOST).is_err());
    }

    #[test]
    fn round_trips_through_json() {
        let c = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k", "boot_args": "a=b"}, "name": "x",
                "serial": {"output_path": "/tmp/x.log"}}"#,
        )
        .unwrap();
        let again = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, again);
    }
}
