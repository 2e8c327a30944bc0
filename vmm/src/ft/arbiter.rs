//! The FT arbiter: who of a pair's two hosts is live, decided by a compare-and-swap on etcd.
//!
//! A pair's record lives at `/lockstep/ft/<pair-id>` and holds `{"live": "<host id>", "epoch": n}`.
//! A side that wants to go live (a secondary whose primary fell silent, a primary that lost its
//! secondary) calls [`Arbiter::claim`] with the record as it last saw it ([`Arbiter::read`]). The
//! claim is one etcd transaction: if the key's `mod_revision` is still the one observed (or the
//! key is still absent), write `{"live": me, "epoch": n + 1}`; otherwise read the record that
//! beat it. So of any number of contenders that observed the same record, exactly one wins, and
//! every other gets [`ArbiterError::Lost`] naming the winner. Anything short of etcd's
//! "succeeded" (etcd unreachable, a timeout, an answer that cannot be read) is an error, never a
//! win; only a later [`Arbiter::read`] can tell whether such a claim was applied after all.
//!
//! Optional liveness: a host can hold a lease ([`Arbiter::grant_lease`], kept with
//! [`Arbiter::keep_alive`]) and attach `/lockstep/ft/<pair-id>/alive/<host id>` to it
//! ([`Arbiter::announce_alive`]); the key disappears when the lease is not kept.
//!
//! The client speaks to etcd's JSON gateway (etcd 3.4: `/v3/kv/range`, `/v3/kv/txn`,
//! `/v3/kv/put`, `/v3/lease/grant`, `/v3/lease/keepalive`), whose answers are untrusted: see
//! [`super::gateway`].

use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::gateway::{Gateway, GatewayError};

/// Where every pair's record lives in etcd.
pub const KEY_PREFIX: &str = "/lockstep/ft/";
/// The default time a request has to be answered whole.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// The default largest answer body accepted from etcd.
pub const DEFAULT_MAX_RESPONSE: usize = 64 * 1024;
/// The longest pair or host id.
pub const MAX_ID_LEN: usize = 128;

/// What went wrong deciding who is live.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// The record was no longer the one the caller observed: another side claimed first.
    #[error(
        "FT pair {pair}: lost to {winner} (epoch {epoch}): the record changed since it was read"
    )]
    Lost {
        /// The pair.
        pair: String,
        /// The host that is live now.
        winner: String,
        /// The record's epoch now.
        epoch: u64,
    },
    /// The record changed since it was read and has since been deleted.
    #[error("FT pair {pair}: the record changed since it was read and is now gone")]
    Vanished {
        /// The pair.
        pair: String,
    },
    /// A pair or host id that cannot name a key.
    #[error("invalid FT {what} id {id:?}: use 1 to {MAX_ID_LEN} letters, digits, '.', '_' or '-'")]
    BadId {
        /// "pair" or "host".
        what: &'static str,
        /// The id given.
        id: String,
    },
    /// Talking to etcd failed; nothing was won.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// etcd's answer has not the shape its API documents.
    #[error("etcd's answer to {request} cannot be read: {why}")]
    BadAnswer {
        /// The request's path.
        request: &'static str,
        /// What was wrong.
        why: String,
    },
    /// The value at a pair's key is not an FT record.
    #[error("FT pair {pair}: the value in etcd is not an FT record: {source}")]
    BadRecord {
        /// The pair.
        pair: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The record's epoch cannot go up any more.
    #[error("FT pair {pair}: epoch {epoch} cannot be incremented")]
    EpochOverflow {
        /// The pair.
        pair: String,
        /// The record's epoch.
        epoch: u64,
    },
    /// The lease expired (or never existed) before it was kept alive.
    #[error("etcd lease {id:x} has expired")]
    LeaseExpired {
        /// The lease's id.
        id: i64,
    },
}

/// Where etcd is and how patient and trusting to be with it.
#[derive(Clone, Debug)]
pub struct ArbiterConfig {
    /// etcd's client endpoints (its JSON gateway listens on the same ports), tried in order
    /// until one accepts a connection.
    pub endpoints: Vec<SocketAddr>,
    /// The time each request has to be answered whole.
    pub timeout: Duration,
    /// The largest answer body accepted.
    pub max_response: usize,
}

impl ArbiterConfig {
    /// The defaults for `endpoints`: [`DEFAULT_TIMEOUT`], [`DEFAULT_MAX_RESPONSE`].
    pub fn new(endpoints: Vec<SocketAddr>) -> Self {
        Self {
            endpoints,
            timeout: DEFAULT_TIMEOUT,
            max_response: DEFAULT_MAX_RESPONSE,
        }
    }
}

/// A pair's record: who is live, and how many times that has been decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtRecord {
    /// The host id of the live side.
    pub live: String,
    /// Incremented by every successful claim; 1 for the first.
    pub epoch: u64,
}

/// A record as read from etcd, with the revision a claim compares against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The record.
    pub record: FtRecord,
    /// etcd's `mod_revision` of the key when it was read.
    pub mod_revision: i64,
}

