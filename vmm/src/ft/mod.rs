//! Fault tolerance (issue #13): a VM paired with a shadow on another host. So far the arbiter
//! that decides which side of a pair is live, on etcd; pairing itself builds on it.

pub mod arbiter;
pub mod gateway;

pub use arbiter::{Arbiter, ArbiterConfig, ArbiterError, FtRecord, Lease, Observed};

#[cfg(test)]
mod tests;
