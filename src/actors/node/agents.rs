//! The registry's dealings with agents and admins: a node joining (recorded durably before its
//! id is answered), an agent's credential (adopting from the store a node that joined through
//! another instance of the hive), an agent's hello (attach its connection, then reconcile: destroy domains no
//! pool knows, and tell pools which of their VMs the node no longer holds, before the node is
//! ready again), cordon/drain/activate, and removal.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};

use super::{NodeError, NodeSpec, NodeView, RegistryMsg, RegistryState, StoredNode, forget, refresh, register};
use crate::actors::supervisor::PoolDirectory;
use crate::agent::proto::{Hello, PROTOCOL_VERSION};
use crate::domain::node::{AdminState, NodeClass, NodeState};
use crate::domain::{Millis, NodeId};
use crate::drivers::remote::{AgentLink, RemoteHypervisor};
use crate::store::{Change, NodeRecord};

/// Ids of nodes that join over the network start above this, clear of the simulated nodes
/// that `hive up` numbers from 1.
pub const FIRST_REMOTE_ID: NodeId = 10_000;

/// A stored agent-run node, as the registry takes it at start: registering until its agent
/// connects (and dead if it does not within the dead-after time).
pub fn remote_spec(r: &NodeRecord, remote: Arc<RemoteHypervisor>) -> NodeSpec {
    NodeSpec {
        id: r.id,
        name: r.name.clone(),
        address: r.address.clone(),
        cores: r.cores,
        ram_mb: r.ram_mb,
        disk_mb: r.disk_mb,
        class: NodeClass::parse(&r.class).unwrap_or_default(),
        admin: AdminState::parse(&r.admin).unwrap_or_default(),
        driver: remote.clone(),
        remote: Some(remote),
        driver_name: r.driver.clone(),
        credential_hash: r.credential_hash.clone(),
        created_at: r.created_at,
    }
}

/// A node joins: first learn the highest id the store has issued, since other instances of the
/// hive sharing it issue ids too. Read off the actor, so that a slow database does not hold up
/// placement meanwhile.
pub(super) fn create(
    me: &ActorRef<RegistryMsg>,
    st: &RegistryState,
    name: String,
    credential_hash: String,
    reply: RpcReplyPort<Result<NodeId, NodeError>>,
) {
    let (store, me) = (st.args.writer.store().clone(), me.clone());
    tokio::spawn(async move {
        let issued = match store.node_rows() {
            Some(rows) => rows.max_issued_node_id().await.map_err(|e| e.to_string()),
            None => Ok(0),
        };
        let _ = me.cast(RegistryMsg::CreateAbove { issued, name, credential_hash, reply });
    });
}

/// Record the new node under the next free id (the store's highest issued is in `high_water`).
/// Two instances taking joins at the same moment may still pick the same id: nothing between
/// the read and the write stops it, and the node row is written as an upsert, so the later join
/// would take over the earlier node's row (credential and all) rather than fail. Closing that
/// needs an insert-only write for a new node in the store.
pub(super) async fn create_above(
    me: &ActorRef<RegistryMsg>,
    st: &mut RegistryState,
    name: String,
    credential_hash: String,
    reply: RpcReplyPort<Result<NodeId, NodeError>>,
    now: Millis,
) -> Result<(), ActorProcessingErr> {
    let id = st.nodes.keys().next_back().copied().unwrap_or(0).max(st.high_water).max(FIRST_REMOTE_ID) + 1;
    st.high_water = id;
    let remote = st.args.handle.remote(id);
    let spec = NodeSpec {
        id,
        name,
        address: String::new(),
        cores: 0,
        ram_mb: 0,
        disk_mb: 0,
        class: NodeClass::Participant,
        admin: AdminState::Active,
        driver: remote.clone(),
        remote: Some(remote),
        driver_name: "unknown".into(),
        credential_hash: Some(credential_hash),
        created_at: now,
    };
    let record = spec.record(NodeState::Registering);
    register(me, st, spec, now).await?;
    let me = me.clone();
    st.args.writer.submit(
        vec![Change::Node(record)],
        Box::new(move |r| {
            let _ = me.cast(RegistryMsg::Created(id, r.map_err(|e| e.to_string()), reply));
        }),
    );
    Ok(())
}

fn holder(st: &RegistryState, credential_hash: &str) -> Option<NodeId> {
    st.nodes.values().find(|e| e.spec.credential_hash.as_deref() == Some(credential_hash)).map(|e| e.spec.id)
}

