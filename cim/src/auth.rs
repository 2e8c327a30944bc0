//! HTTP Basic authentication against the configured users (argon2 hashes), with a cache of
//! recently verified credentials (so that keep-alive clients do not pay for argon2 on every
//! request) and a per-address brake on failed logins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::config::CimUser;

/// How long a verified password is remembered.
const CACHE_TTL: Duration = Duration::from_secs(600);
/// Extra wait per recent failure from one address, and the most it grows to.
const FAILURE_STEP: Duration = Duration::from_millis(250);
const FAILURE_MAX: Duration = Duration::from_secs(4);
/// Failures are forgotten after this long without another.
const FAILURE_MEMORY: Duration = Duration::from_secs(900);
/// Most addresses remembered.
const MAX_TRACKED: usize = 10_000;

/// Hashes a password for the config's `password_hash` (argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// The result of checking a request's credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let in, as this user (`None` when anonymous).
    Allowed(Option<String>),
    /// No credentials sent.
    Missing,
    /// Wrong user or password, or a malformed header.
    Denied,
}

struct Failures {
    count: u32,
    last: Instant,
    /// No attempt from this address is checked before this moment.
    next_allowed: Instant,
}

/// The users and the login bookkeeping.
pub struct Authenticator {
    users: Vec<CimUser>,
    anonymous: bool,
    cache_key: [u8; 32],
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// One argon2 check at a time: bounds the CPU and memory logins can take, and lets
    /// clients that log in in parallel with the same password wait for the first check.
    checking: Mutex<()>,
}

