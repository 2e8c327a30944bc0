//! Issue #11, "the host is the trust boundary": tests that try each class of attack on a real
//! `lockstep host` and would fail if the defect came back. One module per area.

mod cim_abuse;
