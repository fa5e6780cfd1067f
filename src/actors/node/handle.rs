//! `NodeRegistryHandle`: the only way in to the node registry. Cloneable; survives registry
//! restarts (the supervisor swaps the actor in its slot). It also keeps the remote
//! hypervisors of agent-run nodes, so that agents' live connections outlive a registry restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{NodeError, NodeView, Placed, RegistryMsg, VmKey};
use crate::actors::Slot;
use crate::agent::proto::{CacheCounters, Hello, HostStats};
use crate::domain::NodeId;
use crate::domain::node::{AdminState, NodeUse};
use crate::drivers::remote::{AgentLink, RemoteHypervisor};
use crate::drivers::{Hypervisor, VmSpec};

#[derive(Clone)]
pub struct NodeRegistryHandle {
    slot: Arc<Slot<RegistryMsg>>,
    remotes: Arc<Mutex<HashMap<NodeId, Arc<RemoteHypervisor>>>>,
    timeout: Duration,
    command_timeout: Duration,
}

impl NodeRegistryHandle {
    pub fn new(timeout: Duration, command_timeout: Duration) -> NodeRegistryHandle {
        NodeRegistryHandle { slot: Arc::new(Slot::new("node registry")), remotes: Arc::default(), timeout, command_timeout }
    }

    pub(crate) fn slot(&self) -> &Slot<RegistryMsg> {
        &self.slot
    }

    /// The hypervisor of agent-run node `id` (made on first use; one per node for the life of
    /// the process).
    pub fn remote(&self, id: NodeId) -> Arc<RemoteHypervisor> {
        self.remotes.lock().entry(id).or_insert_with(|| Arc::new(RemoteHypervisor::new(self.command_timeout))).clone()
    }

    pub async fn register(&self, spec: super::NodeSpec) -> Result<(), NodeError> {
        Ok(self.slot.call(|r| RegistryMsg::Register(spec.clone(), r), self.timeout).await?)
    }

    /// Record a node that joined with a join token; durable when this returns.
    pub async fn create(&self, name: &str, credential_hash: &str) -> Result<NodeId, NodeError> {
        let (name, credential_hash) = (name.to_string(), credential_hash.to_string());
        self.slot
            .call(|reply| RegistryMsg::Create { name: name.clone(), credential_hash: credential_hash.clone(), reply }, self.timeout)
            .await?
    }

    /// The node whose credential has this SHA-256.
    pub async fn authenticate(&self, credential_hash: &str) -> Result<NodeId, NodeError> {
        let h = credential_hash.to_string();
        self.slot.call(|reply| RegistryMsg::Authenticate { credential_hash: h.clone(), reply }, self.timeout).await?
    }

    /// An agent said hello on `link`; answers the heartbeat interval it must keep.
    pub async fn attach(&self, node: NodeId, hello: Hello, link: Arc<AgentLink>) -> Result<u64, NodeError> {
        self.slot.call(|reply| RegistryMsg::Attach { node, hello: hello.clone(), link: link.clone(), reply }, self.timeout).await?
    }

    pub fn detach(&self, node: NodeId, link: Arc<AgentLink>) {
        self.slot.cast(RegistryMsg::Detach { node, link });
    }

    pub fn heartbeat(&self, node: NodeId, stats: HostStats, cache: Option<CacheCounters>, stock: std::collections::BTreeMap<String, u32>) {
        self.slot.cast(RegistryMsg::Heartbeat { node, stats, cache, stock });
    }

    pub fn image(&self, node: NodeId, sha256: &str, replica: super::Replica) {
        self.slot.cast(RegistryMsg::Image(node, sha256.to_string(), replica));
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

    /// A VM failed to boot on `node`.
    pub fn failed(&self, node: NodeId) {
        self.slot.cast(RegistryMsg::Failed(node));
    }

    pub fn high_water(&self, id: NodeId) {
        self.slot.cast(RegistryMsg::HighWater(id));
    }

    pub fn rated(&self, node: NodeId, stars: u8) {
        self.slot.cast(RegistryMsg::Rated(node, stars));
    }

    /// Set a node's rating totals from the store (after a start or a registry restart).
    pub fn rating_totals(&self, node: NodeId, count: u64, stars: u64) {
        self.slot.cast(RegistryMsg::RatingTotals(node, count, stars));
    }

    pub async fn list(&self) -> Result<Vec<NodeView>, NodeError> {
        Ok(self.slot.call(RegistryMsg::List, self.timeout).await?)
    }

    pub async fn get(&self, id: NodeId) -> Result<NodeView, NodeError> {
        self.list().await?.into_iter().find(|n| n.id == id).ok_or(NodeError::UnknownNode(id))
    }

    pub async fn driver(&self, node: NodeId) -> Result<Arc<dyn Hypervisor>, NodeError> {
        self.slot.call(|r| RegistryMsg::Driver(node, r), self.timeout).await?
    }

    /// An admin's cordon, drain or activate: applied and recorded; answered once durable.
    pub async fn set_admin(&self, node: NodeId, admin: AdminState) -> Result<NodeView, NodeError> {
        self.slot.call(|reply| RegistryMsg::SetAdmin { node, admin, record: true, reply }, self.timeout).await?
    }

    /// Apply an admin state that another instance recorded, without writing it again.
    pub async fn adopt_admin(&self, node: NodeId, admin: AdminState) -> Result<NodeView, NodeError> {
        self.slot.call(|reply| RegistryMsg::SetAdmin { node, admin, record: false, reply }, self.timeout).await?
    }

    pub async fn remove(&self, node: NodeId, force: bool) -> Result<(), NodeError> {
        self.slot.call(|reply| RegistryMsg::Remove { node, force, reply }, self.timeout).await?
    }

    pub async fn uses(&self) -> Result<Vec<(NodeId, NodeUse)>, NodeError> {
        Ok(self.slot.call(RegistryMsg::Uses, self.timeout).await?)
    }
}
