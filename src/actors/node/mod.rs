//! Nodes: the hosts that lend CPU, RAM and disk. `NodeRegistry` owns the table of nodes, their
//! life (`domain::node::NodeHealth`: registering → ready → cordoned/draining → suspect → dead)
//! and their reserved capacity, so placement is decided in one place without locks. A
//! `NodeActor` per node runs active health checks (`check.rs`); agents' connections report
//! hellos and heartbeats here (`agents.rs`). Whenever what a pool may do with a node's VMs
//! changes (suspect: hand none out; draining: idle ones leave; dead: all leave), every pool is
//! told. Reservations are keyed by the VM that holds them (`VmKey`), so placing, re-claiming
//! after a restart and freeing are idempotent: capacity is never counted or released twice.

mod agents;
mod check;
mod handle;
mod place;
mod view;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

pub use self::agents::{FIRST_REMOTE_ID, remote_spec};
pub use self::handle::NodeRegistryHandle;
pub use self::view::{NodeView, Replica};
use super::supervisor::PoolDirectory;
use super::{CallError, Clock, RestartLog, RestartPolicy};
use crate::agent::proto::{CacheCounters, Hello, HostStats};
use crate::domain::node::{AdminState, NodeClass, NodeHealth, NodeState, NodeTimings, NodeUse};
use crate::domain::{Millis, NodeId, VmId};
use crate::drivers::remote::{AgentLink, RemoteHypervisor};
use crate::drivers::{Hypervisor, VmSpec};
use crate::metrics;
use crate::store::{NodeRecord, StoreWriter};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("no node {0}")]
    UnknownNode(NodeId),
    #[error("no ready node has room for {cores} cores and {ram_mb} MB")]
    NoCapacity { cores: u32, ram_mb: u64 },
    #[error("the node credential is not valid")]
    BadCredential,
    #[error("node {0} is busy: {1}")]
    Busy(NodeId, String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("store: {0}")]
    Store(String),
    #[error(transparent)]
    Call(#[from] CallError),
}

/// A node the registry is given: its offer and its hypervisor.
#[derive(Clone)]
pub struct NodeSpec {
    pub id: NodeId,
    pub name: String,
    pub address: String,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
    pub class: NodeClass,
    pub admin: AdminState,
    pub driver: Arc<dyn Hypervisor>,
    /// Set for nodes that run `hive node`: the same object as `driver`, reachable for
    /// attaching and detaching the agent's connection.
    pub remote: Option<Arc<RemoteHypervisor>>,
    pub driver_name: String,
    pub credential_hash: Option<String>,
    pub created_at: Millis,
}

impl NodeSpec {
    fn record(&self, state: NodeState) -> NodeRecord {
        NodeRecord {
            id: self.id,
            name: self.name.clone(),
            driver: self.driver_name.clone(),
            cores: self.cores,
            ram_mb: self.ram_mb,
            disk_mb: self.disk_mb,
            address: self.address.clone(),
            state: state.name().into(),
            created_at: self.created_at,
            remote: self.remote.is_some(),
            class: self.class.name().into(),
            admin: self.admin.name().into(),
            credential_hash: self.credential_hash.clone(),
        }
    }
}

/// The holder of a reservation: one VM of one pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VmKey {
    pub pool: String,
    pub vm: VmId,
}

/// A placed VM: where it went and how to reach that node's hypervisor.
#[derive(Clone)]
pub struct Placed {
    pub node: NodeId,
    pub address: String,
    pub driver: Arc<dyn Hypervisor>,
}

/// How long a boot failure counts against a node's placement weight and score.
const FAILURE_MEMORY_MS: Millis = 10 * 60 * 1000;

struct Entry {
    spec: NodeSpec,
    health: NodeHealth,
    state: NodeState,
    state_since: Millis,
    stats: Option<HostStats>,
    last_heartbeat: Option<Millis>,
    used_cores: u32,
    used_ram_mb: u64,
    used_disk_mb: u64,
    held: HashMap<VmKey, VmSpec>,
    actor: Option<ActorRef<check::NodeMsg>>,
    /// Bumped on every agent connection, so a reconciliation of an older one is ignored.
    link_gen: u64,
    ratings: (u64, u64),
    failures: VecDeque<Millis>,
    peer_url: Option<String>,
    images: BTreeMap<String, Replica>,
    cache: Option<CacheCounters>,
    stock: BTreeMap<String, u32>,
}

