//! `HiveSupervisor`: the root of the actor tree. It starts the node registry and one pool
//! manager per stored pool, keeps the directory of pools that HTTP handlers look names up in,
//! and restarts a failed child from the store (at most N times in T, then it fails itself,
//! which ends the process with an error rather than leaving it half alive). A pool's manager
//! runs only under the pool's lease (`leases.rs`).

mod leases;

pub use leases::instance_url;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::node::{NodeRegistry, NodeRegistryHandle, NodeSpec, RegistryArgs, remote_spec};
use super::pool::{PoolArgs, PoolError, PoolHandle, PoolManager, PoolMsg};
use super::{Clock, RestartLog, RestartPolicy, Slot};
use crate::coord::Coordinator;
use crate::domain::node::NodeTimings;
use crate::domain::pool::{PoolRules, PoolSize};
use crate::drivers::VmSpec;
use crate::metrics;
use crate::store::{Change, StoreWriter};

/// Pool name → handle, readable without a round trip through the supervisor.
#[derive(Clone, Default)]
pub struct PoolDirectory {
    pools: Arc<RwLock<BTreeMap<String, PoolHandle>>>,
}

impl PoolDirectory {
    pub fn get(&self, name: &str) -> Result<PoolHandle, PoolError> {
        self.pools.read().get(name).cloned().ok_or_else(|| PoolError::NoSuchPool(name.to_string()))
    }

    pub fn list(&self) -> Vec<PoolHandle> {
        self.pools.read().values().cloned().collect()
    }

    fn remove(&self, name: &str) {
        self.pools.write().remove(name);
    }

    /// A pool made by another instance, learnt from the store.
    fn insert_if_absent(&self, name: &str, timeout: Duration) {
        self.pools.write().entry(name.to_string()).or_insert_with(|| PoolHandle::new(name, timeout));
    }
}

/// What every pool manager shares; one `PoolArgs` is made from it per pool.
#[derive(Clone)]
pub struct PoolTemplate {
    pub rules: PoolRules,
    pub writer: StoreWriter,
    pub vm_spec: VmSpec,
    pub ping_interval: Duration,
    pub restart: RestartPolicy,
    pub clock: Clock,
    pub call_timeout: Duration,
    /// Followers of each VM's life with a user (Guacamole's REST mode), if any.
    pub hooks: Option<Arc<dyn crate::actors::pool::VmHooks>>,
    /// Where moves between agents pass their disks.
    pub images: Option<crate::images::ImageRegistry>,
}

pub struct SupervisorArgs {
    pub pools: PoolDirectory,
    pub nodes: NodeRegistryHandle,
    pub node_specs: Vec<NodeSpec>,
    pub template: PoolTemplate,
    pub default_size: PoolSize,
    pub node_timings: NodeTimings,
    /// Placement picks at random among this many best-weighted nodes.
    pub placement_top_k: usize,
    pub coord: Arc<dyn Coordinator>,
    /// This process among the hive's instances (see `leases::Leases::instance`).
    pub instance: String,
    pub lease_ttl: Duration,
}

pub enum HiveMsg {
    CreatePool {
        name: String,
        size: PoolSize,
        reply: RpcReplyPort<Result<PoolHandle, PoolError>>,
    },
    DeletePool {
        name: String,
        reply: RpcReplyPort<Result<(), PoolError>>,
    },
    /// Try again to start a pool manager whose restart failed (e.g. the store was busy).
    RestartPool(String),
    /// Renew held leases, take over pools whose lease is free (shared coordinator only).
    LeaseTick,
}

pub struct HiveSupervisor;

pub struct HiveState {
    args: SupervisorArgs,
    restarts: RestartLog,
    leases: leases::Leases,
}

impl Actor for HiveSupervisor {
    type Msg = HiveMsg;
    type State = HiveState;
    type Arguments = SupervisorArgs;

    async fn pre_start(&self, me: ActorRef<HiveMsg>, args: SupervisorArgs) -> Result<HiveState, ActorProcessingErr> {
        let leases = leases::Leases::new(args.coord.clone(), args.instance.clone(), args.lease_ttl);
        let mut st = HiveState { args, restarts: RestartLog::default(), leases };
        start_registry(&me, &st.args).await?;
        let stored = st.args.template.writer.store().load_pools().await?;
        reconcile(&st.args.node_specs, &stored).await;
        if !stored.iter().any(|p| p.name == "default") {
            write_new_pool(&st.args.template.writer, "default", st.args.default_size).await?;
        }
        let names: Vec<String> = st.args.template.writer.store().load_pools().await?.into_iter().map(|p| p.name).collect();
        for name in names {
            let handle = PoolHandle::new(&name, st.args.template.call_timeout);
            st.args.pools.pools.write().insert(name, handle.clone());
            leases::take_or_follow(&me, &mut st, handle).await;
        }
        if st.leases.shared() {
            me.send_after(st.leases.tick_every(), || HiveMsg::LeaseTick);
        }
        Ok(st)
    }

