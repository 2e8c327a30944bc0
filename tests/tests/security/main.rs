//! Issue #11, "the host is the trust boundary": each module tries one class of attack or
//! mistake on a real `lockstep` process and would fail if the defect came back.

mod seccomp;
