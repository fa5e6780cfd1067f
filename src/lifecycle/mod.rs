//! The image lifecycle service, owned by `Hive`: users with bearer tokens and the objects
//! baseimage → environment → deployment → app. Every command is decided by the pure rules in
//! `domain::lifecycle` and made durable before it is answered or applied in memory; decisions
//! are taken one at a time (one table lock), so two commands on one object never interleave.
//! Long backend work (clone, boot, scripts, snapshots, deletion) runs in a spawned task per
//! object (`steps.rs`) that persists each phase change; an object in an automatic phase refuses
//! every other command, so at most one step runs per object. After a restart an object whose
//! automatic step was in flight is Failed with a reason; the others are as they were.

mod requests;
mod steps;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use self::requests::{AppRequest, BaseimageRequest, DeploymentRequest, DeriveRequest, EnvironmentRequest};
use crate::actors::Clock;
use crate::actors::node::{NodeRegistryHandle, VmKey};
use crate::domain::lifecycle::{Book, Caller, ConsoleInfo, Kind, Object, Phase, Refusal, Runtime, forward};
use crate::drivers::VmSpec;
use crate::membership::sha256_hex;
use crate::store::{LifecycleStore, Store, StoreError, UserRecord};

/// The pool name under which lifecycle VMs hold node capacity. Real pool names are
/// `[a-z0-9_-]`, so this one can never collide with a pool's.
pub const VM_POOL: &str = "@lifecycle";

/// User tokens are `hut_` + 40 random characters.
const TOKEN_PREFIX: &str = "hut_";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("no user {0}")]
    UnknownUser(String),
    #[error("a user named {0} exists already")]
    UserExists(String),
    #[error("this store keeps no users or lifecycle objects")]
    NoStore,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LifecycleError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> LifecycleError {
        Refusal::Invalid { field, reason: reason.into() }.into()
    }
}

/// A new user and their token, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct NewUser {
    pub name: String,
    pub token: String,
    pub max_environments: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserView {
    pub name: String,
    pub max_environments: u32,
}

/// An object as the API shows it. The console is shown while the owner configures the VM
/// (ConfigInteractive) and on a ready app.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectView {
    pub id: u64,
    pub kind: Kind,
    pub name: String,
    pub owner: String,
    pub parent: Option<u64>,
    #[serde(rename = "type")]
    pub backend: crate::domain::lifecycle::Backend,
    pub os: crate::domain::lifecycle::OsFamily,
    pub protocol: crate::domain::lifecycle::Protocol,
    pub phase: Phase,
    pub reason: Option<String>,
    pub spec: crate::domain::lifecycle::Spec,
    pub node: Option<u64>,
    pub domain: Option<String>,
    pub snapshot: Option<String>,
    pub runs: Vec<crate::domain::lifecycle::CommandRun>,
    pub console: Option<ConsoleInfo>,
    pub created_at: u64,
    pub updated_at: u64,
}

impl From<&Object> for ObjectView {
    fn from(o: &Object) -> Self {
        let show_console = o.phase == Phase::ConfigInteractive || (o.kind == Kind::App && o.phase == Phase::Ready);
        ObjectView {
            id: o.id,
            kind: o.kind,
            name: o.name.clone(),
            owner: o.owner.clone(),
            parent: o.parent,
            backend: o.traits.backend,
            os: o.traits.os,
            protocol: o.traits.protocol,
            phase: o.phase,
            reason: o.reason.clone(),
            spec: o.spec.clone(),
            node: o.runtime.node,
            domain: o.runtime.domain.clone(),
            snapshot: o.runtime.snapshot.clone(),
            runs: o.runtime.runs.clone(),
            console: if show_console { o.runtime.console.clone() } else { None },
            created_at: o.created_at,
            updated_at: o.updated_at,
        }
    }
}

