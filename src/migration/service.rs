//! The hive's side of migrations: endpoints and their resources, migrations and their runs.
//! A plain cloneable struct (like the image registry), not an actor yet: its state is the store,
//! and one lock serialises every change of a migration (`Migration::apply` on the stored row,
//! persisted before its effects are carried out), so a cancel and a worker's report never
//! interleave. Work runs in tasks that report back through the same methods:
//!
//! - scheduling picks the worker by free conversion space (agents' heartbeats), retrying on
//!   other nodes after failures (`domain::migration`);
//! - the worker's agent fetches, converts and uploads the disk (`Command::Migrate`), sending
//!   `MigrationStep`s; the upload lands in the image registry through `accept_upload`;
//! - the hive then boots an instance of the image on the destination node and checks it runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::actors::Clock;
use crate::actors::node::NodeRegistryHandle;
use crate::agent::proto::{CmdOk, Command};
use crate::domain::migration::{
    Discovered, Endpoint, Event, Migration, MigrationEffect, MigrationInput, MigrationRuleError, Resource, Role, WorkerCandidate,
    choose_worker, known_driver,
};
use crate::domain::{Millis, NodeId};
use crate::migration::fetch::{SourceKind, SourceSpec};
use crate::store::migrations::{EndpointUpdate, MigrationStore};
use crate::store::{Store, StoreError};

/// A worker's run of one attempt may take this long (a big disk over a slow link).
const RUN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// A node's free-space report older than this does not count.
const SCRATCH_STALE_MS: Millis = 30_000;
/// How long scheduling waits for a node to come up or free space before it gives up: agents
/// reconnect within seconds after they or the hive restarted.
const SCHEDULE_PATIENCE: Duration = Duration::from_secs(10);
const SCHEDULE_RETRY: Duration = Duration::from_millis(500);
/// How often endpoints are checked; they count as Down after `STALE_AFTER_MS` without a check.
pub const HEARTBEAT: Duration = Duration::from_secs(20);
pub const STALE_AFTER_MS: Millis = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("{0}")]
    Invalid(String),
    #[error("no {what} {id}")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Rule(#[from] MigrationRuleError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Unavailable(String),
}

/// Someone asked for a migration.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMigration {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub resource_id: u64,
    pub destination_id: u64,
}

/// Someone registered an endpoint.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub params: Value,
}

#[derive(Clone)]
pub struct Migrations {
    store: Arc<dyn Store>,
    nodes: NodeRegistryHandle,
    clock: Clock,
    /// Free conversion bytes per node, and when it was reported.
    scratch: Arc<Mutex<HashMap<NodeId, (u64, Millis)>>>,
    /// Serialises read-apply-write of migrations.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Migrations {
    pub fn new(store: Arc<dyn Store>, nodes: NodeRegistryHandle, clock: Clock) -> Migrations {
        Migrations { store, nodes, clock, scratch: Arc::default(), lock: Arc::default() }
    }

    fn rows(&self) -> Result<&dyn MigrationStore, MigrationError> {
        self.store.migrations().ok_or_else(|| MigrationError::Unavailable("this store keeps no migrations".into()))
    }

    /// An agent's heartbeat said how much conversion space its node has.
    pub fn scratch_free(&self, node: NodeId, free: Option<u64>) {
        let mut s = self.scratch.lock();
        match free {
            Some(f) => s.insert(node, (f, self.clock.now())),
            None => s.remove(&node),
        };
    }

    // ---- endpoints and resources

    pub async fn add_endpoint(&self, role: Role, new: NewEndpoint) -> Result<Endpoint, MigrationError> {
        let mut e = checked_endpoint(role, new)?;
        match self.rows()?.insert_endpoint(&e).await? {
            Some(id) => e.id = id,
            None => return Err(MigrationError::Conflict(format!("a {} named {:?} exists", role.name(), e.name))),
        }
        Ok(e)
    }

    pub async fn endpoints(&self, role: Role) -> Result<Vec<Endpoint>, MigrationError> {
        Ok(self.rows()?.endpoints().await?.into_iter().filter(|e| e.role == role).collect())
    }

    pub async fn endpoint(&self, role: Role, id: u64) -> Result<Endpoint, MigrationError> {
        match self.rows()?.endpoint(id).await? {
            Some(e) if e.role == role => Ok(e),
            _ => Err(MigrationError::NotFound { what: role.name(), id: id.to_string() }),
        }
    }