impl Entry {
    fn recent_failures(&self, now: Millis) -> u32 {
        self.failures.iter().filter(|t| now.saturating_sub(**t) < FAILURE_MEMORY_MS).count() as u32
    }

    fn score(&self, now: Millis) -> f64 {
        crate::domain::node::score(self.health.uptime(), self.ratings.0, self.ratings.1, self.recent_failures(now))
    }

    fn fits(&self, vm: &VmSpec) -> bool {
        self.state.accepts_vms()
            && self.used_cores + vm.cores <= self.spec.cores
            && self.used_ram_mb + vm.ram_mb <= self.spec.ram_mb
            && self.used_disk_mb + vm.disk_mb <= self.spec.disk_mb
    }
}

pub enum RegistryMsg {
    Register(NodeSpec, RpcReplyPort<()>),
    /// A node joined with a join token: record it (durably) and answer its id.
    Create {
        name: String,
        credential_hash: String,
        reply: RpcReplyPort<Result<NodeId, NodeError>>,
    },
    /// `Create`, once the highest node id the store has issued (by any instance) is known.
    CreateAbove {
        issued: Result<NodeId, String>,
        name: String,
        credential_hash: String,
        reply: RpcReplyPort<Result<NodeId, NodeError>>,
    },
    Created(NodeId, Result<(), String>, RpcReplyPort<Result<NodeId, NodeError>>),
    /// Which node holds this credential (by its hash)?
    Authenticate {
        credential_hash: String,
        reply: RpcReplyPort<Result<NodeId, NodeError>>,
    },
    /// No node here holds it: what the store holds for it (a node that joined through another
    /// instance of the hive since this one started), with the node's rating totals.
    Adopt {
        credential_hash: String,
        found: Result<Option<StoredNode>, String>,
        reply: RpcReplyPort<Result<NodeId, NodeError>>,
    },
    /// An agent connected and said hello.
    Attach {
        node: NodeId,
        hello: Hello,
        link: Arc<AgentLink>,
        reply: RpcReplyPort<Result<u64, NodeError>>,
    },
    /// That connection ended.
    Detach {
        node: NodeId,
        link: Arc<AgentLink>,
    },
    /// The agent's domains were compared with the pools' records; `held` is what it reported.
    Reconciled {
        node: NodeId,
        link_gen: u64,
        held: std::collections::BTreeSet<String>,
    },
    Heartbeat {
        node: NodeId,
        stats: HostStats,
        cache: Option<CacheCounters>,
        stock: BTreeMap<String, u32>,
    },
    /// An image's state on a node changed (a fetch started, ended or failed).
    Image(NodeId, String, Replica),
    Checked(NodeId, bool),
    /// Look at every node's deadlines (suspect, dead).
    Sweep,
    /// Choose a node for the VM and reserve its resources there.
    Place(VmKey, VmSpec, RpcReplyPort<Result<Placed, NodeError>>),
    /// Reserve resources of a VM that already runs on `node` (after a restart); a no-op if
    /// that VM already holds them there.
    Claim(NodeId, VmKey, VmSpec, RpcReplyPort<Result<Placed, NodeError>>),
    /// Release whatever the VM holds, wherever it holds it.
    Free(VmKey),
    /// A boot failed on this node (it weighs against the node for a while).
    Failed(NodeId),
    /// An end user rated a session on this node.
    Rated(NodeId, u8),
    /// A node's ratings as the store holds them (count, sum of stars), at (re)start.
    RatingTotals(NodeId, u64, u64),
    List(RpcReplyPort<Vec<NodeView>>),
    Driver(NodeId, RpcReplyPort<Result<Arc<dyn Hypervisor>, NodeError>>),
    SetAdmin {
        node: NodeId,
        admin: AdminState,
        /// False when the state was read from the store (made through another instance): it is
        /// applied here and not written back, so a stale read cannot undo a newer change.
        record: bool,
        reply: RpcReplyPort<Result<NodeView, NodeError>>,
    },
    Remove {
        node: NodeId,
        force: bool,
        reply: RpcReplyPort<Result<(), NodeError>>,
    },
    /// Nodes whose VMs a pool may not use as usual.
    Uses(RpcReplyPort<Vec<(NodeId, NodeUse)>>),
    /// The highest node id ever issued (from the store): new ids go above it.
    HighWater(NodeId),
}