impl ObjectView {
    /// What `caller` sees of `o`. Everyone sees every baseimage, but only its owner (the
    /// admins) sees how it was configured and its console: the VNC password of a baseimage in
    /// ConfigInteractive would let any user into the template VM everyone's clones come from.
    fn for_caller(o: &Object, caller: &Caller) -> ObjectView {
        let mut v = ObjectView::from(o);
        if !caller.may_touch(o) {
            v.console = None;
            v.runs.clear();
            v.spec.scripts.clear();
        }
        v
    }
}

#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    nodes: NodeRegistryHandle,
    /// Resources of lifecycle VMs (the template comes from the baseimage).
    vm: VmSpec,
    boot_timeout: Duration,
    clock: Clock,
    table: tokio::sync::Mutex<Table>,
}

struct Table {
    book: Book,
    /// SHA-256 of a user's token → the user's name.
    tokens: HashMap<String, String>,
}

impl Lifecycle {
    /// Load users and objects; fail the objects whose automatic step a restart interrupted, and
    /// re-claim the node capacity of the VMs the others hold.
    pub async fn open(
        store: Arc<dyn Store>,
        nodes: NodeRegistryHandle,
        vm: VmSpec,
        boot_timeout: Duration,
        clock: Clock,
    ) -> Result<Lifecycle, LifecycleError> {
        let rows = store.lifecycle().ok_or(LifecycleError::NoStore)?;
        let users = rows.users().await?;
        let mut objects = rows.objects().await?;
        for o in objects.iter_mut().filter(|o| o.phase.automatic()) {
            o.reason = Some(format!("the hive restarted during {}; delete it and create it again", o.phase.name()));
            o.phase = Phase::Failed;
            o.updated_at = clock.now();
            rows.update_object(o).await?;
            tracing::warn!(object = o.id, kind = o.kind.name(), "lifecycle step interrupted by a restart: failed");
        }
        for o in objects.iter().filter(|o| owns_vm(o)) {
            let (Some(node), Some(_)) = (o.runtime.node, &o.runtime.domain) else { continue };
            if let Err(e) = nodes.claim(node, &vm_key(o.id), &vm).await {
                tracing::warn!(object = o.id, node.id = node, error = %e, "cannot re-claim a lifecycle VM's capacity");
            }
        }
        let tokens = users.iter().map(|u| (u.token_hash.clone(), u.name.clone())).collect();
        let book = Book::new(objects, users.into_iter().map(|u| (u.name, u.max_environments)));
        crate::metrics::lifecycle_objects(book.objects().map(|o| (o.kind, o.phase)));
        let table = tokio::sync::Mutex::new(Table { book, tokens });
        Ok(Lifecycle { inner: Arc::new(Inner { store, nodes, vm, boot_timeout, clock, table }) })
    }

    fn rows(&self) -> Result<&dyn LifecycleStore, LifecycleError> {
        self.inner.store.lifecycle().ok_or(LifecycleError::NoStore)
    }

    fn now(&self) -> u64 {
        self.inner.clock.now()
    }

    // ---- users --------------------------------------------------------------------------

    /// The user whose token this is.
    pub async fn authenticate(&self, token: &str) -> Option<Caller> {
        if !token.starts_with(TOKEN_PREFIX) {
            return None;
        }
        self.inner.table.lock().await.tokens.get(&sha256_hex(token)).map(|n| Caller::User(n.clone()))
    }

    pub async fn create_user(&self, name: &str, max_environments: Option<u32>) -> Result<NewUser, LifecycleError> {
        requests::check_user_name(name)?;
        let max = requests::check_max(max_environments.unwrap_or(1))?;
        let token = format!("{TOKEN_PREFIX}{}", crate::membership::secret());
        let record = UserRecord { name: name.to_string(), token_hash: sha256_hex(&token), max_environments: max, created_at: self.now() };
        let mut t = self.inner.table.lock().await;
        if !self.rows()?.add_user(&record).await? {
            return Err(LifecycleError::UserExists(name.to_string()));
        }
        t.tokens.insert(record.token_hash, name.to_string());
        t.book.set_limit(name, max);
        tracing::info!(user = name, max_environments = max, "user created");
        Ok(NewUser { name: name.to_string(), token, max_environments: max })
    }

