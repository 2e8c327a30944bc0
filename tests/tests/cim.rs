//! The CIM endpoint of a real host, with real WBEM clients: pywbem's whole script (enumeration,
//! associations, WQL and CQL, pull operations, profiles, RequestStateChange that really starts,
//! pauses, shuts down and stops a booted guest, DefineSystem then starting that VM, indications on
//! a listener), pywbemcli and wbemcli, over HTTP and HTTPS with Basic auth; wrong passwords
//! refused.

use std::time::Duration;

use lockstep_cim::testing::{
    have_pywbem, have_pywbemcli, have_wbemcli, pywbemcli, run_pywbem, wbemcli, wbemcli_as, Target,
};
use lockstep_tests::host::TestHost;
use lockstep_tests::{guest_images, lockstep_bin, require_kvm, VmConfigBuilder};
use serde_json::json;

const USER: &str = "operator";
const PASSWORD: &str = "s3cret-pass";

fn hash(password: &str) -> String {
    lockstep_tests::host::hash_password(password)
}

struct CimHost {
    host: TestHost,
    http: Target,
    https: Target,
}

fn start() -> CimHost {
    let (http_port, https_port) = (lockstep_tests::free_port(), lockstep_tests::free_port());
    let vm = VmConfigBuilder::new(&guest_images().elf)
        .boot_args("lks.mode=halt")
        .vcpus(2)
        .set("name", json!("cimvm"))
        .build();
    let extra = json!({ "cim": {
        "http": format!("127.0.0.1:{http_port}"),
        "https": format!("127.0.0.1:{https_port}"),
        "users": [{ "name": USER, "password_hash": hash(PASSWORD) }],
    }});
    let host = TestHost::start_with(vec![vm], extra);
    let cert = host.dir().join("state/cim/cert.pem");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cert.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no CIM certificate at {}",
            cert.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let target = |url: String, ca| Target {
        url,
        user: USER.into(),
        password: PASSWORD.into(),
        ca_cert: ca,
    };
    CimHost {
        http: target(format!("http://127.0.0.1:{http_port}"), None),
        https: target(format!("https://127.0.0.1:{https_port}"), Some(cert)),
        host,
    }
}

fn pywbem_args<'a>(kernel: &'a str, disk: &'a str) -> Vec<&'a str> {
    vec![
        "--vm",
        "cimvm",
        "--kernel",
        kernel,
        "--cmdline",
        "lks.mode=halt",
        "--disk",
        disk,
        "--tap",
        "lkscimtap0",
        "--state-timeout",
        "60",
    ]
}

#[test]
fn pywbem_script_against_a_real_host_over_http_and_https() {
    if !require_kvm("pywbem_script_against_a_real_host_over_http_and_https") || !have_pywbem() {
        return;
    }
    let cim = start();
    cim.host
        .wait_serial("cimvm", "LKS halt", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("extra.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let kernel = guest_images().elf.display().to_string();
    let disk = disk.display().to_string();
    run_pywbem(&cim.http, &pywbem_args(&kernel, &disk));
    // The guest was really booted again by RequestStateChange (and shut down through Ctrl-Alt-Del).
    let boots = cim
        .host
        .call("GET", "/v1/vms/{name}", "/v1/vms/cimvm", None)
        .json()["boot_count"]
        .as_u64()
        .unwrap();
    assert!(
        boots >= 2,
        "RequestStateChange must boot the guest: boot_count {boots}"
    );
    assert!(
        cim.host.serial("cimvm").contains("LKS ctrl-alt-del"),
        "a graceful shut down asks the guest"
    );
    run_pywbem(
        &cim.https,
        &[
            "--vm",
            "cimvm",
            "--only",
            "enum,get,assoc,query,pull,profiles,errors,auth",
        ],
    );
}

#[test]
fn pywbemcli_and_wbemcli_over_http_and_https() {
    if !require_kvm("pywbemcli_and_wbemcli_over_http_and_https")
        || !have_pywbemcli()
        || !have_wbemcli()
    {
        return;
    }
    let cim = start();
    for target in [&cim.http, &cim.https] {
        let out = pywbemcli(target, &["class", "get", "LKS_VirtualComputerSystem"]);
        assert!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("RequestStateChange")
        );
        let out = pywbemcli(
            target,
            &[
                "instance",
                "enumerate",
                "CIM_ComputerSystem",
                "--pl",
                "Name,EnabledState",
            ],
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("\"cimvm\""),
            "{out:?}"
        );
        let out = pywbemcli(
            target,
            &[
                "instance",
                "query",
                "SELECT Name, EnabledState FROM CIM_ComputerSystem WHERE EnabledState = 2",
            ],
        );
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("cimvm"),
            "{out:?}"
        );
        let out = pywbemcli(
            target,
            &["--default-namespace", "root/interop", "profile", "list"],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("System Virtualization") && text.contains("Virtual System"),
            "{text}"
        );

        let out = wbemcli(target, "ein", "/root/cimv2:CIM_ComputerSystem", &[]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Name=\"cimvm\""),
            "{out:?}"
        );
        let out = wbemcli(target, "ei", "/root/cimv2:LKS_VirtualComputerSystem", &[]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("EnabledState=2"),
            "{out:?}"
        );
        let path = "/root/cimv2:LKS_VirtualComputerSystem.CreationClassName=\"LKS_VirtualComputerSystem\",Name=\"cimvm\"";
        let out = wbemcli(target, "gi", path, &[]);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("cimvm"),
            "{out:?}"
        );
        let refused = wbemcli_as(
            target,
            USER,
            "wrong-password",
            "ein",
            "/root/cimv2:CIM_ComputerSystem",
            &[],
        );
        assert!(
            !String::from_utf8_lossy(&refused.stdout).contains("cimvm"),
            "a wrong password must be refused"
        );
    }
    // wbemcli cm: pause the real guest, then resume it, through RequestStateChange.
    let path = "/root/cimv2:LKS_VirtualComputerSystem.CreationClassName=\"LKS_VirtualComputerSystem\",Name=\"cimvm\"";
    let out = wbemcli(
        &cim.http,
        "cm",
        path,
        &["RequestStateChange.RequestedState=9"],
    );
    assert!(out.status.success(), "{out:?}");
    cim.host
        .wait_state("cimvm", "paused", Duration::from_secs(30));
    wbemcli(
        &cim.http,
        "cm",
        path,
        &["RequestStateChange.RequestedState=2"],
    );
    cim.host
        .wait_state("cimvm", "running", Duration::from_secs(30));
}

/// A bad `cim` section is refused before the host touches anything: the error names the field,
/// and neither the state directory nor the API socket is created.
#[test]
fn a_bad_cim_section_is_refused_and_changes_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (json!({ "http": "127.0.0.1:1", "userz": [] }), "cim.userz"),
        (json!({ "http": "127.0.0.1:1" }), "allow_anonymous"),
        (
            json!({ "http": "not an address", "allow_anonymous": true }),
            "cim.http",
        ),
    ];
    for (section, expected) in cases {
        let config = dir.path().join("host.json");
        let state = dir.path().join("state");
        let socket = dir.path().join("run/api.sock");
        std::fs::write(
            &config,
            json!({ "api_socket": socket, "state_dir": state, "cim": section }).to_string(),
        )
        .unwrap();
        let out = std::process::Command::new(lockstep_bin())
            .args(["host", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{section}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{section}: the error must name {expected}: {stderr}"
        );
        assert!(
            !state.exists() && !socket.exists(),
            "{section}: files were created"
        );
    }
}