/// A stored node found by its credential, with its rating totals (count, sum of stars).
pub type StoredNode = (NodeRecord, (u64, u64));

pub struct NodeRegistry;

pub struct RegistryArgs {
    pub policy: RestartPolicy,
    pub timings: NodeTimings,
    pub pools: PoolDirectory,
    pub writer: StoreWriter,
    pub clock: Clock,
    /// Placement picks at random among this many best-weighted nodes.
    pub top_k: usize,
    /// The registry's own handle (it keeps agents' remote hypervisors across restarts).
    pub handle: NodeRegistryHandle,
}

pub struct RegistryState {
    nodes: BTreeMap<NodeId, Entry>,
    /// Highest node id ever issued; never goes down, so removed nodes' ids are not reused.
    high_water: NodeId,
    restarts: RestartLog,
    args: RegistryArgs,
}

impl Actor for NodeRegistry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(&self, me: ActorRef<RegistryMsg>, args: RegistryArgs) -> Result<RegistryState, ActorProcessingErr> {
        let sweep = Duration::from_millis((args.timings.heartbeat_ms / 4).max(10));
        me.send_interval(sweep, || RegistryMsg::Sweep);
        Ok(RegistryState { nodes: BTreeMap::new(), high_water: 0, restarts: RestartLog::default(), args })
    }

    async fn handle(&self, me: ActorRef<RegistryMsg>, msg: RegistryMsg, st: &mut RegistryState) -> Result<(), ActorProcessingErr> {
        let now = st.args.clock.now();
        match msg {
            RegistryMsg::Register(spec, reply) => {
                register(&me, st, spec, now).await?;
                let _ = reply.send(());
            }
            RegistryMsg::Create { name, credential_hash, reply } => agents::create(&me, st, name, credential_hash, reply),
            RegistryMsg::CreateAbove { issued, name, credential_hash, reply } => match issued {
                Ok(issued) => {
                    st.high_water = st.high_water.max(issued);
                    agents::create_above(&me, st, name, credential_hash, reply, now).await?
                }
                Err(e) => {
                    let _ = reply.send(Err(NodeError::Store(e)));
                }
            },
            RegistryMsg::Created(id, r, reply) => {
                if r.is_err() {
                    forget(st, id);
                }
                let _ = reply.send(r.map(|_| id).map_err(NodeError::Store));
            }
            RegistryMsg::Authenticate { credential_hash, reply } => agents::authenticate(&me, st, credential_hash, reply),
            RegistryMsg::Adopt { credential_hash, found, reply } => agents::adopt(&me, st, credential_hash, found, reply, now).await?,
            RegistryMsg::Attach { node, hello, link, reply } => {
                let r = agents::attach(&me, st, node, hello, link, now);
                let _ = reply.send(r);
            }
            RegistryMsg::Detach { node, link } => {
                if let Some(e) = st.nodes.get_mut(&node) {
                    if let Some(r) = &e.spec.remote {
                        r.detach(&link);
                        if !r.connected() {
                            e.health.disconnected();
                            tracing::info!(node.id = node, "agent disconnected");
                        }
                    }
                }
                refresh(st, node, now);
            }
            RegistryMsg::Reconciled { node, link_gen, held } => {
                // Only the newest connection's report counts: an older one, finishing late,
                // would take VMs placed since for lost.
                if let Some(e) = st.nodes.get_mut(&node).filter(|e| e.link_gen == link_gen) {
                    e.health.reconciled(now);
                    for p in st.args.pools.list() {
                        p.domains_reported(node, held.clone());
                    }
                }
                refresh(st, node, now);
            }
            RegistryMsg::Image(node, sha, replica) => {
                if let Some(e) = st.nodes.get_mut(&node) {
                    e.images.insert(sha, replica);
                }
            }
            RegistryMsg::Heartbeat { node, stats, cache, stock } => {
                if let Some(e) = st.nodes.get_mut(&node) {
                    if let (Some(new), Some(old)) = (&cache, &e.cache) {
                        metrics::cache_reads_reported(old, new);
                    }
                    e.stock = stock;
                    e.health.heartbeat(now);
                    e.stats = Some(stats);
                    e.cache = cache.or(e.cache);
                    e.last_heartbeat = Some(now);
                }
                refresh(st, node, now);
            }
            RegistryMsg::Checked(node, ok) => {
                if let Some(e) = st.nodes.get_mut(&node) {
                    e.health.checked(ok, now);
                }
                refresh(st, node, now);
            }
            RegistryMsg::Sweep => {
                let ids: Vec<NodeId> = st.nodes.keys().copied().collect();
                for id in ids {
                    if let Some(e) = st.nodes.get_mut(&id) {
                        if e.health.tick(now) {
                            tracing::warn!(node.id = id, "node missed its heartbeats: dead");
                        }
                    }
                    refresh(st, id, now);
                }
            }
            RegistryMsg::Place(key, vm, reply) => {
                release_everywhere(st, &key);
                let r = place::choose(st, &vm, now).map(|id| reserve(st.nodes.get_mut(&id).expect("chosen from the table"), key, &vm));
                publish(st);
                let _ = reply.send(r.ok_or(NodeError::NoCapacity { cores: vm.cores, ram_mb: vm.ram_mb }));
            }
            RegistryMsg::Claim(node, key, vm, reply) => {
                if !st.nodes.get(&node).is_some_and(|e| e.held.contains_key(&key)) {
                    release_everywhere(st, &key);
                }
                let r = match st.nodes.get_mut(&node) {
                    Some(e) => Ok(reserve(e, key, &vm)),
                    None => Err(NodeError::UnknownNode(node)),
                };
                publish(st);
                let _ = reply.send(r);
            }
            RegistryMsg::Free(key) => {
                release_everywhere(st, &key);
                publish(st);
            }
            RegistryMsg::Failed(node) => {
                if let Some(e) = st.nodes.get_mut(&node) {
                    e.failures.push_back(now);
                    while e.failures.front().is_some_and(|t| now.saturating_sub(*t) >= FAILURE_MEMORY_MS) {
                        e.failures.pop_front();
                    }
                }
            }
            RegistryMsg::Rated(node, stars) => {
                if let Some(e) = st.nodes.get_mut(&node) {
                    e.ratings.0 += 1;
                    e.ratings.1 += u64::from(stars);
                }
            }
            RegistryMsg::RatingTotals(node, count, stars) => {
                if let Some(e) = st.nodes.get_mut(&node) {
                    e.ratings = (count, stars);
                }
            }
            RegistryMsg::List(reply) => {
                let _ = reply.send(st.nodes.values().map(|e| e.view(now)).collect());
            }
            RegistryMsg::Driver(node, reply) => {
                let _ = reply.send(st.nodes.get(&node).map(|e| e.spec.driver.clone()).ok_or(NodeError::UnknownNode(node)));
            }
            RegistryMsg::SetAdmin { node, admin, record, reply } => agents::set_admin(st, node, admin, record, reply, now),
            RegistryMsg::Remove { node, force, reply } => agents::remove(st, node, force, reply, now),
            RegistryMsg::HighWater(id) => st.high_water = st.high_water.max(id),
            RegistryMsg::Uses(reply) => {
                let uses = st.nodes.values().map(|e| (e.spec.id, e.state.vm_policy())).filter(|(_, u)| *u != NodeUse::Normal).collect();
                let _ = reply.send(uses);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<RegistryMsg>,
        evt: SupervisionEvent,
        st: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, err) = evt else { return Ok(()) };
        let Some(id) = st.nodes.values().find(|e| e.actor.as_ref().is_some_and(|a| a.get_id() == cell.get_id())).map(|e| e.spec.id) else {
            return Ok(());
        };
        tracing::warn!(node.id = id, error = %err, "node actor failed");
        metrics::actor_restart("node");
        if !st.restarts.allow(&format!("node-{id}"), st.args.policy) {
            return Err(format!("node {id} failed too often; escalating").into());
        }
        let spec = st.nodes[&id].spec.clone();
        let actor = check::spawn(&me, &spec, Duration::from_millis(st.args.timings.heartbeat_ms)).await?;
        st.nodes.get_mut(&id).expect("found above").actor = Some(actor);
        Ok(())
    }
}

