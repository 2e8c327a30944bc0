//! Real WBEM clients against the endpoint over a fake host: pywbem (scripts), pywbemcli and
//! sblim-wbemcli, over HTTP and HTTPS with Basic authentication.

use std::sync::Arc;

use lockstep_api::control::HostControl;
use lockstep_api::migration::FtRedundancy;
use lockstep_cim::fake_host::FakeHost;
use lockstep_cim::testing::{
    client, have_pywbem, have_pywbemcli, have_wbemcli, pywbemcli, run, run_pywbem, tests_dir,
    wbemcli, wbemcli_as, TestServer,
};

const VM1: &str = "/root/cimv2:LKS_VirtualComputerSystem.CreationClassName=\"LKS_VirtualComputerSystem\",Name=\"vm001\"";

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn pywbem_over_http_every_section() {
    if !have_pywbem() {
        return;
    }
    let s = TestServer::fake(5);
    run_pywbem(&s.http, &["--min-vms", "5"]);
}

#[test]
fn pywbem_over_https() {
    if !have_pywbem() {
        return;
    }
    let s = TestServer::fake(3);
    run_pywbem(
        &s.https,
        &[
            "--only",
            "enum,get,assoc,query,pull,profiles,state,define,auth",
        ],
    );
}

/// Fault-tolerant pairs as CIM_RedundancySet through pywbem (`tests/pywbem_ft.py`): the sets,
/// their associations, Failover refused where it must be and carried out on the primary's set,
/// and the indication of the status change. The host sees exactly one failover, the primary's.
#[test]
fn pywbem_ft_redundancy_sets() {
    if !have_pywbem() {
        return;
    }
    let host = Arc::new(FakeHost::with_vms(3));
    host.start_vm("vm000").unwrap();
    let web = host.add_ft_pairing("vm000", "primary", "web");
    let db = host.add_ft_pairing("vm001", "secondary", "db");
    let old = host.add_ft_pairing("vm002", "primary", "old");
    host.set_ft_redundancy(&old, FtRedundancy::Degraded);
    let s = TestServer::over(host.clone(), Default::default());
    let target = &s.http;
    let mut cmd = client("python3");
    cmd.arg(tests_dir().join("pywbem_ft.py")).args([
        "--url",
        &target.url,
        "--user",
        &target.user,
        "--password",
        &target.password,
    ]);
    let out = run(&mut cmd);
    assert!(out.status.success(), "pywbem FT checks failed");
    assert_eq!(host.failovers(), vec![web]);
    if !have_pywbemcli() {
        return;
    }
    let o = pywbemcli(target, &["instance", "enumerate", "CIM_RedundancySet"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o).matches("instance of LKS_RedundancySet").count(),
        3
    );
    let set = format!("LKS_RedundancySet.InstanceID=\"LKS:ft:db:{db}\"");
    let o = pywbemcli(
        target,
        &[
            "instance",
            "associators",
            &set,
            "--assoc-class",
            "CIM_MemberOfCollection",
            "--names-only",
        ],
    );
    assert!(o.status.success() && stdout(&o).contains("Name=\"vm001\""));
    let o = pywbemcli(
        target,
        &[
            "instance",
            "references",
            VM1,
            "--result-class",
            "CIM_MemberOfCollection",
        ],
    );
    assert!(o.status.success());
    assert_eq!(
        stdout(&o)
            .matches("instance of LKS_MemberOfCollection")
            .count(),
        1
    );
}