    pub async fn remove_endpoint(&self, role: Role, id: u64) -> Result<(), MigrationError> {
        self.endpoint(role, id).await?;
        let _guard = self.lock.lock().await;
        let rows = self.rows()?;
        let resources: Vec<u64> = rows.resources(Some(id)).await?.iter().map(|r| r.id).collect();
        if let Some(m) = rows
            .migrations()
            .await?
            .iter()
            .find(|m| !m.is_finished() && (m.destination_id == id && role == Role::Destination || resources.contains(&m.resource_id)))
        {
            return Err(MigrationError::Conflict(format!("migration {} ({}) still uses {} {id}", m.id, m.status.name(), role.name())));
        }
        rows.delete_endpoint(id).await?;
        Ok(())
    }

    /// Ask a node to list what source `id` holds, and make that its resource list.
    pub async fn discover(&self, id: u64) -> Result<Vec<Resource>, MigrationError> {
        let mut e = self.endpoint(Role::Source, id).await?;
        let spec = source_spec(&e)?;
        let node =
            self.any_worker().ok_or_else(|| MigrationError::Unavailable("no node agent is connected to look at the source".into()))?;
        let now = self.clock.now();
        let answer = self.nodes.remote(node).agent_call(Command::Discover { source: spec }).await;
        let ok = answer.is_ok();
        e.heartbeat(ok, node, now);
        let _ = self.rows()?.set_endpoint_health(&e).await;
        let found = match answer {
            Ok(CmdOk::Resources(r)) => r,
            Ok(other) => return Err(MigrationError::Unavailable(format!("node {node} answered {other:?}"))),
            Err(err) => return Err(MigrationError::Unavailable(format!("node {node} could not read source {id}: {err}"))),
        };
        let discovered = found
            .into_iter()
            .map(|r| Discovered {
                id_at_source: r.id_at_source,
                kind: match r.kind {
                    crate::migration::fetch::ResourceKind::Instance => crate::domain::migration::ResourceKind::Instance,
                    crate::migration::fetch::ResourceKind::Volume => crate::domain::migration::ResourceKind::Volume,
                },
                name: r.name,
                properties: r.properties,
            })
            .collect();
        self.rows()?.replace_resources(id, discovered).await?;
        Ok(self.rows()?.resources(Some(id)).await?)
    }

    /// One round of endpoint heartbeats: each source is probed from a connected node (its
    /// worker agent reaches it, or not); a `hive` destination is up when its node (or, without
    /// one, any node) is connected. Run every `HEARTBEAT` by `heartbeats`.
    pub async fn check_endpoints(&self) -> Result<(), MigrationError> {
        let now = self.clock.now();
        for mut e in self.rows()?.endpoints().await? {
            let (ok, node) = match e.role {
                Role::Source => {
                    let Some(node) = self.any_worker() else { continue };
                    let Ok(spec) = source_spec(&e) else { continue };
                    (self.nodes.remote(node).agent_call(Command::ProbeSource { source: spec }).await.is_ok(), node)
                }
                Role::Destination => match destination_node(&e) {
                    Ok(Some(node)) => (self.nodes.remote(node).connected(), node),
                    Ok(None) => match self.any_worker() {
                        Some(node) => (true, node),
                        None => continue,
                    },
                    Err(_) => continue,
                },
            };
            if e.heartbeat(ok, node, now) {
                tracing::info!(endpoint = e.id, role = e.role.name(), name = %e.name, state = e.state.name(), "migration endpoint changed state");
            }
            self.rows()?.set_endpoint_health(&e).await?;
        }
        Ok(())
    }