/// Which node holds this credential. One this registry does not know may have joined through
/// another instance sharing the store since this one started: look there (off the actor) and
/// adopt it (`adopt`).
pub(super) fn authenticate(
    me: &ActorRef<RegistryMsg>,
    st: &RegistryState,
    credential_hash: String,
    reply: RpcReplyPort<Result<NodeId, NodeError>>,
) {
    if let Some(id) = holder(st, &credential_hash) {
        let _ = reply.send(Ok(id));
        return;
    }
    let (store, me) = (st.args.writer.store().clone(), me.clone());
    tokio::spawn(async move {
        let found = async {
            let nodes = store.load_nodes().await?;
            let Some(r) = nodes.into_iter().find(|r| r.remote && r.credential_hash.as_deref() == Some(credential_hash.as_str())) else {
                return Ok(None);
            };
            let ratings = match store.node_rows() {
                Some(rows) => rows.rating_totals().await?.into_iter().find(|t| t.0 == r.id).map(|t| (t.1, t.2)).unwrap_or_default(),
                None => (0, 0),
            };
            Ok::<_, crate::store::StoreError>(Some((r, ratings)))
        }
        .await
        .map_err(|e| e.to_string());
        let _ = me.cast(RegistryMsg::Adopt { credential_hash, found, reply });
    });
}

/// Take in a stored node found by its credential, as the registry takes the stored nodes at
/// start: registering until its agent says hello.
pub(super) async fn adopt(
    me: &ActorRef<RegistryMsg>,
    st: &mut RegistryState,
    credential_hash: String,
    found: Result<Option<StoredNode>, String>,
    reply: RpcReplyPort<Result<NodeId, NodeError>>,
    now: Millis,
) -> Result<(), ActorProcessingErr> {
    // Another connection of the same agent may have brought it in meanwhile.
    if let Some(id) = holder(st, &credential_hash) {
        let _ = reply.send(Ok(id));
        return Ok(());
    }
    let r = match found {
        Err(e) => Err(NodeError::Store(e)),
        // An id this registry holds under another credential is not this node's to take over.
        Ok(Some((r, _))) if st.nodes.contains_key(&r.id) => Err(NodeError::BadCredential),
        Ok(None) => Err(NodeError::BadCredential),
        Ok(Some((r, ratings))) => {
            st.high_water = st.high_water.max(r.id);
            register(me, st, remote_spec(&r, st.args.handle.remote(r.id)), now).await?;
            if let Some(e) = st.nodes.get_mut(&r.id) {
                e.ratings = ratings;
            }
            tracing::info!(node.id = r.id, name = %r.name, "a node that joined through another instance of the hive");
            Ok(r.id)
        }
    };
    let _ = reply.send(r);
    Ok(())
}

pub(super) fn attach(
    me: &ActorRef<RegistryMsg>,
    st: &mut RegistryState,
    node: NodeId,
    hello: Hello,
    link: Arc<AgentLink>,
    now: Millis,
) -> Result<u64, NodeError> {
    if hello.version != PROTOCOL_VERSION {
        return Err(NodeError::Invalid { field: "version", reason: format!("this hive speaks version {PROTOCOL_VERSION}") });
    }
    if hello.offer.cores == 0 || hello.offer.ram_mb == 0 {
        return Err(NodeError::Invalid { field: "offer", reason: "a node must offer at least one core and some RAM".into() });
    }
    let e = st.nodes.get_mut(&node).ok_or(NodeError::UnknownNode(node))?;
    let remote = e.spec.remote.clone().ok_or(NodeError::Invalid { field: "node", reason: "not an agent-run node".into() })?;
    remote.set_backend(&hello.driver);
    remote.set_behind_nat(hello.behind_nat);
    remote.attach(Some(link));
    e.link_gen += 1;
    e.health.connected(now);
    e.spec.name = hello.name.clone();
    e.spec.cores = hello.offer.cores;
    e.spec.ram_mb = hello.offer.ram_mb;
    e.spec.disk_mb = hello.offer.disk_mb;
    e.spec.driver_name = hello.driver.clone();
    e.spec.address = hello.addresses.first().cloned().unwrap_or_default();
    e.peer_url = hello.peer_url.clone();
    // What the node says it holds replaces what the hive remembered of it.
    e.images.retain(|_, r| matches!(r, super::Replica::Fetching));
    for sha in &hello.images {
        e.images.insert(sha.clone(), super::Replica::Ready { report: None });
    }
    let link_gen = e.link_gen;
    tracing::info!(node.id = node, name = %hello.name, cores = hello.offer.cores, ram_mb = hello.offer.ram_mb, domains = hello.domains.len(), "agent connected");
    // Persist the offer (and the registering state) now; a failure shows at the next change.
    let record = e.spec.record(NodeState::Registering);
    st.args.writer.submit(vec![Change::Node(record)], Box::new(|_| {}));
    refresh(st, node, now);
    tokio::spawn(reconcile(node, link_gen, hello.domains, remote, st.args.pools.clone(), me.clone()));
    Ok(st.args.timings.heartbeat_ms)
}

