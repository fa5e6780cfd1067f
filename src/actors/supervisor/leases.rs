//! Pool leases: a pool's manager runs on the instance that holds the pool's lease, and only
//! while it does. With the in-process coordinator (one hive) every lease is taken once, for
//! good. With a shared one (Redis) the supervisor ticks every tenth of the lease time: it
//! renews the leases it holds every third of it, gives a pool up (stops its manager) when the
//! lease was lost or could not be renewed before it would expire, and tries to take every other
//! pool, so a pool whose holder died is taken over as soon as its lease expires. A manager
//! starts only under a lease and first takes the pool's fence in the store, so writes of an
//! earlier holder that outlived its lease are refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use tokio::time::Instant;

use super::{HiveMsg, HiveState, retry_start};
use crate::actors::pool::PoolHandle;
use crate::coord::{CoordError, Coordinator, Lease};
use crate::metrics;

/// A lease that never needs renewing: the in-process coordinator serves one hive.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub struct Leases {
    pub coord: Arc<dyn Coordinator>,
    /// This process among the instances: `<advertised URL>#<random>`, so a restarted
    /// instance at the same address is a new holder.
    pub instance: String,
    pub ttl: Duration,
    held: HashMap<String, Held>,
}

struct Held {
    lease: Lease,
    /// When the last successful renewal (or the acquisition) was sent.
    renewed: Instant,
}

/// The advertised URL inside an instance id.
pub fn instance_url(instance: &str) -> &str {
    instance.split('#').next().unwrap_or(instance)
}

impl Leases {
    pub fn new(coord: Arc<dyn Coordinator>, instance: String, ttl: Duration) -> Leases {
        Leases { coord, instance, ttl, held: HashMap::new() }
    }

    /// Leases expire and are contended: another instance may hold a pool.
    pub fn shared(&self) -> bool {
        self.coord.kind() != "local"
    }

    pub fn token(&self, pool: &str) -> Option<u64> {
        self.held.get(pool).map(|h| h.lease.token)
    }

