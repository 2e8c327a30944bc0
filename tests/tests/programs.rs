//! Every program that the tests, the benchmarks, `./demo` and `./test` start is listed in
//! `scripts/host-programs.tsv`, which `scripts/setup-host.sh` installs: the sources are read for
//! the programs they start, so a new one that nobody installs fails here on every machine, not
//! only on a fresh one. And every listed program is installed on this machine.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use lockstep_tests::programs;
use lockstep_tests::repo_path;
use regex::Regex;

/// Programs every Debian 12 system has (its essential packages), which nobody needs to install.
const BASE_SYSTEM: &[&str] = &[
    "apt-get",
    "awk",
    "basename",
    "cat",
    "chmod",
    "cmp",
    "cp",
    "cut",
    "date",
    "dd",
    "dirname",
    "dpkg",
    "dpkg-query",
    "env",
    "find",
    "grep",
    "gzip",
    "head",
    "id",
    "ln",
    "ls",
    "mkdir",
    "mktemp",
    "mv",
    "nproc",
    "readlink",
    "rm",
    "rmdir",
    "sed",
    "seq",
    "sha256sum",
    "sleep",
    "sort",
    "stat",
    "tail",
    "tar",
    "tee",
    "touch",
    "tr",
    "true",
    "false",
    "uname",
    "uniq",
    "wc",
    "xargs",
];

/// Shell words that are not programs: builtins, keywords, and commands run by full path.
const SHELL_WORDS: &[&str] = &[
    ".", ":", "[", "[[", "]]", "alias", "break", "case", "cd", "command", "continue", "declare",
    "do", "done", "echo", "elif", "else", "esac", "eval", "exec", "exit", "export", "fi", "for",
    "function", "hash", "if", "in", "kill", "local", "printf", "pwd", "read", "readonly", "return",
    "set", "shift", "source", "test", "then", "trap", "type", "unset", "until", "wait", "while",
    "{", "}", "!", "time", "mapfile", "let", "shopt", "ulimit", "umask", "getopts",
];

/// Scripts that install what they use themselves (the Linux image build installs its own
/// compiler and tool packages) or run only inside a guest.
const SELF_INSTALLING: &[&str] = &["resources/build-linux-guests.sh", "resources/linux"];

fn files_under(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "corpus" | "artifacts") {
                files_under(&path, exts, out);
            }
        } else if exts.iter().any(|e| name.ends_with(e)) {
            out.push(path);
        }
    }
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo_path(""))
        .unwrap_or(path)
        .display()
        .to_string()
}

fn self_installing(path: &Path) -> bool {
    let rel = relative(path);
    SELF_INSTALLING.iter().any(|s| rel.starts_with(s))
}

/// Programs started by Rust code: `Command::new("x")`, the harness's `command("x")`, the CIM
/// harness's `client("x")`, and `ns.exec(&["x", ...])` / `ns.output(&["x", ...])`.
fn from_rust(text: &str, found: &mut BTreeSet<String>) {
    let re = Regex::new(
        r#"(?:Command::new|programs::command|\bcommand|\bclient)\(\s*"([^"]+)"|\.(?:exec|output)\(\s*&\[\s*"([^"]+)""#,
    )
    .unwrap();
    for c in re.captures_iter(text) {
        let name = c.get(1).or(c.get(2)).unwrap().as_str();
        found.insert(name.to_string());
    }
}

/// Programs started by Python code: the first element of a list given to subprocess, and
/// `shutil.which("x")`.
fn from_python(text: &str, found: &mut BTreeSet<String>) {
    let re = Regex::new(
        r#"(?:Popen|run|check_output|check_call|call)\(\s*\[\s*"([^"]+)"|shutil\.which\(\s*"([^"]+)"\)|^\s*\w*cmd\w* = \[\s*"([^"]+)""#,
    )
    .unwrap();
    for line in text.lines() {
        for c in re.captures_iter(line) {
            let name = c.get(1).or(c.get(2)).or(c.get(3)).unwrap().as_str();
            found.insert(name.to_string());
        }
    }
}

/// Commands that run another program given after their own options.
const WRAPPERS: &[&str] = &["taskset", "timeout", "env", "nice", "setsid"];