    pub async fn set_max_environments(&self, name: &str, max: u32) -> Result<UserView, LifecycleError> {
        let max = requests::check_max(max)?;
        let mut t = self.inner.table.lock().await;
        if t.book.limit(name).is_none() || !self.rows()?.set_max_environments(name, max).await? {
            return Err(LifecycleError::UnknownUser(name.to_string()));
        }
        t.book.set_limit(name, max);
        Ok(UserView { name: name.to_string(), max_environments: max })
    }

    // ---- objects ------------------------------------------------------------------------

    pub async fn get(&self, caller: &Caller, kind: Kind, id: u64) -> Result<ObjectView, LifecycleError> {
        Ok(ObjectView::for_caller(self.inner.table.lock().await.book.read(caller, kind, id)?, caller))
    }

    pub async fn list(&self, caller: &Caller, kind: Kind) -> Vec<ObjectView> {
        self.inner.table.lock().await.book.list(caller, kind).into_iter().map(|o| ObjectView::for_caller(o, caller)).collect()
    }

    /// An admin registers a baseimage → its Create starts at once.
    pub async fn create_baseimage(&self, caller: &Caller, req: BaseimageRequest) -> Result<ObjectView, LifecycleError> {
        let (traits, spec, name) = req.validate()?;
        let mut t = self.inner.table.lock().await;
        t.book.check_baseimage(caller)?;
        let obj = self.new_object(Kind::Baseimage, name, caller.owner().to_string(), None, traits, spec, Runtime::default());
        self.insert(&mut t, obj).await
    }

    /// CloneTemplate, CreateSnapshot or RunApp from `parent` → the new object, in Create.
    pub async fn derive(&self, caller: &Caller, parent: u64, req: DeriveRequest) -> Result<ObjectView, LifecycleError> {
        let kind = req.kind();
        req.refuse_unsupported()?;
        let mut t = self.inner.table.lock().await;
        let owner = t.book.check_derive(caller, kind, parent)?;
        let p = t.book.object(parent).cloned().ok_or(Refusal::Unknown("object", parent))?;
        let (traits, spec, name) = req.validate(&p)?;
        // Deployments and apps live on their environment's VM.
        let runtime = match kind {
            Kind::Deployment | Kind::App => Runtime {
                node: p.runtime.node,
                domain: p.runtime.domain.clone(),
                snapshot: if kind == Kind::App { p.runtime.snapshot.clone() } else { None },
                ..Runtime::default()
            },
            _ => Runtime::default(),
        };
        let obj = self.new_object(kind, name, owner, Some(parent), traits, spec, runtime);
        self.insert(&mut t, obj).await
    }

    /// The owner is done working in the VM: ConfigInteractive → Finalize.
    pub async fn done(&self, caller: &Caller, kind: Kind, id: u64) -> Result<ObjectView, LifecycleError> {
        let mut t = self.inner.table.lock().await;
        let phase = t.book.check_done(caller, kind, id)?;
        let view = self.persist(&mut t, id, |o| o.phase = phase).await?;
        drop(t);
        tokio::spawn(steps::drive(self.clone(), id));
        Ok(view)
    }

    /// Start deleting: → Deleting; the object disappears once its backend state is gone.
    pub async fn delete(&self, caller: &Caller, kind: Kind, id: u64) -> Result<ObjectView, LifecycleError> {
        let mut t = self.inner.table.lock().await;
        t.book.check_delete(caller, kind, id)?;
        let view = self.persist(&mut t, id, |o| o.phase = Phase::Deleting).await?;
        drop(t);
        tokio::spawn(steps::drive(self.clone(), id));
        Ok(view)
    }

    #[allow(clippy::too_many_arguments)]
    fn new_object(
        &self,
        kind: Kind,
        name: String,
        owner: String,
        parent: Option<u64>,
        traits: crate::domain::lifecycle::Traits,
        spec: crate::domain::lifecycle::Spec,
        runtime: Runtime,
    ) -> Object {
        let now = self.now();
        Object {
            id: 0,
            kind,
            name,
            owner,
            parent,
            traits,
            phase: Phase::Create,
            reason: None,
            spec,
            runtime,
            created_at: now,
            updated_at: now,
        }
    }

