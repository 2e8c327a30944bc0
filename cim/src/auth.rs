//! HTTP Basic authentication against the configured users (argon2 hashes). Verified
//! credentials are cached (so that keep-alive clients do not pay for argon2 on every request);
//! other attempts pass the brake on failed logins (`brake.rs`) and wait for a check on the
//! login threads (`login_pool.rs`). Every check costs one argon2 verification, whether the user
//! exists or not, so that the time taken does not tell which names exist.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::brake::Brake;
use crate::config::{CimLogins, CimUser};
use crate::login_pool::LoginPool;

/// How long a verified password is remembered.
const CACHE_TTL: Duration = Duration::from_secs(600);
/// Most verified credentials remembered.
const CACHE_MAX: usize = 1000;

/// Hashes a password for the config's `password_hash` (argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// A password hash that nothing matches (random salt, random output) with the same algorithm
/// and parameters as `model` (argon2's defaults when there is none), that unknown user names
/// are checked against: the check costs what a real user's does. Nothing is hashed to make it.
fn dummy_hash(model: Option<&str>) -> Result<String, String> {
    let default = format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        argon2::Params::DEFAULT_M_COST,
        argon2::Params::DEFAULT_T_COST,
        argon2::Params::DEFAULT_P_COST,
        "A".repeat(22),
        "A".repeat(43)
    );
    let model = PasswordHash::new(model.unwrap_or(&default))
        .map_err(|e| format!("not a PHC password hash: {e}"))?;
    let salt = SaltString::generate(&mut rand_core::OsRng);
    let mut output = [0u8; 64];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut output);
    let len = model.hash.map_or(32, |h| h.len());
    let hash = argon2::password_hash::Output::new(&output[..len.clamp(10, 64)])
        .map_err(|e| format!("cannot make the dummy password hash: {e}"))?;
    let dummy = PasswordHash {
        algorithm: model.algorithm,
        version: model.version,
        params: model.params.clone(),
        salt: Some(salt.as_salt()),
        hash: Some(hash),
    };
    Ok(dummy.to_string())
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
    /// Not checked: too many attempts pending from the client's subnet, or the login queue is
    /// full. Try again later.
    Busy,
}

/// The users, and the credentials verified recently: what the login threads need.
struct Credentials {
    users: Vec<CimUser>,
    /// Checked for user names that do not exist.
    dummy: String,
    cache_key: [u8; 32],
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Credentials {
    fn digest(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(user.as_bytes());
        h.update([0u8]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn is_verified(&self, digest: &[u8; 32]) -> bool {
        let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(digest).is_some_and(|t| t.elapsed() < CACHE_TTL)
    }

    fn remember(&self, digest: [u8; 32]) {
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, t| t.elapsed() < CACHE_TTL);
        }
        if cache.len() >= CACHE_MAX {
            return;
        }
        cache.insert(digest, Instant::now());
    }

    /// The argon2 check, on a login thread: one verification whether the name exists or not
    /// (against the dummy hash when it does not). Clients that log in in parallel with the
    /// same password find it verified by the first.
    fn check(&self, digest: [u8; 32], user: &str, password: &str) -> bool {
        if self.is_verified(&digest) {
            return true;
        }
        let known = self.users.iter().find(|u| u.name == user);
        let hash = known.map_or(self.dummy.as_str(), |u| u.password_hash.as_str());
        let matches = PasswordHash::new(hash).is_ok_and(|h| verify(&h, password.as_bytes()));
        let ok = matches && known.is_some();
        if ok {
            self.remember(digest);
        }
        ok
    }
}

/// The users and the login bookkeeping.
pub struct Authenticator {
    anonymous: bool,
    credentials: Arc<Credentials>,
    brake: Brake,
    pool: LoginPool,
    checking: Checking,
}

impl Authenticator {
    /// From the config's users and login settings; starts the login threads.
    pub fn new(
        users: Vec<CimUser>,
        anonymous: bool,
        logins: &CimLogins,
    ) -> Result<Authenticator, crate::CimError> {
        let mut cache_key = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut cache_key);
        let dummy = dummy_hash(users.first().map(|u| u.password_hash.as_str()))
            .map_err(crate::CimError::Config)?;
        Ok(Authenticator {
            anonymous,
            credentials: Arc::new(Credentials {
                users,
                dummy,
                cache_key,
                verified: Mutex::new(HashMap::new()),
            }),
            brake: Brake::new(
                Duration::from_millis(logins.delay_step_ms),
                Duration::from_millis(logins.delay_max_ms),
                logins.pending_per_subnet,
            ),
            pool: LoginPool::new(logins.threads, logins.queue).map_err(crate::CimError::Runtime)?,
            checking: Mutex::new(HashMap::new()),
        })
    }

