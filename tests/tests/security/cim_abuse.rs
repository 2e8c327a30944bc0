//! The CIM endpoint of a real `lockstep host` under abuse: with 300 idle and slow connections
//! from one address and 200 bad-password requests in flight from a neighbouring subnet, valid
//! clients are still answered within a second. (Each defence has its own test against a fake
//! host in `cim/tests/abuse.rs`.)

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lockstep_cim::testing::raw_http::{availability_under_abuse, basic, Abuse};
use lockstep_tests::host::TestHost;
use lockstep_tests::require_kvm;
use serde_json::json;

const PASSWORD: &str = "abuse-test-pass";

fn hash(password: &str) -> String {
    lockstep_tests::host::hash_password(password)
}

#[test]
fn a_valid_cim_client_is_answered_within_a_second_under_abuse() {
    if !require_kvm("a_valid_cim_client_is_answered_within_a_second_under_abuse") {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = json!({ "cim": {
        "http": format!("127.0.0.1:{port}"),
        "https": null,
        "users": [{ "name": "admin", "password_hash": hash(PASSWORD) }],
    }});
    let host = TestHost::start_with(vec![], extra);
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(to).is_err() {
        assert!(
            Instant::now() < deadline,
            "the CIM endpoint never listened:\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let figures = availability_under_abuse(to, &basic("admin", PASSWORD), &Abuse::ISSUE_FIGURE);
    eprintln!("{figures:#?}");
    assert!(figures.all_valid_ok(), "{figures:#?}\n{}", host.log());
    assert!(
        figures.slowest() < Duration::from_secs(1),
        "slowest valid answer {:?}",
        figures.slowest()
    );
    assert!(figures.abusive_held <= 32, "{figures:#?}");
    assert!(figures.flood_401 + figures.flood_503 > 0, "{figures:#?}");
    // The host logged the refusals, and is still alive.
    assert!(host.log().contains("cim: refusing connections"));
}
