//! Nodes: the hosts that lend CPU, RAM and disk. `NodeRegistry` owns the table of nodes and
//! their reserved capacity, so placement ("which node gets this VM?") is decided in one place
//! without locks; a `NodeActor` per node owns its hypervisor connection and health checks and
//! reports to the registry. The registry supervises its node actors (restart, then escalate).
//! Reservations are keyed by the VM that holds them (`VmKey`), so placing, re-claiming after a
//! restart and freeing are idempotent: capacity is never counted or released twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde::Serialize;

use super::{CallError, RestartLog, RestartPolicy, Slot};
use crate::domain::{NodeId, VmId};
use crate::drivers::{Hypervisor, VmSpec};
use crate::metrics;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("no node {0}")]
    UnknownNode(NodeId),
    #[error("no ready node has room for {cores} cores and {ram_mb} MB")]
    NoCapacity { cores: u32, ram_mb: u64 },
    #[error(transparent)]
    Call(#[from] CallError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Ready,
    Suspect,
}

/// A node as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub driver: &'static str,
    pub address: String,
    pub state: NodeState,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
    pub used_cores: u32,
    pub used_ram_mb: u64,
    pub used_disk_mb: u64,
    pub vms: u32,
}

/// What registering a node needs: its offer and its hypervisor.
#[derive(Clone)]
pub struct NodeSpec {
    pub id: NodeId,
    pub name: String,
    pub address: String,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
    pub driver: Arc<dyn Hypervisor>,
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

struct Entry {
    spec: NodeSpec,
    state: NodeState,
    used_cores: u32,
    used_ram_mb: u64,
    used_disk_mb: u64,
    held: HashMap<VmKey, VmSpec>,
    actor: Option<ActorRef<NodeMsg>>,
}

impl Entry {
    fn view(&self) -> NodeView {
        NodeView {
            id: self.spec.id,
            name: self.spec.name.clone(),
            driver: self.spec.driver.kind(),
            address: self.spec.address.clone(),
            state: self.state,
            cores: self.spec.cores,
            ram_mb: self.spec.ram_mb,
            disk_mb: self.spec.disk_mb,
            used_cores: self.used_cores,
            used_ram_mb: self.used_ram_mb,
            used_disk_mb: self.used_disk_mb,
            vms: self.held.len() as u32,
        }
    }

    fn fits(&self, vm: &VmSpec) -> bool {
        self.state == NodeState::Ready
            && self.used_cores + vm.cores <= self.spec.cores
            && self.used_ram_mb + vm.ram_mb <= self.spec.ram_mb
            && self.used_disk_mb + vm.disk_mb <= self.spec.disk_mb
    }
}

pub enum RegistryMsg {
    Register(NodeSpec, RpcReplyPort<()>),
    /// Choose a node for the VM and reserve its resources there.
    Place(VmKey, VmSpec, RpcReplyPort<Result<Placed, NodeError>>),
    /// Reserve resources of a VM that already runs on `node` (after a restart); a no-op if
    /// that VM already holds them there.
    Claim(NodeId, VmKey, VmSpec, RpcReplyPort<Result<Placed, NodeError>>),
    /// Release whatever the VM holds, wherever it holds it.
    Free(VmKey),
    List(RpcReplyPort<Vec<NodeView>>),
    Driver(NodeId, RpcReplyPort<Result<Arc<dyn Hypervisor>, NodeError>>),
    Health(NodeId, bool),
}

pub struct NodeRegistry;

pub struct RegistryState {
    nodes: BTreeMap<NodeId, Entry>,
    restarts: RestartLog,
    policy: RestartPolicy,
    health_interval: Duration,
}

impl Actor for NodeRegistry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = (RestartPolicy, Duration);

    async fn pre_start(
        &self,
        _me: ActorRef<RegistryMsg>,
        (policy, health_interval): Self::Arguments,
    ) -> Result<RegistryState, ActorProcessingErr> {
        Ok(RegistryState { nodes: BTreeMap::new(), restarts: RestartLog::default(), policy, health_interval })
    }