/// A lease granted by etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// etcd's lease id.
    pub id: i64,
    /// The time to live etcd granted.
    pub ttl: Duration,
}

/// The etcd client that decides who of a pair is live.
#[derive(Clone, Debug)]
pub struct Arbiter {
    gateway: Gateway,
}

impl Arbiter {
    /// An arbiter on the etcd that `config` names. Nothing is sent until the first call.
    pub fn new(config: ArbiterConfig) -> Self {
        Self {
            gateway: Gateway::new(config.endpoints, config.timeout, config.max_response),
        }
    }

    /// The pair's record, or `None` if no side has claimed it yet.
    pub fn read(&self, pair: &str) -> Result<Option<Observed>, ArbiterError> {
        let key = record_key(pair)?;
        let answer = self
            .gateway
            .post("/v3/kv/range", &json!({ "key": BASE64.encode(&key) }))?;
        observed_in(pair, "/v3/kv/range", &answer)
    }

    /// Makes `me` the pair's live side if the record is still `expected` (`None`: still absent).
    /// On success returns the new record (epoch one more than `expected`'s, 1 for the first).
    /// If another side got there first, [`ArbiterError::Lost`] names it; if etcd cannot be
    /// reached or its answer read, the claim is an error and must be treated as not won. Such an
    /// error leaves the outcome unknown (etcd may have applied a write whose answer was lost):
    /// before acting on it, [`read`](Self::read) the record again; a record naming `me` at the
    /// claimed epoch means the claim did win.
    pub fn claim(
        &self,
        pair: &str,
        me: &str,
        expected: Option<&Observed>,
    ) -> Result<Observed, ArbiterError> {
        const PATH: &str = "/v3/kv/txn";
        let key = BASE64.encode(record_key(pair)?);
        check_id("host", me)?;
        let epoch = match expected {
            None => 1,
            Some(seen) => {
                seen.record
                    .epoch
                    .checked_add(1)
                    .ok_or_else(|| ArbiterError::EpochOverflow {
                        pair: pair.to_string(),
                        epoch: seen.record.epoch,
                    })?
            }
        };
        let record = FtRecord {
            live: me.to_string(),
            epoch,
        };
        let value = serde_json::to_vec(&record).map_err(|source| ArbiterError::BadRecord {
            pair: pair.to_string(),
            source,
        })?;
        let compare = match expected {
            None => json!({
                "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"
            }),
            Some(seen) => json!({
                "key": key, "target": "MOD", "result": "EQUAL",
                "mod_revision": seen.mod_revision.to_string()
            }),
        };
        let txn = json!({
            "compare": [compare],
            "success": [{ "request_put": { "key": key, "value": BASE64.encode(value) } }],
            "failure": [{ "request_range": { "key": key } }],
        });
        let answer = self.gateway.post(PATH, &txn)?;
        let succeeded = match answer.get("succeeded") {
            // The gateway leaves out fields at their zero value: no "succeeded" is false.
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(bad(PATH, format!("\"succeeded\" is {other}"))),
        };
        if succeeded {
            let revision = int_field(answer.get("header"), "revision", PATH)?;
            return Ok(Observed {
                record,
                mod_revision: revision,
            });
        }
        let range = answer
            .get("responses")
            .and_then(Value::as_array)
            .and_then(|r| r.first())
            .and_then(|r| r.get("response_range"))
            .ok_or_else(|| bad(PATH, "a failed compare without the record read after it"))?;
        match observed_in(pair, PATH, range)? {
            Some(now) => Err(ArbiterError::Lost {
                pair: pair.to_string(),
                winner: now.record.live,
                epoch: now.record.epoch,
            }),
            None => Err(ArbiterError::Vanished {
                pair: pair.to_string(),
            }),
        }
    }

    /// A lease of `ttl` (rounded up to whole seconds, at least 1).
    pub fn grant_lease(&self, ttl: Duration) -> Result<Lease, ArbiterError> {
        const PATH: &str = "/v3/lease/grant";
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let answer = self
            .gateway
            .post(PATH, &json!({ "TTL": secs.max(1).to_string() }))?;
        if let Some(error) = answer.get("error") {
            return Err(bad(PATH, format!("etcd refused: {error}")));
        }
        lease_in(&answer, PATH)
    }

    /// Renews `lease`; returns its time to live from now, or [`ArbiterError::LeaseExpired`].
    pub fn keep_alive(&self, lease: &Lease) -> Result<Duration, ArbiterError> {
        const PATH: &str = "/v3/lease/keepalive";
        let answer = self
            .gateway
            .post(PATH, &json!({ "ID": lease.id.to_string() }))?;
        let result = answer
            .get("result")
            .ok_or_else(|| bad(PATH, "no \"result\""))?;
        let renewed = lease_in(result, PATH)?;
        if renewed.ttl.is_zero() {
            return Err(ArbiterError::LeaseExpired { id: lease.id });
        }
        Ok(renewed.ttl)
    }

