//! What the API shows of a node (`NodeView`) and of an image on a node (`Replica`), built from
//! the registry's entry at one moment.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Entry;
use crate::agent::proto::{CacheCounters, Fetched, HostStats};
use crate::domain::node::{AdminState, NodeClass, NodeState};
use crate::domain::{Millis, NodeId};

/// A node as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub class: NodeClass,
    pub driver: String,
    pub remote: bool,
    pub connected: bool,
    /// The agent said the hive cannot reach its address: VNC goes through its connection.
    pub behind_nat: bool,
    pub address: String,
    pub state: NodeState,
    pub admin: AdminState,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
    pub used_cores: u32,
    pub used_ram_mb: u64,
    pub used_disk_mb: u64,
    pub vms: u32,
    /// 0..=1, from health history, ratings and recent failures (`domain::node::score`).
    pub score: f64,
    pub uptime: f64,
    pub ratings: u64,
    pub rating_avg: Option<f64>,
    pub recent_failures: u32,
    /// When the node entered its current state (ms since the epoch, the hive's clock).
    pub state_since: Millis,
    /// When the agent's last heartbeat arrived, and how long ago (remote nodes).
    pub last_heartbeat_at: Option<Millis>,
    pub heartbeat_age_ms: Option<u64>,
    /// Host context from the last heartbeat.
    pub host: Option<HostStats>,
    /// Where the node serves image pieces to peers.
    pub peer_url: Option<String>,
    /// Images on the node: held (verified), being fetched, or failed.
    pub images: BTreeMap<String, Replica>,
    /// The node cache's read counters, from the last heartbeat.
    pub cache: Option<CacheCounters>,
    /// Ready copies per image (the node's stock), from the last heartbeat.
    pub stock: BTreeMap<String, u32>,
}

/// An image on a node.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Replica {
    Fetching,
    /// Held and verified; `report` when the hive saw the fetch.
    Ready {
        report: Option<Fetched>,
    },
    Failed {
        error: String,
    },
}

impl Entry {
    pub(super) fn view(&self, now: Millis) -> NodeView {
        NodeView {
            id: self.spec.id,
            name: self.spec.name.clone(),
            class: self.spec.class,
            driver: self.spec.driver_name.clone(),
            remote: self.spec.remote.is_some(),
            connected: self.spec.remote.as_ref().is_none_or(|r| r.connected()),
            behind_nat: self.spec.remote.as_ref().is_some_and(|r| r.behind_nat()),
            address: self.spec.address.clone(),
            state: self.state,
            admin: self.spec.admin,
            cores: self.spec.cores,
            ram_mb: self.spec.ram_mb,
            disk_mb: self.spec.disk_mb,
            used_cores: self.used_cores,
            used_ram_mb: self.used_ram_mb,
            used_disk_mb: self.used_disk_mb,
            vms: self.held.len() as u32,
            score: self.score(now),
            uptime: self.health.uptime(),
            ratings: self.ratings.0,
            rating_avg: (self.ratings.0 > 0).then(|| self.ratings.1 as f64 / self.ratings.0 as f64),
            recent_failures: self.recent_failures(now),
            state_since: self.state_since,
            last_heartbeat_at: self.last_heartbeat,
            heartbeat_age_ms: self.last_heartbeat.map(|t| now.saturating_sub(t)),
            host: self.stats.clone(),
            peer_url: self.peer_url.clone(),
            images: self.images.clone(),
            cache: self.cache,
            stock: self.stock.clone(),
        }
    }
}
