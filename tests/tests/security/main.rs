//! Issue #11, "the host is the trust boundary": tests that try what an attacker would (hostile
//! files and paths, other local users, network clients) and would fail if a defect came back.
//! One module per area; each test is bounded in time and sends traffic only to loopback.

mod api_tcp;
mod cim_abuse;
mod files;
mod seccomp;
mod snapshot;