/// Programs started by a shell script: the first word of each command, and the program a
/// wrapper (`taskset -c 1 wrk`) runs. Quoted strings, heredoc bodies, comments, `case`
/// patterns, variables, paths, functions and shell words are left out.
fn from_shell(text: &str, found: &mut BTreeSet<String>) {
    let function = Regex::new(r"^\s*([A-Za-z_][\w-]*)\s*\(\)").unwrap();
    let functions: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| function.captures(l).map(|c| c.get(1).unwrap().as_str()))
        .collect();
    let heredoc = Regex::new(r#"<<-?\s*['"]?(\w+)['"]?"#).unwrap();
    let quoted = Regex::new(r#""[^"]*"|'[^']*'|\$\(\([^)]*\)\)"#).unwrap();
    let case_pattern = Regex::new(r"(?:^|\bin\b|;;)\s*[^;()]*\)").unwrap();
    let separators = Regex::new(r"\|\||&&|[|;&`]|\$\(|\(|\bthen\b|\bdo\b|\belse\b|!").unwrap();
    let word = Regex::new(r"^[A-Za-z][\w.+-]*$").unwrap();
    let mut in_heredoc: Option<String> = None;
    for raw in text.lines() {
        if let Some(end) = &in_heredoc {
            if raw.trim() == end {
                in_heredoc = None;
            }
            continue;
        }
        if let Some(c) = heredoc.captures(raw) {
            in_heredoc = Some(c.get(1).unwrap().as_str().to_string());
        }
        if raw.trim_start().starts_with('#') {
            continue;
        }
        let line = quoted.replace_all(raw, "\"\"");
        let line = match line.find(" #") {
            Some(i) => &line[..i],
            None => &line[..],
        };
        let line = case_pattern.replace_all(line, " ");
        for segment in separators.split(&line) {
            // Leading assignments (VAR=value cmd) and redirections are not the program; a
            // wrapper's options and numbers are not either.
            let mut words = segment
                .split_whitespace()
                .filter(|w| !w.contains('=') && !w.starts_with(['<', '>', '2']));
            let mut program = words.next();
            while let Some(w) = program.filter(|w| WRAPPERS.contains(w)) {
                found.insert(w.to_string());
                program = words.find(|w| !w.starts_with('-') && w.parse::<f64>().is_err());
            }
            let Some(first) = program else { continue };
            if !word.is_match(first) || SHELL_WORDS.contains(&first) || functions.contains(first) {
                continue;
            }
            found.insert(first.to_string());
        }
    }
}

/// The programs the project's sources start, with the file that starts each (first seen).
fn started_programs() -> Vec<(String, String)> {
    let root = repo_path("");
    let mut started: Vec<(String, String)> = Vec::new();
    let mut note = |names: BTreeSet<String>, file: &Path| {
        for name in names {
            if !started.iter().any(|(n, _)| *n == name) {
                started.push((name, relative(file)));
            }
        }
    };
    let mut rust = Vec::new();
    for dir in [
        "tests/src",
        "tests/tests",
        "cim/src",
        "cim/tests",
        "api/src",
        "vmm/src",
        "devices/src",
        "src",
    ] {
        files_under(&root.join(dir), &[".rs"], &mut rust);
    }
    // This file names programs in its own examples.
    rust.retain(|f| !f.ends_with("tests/programs.rs"));
    for file in rust {
        let mut names = BTreeSet::new();
        from_rust(&std::fs::read_to_string(&file).unwrap(), &mut names);
        note(names, &file);
    }
    let mut python = Vec::new();
    for dir in ["bench", "cim/tests", "resources"] {
        files_under(&root.join(dir), &[".py"], &mut python);
    }
    for file in python.iter().filter(|f| !self_installing(f)) {
        let mut names = BTreeSet::new();
        from_python(&std::fs::read_to_string(file).unwrap(), &mut names);
        note(names, file);
    }
    let mut shell = vec![root.join("test"), root.join("demo"), root.join(".ci/run")];
    for dir in [
        "bench",
        "scripts",
        "cim/tests",
        "tests/guest",
        "fuzz",
        "cim/fuzz",
        "resources",
    ] {
        files_under(&root.join(dir), &[".sh"], &mut shell);
    }
    for file in shell.iter().filter(|f| !self_installing(f)) {
        let mut names = BTreeSet::new();
        from_shell(&std::fs::read_to_string(file).unwrap(), &mut names);
        note(names, file);
    }
    started
}

#[test]
fn every_program_the_sources_start_is_installed_by_the_setup_script() {
    let started = started_programs();
    eprintln!("programs the sources start: {started:?}");
    // The scan must see the programs it is known to start, or it proves nothing.
    for known in [
        "ip",
        "ping",
        "curl",
        "python3",
        "wbemcli",
        "wrk",
        "qemu-system-x86_64",
    ] {
        assert!(
            started.iter().any(|(n, _)| n == known),
            "the source scan no longer finds `{known}`: {started:?}"
        );
    }
    let unlisted: Vec<String> = started
        .iter()
        .filter(|(name, _)| {
            programs::installer(name).is_none()
                && !BASE_SYSTEM.contains(&name.as_str())
                && name != "lockstep"
        })
        .map(|(name, file)| format!("{name} (started in {file})"))
        .collect();
    assert!(
        unlisted.is_empty(),
        "programs started but not in scripts/host-programs.tsv, so a fresh machine lacks them: \
         {unlisted:?}"
    );
}

#[test]
fn every_listed_program_is_installed_here() {
    let missing: Vec<String> = programs::listed()
        .into_iter()
        .filter(|(name, _)| programs::find(name).is_none())
        .map(|(name, installer)| format!("{name} ({installer})"))
        .collect();
    assert!(
        missing.is_empty(),
        "scripts/setup-host.sh should have installed: {missing:?}"
    );
}

#[test]
fn the_setup_script_installs_from_the_list() {
    let script = std::fs::read_to_string(repo_path("scripts/setup-host.sh")).unwrap();
    assert!(
        script.contains("host-programs.tsv"),
        "setup-host.sh must read the list"
    );
    let test = std::fs::read_to_string(repo_path("test")).unwrap();
    assert!(
        test.contains("scripts/setup-host.sh"),
        "./test must run the setup"
    );
    let demo = std::fs::read_to_string(repo_path("demo")).unwrap();
    assert!(
        demo.contains("scripts/setup-host.sh"),
        "./demo must run the setup"
    );
}
