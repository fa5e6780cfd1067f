//! The in-process coordinator of the embedded default: one hive, so leases and claims are maps
//! behind one lock and every operation is atomic under it. Lease expiry follows a clock that
//! tests drive by hand (`ManualClock`); production uses the monotonic clock. Fencing tokens
//! come from one counter per pool, starting at 1 when the process starts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{Claim, CoordError, Coordinator, Lease, observe};

/// A clock moved only by `advance`, for tests of lease expiry without waiting.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

enum Clock {
    Monotonic(Instant),
    Manual(ManualClock),
}

impl Clock {
    fn now_ms(&self) -> u64 {
        match self {
            Clock::Monotonic(start) => start.elapsed().as_millis() as u64,
            Clock::Manual(c) => c.0.load(Ordering::SeqCst),
        }
    }
}

struct HeldLease {
    instance: String,
    token: u64,
    expires_ms: u64,
}

#[derive(Default)]
struct State {
    /// Last token issued per pool (leases and claims alike).
    fences: HashMap<String, u64>,
    /// Token of the newest lease issued per pool, for `check_fence`.
    newest_lease: HashMap<String, u64>,
    leases: HashMap<String, HeldLease>,
    /// (pool, vm) → (handle, token).
    claims: HashMap<(String, String), (String, u64)>,
}

impl State {
    fn next_token(&mut self, pool: &str) -> u64 {
        let t = self.fences.entry(pool.to_string()).or_insert(0);
        *t += 1;
        *t
    }

    /// The live lease on `pool`, dropping it if it has expired.
    fn live_lease(&mut self, pool: &str, now: u64) -> Option<&mut HeldLease> {
        if self.leases.get(pool).is_some_and(|l| l.expires_ms <= now) {
            self.leases.remove(pool);
        }
        self.leases.get_mut(pool)
    }
}

pub struct LocalCoordinator {
    clock: Clock,
    state: Mutex<State>,
}

impl Default for LocalCoordinator {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalCoordinator {
    pub fn new() -> Self {
        LocalCoordinator { clock: Clock::Monotonic(Instant::now()), state: Mutex::new(State::default()) }
    }

    /// A coordinator whose leases expire only as `clock` is advanced.
    pub fn with_clock(clock: ManualClock) -> Self {
        LocalCoordinator { clock: Clock::Manual(clock), state: Mutex::new(State::default()) }
    }

    fn acquire(&self, pool: &str, instance: &str, ttl: Duration) -> Option<Lease> {
        let now = self.clock.now_ms();
        let expires_ms = now + ttl.as_millis() as u64;
        let mut st = self.state.lock();
        if let Some(held) = st.live_lease(pool, now) {
            if held.instance != instance {
                return None;
            }
            held.expires_ms = expires_ms;
            return Some(Lease { pool: pool.into(), instance: instance.into(), token: held.token });
        }
        let token = st.next_token(pool);
        st.newest_lease.insert(pool.into(), token);
        st.leases.insert(pool.into(), HeldLease { instance: instance.into(), token, expires_ms });
        Some(Lease { pool: pool.into(), instance: instance.into(), token })
    }

    fn renew(&self, lease: &Lease, ttl: Duration) -> Result<(), CoordError> {
        let now = self.clock.now_ms();
        let mut st = self.state.lock();
        match st.live_lease(&lease.pool, now) {
            Some(held) if held.instance == lease.instance && held.token == lease.token => {
                held.expires_ms = now + ttl.as_millis() as u64;
                Ok(())
            }
            _ => Err(CoordError::Lost),
        }
    }

    fn release(&self, lease: &Lease) -> Result<(), CoordError> {
        let now = self.clock.now_ms();
        let mut st = self.state.lock();
        match st.live_lease(&lease.pool, now) {
            Some(held) if held.instance == lease.instance && held.token == lease.token => {
                st.leases.remove(&lease.pool);
                Ok(())
            }
            _ => Err(CoordError::Lost),
        }
    }

    fn claim(&self, pool: &str, vm: &str, handle: &str) -> Result<Claim, CoordError> {
        let mut st = self.state.lock();
        let key = (pool.to_string(), vm.to_string());
        if let Some((holder, token)) = st.claims.get(&key) {
            if holder != handle {
                return Err(CoordError::Taken);
            }
            return Ok(Claim { pool: pool.into(), vm: vm.into(), handle: handle.into(), token: *token });
        }
        let token = st.next_token(pool);
        st.claims.insert(key, (handle.to_string(), token));
        Ok(Claim { pool: pool.into(), vm: vm.into(), handle: handle.into(), token })
    }

    fn unclaim(&self, claim: &Claim) -> Result<(), CoordError> {
        let mut st = self.state.lock();
        let key = (claim.pool.clone(), claim.vm.clone());
        match st.claims.get(&key) {
            Some((holder, token)) if *holder == claim.handle && *token == claim.token => {
                st.claims.remove(&key);
                Ok(())
            }
            _ => Err(CoordError::Lost),
        }
    }
}

#[async_trait]
impl Coordinator for LocalCoordinator {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn acquire_lease(&self, pool: &str, instance: &str, ttl: Duration) -> Result<Option<Lease>, CoordError> {
        let started = Instant::now();
        let r = Ok(self.acquire(pool, instance, ttl));
        observe("acquire_lease", started, &r, matches!(r, Ok(None)));
        r
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<(), CoordError> {
        let started = Instant::now();
        let r = self.renew(lease, ttl);
        observe("renew_lease", started, &r, false);
        r
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), CoordError> {
        let started = Instant::now();
        let r = self.release(lease);
        observe("release_lease", started, &r, false);
        r
    }

    async fn lease_holder(&self, pool: &str) -> Result<Option<(String, u64)>, CoordError> {
        let now = self.clock.now_ms();
        let mut st = self.state.lock();
        Ok(st.live_lease(pool, now).map(|l| (l.instance.clone(), l.token)))
    }

    async fn check_fence(&self, pool: &str, token: u64) -> Result<(), CoordError> {
        let newest = self.state.lock().newest_lease.get(pool).copied().unwrap_or(0);
        if token >= newest { Ok(()) } else { Err(CoordError::Lost) }
    }

    async fn claim_vm(&self, pool: &str, vm: &str, handle: &str) -> Result<Claim, CoordError> {
        let started = Instant::now();
        let r = self.claim(pool, vm, handle);
        observe("claim_vm", started, &r, false);
        r
    }

    async fn release_vm(&self, claim: &Claim) -> Result<(), CoordError> {
        let started = Instant::now();
        let r = self.unclaim(claim);
        observe("release_vm", started, &r, false);
        r
    }

    async fn vm_holder(&self, pool: &str, vm: &str) -> Result<Option<(String, u64)>, CoordError> {
        Ok(self.state.lock().claims.get(&(pool.to_string(), vm.to_string())).cloned())
    }

    async fn ping(&self) -> Result<(), CoordError> {
        Ok(())
    }
}