#[test]
fn pywbemcli_commands() {
    if !have_pywbemcli() {
        return;
    }
    let s = TestServer::fake(3);
    for target in [&s.http, &s.https] {
        let o = pywbemcli(target, &["class", "get", "LKS_VirtualComputerSystem"]);
        assert!(
            o.status.success()
                && stdout(&o).contains("class LKS_VirtualComputerSystem : CIM_ComputerSystem")
        );
        assert!(stdout(&o).contains("RequestStateChange("));
        let o = pywbemcli(target, &["instance", "enumerate", "CIM_ComputerSystem"]);
        assert!(o.status.success());
        assert_eq!(
            stdout(&o)
                .matches("instance of LKS_VirtualComputerSystem")
                .count(),
            3
        );
        assert_eq!(
            stdout(&o)
                .matches("instance of LKS_HostComputerSystem")
                .count(),
            1
        );
        let o = pywbemcli(
            target,
            &[
                "instance",
                "enumerate",
                "CIM_ComputerSystem",
                "--names-only",
            ],
        );
        assert!(o.status.success() && stdout(&o).contains("Name=\"vm002\""));
        let o = pywbemcli(
            target,
            &[
                "--use-pull",
                "no",
                "instance",
                "query",
                "SELECT Name FROM CIM_ComputerSystem WHERE Name LIKE 'vm00.*'",
            ],
        );
        assert!(o.status.success(), "instance query");
        assert_eq!(
            stdout(&o)
                .matches("instance of LKS_VirtualComputerSystem")
                .count(),
            3
        );
        let o = pywbemcli(
            target,
            &[
                "instance",
                "query",
                "--ql",
                "WQL",
                "SELECT * FROM LKS_VirtualComputerSystem WHERE EnabledState = 3",
            ],
        );
        assert!(
            o.status.success(),
            "instance query over the pull operations"
        );
        let o = pywbemcli(target, &["profile", "list"]);
        assert!(o.status.success());
        for name in [
            "System Virtualization",
            "Virtual System",
            "Resource Allocation",
            "Profile Registration",
        ] {
            assert!(stdout(&o).contains(name), "profile list shows {name}");
        }
        let o = pywbemcli(
            target,
            &["instance", "get", VM1.trim_start_matches("/root/cimv2:")],
        );
        assert!(o.status.success() && stdout(&o).contains("EnabledState = 3"));
    }
    let mut wrong = s.http.clone();
    wrong.password.push('x');
    let o = pywbemcli(&wrong, &["instance", "count", "CIM_ComputerSystem"]);
    assert!(!o.status.success(), "a wrong password is refused");
}

#[test]
fn wbemcli_commands() {
    if !have_wbemcli() {
        return;
    }
    let s = TestServer::fake(3);
    for target in [&s.http, &s.https] {
        let o = wbemcli(target, "ein", "/root/cimv2:CIM_ComputerSystem", &[]);
        assert!(o.status.success());
        assert_eq!(stdout(&o).lines().count(), 4, "three VMs and the host");
        let o = wbemcli(target, "ei", "/root/cimv2:LKS_VirtualComputerSystem", &[]);
        assert!(o.status.success() && stdout(&o).contains("EnabledState=3"));
        let o = wbemcli(target, "gi", VM1, &[]);
        assert!(o.status.success() && stdout(&o).contains("Name=\"vm001\""));
        let o = wbemcli(target, "cm", VM1, &["RequestStateChange.RequestedState=2"]);
        assert!(
            o.status.success() && stdout(&o).contains("RequestStateChange: 0"),
            "start through wbemcli"
        );
        let o = wbemcli(target, "gi", VM1, &[]);
        assert!(stdout(&o).contains("EnabledState=2"), "the VM runs");
        let o = wbemcli(target, "cm", VM1, &["RequestStateChange.RequestedState=3"]);
        assert!(
            o.status.success() && stdout(&o).contains("RequestStateChange: 0"),
            "stop through wbemcli"
        );
        let o = wbemcli(target, "gc", "/root/cimv2:LKS_VirtualComputerSystem", &[]);
        assert!(o.status.success() && stdout(&o).contains("EnabledState="));
        let o = wbemcli_as(
            target,
            "admin",
            "not-the-password",
            "ein",
            "/root/cimv2:CIM_ComputerSystem",
            &[],
        );
        assert!(!o.status.success(), "a wrong password is refused");
        assert!(String::from_utf8_lossy(&o.stderr).contains("username/password"));
    }
}