/// Compare what the agent holds with what the pools hold on that node. Domains no pool knows
/// are destroyed; pool VMs whose domain is gone leave their pools. Runs while the node is
/// registering, so no new VM can be placed there meanwhile.
async fn reconcile(
    node: NodeId,
    link_gen: u64,
    domains: Vec<String>,
    remote: Arc<RemoteHypervisor>,
    pools: PoolDirectory,
    me: ActorRef<RegistryMsg>,
) {
    let held: BTreeSet<String> = domains.into_iter().collect();
    // Lifecycle VMs belong to the lifecycle service, which keeps its own record of them.
    let mine = |d: &&String| !d.starts_with(crate::domain::lifecycle::DOMAIN_PREFIX);
    let mut known = HashSet::new();
    let mut complete = true;
    for p in pools.list() {
        if !p.running() {
            // Run by another instance (which reconciles its own pools when the agent says
            // hello there too), or restarting: its VMs are unknown here, so destroy nothing.
            tracing::debug!(node.id = node, pool = %p.name(), "pool not run here; orphans are left to its instance");
            complete = false;
            continue;
        }
        match p.status().await {
            Ok(snap) => known.extend(snap.vms.into_iter().filter_map(|v| v.placement).filter(|pl| pl.node == node).map(|pl| pl.domain)),
            Err(e) => {
                // Without every pool's answer an unknown domain may still be someone's VM: keep it.
                tracing::warn!(node.id = node, pool = %p.name(), error = %e, "cannot reconcile with a pool");
                complete = false;
            }
        }
    }
    if complete {
        for d in held.iter().filter(mine).filter(|d| !known.contains(*d)) {
            tracing::info!(node.id = node, domain = %d, "destroying a domain no pool knows");
            if let Err(e) = remote.destroy_domain(d).await {
                tracing::warn!(node.id = node, domain = %d, error = %e, "cannot destroy an orphan domain");
            }
        }
    }
    let _ = me.cast(RegistryMsg::Reconciled { node, link_gen, held });
}

pub(super) fn set_admin(
    st: &mut RegistryState,
    node: NodeId,
    admin: AdminState,
    record: bool,
    reply: RpcReplyPort<Result<NodeView, NodeError>>,
    now: Millis,
) {
    let Some(e) = st.nodes.get_mut(&node) else {
        let _ = reply.send(Err(NodeError::UnknownNode(node)));
        return;
    };
    e.spec.admin = admin;
    e.health.admin = admin;
    tracing::info!(node.id = node, admin = admin.name(), "node admin state");
    refresh(st, node, now);
    let view = st.nodes.get(&node).map(|e| e.view(now)).ok_or(NodeError::UnknownNode(node));
    if !record {
        let _ = reply.send(view);
        return;
    }
    // The answer waits until the intent is durable. Only the admin column is written: the rest
    // of the row belongs to the node's own life, which other instances may be writing too.
    st.args.writer.submit(
        vec![Change::NodeAdmin { id: node, admin: admin.name().into() }],
        Box::new(move |r| {
            let _ = reply.send(r.map_err(|e| NodeError::Store(e.to_string())).and(view));
        }),
    );
}

pub(super) fn remove(st: &mut RegistryState, node: NodeId, force: bool, reply: RpcReplyPort<Result<(), NodeError>>, now: Millis) {
    let Some(e) = st.nodes.get(&node) else {
        let _ = reply.send(Err(NodeError::UnknownNode(node)));
        return;
    };
    if !e.held.is_empty() && !force {
        let why = format!("it runs {} VM(s); drain it first, or remove with force=true", e.held.len());
        let _ = reply.send(Err(NodeError::Busy(node, why)));
        return;
    }
    if let Some(r) = &e.spec.remote {
        r.refuse("removed by an admin");
    }
    tracing::info!(node.id = node, force, "node removed");
    // Its VMs leave the pools as if it had died; then it is forgotten.
    super::tell_pools(st, node, crate::domain::node::NodeUse::Lost);
    forget(st, node);
    let _ = now;
    st.args.writer.submit(
        vec![Change::NodeDeleted { id: node }],
        Box::new(move |r| {
            let _ = reply.send(r.map_err(|e| NodeError::Store(e.to_string())));
        }),
    );
}
