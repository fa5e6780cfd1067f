//! Node membership and the participants' side of the books: join tokens (one-time, expiring,
//! stored only as hashes), their exchange for a node's own credential, authenticating an
//! agent's connection, the rewards ledger (VM-seconds × cores served, per node and period),
//! and end users' ratings of the sessions a node served.
//!
//! Tokens (`hjt_…`) and credentials (`hnc_…`) are random 40-character strings behind a
//! prefix that says what they are; the hive keeps only their SHA-256.

use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::actors::node::NodeError;
use crate::actors::pool::PoolError;
use crate::app::Hive;
use crate::domain::{Millis, NodeId};
use crate::store::{NodeStore, Rating, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("the join token is unknown, used or expired")]
    BadJoinToken,
    #[error("the node credential is not valid")]
    BadCredential,
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("no session {1} in pool {0}")]
    UnknownSession(String, u64),
    #[error("session {1} of pool {0} has no VM yet; rate it once it has one")]
    NotAssigned(String, u64),
    #[error("session {1} of pool {0} was rated already")]
    AlreadyRated(String, u64),
    #[error("this store keeps no node rows")]
    NoNodeStore,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

#[derive(Debug, Clone, Serialize)]
pub struct JoinToken {
    pub token: String,
    pub expires_at: Millis,
}

#[derive(Debug, Clone, Serialize)]
pub struct Joined {
    pub node_id: NodeId,
    /// The node's own credential: shown once, kept by the agent.
    pub credential: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rewards {
    pub node: NodeId,
    pub from: Millis,
    pub to: Millis,
    /// User sessions that overlap the period (ended or still running).
    pub sessions: u64,
    pub vm_seconds: f64,
    /// What the node is rewarded for: VM-seconds × cores.
    pub core_seconds: f64,
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub(crate) fn secret() -> String {
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(40).map(char::from).collect()
}

impl Hive {
    fn node_rows(&self) -> Result<&dyn NodeStore, MembershipError> {
        self.store().node_rows().ok_or(MembershipError::NoNodeStore)
    }

    pub async fn create_join_token(&self) -> Result<JoinToken, MembershipError> {
        let token = format!("hjt_{}", secret());
        let now = self.now();
        let expires_at = now + self.config().node.join_token_ttl_secs * 1000;
        self.node_rows()?.add_join_token(&sha256_hex(&token), now, expires_at).await?;
        Ok(JoinToken { token, expires_at })
    }

    /// Exchange a join token for a new node and its credential. The token is used up even if
    /// recording the node fails afterwards (ask an admin for another; never a double join).
    pub async fn join(&self, token: &str, name: &str) -> Result<Joined, MembershipError> {
        if !(1..=80).contains(&name.chars().count()) || name.chars().any(char::is_control) {
            return Err(MembershipError::Invalid { field: "name", reason: "1 to 80 printable characters".into() });
        }
        let hash = sha256_hex(token);
        // Claim the token first (atomically), then create the node and note which it became.
        if !token.starts_with("hjt_") || !self.node_rows()?.consume_join_token(&hash, self.now()).await? {
            return Err(MembershipError::BadJoinToken);
        }
        let credential = format!("hnc_{}", secret());
        let node_id = self.nodes_handle().create(name, &sha256_hex(&credential)).await?;
        self.node_rows()?.join_token_used_by(&hash, node_id).await?;
        tracing::info!(node.id = node_id, name, "node joined");
        Ok(Joined { node_id, credential })
    }

    /// Check an agent's credential; answers the node it belongs to.
    pub async fn authenticate_agent(&self, credential: &str) -> Result<NodeId, MembershipError> {
        if !credential.starts_with("hnc_") {
            return Err(MembershipError::BadCredential);
        }
        match self.nodes_handle().authenticate(&sha256_hex(credential)).await {
            Ok(node) => Ok(node),
            Err(NodeError::BadCredential) => Err(MembershipError::BadCredential),
            Err(e) => Err(e.into()),
        }
    }

    /// What `node` served in `[from, to)`: ended sessions from the ledger plus sessions that
    /// are running now.
    pub async fn rewards(&self, node: NodeId, from: Millis, to: Millis) -> Result<Rewards, MembershipError> {
        if from >= to {
            return Err(MembershipError::Invalid { field: "from", reason: format!("from ({from}) must be before to ({to})") });
        }
        self.node(node).await?;
        let mut spans: Vec<(u32, Millis, Millis)> =
            self.node_rows()?.served(node, from, to).await?.into_iter().map(|r| (r.cores, r.started_at, r.ended_at)).collect();
        let now = self.now();
        let cores = self.config().vm.cores;
        for pool in self.pools() {
            let Ok(snap) = pool.status().await else { continue };
            for h in &snap.handles {
                let Some(vm) = h.vm.and_then(|id| snap.vms.iter().find(|v| v.id == id)) else { continue };
                if vm.placement.as_ref().is_some_and(|p| p.node == node) {
                    spans.push((cores, vm.since, now));
                }
            }
        }
        let mut r = Rewards { node, from, to, sessions: 0, vm_seconds: 0.0, core_seconds: 0.0 };
        for (cores, a, b) in spans {
            let (a, b) = (a.max(from), b.min(to));
            if a < b {
                let secs = (b - a) as f64 / 1000.0;
                r.sessions += 1;
                r.vm_seconds += secs;
                r.core_seconds += secs * f64::from(cores);
            }
        }
        Ok(r)
    }

    /// An end user rates session `handle` of `pool` (running or ended), once.
    pub async fn rate(&self, pool_name: &str, handle: u64, stars: u8, comment: &str) -> Result<Rating, MembershipError> {
        if !(1..=5).contains(&stars) {
            return Err(MembershipError::Invalid { field: "stars", reason: format!("{stars} is not between 1 and 5") });
        }
        if comment.chars().count() > 1000 {
            return Err(MembershipError::Invalid { field: "comment", reason: "at most 1000 characters".into() });
        }
        let pool = self.pool(pool_name)?;
        let snap = pool.status().await?;
        let live = snap.handles.iter().find(|h| h.id == handle);
        let (node, started) = match live {
            Some(h) => {
                let vm = h.vm.and_then(|id| snap.vms.iter().find(|v| v.id == id));
                let Some((node, since)) = vm.and_then(|v| Some((v.placement.as_ref()?.node, v.since))) else {
                    return Err(MembershipError::NotAssigned(pool_name.into(), handle));
                };
                (node, since)
            }
            None => match self.node_rows()?.last_served(pool_name, handle).await? {
                Some(r) => (r.node_id, r.started_at),
                None => return Err(MembershipError::UnknownSession(pool_name.into(), handle)),
            },
        };
        let rating = Rating {
            pool: pool_name.into(),
            handle,
            session_started: started,
            node_id: node,
            stars,
            comment: comment.into(),
            created_at: self.now(),
        };
        if !self.node_rows()?.add_rating(&rating).await? {
            return Err(MembershipError::AlreadyRated(pool_name.into(), handle));
        }
        self.nodes_handle().rated(node, stars);
        Ok(rating)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_hashed() {
        assert_ne!(secret(), secret());
        assert_eq!(secret().len(), 40);
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
