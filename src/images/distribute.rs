//! Placing an image's replicas on nodes and moving it there. The admin asks for a replication
//! factor (or names the nodes); a pluggable distributor (`domain::placement`: ROUND_ROBIN,
//! RANDOM, TWO_CHOICES, SORT_UF, ROUND_ROBIN_WEIGHT) picks distinct ready nodes with disk room
//! among those that do not hold it yet. Every chosen node fetches the image's pieces from the
//! others (those that hold it, and those fetching it at the same time: pieces spread while the
//! download runs) and from the hive as origin, and verifies it; the registry records each
//! node's replica as fetching, then ready (with the fetch's counters) or failed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::actors::node::{NodeView, Replica};
use crate::agent::proto::Peer;
use crate::app::Hive;
use crate::domain::NodeId;
use crate::domain::node::NodeState;
use crate::domain::placement::{Bin, Distributor, Strategy};
use crate::images::ImageError;

/// How long a node may take to fetch one image.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributeRequest {
    /// How many more nodes should hold the image (default 1), unless `nodes` names them.
    pub replicas: Option<usize>,
    pub nodes: Option<Vec<NodeId>>,
    /// Default TWO_CHOICES.
    pub distributor: Option<Strategy>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Distribution {
    pub image: String,
    pub strategy: Strategy,
    pub nodes: Vec<NodeId>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaView {
    pub node: NodeId,
    #[serde(flatten)]
    pub replica: Replica,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ImageError {
    ImageError::Invalid { field, reason: reason.into() }
}

/// Can `n` take a new replica of an image of `size_mb`? (A node whose last fetch failed may
/// try again.)
fn candidate(n: &NodeView, sha: &str, size_mb: u64) -> bool {
    let has = matches!(n.images.get(sha), Some(Replica::Ready { .. } | Replica::Fetching));
    n.remote
        && n.connected
        && n.state == NodeState::Ready
        && n.peer_url.is_some()
        && !has
        && n.disk_mb.saturating_sub(n.used_disk_mb) >= size_mb
}

impl Hive {
    pub async fn distribute(&self, sha256: &str, req: DistributeRequest) -> Result<Distribution, ImageError> {
        let image = self.images().get(sha256).await?;
        let views = self.nodes().await.map_err(|e| ImageError::Io(e.to_string()))?;
        let size_mb = image.size.div_ceil(1 << 20);
        let strategy = req.distributor.unwrap_or(Strategy::TwoChoices);
        let chosen: Vec<NodeId> = match req.nodes {
            Some(mut ids) => {
                ids.sort_unstable();
                ids.dedup();
                if ids.is_empty() {
                    return Err(invalid("nodes", "name at least one node"));
                }
                for id in &ids {
                    let n = views.iter().find(|n| n.id == *id).ok_or_else(|| invalid("nodes", format!("no node {id}")))?;
                    if !candidate(n, sha256, size_mb) {
                        let why = format!("node {id} cannot take it now (state {}, has it: {:?})", n.state.name(), n.images.get(sha256));
                        return Err(invalid("nodes", why));
                    }
                }
                ids
            }
            None => {
                let replicas = req.replicas.unwrap_or(1);
                if replicas == 0 {
                    return Err(invalid("replicas", "at least 1"));
                }
                let bins: Vec<Bin> = views
                    .iter()
                    .filter(|n| candidate(n, sha256, size_mb))
                    .map(|n| Bin { id: n.id, capacity: n.disk_mb, used: n.used_disk_mb, weight: n.cores.max(1) })
                    .collect();
                Distributor::new(strategy, self.now()).place(&bins, size_mb, replicas).map_err(|e| invalid("replicas", e.to_string()))?
            }
        };
        // Everyone who holds it or is about to fetch it is a peer of everyone else.
        let peers: Vec<Peer> = views
            .iter()
            .filter(|n| chosen.contains(&n.id) || matches!(n.images.get(sha256), Some(Replica::Ready { .. } | Replica::Fetching)))
            .filter_map(|n| Some(Peer { node: n.id, url: n.peer_url.clone()? }))
            .collect();
        let nodes = self.nodes_handle().clone();
        for id in &chosen {
            nodes.image(*id, sha256, Replica::Fetching);
            let (remote, nodes, sha) = (nodes.remote(*id), nodes.clone(), sha256.to_string());
            let peers: Vec<Peer> = peers.iter().filter(|p| p.node != *id).cloned().collect();
            let id = *id;
            tokio::spawn(async move {
                let replica = match remote.fetch_image(&sha, peers, FETCH_TIMEOUT).await {
                    Ok(report) if report.verified && report.sha256 == sha => Replica::Ready { report: Some(report) },
                    Ok(report) => Replica::Failed { error: format!("the node fetched {} but did not verify it", report.sha256) },
                    Err(e) => Replica::Failed { error: e.to_string() },
                };
                if let Replica::Failed { error } = &replica {
                    tracing::warn!(node.id = id, image = %sha, error = %error, "image fetch failed");
                }
                nodes.image(id, &sha, replica);
            });
        }
        tracing::info!(image = %sha256, nodes = ?chosen, ?strategy, "distributing");
        Ok(Distribution { image: sha256.to_string(), strategy, nodes: chosen })
    }

    /// Every node's replica of the image.
    pub async fn replicas(&self, sha256: &str) -> Result<Vec<ReplicaView>, ImageError> {
        self.images().get(sha256).await?;
        let views = self.nodes().await.map_err(|e| ImageError::Io(e.to_string()))?;
        Ok(views.into_iter().filter_map(|n| Some(ReplicaView { node: n.id, replica: n.images.get(sha256)?.clone() })).collect())
    }
}