    async fn post_stop(&self, _me: ActorRef<HiveMsg>, st: &mut HiveState) -> Result<(), ActorProcessingErr> {
        // Hand the pools over now rather than after the leases expire.
        for pool in st.args.pools.list() {
            st.leases.release(pool.name()).await;
        }
        Ok(())
    }

    async fn handle(&self, me: ActorRef<HiveMsg>, msg: HiveMsg, st: &mut HiveState) -> Result<(), ActorProcessingErr> {
        match msg {
            HiveMsg::CreatePool { name, size, reply } => {
                let r = create_pool(&me, st, name, size).await;
                let _ = reply.send(r);
            }
            HiveMsg::DeletePool { name, reply } => {
                let r = delete_pool(st, &name).await;
                let _ = reply.send(r);
            }
            HiveMsg::RestartPool(name) => {
                let Ok(pool) = st.args.pools.get(&name) else { return Ok(()) };
                if pool.slot().get().is_some() || !leases::still_held(st, &pool).await {
                    return Ok(());
                }
                // A retry after a start that failed: the failure was counted when the manager
                // died; a dependency that stays down (the database) must not use up the budget.
                retry_start(&me, st, pool).await;
            }
            HiveMsg::LeaseTick => {
                leases::tick(&me, st).await;
                // A held pool whose manager stopped itself (coordination down) starts again
                // once its lease is confirmed.
                for pool in st.args.pools.list() {
                    if pool.slot().get().is_none() && st.leases.token(pool.name()).is_some() && leases::still_held(st, &pool).await {
                        retry_start(&me, st, pool).await;
                    }
                }
                me.send_after(st.leases.tick_every(), || HiveMsg::LeaseTick);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<HiveMsg>,
        evt: SupervisionEvent,
        st: &mut HiveState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorTerminated(cell, _, why) = &evt {
            // A manager stops itself when its writes were superseded or its coordinator is
            // unreachable: start it again once the lease is confirmed, without using up the
            // restart budget (a lease tick does it with a shared coordinator).
            let id = cell.get_id();
            if let Some(pool) = st.args.pools.list().into_iter().find(|p| p.slot().get().is_some_and(|a| a.get_id() == id)) {
                tracing::warn!(pool = %pool.name(), reason = ?why, "pool manager stopped");
                pool.slot().set(None);
                pool.slot().set_down(why.clone().unwrap_or_else(|| "stopped".into()));
                if !st.leases.shared() {
                    let name = pool.name().to_string();
                    me.send_after(Duration::from_secs(1), move || HiveMsg::RestartPool(name));
                }
            }
            return Ok(());
        }
        let SupervisionEvent::ActorFailed(cell, err) = evt else { return Ok(()) };
        let id = cell.get_id();
        if st.args.nodes.slot().get().is_some_and(|a| a.get_id() == id) {
            metrics::actor_restart("node_registry");
            tracing::error!(error = %err, "node registry failed");
            if !st.restarts.allow("node-registry", st.args.template.restart) {
                return Err("node registry failed too often; giving up".into());
            }
            start_registry(&me, &st.args).await?;
            // Capacity bookkeeping died with it: every pool claims its VMs' capacity again.
            for p in st.args.pools.list() {
                p.slot().cast(PoolMsg::Reclaim);
            }
            return Ok(());
        }
        let failed = st.args.pools.list().into_iter().find(|p| p.slot().get().is_some_and(|a| a.get_id() == id));
        if let Some(pool) = failed {
            metrics::actor_restart("pool_manager");
            tracing::error!(pool = %pool.name(), error = %err, "pool manager failed; restarting from the store");
            pool.slot().set(None);
            restart_pool(&me, st, pool).await?;
        }
        Ok(())
    }
}

/// Before any pool starts (so no boot is in flight): destroy domains that a node holds but no
/// stored VM refers to, e.g. one created just before a crash and never recorded.
async fn reconcile(nodes: &[NodeSpec], stored: &[crate::store::StoredPool]) {
    let known: std::collections::HashSet<(u64, &str)> = stored
        .iter()
        .flat_map(|p| p.snapshot.vms.iter())
        .filter_map(|v| v.placement.as_ref())
        .map(|p| (p.node, p.domain.as_str()))
        .collect();
    for node in nodes {
        let Ok(domains) = node.driver.list().await else { continue };
        // Lifecycle VMs (`lc.…`) are the lifecycle service's, not the pools'.
        let pools_own = |d: &&String| !d.starts_with(crate::domain::lifecycle::DOMAIN_PREFIX);
        for d in domains.iter().filter(pools_own).filter(|d| !known.contains(&(node.id, d.as_str()))) {
            tracing::info!(node.id = node.id, domain = %d, "destroying a domain no pool knows");
            if let Err(e) = node.driver.destroy(d).await {
                tracing::warn!(node.id = node.id, domain = %d, error = %e, "cannot destroy orphan domain");
            }
        }
    }
}

/// Restart a failed pool manager within the restart policy. A start that fails (its state could
/// not be loaded) counts as another failure and is retried a second later; past the policy the
/// supervisor gives up, which stops the hive.
async fn restart_pool(me: &ActorRef<HiveMsg>, st: &mut HiveState, pool: PoolHandle) -> Result<(), ActorProcessingErr> {
    if !st.restarts.allow(&format!("pool-{}", pool.name()), st.args.template.restart) {
        return Err(format!("pool {} failed too often; giving up", pool.name()).into());
    }
    retry_start(me, st, pool).await;
    Ok(())
}

/// Start a pool manager; if it cannot start (its state cannot be loaded), say why on its slot
/// and try again a second later, for as long as it takes.
async fn retry_start(me: &ActorRef<HiveMsg>, st: &mut HiveState, pool: PoolHandle) {
    let Some(token) = st.leases.token(pool.name()) else { return };
    if let Err(e) = start_pool(me, &st.args, pool.clone(), token).await {
        tracing::error!(pool = %pool.name(), error = %e, "pool manager did not start; retrying in 1 s");
        pool.slot().set_down(format!("restarting: {}", start_error(&e)));
        let name = pool.name().to_string();
        me.send_after(Duration::from_secs(1), move || HiveMsg::RestartPool(name));
    }
}

/// The cause inside ractor's "Actor panicked during startup '…'" wrapping.
fn start_error(e: &ActorProcessingErr) -> String {
    let text = e.to_string();
    match (text.find('\''), text.rfind('\'')) {
        (Some(a), Some(b)) if b > a => text[a + 1..b].to_string(),
        _ => text,
    }
}

async fn start_registry(me: &ActorRef<HiveMsg>, args: &SupervisorArgs) -> Result<(), ActorProcessingErr> {
    let reg_args = RegistryArgs {
        policy: args.template.restart,
        timings: args.node_timings,
        pools: args.pools.clone(),
        writer: args.template.writer.clone(),
        clock: args.template.clock,
        top_k: args.placement_top_k,
        handle: args.nodes.clone(),
    };
    let (reg, _) = Actor::spawn_linked(None, NodeRegistry, reg_args, me.get_cell()).await?;
    args.nodes.slot().set(Some(reg));
    for spec in &args.node_specs {
        args.nodes.register(spec.clone()).await?;
    }
    // Agent-run nodes come from the store, so that those that joined since start survive a
    // registry restart too.
    for r in args.template.writer.store().load_nodes().await?.iter().filter(|r| r.remote) {
        args.nodes.register(remote_spec(r, args.nodes.remote(r.id))).await?;
    }
    // Ratings live in the store; without this a restart would forget every review a node earned.
    if let Some(rows) = args.template.writer.store().node_rows() {
        for (node, count, stars) in rows.rating_totals().await? {
            args.nodes.rating_totals(node, count, stars);
        }
        args.nodes.high_water(rows.max_issued_node_id().await?);
    }
    Ok(())
}

async fn start_pool(me: &ActorRef<HiveMsg>, args: &SupervisorArgs, handle: PoolHandle, lease: u64) -> Result<(), ActorProcessingErr> {
    let t = &args.template;
    let pool_args = PoolArgs {
        coord: args.coord.clone(),
        lease,
        handle: handle.clone(),
        rules: t.rules,
        writer: t.writer.clone(),
        nodes: args.nodes.clone(),
        vm_spec: t.vm_spec.clone(),
        ping_interval: t.ping_interval,
        restart: t.restart,
        clock: t.clock,
        hooks: t.hooks.clone(),
        images: t.images.clone(),
    };
    let (actor, _) = Actor::spawn_linked(None, PoolManager, pool_args, me.get_cell()).await?;
    handle.slot().set(Some(actor));
    Ok(())
}

async fn write_new_pool(writer: &StoreWriter, name: &str, size: PoolSize) -> Result<(), PoolError> {
    let row = Change::Pool { pool: name.to_string(), size, next_vm: 1, next_batch: 1, next_handle: 1, preps: vec![], pending: vec![] };
    Ok(writer.write(vec![row]).await?)
}

/// Pool names appear in URLs and metric labels: short, lowercase, no surprises.
pub fn valid_pool_name(name: &str) -> bool {
    (1..=40).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

async fn create_pool(me: &ActorRef<HiveMsg>, st: &mut HiveState, name: String, size: PoolSize) -> Result<PoolHandle, PoolError> {
    use crate::domain::pool::PoolInputError::Invalid;
    if !valid_pool_name(&name) {
        return Err(Invalid { field: "name", reason: "1 to 40 characters of a-z, 0-9, '-' and '_'".into() }.into());
    }
    if st.args.pools.get(&name).is_ok() {
        return Err(PoolError::Exists(name));
    }
    // Another instance may have made it since this one last looked.
    if st.leases.shared() && st.args.template.writer.store().pool_names().await?.contains(&name) {
        return Err(PoolError::Exists(name));
    }
    if size.min > size.max {
        return Err(Invalid { field: "min", reason: format!("min ({}) is above max ({})", size.min, size.max) }.into());
    }
    if size.max > st.args.template.rules.max_cap {
        return Err(
            Invalid { field: "max", reason: format!("max ({}) is above the cap ({})", size.max, st.args.template.rules.max_cap) }.into()
        );
    }
    write_new_pool(&st.args.template.writer, &name, size).await?;
    let handle = PoolHandle::new(&name, st.args.template.call_timeout);
    st.args.pools.pools.write().insert(name, handle.clone());
    leases::take_or_follow(me, st, handle.clone()).await;
    Ok(handle)
}

async fn delete_pool(st: &mut HiveState, name: &str) -> Result<(), PoolError> {
    if name == "default" {
        return Err(PoolError::Busy(name.into(), "the default pool serves the vmcloud routes and cannot be deleted".into()));
    }
    let pool = st.args.pools.get(name)?;
    let snap = pool.status().await?;
    if !snap.vms.is_empty() || !snap.batches.is_empty() || !snap.handles.is_empty() {
        return Err(PoolError::Busy(
            name.into(),
            format!(
                "{} VMs, {} batches, {} handles; resize it to 0/0/0 and cancel its batches first",
                snap.vms.len(),
                snap.batches.len(),
                snap.handles.len()
            ),
        ));
    }
    st.args.template.writer.write(vec![Change::PoolDeleted { pool: name.to_string() }]).await?;
    st.args.pools.pools.write().remove(name);
    if let Some(a) = pool.slot().get() {
        pool.slot().set(None);
        a.stop(Some("pool deleted".into()));
    }
    st.leases.release(name).await;
    Ok(())
}

/// The way in to the supervisor for pool creation and deletion.
#[derive(Clone)]
pub struct HiveHandle {
    slot: Arc<Slot<HiveMsg>>,
    timeout: Duration,
}

impl HiveHandle {
    pub fn new(actor: ActorRef<HiveMsg>, timeout: Duration) -> HiveHandle {
        let slot = Slot::new("hive supervisor");
        slot.set(Some(actor));
        HiveHandle { slot: Arc::new(slot), timeout }
    }

    pub async fn create_pool(&self, name: &str, size: PoolSize) -> Result<PoolHandle, PoolError> {
        self.slot.call(|reply| HiveMsg::CreatePool { name: name.to_string(), size, reply }, self.timeout).await?
    }

    pub async fn delete_pool(&self, name: &str) -> Result<(), PoolError> {
        self.slot.call(|reply| HiveMsg::DeletePool { name: name.to_string(), reply }, self.timeout).await?
    }

    pub fn stop(&self) {
        if let Some(a) = self.slot.get() {
            a.stop(Some("shutdown".into()));
        }
    }
}
