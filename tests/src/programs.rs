//! The programs the tests start besides lockstep, from one list: `scripts/host-programs.tsv`,
//! which `scripts/setup-host.sh` installs. A program missing from the host fails the test with its
//! name and the package that brings it; a program missing from the list fails on every machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The list that `scripts/setup-host.sh` installs from.
pub const HOST_PROGRAMS: &str = include_str!("../../scripts/host-programs.tsv");

/// Every `(program, installer)` in the list; the installer is a Debian package, `pip:NAME` or
/// `rustup`.
pub fn listed() -> Vec<(&'static str, &'static str)> {
    HOST_PROGRAMS
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, i)| (p.trim(), i.trim()))
        .collect()
}

/// What installs `program`, if it is listed.
pub fn installer(program: &str) -> Option<&'static str> {
    listed()
        .into_iter()
        .find(|(p, _)| *p == program)
        .map(|(_, i)| i)
}

/// Where `program` is on `PATH`, if anywhere.
pub fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The path of `program`; panics, naming it and its package, if it is not listed in
/// `scripts/host-programs.tsv` or not installed.
pub fn require(program: &str) -> PathBuf {
    let Some(installer) = installer(program) else {
        panic!(
            "the tests start `{program}`, which scripts/host-programs.tsv does not list: \
             add it with the package that installs it, so scripts/setup-host.sh installs it"
        );
    };
    find(program).unwrap_or_else(|| {
        panic!(
            "`{program}` is not installed (it comes with {installer}): \
             run scripts/setup-host.sh, or ./test, which runs it"
        )
    })
}

/// A command for `program`, checked with [`require`] first.
pub fn command(program: &str) -> Command {
    Command::new(require(program))
}

/// Runs `cmd` to completion; a program that cannot be started fails the test with the reason.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses_and_names_an_installer_for_each_program() {
        let listed = listed();
        assert!(listed
            .iter()
            .any(|(p, i)| *p == "ping" && *i == "iputils-ping"));
        for (program, installer) in listed {
            assert!(!program.is_empty() && !installer.is_empty());
            assert!(!program.contains(char::is_whitespace), "{program}");
        }
    }

    #[test]
    #[should_panic(expected = "does not list")]
    fn an_unlisted_program_is_refused_on_every_machine() {
        require("sh-but-not-listed");
    }
}