async fn register(me: &ActorRef<RegistryMsg>, st: &mut RegistryState, spec: NodeSpec, now: Millis) -> Result<(), ActorProcessingErr> {
    let id = spec.id;
    let actor = check::spawn(me, &spec, Duration::from_millis(st.args.timings.heartbeat_ms)).await?;
    let local = spec.remote.is_none();
    let mut health = NodeHealth::new(st.args.timings, local, spec.admin, now);
    // The registry itself restarted under a live agent: its connection is still good.
    if spec.remote.as_ref().is_some_and(|r| r.connected()) {
        health.connected(now);
        health.reconciled(now);
    }
    let state = health.state(now);
    let entry = Entry {
        spec,
        health,
        state,
        state_since: now,
        stats: None,
        last_heartbeat: None,
        used_cores: 0,
        used_ram_mb: 0,
        used_disk_mb: 0,
        held: HashMap::new(),
        actor: Some(actor),
        link_gen: 0,
        ratings: (0, 0),
        failures: VecDeque::new(),
        peer_url: None,
        images: BTreeMap::new(),
        cache: None,
        stock: BTreeMap::new(),
    };
    if let Some(old) = st.nodes.insert(id, entry).and_then(|e| e.actor) {
        old.stop(None);
    }
    tell_pools(st, id, state.vm_policy());
    publish(st);
    Ok(())
}

