//! The image lifecycle as a pure state machine: Baseimage → Environment → Deployment → App
//! (transitions CloneTemplate, CreateSnapshot, RunApp), each object walking its sub-phases
//! Create → ConfigAuto → ConfigInteractive → Finalize → Ready (an App: Create → Ready).
//! `Book` holds the objects and the users' environment limits and answers, without I/O, whether
//! a command is legal and what it changes. Guarantees: a live object only moves forward; once
//! Failed or Deleting it never returns to a live phase; a derived object always belongs to its
//! parent's owner (nothing one user configured is ever copied to another user); a user holds
//! at most their limit of environments. The service (`crate::lifecycle`) persists, then applies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Millis;

/// The owner recorded for objects an admin creates for themselves (baseimages, admin's own
/// environments). No user may take this name.
pub const ADMIN_OWNER: &str = "admin";

/// Lifecycle VMs' domain names start with this. Pool names cannot hold a dot, so no pool VM's
/// domain (`<pool>-<id>`) can look like one; pool reconciliation leaves these alone.
pub const DOMAIN_PREFIX: &str = "lc.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Baseimage,
    Environment,
    Deployment,
    App,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Baseimage, Kind::Environment, Kind::Deployment, Kind::App];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Baseimage => "baseimage",
            Kind::Environment => "environment",
            Kind::Deployment => "deployment",
            Kind::App => "app",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The kind this one is derived from.
    pub fn parent(self) -> Option<Kind> {
        match self {
            Kind::Baseimage => None,
            Kind::Environment => Some(Kind::Baseimage),
            Kind::Deployment => Some(Kind::Environment),
            Kind::App => Some(Kind::Deployment),
        }
    }

    /// The transition that makes an object of this kind from its parent.
    pub fn transition(self) -> Option<&'static str> {
        match self {
            Kind::Baseimage => None,
            Kind::Environment => Some("CloneTemplate"),
            Kind::Deployment => Some("CreateSnapshot"),
            Kind::App => Some("RunApp"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Create,
    ConfigAuto,
    ConfigInteractive,
    Finalize,
    Ready,
    Failed,
    Deleting,
}

impl Phase {
    pub const ALL: [Phase; 7] =
        [Phase::Create, Phase::ConfigAuto, Phase::ConfigInteractive, Phase::Finalize, Phase::Ready, Phase::Failed, Phase::Deleting];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Create => "create",
            Phase::ConfigAuto => "config_auto",
            Phase::ConfigInteractive => "config_interactive",
            Phase::Finalize => "finalize",
            Phase::Ready => "ready",
            Phase::Failed => "failed",
            Phase::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Progress along the life of an object. Failed and Deleting share the last rank: an object
    /// whose deletion failed is Failed again and may be deleted again, but never lives again.
    pub fn rank(self) -> u8 {
        match self {
            Phase::Create => 0,
            Phase::ConfigAuto => 1,
            Phase::ConfigInteractive => 2,
            Phase::Finalize => 3,
            Phase::Ready => 4,
            Phase::Failed | Phase::Deleting => 5,
        }
    }

    /// Phases whose work the hive does by itself, in a task; nothing else may touch the object
    /// meanwhile, and a restart of the hive fails them.
    pub fn automatic(self) -> bool {
        matches!(self, Phase::Create | Phase::ConfigAuto | Phase::Finalize | Phase::Deleting)
    }
}

/// May an object go from `from` to `to`?
pub fn forward(from: Phase, to: Phase) -> bool {
    match (from, to) {
        (Phase::Failed, Phase::Deleting) | (Phase::Deleting, Phase::Failed) => true,
        (Phase::Failed | Phase::Deleting, _) => false,
        _ => to.rank() > from.rank(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Vm,
    Container,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OsFamily {
    Linux,
    Windows,
    LinuxWine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Vnc,
    Rdp,
}

/// The choices every object carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traits {
    #[serde(rename = "type")]
    pub backend: Backend,
    pub os: OsFamily,
    pub protocol: Protocol,
}

/// What the object was asked to be (fixed at creation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// Baseimage: the template the nodes hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Run in order during ConfigAuto.
    #[serde(default)]
    pub scripts: Vec<String>,
    /// Stop in ConfigInteractive until the owner says done.
    #[serde(default)]
    pub interactive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// App: the command that runs the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

/// One command run through the command channel, and what it returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRun {
    pub command: String,
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Where the user reaches the object's VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleInfo {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub password: String,
}

/// What the backend steps produced so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    #[serde(default)]
    pub node: Option<u64>,
    #[serde(default)]
    pub domain: Option<String>,
    /// The snapshot this object made (or, for an app, started from).
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub console: Option<ConsoleInfo>,
    #[serde(default)]
    pub runs: Vec<CommandRun>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub id: u64,
    pub kind: Kind,
    pub name: String,
    pub owner: String,
    pub parent: Option<u64>,
    pub traits: Traits,
    pub phase: Phase,
    /// Why the object failed (or why its deletion did).
    pub reason: Option<String>,
    pub spec: Spec,
    pub runtime: Runtime,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    Admin,
    User(String),
}

impl Caller {
    /// The owner of what this caller creates for themselves.
    pub fn owner(&self) -> &str {
        match self {
            Caller::Admin => ADMIN_OWNER,
            Caller::User(u) => u,
        }
    }

    /// Is `obj` this caller's own (an admin: everything)?
    pub fn may_touch(&self, obj: &Object) -> bool {
        match self {
            Caller::Admin => true,
            Caller::User(u) => *u == obj.owner,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no {0} {1}")]
    Unknown(&'static str, u64),
    #[error("{0}")]
    Forbidden(String),
    #[error("{kind} {id} is in phase {current}; {asked} is not possible now")]
    BadTransition { kind: &'static str, id: u64, current: &'static str, asked: String },
    #[error("user {user} holds {held} environment(s), the most allowed; an admin may raise max_environments")]
    LimitReached { user: String, held: u32 },
    #[error("{0} is not supported yet")]
    NotSupported(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0}")]
    Busy(String),
    #[error("{kind} {id} still has {children} object(s) derived from it; delete those first")]
    HasChildren { kind: &'static str, id: u64, children: usize },
}

/// Check the choices an object carries: containers are not supported yet (checked first, so a
/// container request is always answered as such); RDP is for Windows guests only.
pub fn check_traits(t: &Traits) -> Result<(), Refusal> {
    if t.backend == Backend::Container {
        return Err(Refusal::NotSupported("the container backend".into()));
    }
    if t.protocol == Protocol::Rdp && t.os != OsFamily::Windows {
        return Err(Refusal::Invalid { field: "protocol", reason: "rdp is only for windows guests; use vnc".into() });
    }
    Ok(())
}

/// The objects and each user's environment limit.
#[derive(Clone, Debug, Default)]
pub struct Book {
    objects: BTreeMap<u64, Object>,
    limits: BTreeMap<String, u32>,
}

impl Book {
    pub fn new(objects: impl IntoIterator<Item = Object>, limits: impl IntoIterator<Item = (String, u32)>) -> Book {
        Book { objects: objects.into_iter().map(|o| (o.id, o)).collect(), limits: limits.into_iter().collect() }
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }

    pub fn object(&self, id: u64) -> Option<&Object> {
        self.objects.get(&id)
    }

    pub fn limit(&self, user: &str) -> Option<u32> {
        self.limits.get(user).copied()
    }

    pub fn set_limit(&mut self, user: &str, max: u32) {
        self.limits.insert(user.to_string(), max);
    }

    /// The object `id` of kind `kind` (an object of another kind is unknown under this kind).
    pub fn get(&self, kind: Kind, id: u64) -> Result<&Object, Refusal> {
        self.objects.get(&id).filter(|o| o.kind == kind).ok_or(Refusal::Unknown(kind.name(), id))
    }

    /// The object, if `caller` may see it.
    pub fn read(&self, caller: &Caller, kind: Kind, id: u64) -> Result<&Object, Refusal> {
        let o = self.get(kind, id)?;
        // Baseimages are the admins' offer to everyone.
        if kind == Kind::Baseimage || caller.may_touch(o) { Ok(o) } else { Err(forbidden(o)) }
    }

    /// What `caller` sees of kind `kind`: their own objects (an admin: all; baseimages: all).
    pub fn list(&self, caller: &Caller, kind: Kind) -> Vec<&Object> {
        self.objects.values().filter(|o| o.kind == kind && (kind == Kind::Baseimage || caller.may_touch(o))).collect()
    }

    pub fn children(&self, id: u64) -> impl Iterator<Item = &Object> {
        self.objects.values().filter(move |o| o.parent == Some(id))
    }

    /// May `caller` create a baseimage?
    pub fn check_baseimage(&self, caller: &Caller) -> Result<(), Refusal> {
        match caller {
            Caller::Admin => Ok(()),
            Caller::User(_) => Err(Refusal::Forbidden("baseimages are created by admins".into())),
        }
    }

    /// May `caller` derive an object of kind `kind` from `parent`? Answers its owner: always the
    /// parent's owner, except for a clone of a baseimage, which belongs to the caller.
    pub fn check_derive(&self, caller: &Caller, kind: Kind, parent: u64) -> Result<String, Refusal> {
        let (Some(parent_kind), Some(asked)) = (kind.parent(), kind.transition()) else {
            return Err(Refusal::Invalid { field: "kind", reason: "a baseimage is not derived from anything".into() });
        };
        let p = self.get(parent_kind, parent)?;
        let owner = if parent_kind == Kind::Baseimage { caller.owner().to_string() } else { p.owner.clone() };
        if parent_kind != Kind::Baseimage && !caller.may_touch(p) {
            return Err(forbidden(p));
        }
        if p.phase != Phase::Ready {
            return Err(bad(p, asked));
        }
        if let (Kind::Environment, Some(max)) = (kind, self.limits.get(&owner)) {
            let held = self.objects.values().filter(|o| o.kind == Kind::Environment && o.owner == owner).count() as u32;
            if held >= *max {
                return Err(Refusal::LimitReached { user: owner, held });
            }
        }
        if matches!(kind, Kind::Deployment | Kind::App) {
            // One VM serves an environment and everything derived from it: a new deployment or
            // app would revert it under whatever is using it now.
            let env = if kind == Kind::Deployment { p.id } else { p.parent.unwrap_or(p.id) };
            if let Some(user) = self.vm_user(env) {
                return Err(Refusal::Busy(format!(
                    "the VM of environment {env} is in use by {} {} (phase {}); wait for it or delete it",
                    user.kind.name(),
                    user.id,
                    user.phase.name()
                )));
            }
        }
        Ok(owner)
    }

    /// The object under environment `env` that is using its VM now, if any: a deployment being
    /// built, or an app that has not failed.
    fn vm_user(&self, env: u64) -> Option<&Object> {
        let deployments: Vec<&Object> = self.children(env).collect();
        let building = deployments.iter().find(|d| d.phase.rank() < Phase::Ready.rank() || d.phase == Phase::Deleting);
        building
            .copied()
            .or_else(|| deployments.iter().flat_map(|d| self.children(d.id)).find(|a| a.kind == Kind::App && a.phase != Phase::Failed))
    }

    /// The phase after the automatic work of `id`'s current phase finished well.
    pub fn check_advance(&self, id: u64) -> Result<Phase, Refusal> {
        let o = self.objects.get(&id).ok_or(Refusal::Unknown("object", id))?;
        Ok(match (o.kind, o.phase) {
            (Kind::App, Phase::Create) => Phase::Ready,
            (_, Phase::Create) => Phase::ConfigAuto,
            (_, Phase::ConfigAuto) if o.spec.interactive => Phase::ConfigInteractive,
            (_, Phase::ConfigAuto) | (_, Phase::ConfigInteractive) => Phase::Finalize,
            (_, Phase::Finalize) => Phase::Ready,
            _ => return Err(bad(o, "finishing a step")),
        })
    }

    /// The user says ConfigInteractive is done: → Finalize.
    pub fn check_done(&self, caller: &Caller, kind: Kind, id: u64) -> Result<Phase, Refusal> {
        let o = self.get(kind, id)?;
        if !caller.may_touch(o) {
            return Err(forbidden(o));
        }
        if o.phase != Phase::ConfigInteractive {
            return Err(bad(o, "done"));
        }
        self.check_advance(id)
    }

    /// May `caller` delete `id` now? Not while a step runs, nor while anything derives from it.
    pub fn check_delete(&self, caller: &Caller, kind: Kind, id: u64) -> Result<(), Refusal> {
        let o = self.get(kind, id)?;
        if !caller.may_touch(o) {
            return Err(forbidden(o));
        }
        if o.phase.automatic() {
            return Err(bad(o, "delete"));
        }
        let children = self.children(id).count();
        if children > 0 {
            return Err(Refusal::HasChildren { kind: o.kind.name(), id, children });
        }
        Ok(())
    }

    pub fn insert(&mut self, o: Object) {
        self.objects.insert(o.id, o);
    }

    pub fn remove(&mut self, id: u64) -> Option<Object> {
        self.objects.remove(&id)
    }
}

fn forbidden(o: &Object) -> Refusal {
    Refusal::Forbidden(format!("{} {} belongs to another user", o.kind.name(), o.id))
}

fn bad(o: &Object, asked: &str) -> Refusal {
    Refusal::BadTransition { kind: o.kind.name(), id: o.id, current: o.phase.name(), asked: asked.to_string() }
}

#[cfg(test)]
mod tests;