    /// Endpoint heartbeats, for the hive's life.
    pub async fn heartbeats(self) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tick.tick().await;
            if let Err(e) = self.check_endpoints().await {
                tracing::warn!(error = %e, "migration endpoint heartbeat failed");
            }
        }
    }

    pub async fn resources(&self, source: Option<u64>) -> Result<Vec<Resource>, MigrationError> {
        Ok(self.rows()?.resources(source).await?)
    }

    // ---- migrations

    pub async fn create(&self, new: NewMigration) -> Result<Migration, MigrationError> {
        // The migration names the image it makes, so it must be a valid image name.
        let chars = new.name.chars().count();
        if new.name.trim().is_empty() || chars > crate::images::NAME_MAX_CHARS {
            let max = crate::images::NAME_MAX_CHARS;
            return Err(MigrationError::Invalid(format!("name: 1 to {max} characters, not blank (got {chars})")));
        }
        if new.name.chars().any(char::is_control) {
            return Err(MigrationError::Invalid("name: must not contain control characters".into()));
        }
        let rows = self.rows()?;
        let resource = rows
            .resource(new.resource_id)
            .await?
            .ok_or_else(|| MigrationError::NotFound { what: "resource", id: new.resource_id.to_string() })?;
        self.endpoint(Role::Destination, new.destination_id).await?;
        let _guard = self.lock.lock().await;
        if let Some(m) = rows.migrations().await?.iter().find(|m| m.resource_id == resource.id && !m.is_finished()) {
            return Err(MigrationError::Conflict(format!("resource {} is already being migrated by migration {}", resource.id, m.id)));
        }
        let mut m = Migration::new(new.name, new.description, resource.id, new.destination_id, self.clock.now());
        m.id = rows.insert_migration(&m).await?;
        let effects = m.start_effects();
        drop(_guard);
        self.carry_out(m.id, effects);
        Ok(m)
    }

    /// After a start: migrations that had not finished are driven on. A run in flight ended with
    /// the old process (its worker's connection went with it), so it counts as a lost worker and
    /// is retried on another node; one waiting for a worker is scheduled.
    pub async fn resume(&self) {
        let all = match self.list().await {
            Ok(all) => all,
            Err(e) => return tracing::warn!(error = %e, "cannot resume migrations"),
        };
        for m in all.into_iter().filter(|m| !m.is_finished()) {
            match m.worker.filter(|_| !m.waiting_for_worker()) {
                Some(node) => {
                    let lost = MigrationInput::WorkerFailed { node, error: "the hive restarted while it ran".into() };
                    if let Err(e) = self.input(m.id, lost).await {
                        tracing::warn!(migration = m.id, error = %e, "cannot resume migration");
                    }
                }
                None => self.carry_out(m.id, m.start_effects()),
            }
        }
    }

    pub async fn list(&self) -> Result<Vec<Migration>, MigrationError> {
        Ok(self.rows()?.migrations().await?)
    }

    pub async fn get(&self, id: u64) -> Result<Migration, MigrationError> {
        self.rows()?.migration(id).await?.ok_or_else(|| MigrationError::NotFound { what: "migration", id: id.to_string() })
    }

    pub async fn cancel(&self, id: u64) -> Result<Migration, MigrationError> {
        self.input(id, MigrationInput::Cancel).await
    }

    pub async fn delete(&self, id: u64) -> Result<(), MigrationError> {
        let _guard = self.lock.lock().await;
        let m = self.get(id).await?;
        m.check_delete()?;
        self.rows()?.delete_migration(id).await?;
        Ok(())
    }

    /// A worker's progress report; reports from a node that is not the job's worker (a run
    /// superseded by a retry) are dropped.
    pub async fn step(&self, node: NodeId, id: u64, event: Event, percent: u8) {
        if let Err(e) = self.input(id, MigrationInput::Step { node, event, step_progress: percent }).await {
            tracing::debug!(migration = id, node, error = %e, "step report ignored");
        }
    }

    /// Apply `input` to migration `id` under the lock, persist, then carry out the effects.
    async fn input(&self, id: u64, input: MigrationInput) -> Result<Migration, MigrationError> {
        let _guard = self.lock.lock().await;
        let mut m = self.get(id).await?;
        let before = m.status;
        let effects = m.apply(input, self.clock.now())?;
        if !self.rows()?.update_migration(&m, before).await? {
            return Err(MigrationError::Conflict(format!("migration {id} changed meanwhile; ask again")));
        }
        drop(_guard);
        self.carry_out(id, effects);
        Ok(m)
    }

    fn carry_out(&self, id: u64, effects: Vec<MigrationEffect>) {
        for effect in effects {
            let this = self.clone();
            tokio::spawn(async move {
                match effect {
                    MigrationEffect::Schedule { tried } => this.schedule(id, &tried).await,
                    MigrationEffect::Start { node } => this.run(id, node).await,
                    MigrationEffect::Stop { node } => {
                        if let Err(e) = this.nodes.remote(node).agent_call(Command::CancelMigration { job: id }).await {
                            tracing::info!(migration = id, node, error = %e, "could not tell the worker to stop (it may be gone)");
                        }
                    }
                    MigrationEffect::MarkMigrated { resource_id } => {
                        if let Ok(rows) = this.rows() {
                            let _ = rows.set_resource_migrated(resource_id, true).await;
                        }
                    }
                }
            });
        }
    }

    /// A connected node with a recent free-space report, preferring the most space.
    fn any_worker(&self) -> Option<NodeId> {
        self.candidates().into_iter().filter(|c| c.up).max_by_key(|c| (c.free_conversion_bytes, std::cmp::Reverse(c.node))).map(|c| c.node)
    }

    fn candidates(&self) -> Vec<WorkerCandidate> {
        let now = self.clock.now();
        let scratch = self.scratch.lock().clone();
        scratch
            .into_iter()
            .map(|(node, (free, at))| WorkerCandidate {
                node,
                free_conversion_bytes: free,
                up: now.saturating_sub(at) <= SCRATCH_STALE_MS && self.nodes.remote(node).connected(),
                accepts_migrations: true,
            })
            .collect()
    }

    async fn schedule(&self, id: u64, tried: &[NodeId]) {
        let needed = match self.needed_bytes(id).await {
            Ok(n) => n,
            Err(e) => {
                let _ = self.input(id, MigrationInput::Unschedulable { reason: e.to_string() }).await;
                return;
            }
        };
        let deadline = tokio::time::Instant::now() + SCHEDULE_PATIENCE;
        let input = loop {
            match choose_worker(&self.candidates(), needed, tried) {
                Ok(node) => break MigrationInput::Scheduled { node },
                Err(why) if why.may_change() && tokio::time::Instant::now() < deadline => {
                    // Cancelled meanwhile: nothing left to schedule.
                    if !self.get(id).await.is_ok_and(|m| m.waiting_for_worker()) {
                        return;
                    }
                    tokio::time::sleep(SCHEDULE_RETRY).await;
                }
                Err(why) => break MigrationInput::Unschedulable { reason: why.to_string() },
            }
        };
        if let Err(e) = self.input(id, input).await {
            tracing::warn!(migration = id, error = %e, "scheduling result not applied");
        }
    }

    /// Room the worker needs: the source's disk twice (the fetched copy and the qcow2), when
    /// the source said how big it is.
    async fn needed_bytes(&self, id: u64) -> Result<u64, MigrationError> {
        let m = self.get(id).await?;
        let r = self.rows()?.resource(m.resource_id).await?;
        Ok(r.map(|r| disk_bytes(&r.properties).saturating_mul(2)).unwrap_or(0))
    }

    /// One attempt on `node`: the worker's pipeline, then the boot at the destination.
    async fn run(&self, id: u64, node: NodeId) {
        let outcome = self.attempt(id, node).await;
        let input = match outcome {
            Ok(result) => MigrationInput::Completed { node, result },
            Err(Failure::Step { error, retryable }) => MigrationInput::StepFailed { node, error, retryable },
            Err(Failure::Lost(error)) => MigrationInput::WorkerFailed { node, error },
            Err(Failure::Cancelled) => return,
        };
        if let Err(e) = self.input(id, input).await {
            tracing::info!(migration = id, node, error = %e, "attempt result not applied (cancelled or superseded)");
        }
    }

    async fn attempt(&self, id: u64, node: NodeId) -> Result<Value, Failure> {
        let m = self.get(id).await.map_err(|e| Failure::step(e.to_string()))?;
        let rows = self.rows().map_err(|e| Failure::step(e.to_string()))?;
        let resource = rows
            .resource(m.resource_id)
            .await
            .map_err(|e| Failure::Lost(e.to_string()))?
            .ok_or_else(|| Failure::step(format!("resource {} is gone", m.resource_id)))?;
        let source = match rows.endpoint(resource.source_id).await {
            Ok(Some(e)) => e,
            Ok(None) => return Err(Failure::step(format!("source {} is gone", resource.source_id))),
            Err(e) => return Err(Failure::Lost(e.to_string())),
        };
        let spec = source_spec(&source).map_err(|e| Failure::step(e.to_string()))?;
        let cmd = Command::Migrate { job: id, source: spec, id_at_source: resource.id_at_source.clone(), upload_path: upload_path(id) };
        let image = match self.nodes.remote(node).migrate(cmd, RUN_TIMEOUT).await {
            Ok(CmdOk::Migrated(image)) => image,
            Ok(CmdOk::MigrationFailed { cancelled: true, .. }) => return Err(Failure::Cancelled),
            Ok(CmdOk::MigrationFailed { error, retryable, .. }) => return Err(Failure::Step { error, retryable }),
            Ok(other) => return Err(Failure::Lost(format!("node {node} answered {other:?}"))),
            Err(e) => return Err(Failure::Lost(format!("node {node}: {e}"))),
        };
        let destination = rows
            .endpoint(m.destination_id)
            .await
            .map_err(|e| Failure::Lost(e.to_string()))?
            .ok_or_else(|| Failure::step(format!("destination {} is gone", m.destination_id)))?;
        self.step(node, id, Event::BootingInstance, 0).await;
        let booted = super::boot::boot_check(&self.nodes, &destination, &image, &m.name).await.map_err(Failure::step)?;
        Ok(json!({"image": image, "destination": destination.name, "instance": booted}))
    }

    /// The worker's upload arrives: only while `node` runs migration `id`.
    pub async fn upload_allowed(&self, id: u64, node: NodeId) -> Result<Migration, MigrationError> {
        let m = self.get(id).await?;
        if m.worker != Some(node) || m.is_finished() {
            return Err(MigrationError::Conflict(format!("node {node} is not running migration {id}")));
        }
        Ok(m)
    }

    /// Update a destination's or source's parameters (name, params), keeping its id.
    /// Replace an endpoint's name, type and parameters, checked as when it was added; its
    /// state (Up/Down) stays until the next heartbeat.
    pub async fn edit_endpoint(&self, role: Role, id: u64, new: NewEndpoint) -> Result<Endpoint, MigrationError> {
        let checked = checked_endpoint(role, new)?;
        let mut e = self.endpoint(role, id).await?;
        e.name = checked.name;
        e.kind = checked.kind;
        e.params = checked.params;
        match self.rows()?.update_endpoint(&e).await? {
            EndpointUpdate::Done => Ok(e),
            EndpointUpdate::NotFound => Err(MigrationError::NotFound { what: role.name(), id: id.to_string() }),
            EndpointUpdate::NameTaken => Err(MigrationError::Conflict(format!("a {} named {:?} exists", role.name(), e.name))),
        }
    }
}

