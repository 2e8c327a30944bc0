//! The FT arbiter (issue #13, point 4) against a real etcd on loopback: of two contenders that
//! saw the same record exactly one wins, every time, whether they are threads or processes; a
//! stale claimant loses and is told who won; an etcd that is gone or frozen makes a claim fail
//! within its timeout, never win; a lease-kept liveness key goes away when the lease is not kept.
//! Hostile answers from a fake etcd are tested in `vmm/src/ft/tests.rs`.

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lockstep_tests::etcd::Etcd;
use lockstep_vmm::ft::{Arbiter, ArbiterConfig, ArbiterError, Observed};

const ROUNDS: u64 = 50;
const TIMEOUT: Duration = Duration::from_secs(2);

/// One round: whatever two claims from `seen` return, exactly one won, the other lost to it,
/// and the record now names the winner at the next epoch.
fn check_round(
    arbiter: &Arbiter,
    pair: &str,
    seen: Option<&Observed>,
    results: [(String, Result<Observed, String>); 2],
) -> Observed {
    let winners: Vec<_> = results.iter().filter(|(_, r)| r.is_ok()).collect();
    assert_eq!(
        winners.len(),
        1,
        "{pair}: not exactly one winner: {results:?}"
    );
    let (winner, won) = winners[0];
    let won = won.clone().unwrap();
    let (loser, lost) = results.iter().find(|(_, r)| r.is_err()).unwrap();
    let lost = lost.clone().unwrap_err();
    assert!(
        lost.contains(&format!("lost to {winner}")),
        "{pair}: {loser} should have lost to {winner}: {lost}"
    );
    let epoch = seen.map_or(1, |s| s.record.epoch + 1);
    assert_eq!(won.record.live, *winner);
    assert_eq!(won.record.epoch, epoch);
    let now = arbiter.read(pair).unwrap().expect("a record after a win");
    assert_eq!(now, won, "{pair}: the record is the winner's");
    now
}

#[test]
fn two_threads_racing_from_the_same_record_one_wins_each_time() {
    let Some(etcd) = Etcd::start("two_threads_racing") else {
        return;
    };
    let arbiter = etcd.arbiter(TIMEOUT);
    let pair = "race-threads";
    let mut seen: Option<Observed> = None;
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|side| {
                let (barrier, arbiter, seen) = (barrier.clone(), arbiter.clone(), seen.clone());
                let me = format!("host-{side}-{round}");
                std::thread::spawn(move || {
                    barrier.wait();
                    let got = arbiter
                        .claim(pair, &me, seen.as_ref())
                        .map_err(|e| e.to_string());
                    (me, got)
                })
            })
            .collect();
        let mut results = handles.into_iter().map(|h| h.join().unwrap());
        let results = [results.next().unwrap(), results.next().unwrap()];
        seen = Some(check_round(&arbiter, pair, seen.as_ref(), results));
    }
    assert_eq!(seen.unwrap().record.epoch, ROUNDS);
}

/// The child side of the process race: does nothing unless started by the test below, which
/// sets the environment; then claims once at the agreed instant and prints the outcome.
#[test]
fn ft_arbiter_child_claim() {
    let Ok(endpoint) = std::env::var("LKS_FT_CHILD_ENDPOINT") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap();
    let arbiter = Arbiter::new({
        let mut c = ArbiterConfig::new(vec![endpoint.parse().unwrap()]);
        c.timeout = TIMEOUT;
        c
    });
    let seen = match var("LKS_FT_CHILD_SEEN").as_str() {
        "" => None,
        s => {
            let (live, rest) = s.split_once(',').unwrap();
            let (epoch, rev) = rest.split_once(',').unwrap();
            Some(Observed {
                record: lockstep_vmm::ft::FtRecord {
                    live: live.into(),
                    epoch: epoch.parse().unwrap(),
                },
                mod_revision: rev.parse().unwrap(),
            })
        }
    };
    let at = Duration::from_millis(var("LKS_FT_CHILD_AT_MS").parse().unwrap());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    if let Some(wait) = at.checked_sub(now) {
        std::thread::sleep(wait);
    }
    match arbiter.claim(
        &var("LKS_FT_CHILD_PAIR"),
        &var("LKS_FT_CHILD_ME"),
        seen.as_ref(),
    ) {
        Ok(won) => println!("CLAIM-RESULT WON {} {}", won.record.epoch, won.mod_revision),
        Err(e) => println!("CLAIM-RESULT ERR {e}"),
    }
}