/// Drop a node from the table (removed, or its creation could not be stored).
fn forget(st: &mut RegistryState, id: NodeId) {
    if let Some(e) = st.nodes.remove(&id) {
        if let Some(a) = e.actor {
            a.stop(None);
        }
    }
    publish(st);
}

/// Recompute a node's state; on a change, log it, persist it, and tell the pools if what they
/// may do with its VMs changed.
fn refresh(st: &mut RegistryState, id: NodeId, now: Millis) {
    let Some(e) = st.nodes.get_mut(&id) else { return };
    let state = e.health.state(now);
    if state == e.state {
        return;
    }
    let before = std::mem::replace(&mut e.state, state);
    e.state_since = now;
    tracing::info!(node.id = id, from = before.name(), to = state.name(), "node state");
    let record = e.spec.record(state);
    st.args.writer.submit(vec![crate::store::Change::Node(record)], Box::new(|_| {}));
    if before.vm_policy() != state.vm_policy() {
        tell_pools(st, id, state.vm_policy());
    }
    publish(st);
}

fn tell_pools(st: &RegistryState, id: NodeId, usage: NodeUse) {
    for p in st.args.pools.list() {
        p.node_use(id, usage);
    }
}

fn reserve(e: &mut Entry, key: VmKey, vm: &VmSpec) -> Placed {
    if !e.held.contains_key(&key) {
        e.used_cores += vm.cores;
        e.used_ram_mb += vm.ram_mb;
        e.used_disk_mb += vm.disk_mb;
        e.held.insert(key, vm.clone());
    }
    Placed { node: e.spec.id, address: e.spec.address.clone(), driver: e.spec.driver.clone() }
}

fn release_everywhere(st: &mut RegistryState, key: &VmKey) {
    for e in st.nodes.values_mut() {
        if let Some(vm) = e.held.remove(key) {
            e.used_cores = e.used_cores.saturating_sub(vm.cores);
            e.used_ram_mb = e.used_ram_mb.saturating_sub(vm.ram_mb);
            e.used_disk_mb = e.used_disk_mb.saturating_sub(vm.disk_mb);
        }
    }
}

fn publish(st: &RegistryState) {
    let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut replicas = [0usize; 3];
    for e in st.nodes.values() {
        *by_state.entry(e.state.name()).or_default() += 1;
        for r in e.images.values() {
            replicas[match r {
                Replica::Fetching => 0,
                Replica::Ready { .. } => 1,
                Replica::Failed { .. } => 2,
            }] += 1;
        }
    }
    metrics::nodes(&by_state);
    metrics::image_replicas(replicas[0], replicas[1], replicas[2]);
}
