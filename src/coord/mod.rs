//! Coordination between hive instances: a lease per pool (one instance at a time runs a pool's
//! manager; the others ask `lease_holder` and forward to it) and claims on VMs (one handle at a
//! time holds a VM). Every lease and claim carries a fencing token from one counter per pool,
//! so tokens rise strictly across holders and a stale holder is told apart by its smaller token.
//! `local` is the in-process coordinator of the embedded default; `redis` shares the same
//! guarantees between processes. Errors say whether the server could not be reached
//! (`Unavailable`, for a 503 naming the cause) or the lease/claim is no longer ours (`Lost`).

pub mod local;
pub mod redis;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

pub use self::redis::RedisCoordinator;
pub use local::{LocalCoordinator, ManualClock};

use crate::config::CoordConfig;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CoordError {
    /// The coordination server could not be reached or did not answer in time.
    #[error("coordination unavailable: {0}")]
    Unavailable(String),
    /// The lease or claim is no longer ours: it expired, was released, or another holder has it.
    #[error("lease or claim lost to another holder")]
    Lost,
    /// The VM is claimed by another handle.
    #[error("VM already claimed by another handle")]
    Taken,
    /// The server answered something we did not expect (a bug or a foreign key in our space).
    #[error("coordination protocol: {0}")]
    Protocol(String),
    #[error("coordination config: {0}")]
    Config(String),
}

/// The right to run one pool's manager until `renew_lease` fails. `token` rises strictly per
/// pool across holders: pass it along with writes so a stale holder can be refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub pool: String,
    pub instance: String,
    pub token: u64,
}

/// One handle's hold on one VM until `release_vm`. `token` comes from the pool's counter, so a
/// newer claim on the same VM always has a larger one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub pool: String,
    pub vm: String,
    pub handle: String,
    pub token: u64,
}

#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// "local" or "redis", for logs and `/readyz`.
    fn kind(&self) -> &'static str;

    /// Take `pool`'s lease for `ttl` if nobody holds it: `None` while another instance does.
    /// Asking again for a lease `instance` already holds renews and returns it (a retry after
    /// a timed-out call that did take it), so instance ids must be unique per process.
    async fn acquire_lease(&self, pool: &str, instance: &str, ttl: Duration) -> Result<Option<Lease>, CoordError>;

    /// Extend the lease to `ttl` from now; `Lost` if it expired or another instance holds it.
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<(), CoordError>;

    /// Give the lease up now; `Lost` if it was no longer ours (nothing else is touched).
    async fn release_lease(&self, lease: &Lease) -> Result<(), CoordError>;

    /// Who holds `pool`'s lease now, with its token: where a non-holder forwards.
    async fn lease_holder(&self, pool: &str) -> Result<Option<(String, u64)>, CoordError>;

    /// `Ok` while no lease on `pool` newer than `token` has been issued; `Lost` once one has,
    /// so a holder that was paused past its lease learns it before acting.
    async fn check_fence(&self, pool: &str, token: u64) -> Result<(), CoordError>;

    /// Claim `vm` for `handle`; `Taken` if another handle holds it. Claiming again for the
    /// same handle returns the same claim (retries are safe). Claims do not expire.
    async fn claim_vm(&self, pool: &str, vm: &str, handle: &str) -> Result<Claim, CoordError>;

    /// Release the claim if it is still this one (same handle and token); `Lost` otherwise,
    /// and a newer claim on the VM stays untouched.
    async fn release_vm(&self, claim: &Claim) -> Result<(), CoordError>;

    /// Which handle holds `vm`, with the claim's token.
    async fn vm_holder(&self, pool: &str, vm: &str) -> Result<Option<(String, u64)>, CoordError>;

    /// Whether the server answers, for `/readyz`.
    async fn ping(&self) -> Result<(), CoordError>;
}

/// The coordinator the config asks for: Redis when `coord.redis_url` is set, else in-process.
/// Does not connect: a hive starts while Redis is down and `/readyz` says so. Call inside a
/// Tokio runtime.
pub fn from_config(cfg: &CoordConfig) -> Result<Arc<dyn Coordinator>, CoordError> {
    use secrecy::ExposeSecret;
    match &cfg.redis_url {
        Some(url) => {
            let timeout = Duration::from_millis(cfg.op_timeout_ms);
            Ok(Arc::new(RedisCoordinator::new(url.expose_secret(), timeout)?))
        }
        None => Ok(Arc::new(LocalCoordinator::new())),
    }
}

/// Count and time one operation. `outcome` is from a fixed set: ok, refused, lost, taken,
/// unavailable, error.
pub(crate) fn observe<T>(op: &'static str, started: Instant, result: &Result<T, CoordError>, refused: bool) {
    let outcome = match result {
        Ok(_) if refused => "refused",
        Ok(_) => "ok",
        Err(CoordError::Lost) => "lost",
        Err(CoordError::Taken) => "taken",
        Err(CoordError::Unavailable(_)) => "unavailable",
        Err(_) => "error",
    };
    crate::metrics::coord_op(op, outcome, started.elapsed().as_secs_f64());
}