    async fn insert(&self, t: &mut Table, mut obj: Object) -> Result<ObjectView, LifecycleError> {
        obj.id = self.rows()?.insert_object(&obj).await?;
        tracing::info!(object = obj.id, kind = obj.kind.name(), owner = %obj.owner, parent = ?obj.parent, "lifecycle object created");
        let view = ObjectView::from(&obj);
        let id = obj.id;
        t.book.insert(obj);
        crate::metrics::lifecycle_objects(t.book.objects().map(|o| (o.kind, o.phase)));
        tokio::spawn(steps::drive(self.clone(), id));
        Ok(view)
    }

    /// Change object `id` with `f`, durably, then in memory. A phase change must go forward.
    async fn persist(&self, t: &mut Table, id: u64, f: impl FnOnce(&mut Object)) -> Result<ObjectView, LifecycleError> {
        let mut o = t.book.object(id).cloned().ok_or(Refusal::Unknown("object", id))?;
        let before = o.phase;
        f(&mut o);
        if o.phase != before && !forward(before, o.phase) {
            // The rules never ask for this; refuse rather than write it.
            return Err(Refusal::BadTransition { kind: o.kind.name(), id, current: before.name(), asked: o.phase.name().into() }.into());
        }
        o.updated_at = self.now();
        if !self.rows()?.update_object(&o).await? {
            return Err(Refusal::Unknown(o.kind.name(), id).into());
        }
        if o.phase != before {
            tracing::info!(object = id, kind = o.kind.name(), from = before.name(), to = o.phase.name(), "lifecycle phase");
        }
        let view = ObjectView::from(&o);
        let moved = o.phase != before;
        t.book.insert(o);
        if moved {
            crate::metrics::lifecycle_objects(t.book.objects().map(|o| (o.kind, o.phase)));
        }
        Ok(view)
    }

    // ---- for the step tasks -------------------------------------------------------------

    async fn object(&self, id: u64) -> Option<Object> {
        self.inner.table.lock().await.book.object(id).cloned()
    }

    /// Record what a step produced so far (its phase unchanged), so a crash loses none of it.
    async fn record(&self, id: u64, runtime: &Runtime) -> Result<(), LifecycleError> {
        let mut t = self.inner.table.lock().await;
        self.persist(&mut t, id, |o| o.runtime = runtime.clone()).await.map(drop)
    }

    /// The step of the current phase finished well: record its output and move on.
    async fn advance(&self, id: u64, runtime: Runtime) -> Result<Phase, LifecycleError> {
        let mut t = self.inner.table.lock().await;
        let phase = t.book.check_advance(id)?;
        self.persist(&mut t, id, |o| {
            o.phase = phase;
            o.runtime = runtime;
        })
        .await?;
        Ok(phase)
    }

    async fn fail(&self, id: u64, reason: String, runtime: Runtime) {
        let mut t = self.inner.table.lock().await;
        let r = self
            .persist(&mut t, id, |o| {
                o.phase = Phase::Failed;
                o.reason = Some(reason);
                o.runtime = runtime;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(object = id, error = %e, "cannot record a lifecycle failure; the object is failed after a restart");
        }
    }

    /// The object is gone from every backend: forget it.
    async fn forget(&self, id: u64) -> Result<(), LifecycleError> {
        let mut t = self.inner.table.lock().await;
        self.rows()?.delete_object(id).await?;
        t.book.remove(id);
        crate::metrics::lifecycle_objects(t.book.objects().map(|o| (o.kind, o.phase)));
        tracing::info!(object = id, "lifecycle object deleted");
        Ok(())
    }
}

/// Does this object hold a VM of its own (rather than its environment's)?
fn owns_vm(o: &Object) -> bool {
    matches!(o.kind, Kind::Baseimage | Kind::Environment)
}

fn vm_key(id: u64) -> VmKey {
    VmKey { pool: VM_POOL.to_string(), vm: id }
}