    /// Checks an `Authorization` header value from `addr`. Cached credentials are answered at
    /// once, credentials already being checked get that check's outcome; others wait for the
    /// brake, then for an argon2 check on a login thread, or are refused unchecked (`Busy`)
    /// when too many are pending.
    pub async fn authenticate(&self, header: Option<&str>, addr: IpAddr) -> Verdict {
        let Some(header) = header else {
            return if self.anonymous {
                Verdict::Allowed(None)
            } else {
                Verdict::Missing
            };
        };
        let Some((user, password)) = parse_basic(header) else {
            self.brake.record_failure(addr);
            return Verdict::Denied;
        };
        let digest = self.credentials.digest(&user, &password);
        if self.credentials.is_verified(&digest) {
            return Verdict::Allowed(Some(user));
        }
        // The same credentials already being checked (a client opening several connections
        // at once): wait for that check's outcome rather than check again.
        let leading = {
            let mut checking = self.checking.lock().unwrap_or_else(|p| p.into_inner());
            match checking.get(&digest) {
                Some(outcome) => Err(outcome.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    checking.insert(digest, rx);
                    Ok(Leading {
                        checking: &self.checking,
                        digest,
                        outcome: tx,
                    })
                }
            }
        };
        let leading = match leading {
            Ok(leading) => leading,
            Err(mut outcome) => {
                return match outcome.wait_for(Option::is_some).await.map(|o| *o) {
                    Ok(Some(Checked::Good)) => Verdict::Allowed(Some(user)),
                    Ok(Some(Checked::Bad)) => Verdict::Denied,
                    _ => Verdict::Busy,
                };
            }
        };
        let checked = self.check(digest, &user, password, addr).await;
        let _ = leading.outcome.send(Some(checked));
        match checked {
            Checked::Busy => Verdict::Busy,
            Checked::Good => Verdict::Allowed(Some(user)),
            Checked::Bad => {
                // The user name may be logged; the password never is.
                log::warn!(
                    "cim: failed login as {:?} from {addr}",
                    user.chars().take(64).collect::<String>()
                );
                self.brake.record_failure(addr);
                Verdict::Denied
            }
        }
    }

    /// Passes the brake, then checks on a login thread.
    async fn check(&self, digest: [u8; 32], user: &str, password: String, addr: IpAddr) -> Checked {
        let Some(ticket) = self.brake.admit(addr) else {
            return Checked::Busy;
        };
        if !ticket.wait.is_zero() {
            tokio::time::sleep(ticket.wait).await;
        }
        let credentials = Arc::clone(&self.credentials);
        let name = user.to_string();
        let checked = self
            .pool
            .run(move || credentials.check(digest, &name, &password))
            .await;
        match checked {
            None => Checked::Busy,
            Some(true) => Checked::Good,
            Some(false) => Checked::Bad,
        }
    }
}

/// The outcome of one check, shared with the requests that wait for it.
#[derive(Debug, Clone, Copy)]
enum Checked {
    Good,
    Bad,
    Busy,
}

/// Credentials being checked; the others waiting for the same ones see `outcome`.
type Checking = Mutex<HashMap<[u8; 32], watch::Receiver<Option<Checked>>>>;

/// The request that checks some credentials for all that send them at the moment; its entry
/// goes when it ends (also when it is abandoned: those waiting are then told `Busy`).
struct Leading<'a> {
    checking: &'a Checking,
    digest: [u8; 32],
    outcome: watch::Sender<Option<Checked>>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let mut checking = self.checking.lock().unwrap_or_else(|p| p.into_inner());
        checking.remove(&self.digest);
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

    #[tokio::test(flavor = "current_thread")]
    async fn verify_cache_and_brake() {
        let hash = hash_password("s3cret").unwrap();
        let logins = CimLogins {
            delay_step_ms: 300,
            ..CimLogins::default()
        };
        let users = vec![CimUser {
            name: "admin".into(),
            password_hash: hash,
        }];
        let auth = Authenticator::new(users, false, &logins).unwrap();
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(auth.authenticate(None, addr).await, Verdict::Missing);
        let good = basic("admin", "s3cret");
        assert_eq!(
            auth.authenticate(Some(&good), addr).await,
            Verdict::Allowed(Some("admin".into()))
        );
        let digest = auth.credentials.digest("admin", "s3cret");
        assert!(auth.credentials.is_verified(&digest));
        assert_eq!(
            auth.authenticate(Some(&basic("admin", "wrong")), addr)
                .await,
            Verdict::Denied
        );
        assert_eq!(
            auth.authenticate(Some(&basic("nobody", "s3cret")), addr)
                .await,
            Verdict::Denied
        );
        assert_eq!(
            auth.authenticate(Some("Bearer x"), addr).await,
            Verdict::Denied
        );
        // Three failures: the subnet's attempts are now spaced 900 ms apart, and queue up.
        let first = auth.brake.admit("127.0.0.9".parse().unwrap()).unwrap();
        let second = auth.brake.admit("127.0.0.9".parse().unwrap()).unwrap();
        assert!(
            second.wait >= Duration::from_millis(800),
            "{:?}",
            second.wait
        );
        drop((first, second));
        // The cached password gets in at once, braked subnet or not.
        let start = Instant::now();
        assert!(matches!(
            auth.authenticate(Some(&good), addr).await,
            Verdict::Allowed(_)
        ));
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn the_dummy_hash_has_the_users_parameters() {
        let model = "$argon2id$v=19$m=8192,t=3,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";
        let dummy = dummy_hash(Some(model)).unwrap();
        assert!(
            dummy.starts_with("$argon2id$v=19$m=8192,t=3,p=1$"),
            "{dummy}"
        );
        assert!(dummy_hash(None).unwrap().starts_with("$argon2id$"));
    }
}