    pub fn tick_every(&self) -> Duration {
        (self.ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    pub fn forget(&mut self, pool: &str) {
        self.held.remove(pool);
    }

    /// Give the lease back at once (pool deleted, shutdown), so nobody waits for it to expire.
    pub async fn release(&mut self, pool: &str) {
        if let Some(h) = self.held.remove(pool) {
            metrics::lease_change(pool, "released");
            if let Err(e) = self.coord.release_lease(&h.lease).await {
                tracing::debug!(pool, error = %e, "lease not released");
            }
        }
    }
}

/// Take `pool`'s lease and start its manager, or note who runs it (the pool's slot then
/// answers with that, for calls that are not forwarded).
pub(super) async fn take_or_follow(me: &ActorRef<HiveMsg>, st: &mut HiveState, pool: PoolHandle) {
    let name = pool.name().to_string();
    metrics::lease_seen(&name);
    let ttl = if st.leases.shared() { st.leases.ttl } else { FOREVER };
    let sent = Instant::now();
    match st.leases.coord.acquire_lease(&name, &st.leases.instance, ttl).await {
        Ok(Some(lease)) => {
            tracing::info!(pool = %name, token = lease.token, "took the pool's lease; starting its manager");
            metrics::lease_change(&name, "acquired");
            st.leases.held.insert(name, Held { lease, renewed: sent });
            // Requests that arrive while the manager loads wait for it rather than being told
            // who held the pool before.
            pool.slot().clear_down();
            retry_start(me, st, pool).await;
        }
        Ok(None) => {
            let holder = match st.leases.coord.lease_holder(&name).await {
                Ok(Some((who, _))) => format!("run by the instance at {}", instance_url(&who)),
                Ok(None) => "its lease is being taken over".to_string(),
                Err(e) => e.to_string(),
            };
            pool.slot().set_down(holder);
        }
        Err(e) => pool.slot().set_down(e.to_string()),
    }
}

/// Stop running `pool` here: its lease is gone or could not be kept.
fn give_up(st: &mut HiveState, pool: &PoolHandle, why: String) {
    tracing::warn!(pool = %pool.name(), reason = %why, "giving the pool up");
    metrics::lease_change(pool.name(), "lost");
    st.leases.forget(pool.name());
    pool.slot().set_down(why.clone());
    if let Some(a) = pool.slot().get() {
        pool.slot().set(None);
        pool.slot().set_down(why.clone());
        a.stop(Some(why));
    }
}

/// Before restarting a manager under a lease it already had: is the lease still ours? A
/// manager started without this check would take the fence from the pool's real holder.
pub(super) async fn still_held(st: &mut HiveState, pool: &PoolHandle) -> bool {
    if !st.leases.shared() {
        return st.leases.held.contains_key(pool.name());
    }
    let Some(h) = st.leases.held.get(pool.name()) else { return false };
    let (lease, sent) = (h.lease.clone(), Instant::now());
    match st.leases.coord.renew_lease(&lease, st.leases.ttl).await {
        Ok(()) => {
            if let Some(h) = st.leases.held.get_mut(pool.name()) {
                h.renewed = sent;
            }
            true
        }
        Err(CoordError::Lost) => {
            give_up(st, pool, "its lease moved to another instance".into());
            false
        }
        Err(e) => {
            pool.slot().set_down(e.to_string());
            false
        }
    }
}

/// One tick of a shared coordinator: learn pools made or deleted elsewhere, renew, take over.
pub(super) async fn tick(me: &ActorRef<HiveMsg>, st: &mut HiveState) {
    if let Ok(stored) = st.args.template.writer.store().pool_names().await {
        let names: std::collections::BTreeSet<String> = stored.into_iter().collect();
        for gone in st.args.pools.list().into_iter().filter(|p| !names.contains(p.name())) {
            give_up(st, &gone, "the pool was deleted".into());
            st.args.pools.remove(gone.name());
        }
        for name in names {
            st.args.pools.insert_if_absent(&name, st.args.template.call_timeout);
        }
    }
    sync_node_admin(st).await;
    let ttl = st.leases.ttl;
    // Give up early enough that the lease cannot expire while this manager still acts.
    let last_chance = ttl.saturating_sub(st.leases.tick_every() * 2 + st.leases.coord_timeout());
    for pool in st.args.pools.list() {
        let Some(h) = st.leases.held.get(pool.name()) else {
            take_or_follow(me, st, pool).await;
            continue;
        };
        if h.renewed.elapsed() < ttl / 3 {
            continue;
        }
        let (lease, last, sent) = (h.lease.clone(), h.renewed, Instant::now());
        match st.leases.coord.renew_lease(&lease, ttl).await {
            Ok(()) => {
                if let Some(h) = st.leases.held.get_mut(pool.name()) {
                    h.renewed = sent;
                }
            }
            Err(CoordError::Lost) => give_up(st, &pool, "its lease expired and moved to another instance".into()),
            Err(e) if last.elapsed() >= last_chance => give_up(st, &pool, format!("its lease could not be renewed: {e}")),
            Err(e) => tracing::warn!(pool = %pool.name(), error = %e, "lease renewal failed; retrying"),
        }
    }
}

/// An admin's cordon, drain or activate is sent to one instance, which records it; the others
/// take it from the store here, within a tick, so pools run anywhere respect it.
async fn sync_node_admin(st: &HiveState) {
    let Ok(stored) = st.args.template.writer.store().load_nodes().await else { return };
    let Ok(views) = st.args.nodes.list().await else { return };
    for v in views.iter().filter(|v| v.remote) {
        let Some(r) = stored.iter().find(|r| r.id == v.id) else { continue };
        match crate::domain::node::AdminState::parse(&r.admin) {
            Some(admin) if admin != v.admin => {
                tracing::info!(node.id = v.id, admin = admin.name(), "node admin state changed through another instance");
                if let Err(e) = st.args.nodes.adopt_admin(v.id, admin).await {
                    tracing::warn!(node.id = v.id, error = %e, "cannot apply the node's admin state");
                }
            }
            _ => {}
        }
    }
}

impl Leases {
    fn coord_timeout(&self) -> Duration {
        // Every call is bounded by the coordinator's own timeout; a tenth of the lease is a
        // safe stand-in when it is not known here.
        self.ttl / 10
    }
}
