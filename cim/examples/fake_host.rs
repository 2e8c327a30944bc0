//! Serves the CIM endpoint for a fake host with N stopped VMs: for trying clients by hand and for
//! the benchmark (which measures this process's memory).
//!
//! cargo run -p lockstep-cim --example fake_host -- --vms 50 --http 127.0.0.1:5988 \
//!     --https 127.0.0.1:5989 --user admin --password secret --state-dir /tmp/cim-state

use std::sync::Arc;

use lockstep_cim::fake_host::FakeHost;
use lockstep_cim::{CimConfig, CimUser};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("LOCKSTEP_LOG", "info")).init();
    let mut config = CimConfig {
        https: None,
        ..CimConfig::default()
    };
    let mut vms = 50;
    let mut user = None;
    let mut password = None;
    let mut state_dir = std::env::temp_dir().join("lockstep-cim-fake");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| die(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--vms" => {
                vms = value()
                    .parse()
                    .unwrap_or_else(|_| die("--vms takes a number"))
            }
            "--http" => {
                config.http = Some(
                    value()
                        .parse()
                        .unwrap_or_else(|_| die("--http takes ADDR:PORT")),
                )
            }
            "--https" => {
                config.https = Some(
                    value()
                        .parse()
                        .unwrap_or_else(|_| die("--https takes ADDR:PORT")),
                )
            }
            "--user" => user = Some(value()),
            "--password" => password = Some(value()),
            "--state-dir" => state_dir = value().into(),
            "--threads" => {
                config.threads = value()
                    .parse()
                    .unwrap_or_else(|_| die("--threads takes a number"))
            }
            "--anonymous" => config.allow_anonymous = true,
            other => die(&format!("unknown argument {other}")),
        }
    }
    if let (Some(name), Some(pw)) = (user, password) {
        let hash = lockstep_cim::hash_password(&pw).unwrap_or_else(|e| die(&e));
        config.users.push(CimUser {
            name,
            password_hash: hash,
        });
    }
    config.hostname = Some("localhost".into());
    let host = Arc::new(FakeHost::with_vms(vms));
    let server =
        lockstep_cim::start(host, config, &state_dir).unwrap_or_else(|e| die(&e.to_string()));
    if let Some(a) = server.https_addr() {
        println!("https={a}");
    }
    if let Some(a) = server.http_addr() {
        println!("http={a}");
    }
    println!("ready");
    loop {
        std::thread::park();
    }
}

fn die(msg: &str) -> ! {
    eprintln!("fake_host: {msg}");
    std::process::exit(2)
}