impl Authenticator {
    /// From the config's users.
    pub fn new(users: Vec<CimUser>, anonymous: bool) -> Authenticator {
        let mut cache_key = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut cache_key);
        Authenticator {
            users,
            anonymous,
            cache_key,
            verified: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            checking: Mutex::new(()),
        }
    }

    /// How long a request from `addr` must wait before its credentials are checked: nothing
    /// for an address without recent failures; otherwise attempts are spaced out, each failure
    /// widening the gap. Reserves the slot, so parallel attempts queue up.
    pub fn delay_for(&self, addr: IpAddr) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let Some(f) = map.get_mut(&addr) else {
            return Duration::ZERO;
        };
        if now.duration_since(f.last) > FAILURE_MEMORY {
            map.remove(&addr);
            return Duration::ZERO;
        }
        let gap = (FAILURE_STEP * f.count).min(FAILURE_MAX);
        let start = f.next_allowed.max(now);
        f.next_allowed = start + gap;
        start - now
    }

    fn record_failure(&self, addr: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() >= MAX_TRACKED {
            map.retain(|_, f| now.duration_since(f.last) < FAILURE_MEMORY);
        }
        if map.len() >= MAX_TRACKED {
            // Still full: forget the oldest entries rather than grow.
            let mut ages: Vec<(IpAddr, Instant)> = map.iter().map(|(a, f)| (*a, f.last)).collect();
            ages.sort_by_key(|(_, t)| *t);
            for (a, _) in ages.into_iter().take(MAX_TRACKED / 10) {
                map.remove(&a);
            }
        }
        let f = map.entry(addr).or_insert(Failures {
            count: 0,
            last: now,
            next_allowed: now,
        });
        f.count = f.count.saturating_add(1);
        f.last = now;
    }

    fn record_success(&self, addr: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&addr);
    }

    fn cache_digest(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(user.as_bytes());
        h.update([0u8]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Checks an `Authorization` header value. Blocks for an argon2 verification when the
    /// credentials are not cached: call it off the I/O threads.
    pub fn check(&self, header: Option<&str>, addr: IpAddr) -> Verdict {
        let Some(header) = header else {
            return if self.anonymous {
                Verdict::Allowed(None)
            } else {
                Verdict::Missing
            };
        };
        let Some((user, password)) = parse_basic(header) else {
            self.record_failure(addr);
            return Verdict::Denied;
        };
        let digest = self.cache_digest(&user, &password);
        let cached = || {
            let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(&digest).is_some_and(|t| t.elapsed() < CACHE_TTL)
        };
        if cached() {
            return Verdict::Allowed(Some(user));
        }
        let serial = self.checking.lock().unwrap_or_else(|p| p.into_inner());
        if cached() {
            return Verdict::Allowed(Some(user));
        }
        let ok = self.users.iter().any(|u| {
            u.name == user
                && PasswordHash::new(&u.password_hash)
                    .is_ok_and(|h| verify(&h, password.as_bytes()))
        });
        if ok {
            let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 1000 {
                cache.retain(|_, t| t.elapsed() < CACHE_TTL);
            }
            cache.insert(digest, Instant::now());
            drop(cache);
            drop(serial);
            self.record_success(addr);
            Verdict::Allowed(Some(user))
        } else {
            // The user name may be logged; the password never is.
            log::warn!(
                "cim: failed login as {:?} from {addr}",
                user.chars().take(64).collect::<String>()
            );
            self.record_failure(addr);
            Verdict::Denied
        }
    }

    /// Whether the credentials are known good without an argon2 check (the fast path).
    pub fn is_cached(&self, header: Option<&str>) -> bool {
        let Some((user, password)) = header.and_then(parse_basic) else {
            return false;
        };
        let digest = self.cache_digest(&user, &password);
        let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(&digest).is_some_and(|t| t.elapsed() < CACHE_TTL)
    }
}

/// Anonymous memory for argon2's blocks, mapped for one check and unmapped after: the heap
/// would keep 19 MiB per thread that ever checked a password.
struct BlockMemory {
    ptr: *mut libc::c_void,
    len: usize,
    blocks: usize,
}

impl BlockMemory {
    fn new(blocks: usize) -> Option<BlockMemory> {
        let len = blocks.checked_mul(std::mem::size_of::<argon2::Block>())?;
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(BlockMemory { ptr, len, blocks })
    }
}

impl AsMut<[argon2::Block]> for BlockMemory {
    fn as_mut(&mut self) -> &mut [argon2::Block] {
        // SAFETY: the mapping is `blocks` Blocks long, page-aligned (Block needs 64), zero-filled
        // (all zeros is a valid Block: it is plain u64s) and lives as long as `self`, which this
        // exclusive borrow ties the slice to.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<argon2::Block>(), self.blocks) }
    }
}

impl Drop for BlockMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing borrows any more.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Checks a password against a PHC argon2 hash, with the work memory outside the heap.
fn verify(hash: &PasswordHash<'_>, password: &[u8]) -> bool {
    let check = || -> Option<bool> {
        let algorithm = argon2::Algorithm::try_from(hash.algorithm).ok()?;
        let version = match hash.version {
            Some(v) => argon2::Version::try_from(v).ok()?,
            None => argon2::Version::default(),
        };
        let params = argon2::Params::try_from(hash).ok()?;
        let mut salt_buf = [0u8; 64];
        let salt = hash.salt?.decode_b64(&mut salt_buf).ok()?;
        let expected = hash.hash?;
        let mut out = vec![0u8; expected.len()];
        let memory = BlockMemory::new(params.block_count())?;
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(password, salt, &mut out, memory)
            .ok()?;
        // Output's equality is constant-time.
        Some(argon2::password_hash::Output::new(&out).ok()? == expected)
    };
    check().unwrap_or(false)
}

/// `Basic base64(user:password)` to its parts.
fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || rest.len() > 4096 {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    }

    #[test]
    fn verify_cache_and_brake() {
        let hash = hash_password("s3cret").unwrap();
        let auth = Authenticator::new(
            vec![CimUser {
                name: "admin".into(),
                password_hash: hash,
            }],
            false,
        );
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(auth.check(None, addr), Verdict::Missing);
        assert_eq!(
            auth.check(Some(&basic("admin", "s3cret")), addr),
            Verdict::Allowed(Some("admin".into()))
        );
        assert!(auth.is_cached(Some(&basic("admin", "s3cret"))));
        assert_eq!(auth.delay_for(addr), Duration::ZERO);
        assert_eq!(
            auth.check(Some(&basic("admin", "wrong")), addr),
            Verdict::Denied
        );
        assert_eq!(auth.check(Some("Bearer x"), addr), Verdict::Denied);
        // Two failures: attempts are now spaced 500 ms apart, and queue up.
        assert_eq!(auth.delay_for(addr), Duration::ZERO);
        let second = auth.delay_for(addr);
        assert!(second >= Duration::from_millis(400), "{second:?}");
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(auth.delay_for(other), Duration::ZERO);
    }
}