#[test]
fn two_processes_racing_from_the_same_record_one_wins_each_time() {
    let Some(etcd) = Etcd::start("two_processes_racing") else {
        return;
    };
    let arbiter = etcd.arbiter(TIMEOUT);
    let pair = "race-processes";
    let exe = std::env::current_exe().unwrap();
    let mut seen: Option<Observed> = None;
    for round in 0..ROUNDS {
        let seen_env = seen.as_ref().map_or(String::new(), |s| {
            format!("{},{},{}", s.record.live, s.record.epoch, s.mod_revision)
        });
        // Both start their claim at the same instant, once both processes are up.
        let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_millis(200);
        let children: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|side| {
                let me = format!("proc-{side}-{round}");
                let child = Command::new(&exe)
                    .args([
                        "--exact",
                        "ft_arbiter_child_claim",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env("LKS_FT_CHILD_ENDPOINT", etcd.endpoint().to_string())
                    .env("LKS_FT_CHILD_PAIR", pair)
                    .env("LKS_FT_CHILD_ME", &me)
                    .env("LKS_FT_CHILD_SEEN", &seen_env)
                    .env("LKS_FT_CHILD_AT_MS", at.as_millis().to_string())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                (me, child)
            })
            .collect();
        let mut results = children.into_iter().map(|(me, child)| {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text
                .lines()
                .find_map(|l| l.split_once("CLAIM-RESULT ").map(|(_, r)| r))
                .unwrap_or_else(|| panic!("{me} printed no result: {text}"))
                .to_string();
            let got = match line.strip_prefix("WON ") {
                Some(rest) => {
                    let (epoch, rev) = rest.split_once(' ').unwrap();
                    Ok(Observed {
                        record: lockstep_vmm::ft::FtRecord {
                            live: me.clone(),
                            epoch: epoch.parse().unwrap(),
                        },
                        mod_revision: rev.parse().unwrap(),
                    })
                }
                None => Err(line),
            };
            (me, got)
        });
        let results = [results.next().unwrap(), results.next().unwrap()];
        seen = Some(check_round(&arbiter, pair, seen.as_ref(), results));
    }
}

#[test]
fn a_stale_claimant_loses_and_is_told_who_won() {
    let Some(etcd) = Etcd::start("a_stale_claimant_loses") else {
        return;
    };
    let arbiter = etcd.arbiter(TIMEOUT);
    let pair = "stale";
    assert_eq!(arbiter.read(pair).unwrap(), None);
    let first = arbiter.claim(pair, "host-a", None).unwrap();
    assert_eq!(
        (first.record.live.as_str(), first.record.epoch),
        ("host-a", 1)
    );
    // A claim as if the key were still absent loses to the first.
    let err = arbiter.claim(pair, "host-b", None).unwrap_err();
    assert!(
        matches!(&err, ArbiterError::Lost { winner, epoch: 1, .. } if winner == "host-a"),
        "{err:?}"
    );
    // host-b takes over from what it saw; host-a, still holding its own old view, then loses.
    let second = arbiter.claim(pair, "host-b", Some(&first)).unwrap();
    assert_eq!(second.record.epoch, 2);
    let err = arbiter.claim(pair, "host-a", Some(&first)).unwrap_err();
    assert!(
        err.to_string().contains("lost to host-b (epoch 2)"),
        "{err}"
    );
    assert_eq!(arbiter.read(pair).unwrap(), Some(second.clone()));
    // A view with the right epoch but an old revision is still stale.
    let mut forged = second.clone();
    forged.mod_revision -= 1;
    assert!(matches!(
        arbiter.claim(pair, "host-a", Some(&forged)),
        Err(ArbiterError::Lost { .. })
    ));
    assert_eq!(arbiter.read(pair).unwrap(), Some(second));
}

#[test]
fn with_etcd_gone_or_frozen_a_claim_fails_within_its_timeout() {
    let Some(mut etcd) = Etcd::start("with_etcd_gone_or_frozen") else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let arbiter = etcd.arbiter(timeout);
    let seen = arbiter.claim("gone", "host-a", None).unwrap();
    let bound = timeout + Duration::from_secs(2);

    // Frozen (SIGSTOP): the connection is accepted by the kernel, nothing answers.
    let pid = libc::pid_t::try_from(etcd.pid()).unwrap();
    // SAFETY: signals our own child process, which is alive until `etcd` is dropped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let start = Instant::now();
    let got = arbiter.claim("gone", "host-b", Some(&seen));
    let took = start.elapsed();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(
        matches!(got, Err(ArbiterError::Gateway(_))),
        "a frozen etcd must not give a win or a loss: {got:?}"
    );
    assert!(took < bound, "the claim took {took:?}");
    // The outcome of a claim that timed out is unknown until read: etcd, thawed, may or may not
    // apply the request it had received. Either way the record is whole and one of the two.
    let now = etcd.arbiter(TIMEOUT).read("gone").unwrap().unwrap();
    assert!(
        now == seen || (now.record.live == "host-b" && now.record.epoch == 2),
        "{now:?}"
    );
    let seen = now;

    // Gone: nothing listens any more.
    etcd.kill();
    for me in ["host-b", "host-c"] {
        let start = Instant::now();
        let got = arbiter.claim("gone", me, Some(&seen));
        assert!(
            matches!(got, Err(ArbiterError::Gateway(_))),
            "a dead etcd must not give a win or a loss: {got:?}"
        );
        assert!(start.elapsed() < bound, "{:?}", start.elapsed());
        assert!(arbiter.read("gone").is_err());
    }
}

#[test]
fn a_liveness_key_lives_as_long_as_its_lease_is_kept() {
    let Some(etcd) = Etcd::start("a_liveness_key_lives") else {
        return;
    };
    let arbiter = etcd.arbiter(TIMEOUT);
    let lease = arbiter.grant_lease(Duration::from_secs(2)).unwrap();
    assert!(lease.ttl >= Duration::from_secs(2), "{lease:?}");
    assert!(!arbiter.is_alive("p1", "host-a").unwrap());
    arbiter.announce_alive("p1", "host-a", &lease).unwrap();
    assert!(arbiter.is_alive("p1", "host-a").unwrap());
    assert!(!arbiter.is_alive("p1", "host-b").unwrap());
    assert!(arbiter.keep_alive(&lease).unwrap() > Duration::ZERO);
    // Not kept any more: the key goes when the lease ends (TTL 2 s; 15 s allowed for a busy host).
    let start = Instant::now();
    while arbiter.is_alive("p1", "host-a").unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the key outlived its lease"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = arbiter.keep_alive(&lease).unwrap_err();
    assert!(matches!(err, ArbiterError::LeaseExpired { .. }), "{err:?}");
    assert!(arbiter.announce_alive("p1", "host-a", &lease).is_err());
}