    async fn handle(&self, me: ActorRef<RegistryMsg>, msg: RegistryMsg, st: &mut RegistryState) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Register(spec, reply) => {
                let id = spec.id;
                let actor = spawn_node(&me, &spec, st.health_interval).await?;
                st.nodes.insert(
                    id,
                    Entry {
                        spec,
                        state: NodeState::Ready,
                        used_cores: 0,
                        used_ram_mb: 0,
                        used_disk_mb: 0,
                        held: HashMap::new(),
                        actor: Some(actor),
                    },
                );
                publish(st);
                let _ = reply.send(());
            }
            RegistryMsg::Place(key, vm, reply) => {
                release_everywhere(st, &key);
                // Most free RAM first; ties go to the lower id. (Filters and weighers with a
                // random pick among the top few arrive with real nodes.)
                let best = st
                    .nodes
                    .values_mut()
                    .filter(|e| e.fits(&vm))
                    .max_by_key(|e| (e.spec.ram_mb - e.used_ram_mb, std::cmp::Reverse(e.spec.id)));
                let r = match best {
                    Some(e) => Ok(reserve(e, key, &vm)),
                    None => Err(NodeError::NoCapacity { cores: vm.cores, ram_mb: vm.ram_mb }),
                };
                publish(st);
                let _ = reply.send(r);
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
            RegistryMsg::List(reply) => {
                let _ = reply.send(st.nodes.values().map(Entry::view).collect());
            }
            RegistryMsg::Driver(node, reply) => {
                let _ = reply.send(st.nodes.get(&node).map(|e| e.spec.driver.clone()).ok_or(NodeError::UnknownNode(node)));
            }
            RegistryMsg::Health(node, ok) => {
                if let Some(e) = st.nodes.get_mut(&node) {
                    e.state = if ok { NodeState::Ready } else { NodeState::Suspect };
                }
                publish(st);
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
        if !st.restarts.allow(&format!("node-{id}"), st.policy) {
            return Err(format!("node {id} failed too often; escalating").into());
        }
        let spec = st.nodes[&id].spec.clone();
        let actor = spawn_node(&me, &spec, st.health_interval).await?;
        st.nodes.get_mut(&id).expect("found above").actor = Some(actor);
        Ok(())
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
    let ready = st.nodes.values().filter(|e| e.state == NodeState::Ready).count();
    metrics::nodes(ready, st.nodes.len() - ready);
}

async fn spawn_node(me: &ActorRef<RegistryMsg>, spec: &NodeSpec, interval: Duration) -> Result<ActorRef<NodeMsg>, ActorProcessingErr> {
    let args = NodeArgs { id: spec.id, driver: spec.driver.clone(), registry: me.clone(), interval };
    let (actor, _) = Actor::spawn_linked(None, NodeActor, args, me.get_cell()).await?;
    Ok(actor)
}

// ---- NodeActor ---------------------------------------------------------------------------

pub enum NodeMsg {
    Check,
    Checked(bool),
}

pub struct NodeActor;

pub struct NodeArgs {
    id: NodeId,
    driver: Arc<dyn Hypervisor>,
    registry: ActorRef<RegistryMsg>,
    interval: Duration,
}

pub struct NodeActorState {
    args: NodeArgs,
    healthy: Option<bool>,
    checking: bool,
}

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = NodeActorState;
    type Arguments = NodeArgs;

    async fn pre_start(&self, me: ActorRef<NodeMsg>, args: NodeArgs) -> Result<NodeActorState, ActorProcessingErr> {
        me.send_interval(args.interval, || NodeMsg::Check);
        Ok(NodeActorState { args, healthy: None, checking: false })
    }

    async fn handle(&self, me: ActorRef<NodeMsg>, msg: NodeMsg, st: &mut NodeActorState) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Check if !st.checking => {
                st.checking = true;
                let driver = st.args.driver.clone();
                tokio::spawn(async move {
                    let ok = driver.list().await.is_ok();
                    let _ = me.cast(NodeMsg::Checked(ok));
                });
            }
            NodeMsg::Check => {}
            NodeMsg::Checked(ok) => {
                st.checking = false;
                if st.healthy != Some(ok) {
                    st.healthy = Some(ok);
                    let _ = st.args.registry.cast(RegistryMsg::Health(st.args.id, ok));
                }
            }
        }
        Ok(())
    }
}

// ---- handle ------------------------------------------------------------------------------

/// The way in to the node registry. Cloneable; survives registry restarts.
#[derive(Clone)]
pub struct NodeRegistryHandle {
    slot: Arc<Slot<RegistryMsg>>,
    timeout: Duration,
}

impl NodeRegistryHandle {
    pub fn new(timeout: Duration) -> NodeRegistryHandle {
        NodeRegistryHandle { slot: Arc::new(Slot::new("node registry")), timeout }
    }

    pub(crate) fn slot(&self) -> &Slot<RegistryMsg> {
        &self.slot
    }

    pub async fn register(&self, spec: NodeSpec) -> Result<(), NodeError> {
        Ok(self.slot.call(|r| RegistryMsg::Register(spec.clone(), r), self.timeout).await?)
    }

    pub async fn place(&self, key: &VmKey, vm: &VmSpec) -> Result<Placed, NodeError> {
        self.slot.call(|r| RegistryMsg::Place(key.clone(), vm.clone(), r), self.timeout).await?
    }

    pub async fn claim(&self, node: NodeId, key: &VmKey, vm: &VmSpec) -> Result<Placed, NodeError> {
        self.slot.call(|r| RegistryMsg::Claim(node, key.clone(), vm.clone(), r), self.timeout).await?
    }

    pub fn free(&self, key: &VmKey) {
        self.slot.cast(RegistryMsg::Free(key.clone()));
    }

    pub async fn list(&self) -> Result<Vec<NodeView>, NodeError> {
        Ok(self.slot.call(RegistryMsg::List, self.timeout).await?)
    }

    pub async fn driver(&self, node: NodeId) -> Result<Arc<dyn Hypervisor>, NodeError> {
        self.slot.call(|r| RegistryMsg::Driver(node, r), self.timeout).await?
    }

    pub async fn get(&self, id: NodeId) -> Result<NodeView, NodeError> {
        self.list().await?.into_iter().find(|n| n.id == id).ok_or(NodeError::UnknownNode(id))
    }
}