    /// Puts `/lockstep/ft/<pair>/alive/<me>` under `lease`: the key lives while the lease does.
    pub fn announce_alive(&self, pair: &str, me: &str, lease: &Lease) -> Result<(), ArbiterError> {
        const PATH: &str = "/v3/kv/put";
        let key = alive_key(pair, me)?;
        let answer = self.gateway.post(
            PATH,
            &json!({
                "key": BASE64.encode(key),
                "value": BASE64.encode(me),
                "lease": lease.id.to_string(),
            }),
        )?;
        if answer.get("error").is_some() || answer.get("code").is_some() {
            return Err(ArbiterError::LeaseExpired { id: lease.id });
        }
        int_field(answer.get("header"), "revision", PATH).map(|_| ())
    }

    /// Whether `host`'s liveness key for `pair` exists (its lease is being kept).
    pub fn is_alive(&self, pair: &str, host: &str) -> Result<bool, ArbiterError> {
        const PATH: &str = "/v3/kv/range";
        let key = alive_key(pair, host)?;
        let answer = self.gateway.post(
            PATH,
            &json!({ "key": BASE64.encode(key), "count_only": true }),
        )?;
        let count = match answer.get("count") {
            None => 0,
            Some(_) => int_field(Some(&answer), "count", PATH)?,
        };
        Ok(count > 0)
    }
}

fn bad(request: &'static str, why: impl Into<String>) -> ArbiterError {
    ArbiterError::BadAnswer {
        request,
        why: why.into(),
    }
}

/// Checks that `id` can be part of a key: 1 to [`MAX_ID_LEN`] of `[A-Za-z0-9._-]`.
pub fn check_id(what: &'static str, id: &str) -> Result<(), ArbiterError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ArbiterError::BadId {
            what,
            id: id.chars().take(MAX_ID_LEN + 1).collect(),
        })
    }
}

/// The key of `pair`'s record.
pub fn record_key(pair: &str) -> Result<String, ArbiterError> {
    check_id("pair", pair)?;
    Ok(format!("{KEY_PREFIX}{pair}"))
}

fn alive_key(pair: &str, host: &str) -> Result<String, ArbiterError> {
    check_id("host", host)?;
    Ok(format!("{}/alive/{host}", record_key(pair)?))
}

/// An int64 field, which the gateway writes as a JSON string (or, leniently, a number);
/// absent means zero.
fn int_field(
    object: Option<&Value>,
    field: &str,
    request: &'static str,
) -> Result<i64, ArbiterError> {
    let object = object.ok_or_else(|| bad(request, format!("no object holding \"{field}\"")))?;
    match object.get(field) {
        None => Ok(0),
        Some(Value::String(s)) => s
            .parse::<i64>()
            .map_err(|_| bad(request, format!("\"{field}\" is {s:?}"))),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| bad(request, format!("\"{field}\" is {n}"))),
        Some(other) => Err(bad(request, format!("\"{field}\" is {other}"))),
    }
}

fn lease_in(object: &Value, request: &'static str) -> Result<Lease, ArbiterError> {
    let id = int_field(Some(object), "ID", request)?;
    let ttl = int_field(Some(object), "TTL", request)?;
    let ttl = u64::try_from(ttl).map_err(|_| bad(request, format!("\"TTL\" is {ttl}")))?;
    if id == 0 {
        return Err(bad(request, "no lease \"ID\""));
    }
    Ok(Lease {
        id,
        ttl: Duration::from_secs(ttl),
    })
}

/// The record in a range answer (`kvs` absent or empty: no record).
fn observed_in(
    pair: &str,
    request: &'static str,
    range: &Value,
) -> Result<Option<Observed>, ArbiterError> {
    let kvs = match range.get("kvs") {
        None => return Ok(None),
        Some(Value::Array(kvs)) => kvs,
        Some(other) => return Err(bad(request, format!("\"kvs\" is {other}"))),
    };
    let [kv] = kvs.as_slice() else {
        if kvs.is_empty() {
            return Ok(None);
        }
        return Err(bad(request, format!("{} values for one key", kvs.len())));
    };
    let key = decode(kv.get("key"), "key", request)?;
    if key != record_key(pair)?.as_bytes() {
        return Err(bad(request, "a value for another key"));
    }
    let value = decode(kv.get("value"), "value", request)?;
    let record: FtRecord =
        serde_json::from_slice(&value).map_err(|source| ArbiterError::BadRecord {
            pair: pair.to_string(),
            source,
        })?;
    let mod_revision = int_field(Some(kv), "mod_revision", request)?;
    if mod_revision <= 0 {
        return Err(bad(request, "a value without a mod_revision"));
    }
    Ok(Some(Observed {
        record,
        mod_revision,
    }))
}

fn decode(
    field: Option<&Value>,
    name: &str,
    request: &'static str,
) -> Result<Vec<u8>, ArbiterError> {
    let text = match field {
        // An empty value is left out by the gateway.
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => s,
        Some(other) => return Err(bad(request, format!("\"{name}\" is {other}"))),
    };
    BASE64
        .decode(text)
        .map_err(|e| bad(request, format!("\"{name}\" is not base64: {e}")))
}