/// The endpoint `new` describes, checked: a name of 1 to 100 characters, a known type, and the
/// parameters its role needs (what a source is read from; the node a destination names).
fn checked_endpoint(role: Role, new: NewEndpoint) -> Result<Endpoint, MigrationError> {
    if new.name.trim().is_empty() || new.name.len() > 100 {
        return Err(MigrationError::Invalid("name: 1 to 100 characters".into()));
    }
    if !known_driver(&new.kind) {
        return Err(MigrationError::Invalid(format!(
            "type: {:?} is not one of {}",
            new.kind,
            crate::domain::migration::DRIVERS.join(", ")
        )));
    }
    let e = Endpoint::new(role, new.name, new.kind, if new.params.is_null() { json!({}) } else { new.params });
    match role {
        Role::Source => {
            source_spec(&e)?;
        }
        Role::Destination => {
            destination_node(&e)?;
        }
    }
    Ok(e)
}

enum Failure {
    Step { error: String, retryable: bool },
    Lost(String),
    Cancelled,
}

impl Failure {
    fn step(error: String) -> Failure {
        Failure::Step { error, retryable: false }
    }
}

/// Where a worker uploads migration `id`'s converted disk.
pub fn upload_path(id: u64) -> String {
    format!("/api/v1/agent/migrations/{id}/disk")
}

/// Bytes of a resource's disks, as discovery reported them (`size` or `disks[].size`).
fn disk_bytes(p: &Value) -> u64 {
    let own = p["size"].as_u64().unwrap_or(0);
    let disks: u64 = p["disks"].as_array().map(|d| d.iter().filter_map(|x| x["size"].as_u64()).sum()).unwrap_or(0);
    own.max(disks)
}

/// How a worker reaches a source. VMware, Hyper-V and VirtualBox sources are their exported
/// disks (vmdk, vhd/vhdx, vdi), in a directory (`dir`) or under a URL (`base_url`).
pub fn source_spec(e: &Endpoint) -> Result<SourceSpec, MigrationError> {
    let kind = match e.kind.as_str() {
        "libvirt" => SourceKind::Libvirt,
        "file" => SourceKind::File,
        "http" => SourceKind::Http,
        "vmware" | "hyperv" | "virtualbox" if e.params.get("dir").is_some() => SourceKind::File,
        "vmware" | "hyperv" | "virtualbox" if e.params.get("base_url").is_some() => SourceKind::Http,
        "vmware" | "hyperv" | "virtualbox" => {
            return Err(MigrationError::Invalid(format!(
                "params: a {} source is its exported disks: give \"dir\" or \"base_url\"",
                e.kind
            )));
        }
        other => return Err(MigrationError::Invalid(format!("type: {other:?} cannot be a source"))),
    };
    SourceSpec::from_parts(kind, e.params.clone()).map_err(|err| MigrationError::Invalid(format!("params: {err}")))
}

/// A destination is the hive itself: `{"node": id}` names the node to boot on (default: the
/// worker that converted the disk is not assumed; any connected node).
pub fn destination_node(e: &Endpoint) -> Result<Option<NodeId>, MigrationError> {
    if e.kind != "hive" {
        return Err(MigrationError::Invalid(format!("type: {:?} destinations are not supported yet; use \"hive\"", e.kind)));
    }
    match e.params.get("node") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| MigrationError::Invalid("params.node: a node id (a positive integer)".into())),
    }
}
