//! Hypervisors behind one small trait. The pool never talks to a hypervisor directly: a
//! `SessionActor` calls these methods from spawned tasks and reports the results back.
//!
//! Drivers: `sim` (in-process simulator for `hive up`, tests at scale and benchmarks; it is a
//! simulator and says so in every name it hands out). libvirt and others come later behind the
//! same trait. `desktop`: a desktop made of processes on the node (Xvfb, x11vnc, a browser).

pub mod addresses;
pub mod desktop;
pub mod domain_xml;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod remote;
pub mod sim;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Name of the snapshot taken right after a VM first boots; clean-up reverts to it.
pub const CLEAN_SNAPSHOT: &str = "clean";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", content = "detail", rename_all = "snake_case")]
pub enum DriverError {
    #[error("no domain {0}")]
    NotFound(String),
    #[error("{0} is not supported by this driver")]
    Unsupported(String),
    #[error("the guest has not checked in yet")]
    NotReady,
    #[error("hypervisor operation failed: {0}")]
    Failed(String),
}

/// What to create: a linked clone of `template` with these resources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub template: String,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
}

/// Where a VNC client connects, and with which password.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Console {
    pub host: String,
    pub port: u16,
    pub password: String,
}

/// What a health ping learns from a guest that answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    pub ip: String,
}

/// Guest-level preparation for a batch (vmcloud: open the browser at the home page).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareSpec {
    pub home_page: String,
    pub profile_name: String,
}

/// What a command run in a guest through the command channel (ssh) returned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// The command's exit status; -1 when it was killed by a signal.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    pub cpu_time_ns: u64,
    pub memory_kb: u64,
}

/// Where a disk handed from one node to another can be read by the node that takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskRef {
    /// A file on the host the driver runs on: between in-process drivers, or inside an agent.
    File { path: std::path::PathBuf },
    /// An image in the hive's registry, by content: between agents. `fresh` when the export
    /// added it (the mover deletes it afterwards); false when the registry held it already.
    Image { sha256: String, fresh: bool },
}

/// A stopped VM's disk as `Hypervisor::export` hands it out: an overlay on `template`, whose
/// own disk has SHA-256 `template_sha256` (so the taking node can tell whether its template
/// of that name is the same one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedDisk {
    pub disk: DiskRef,
    pub template: String,
    pub template_sha256: String,
}

/// A template's disk as `Hypervisor::export_template` hands it out, with its ready line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedTemplate {
    pub name: String,
    pub disk: DiskRef,
    pub ready: Option<String>,
}

/// A running VM as its node describes it for a live move: the template its disk is an overlay
/// of (with that template disk's SHA-256) and its migratable definitions, running and stored
/// (with its VNC password).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSource {
    pub domain: String,
    pub template: String,
    pub template_sha256: String,
    pub xml: String,
    pub persistent_xml: String,
}

/// What the node taking a live move got ready: the domain's name and definition there, and
/// where the source's hypervisor reaches this one (`peer_uri`) and sends the memory
/// (`migrate_uri`; the hypervisor's default when `None`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTarget {
    pub domain: String,
    pub peer_uri: String,
    pub migrate_uri: Option<String>,
    pub xml: String,
    pub persistent_xml: String,
}

// The definitions hold the VNC password: never in a log line.
impl std::fmt::Debug for LiveSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSource").field("domain", &self.domain).field("template", &self.template).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LiveTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTarget").field("domain", &self.domain).field("peer_uri", &self.peer_uri).finish_non_exhaustive()
    }
}

/// The error `import` answers when the node lacks the disk's template.
pub fn missing_template(name: &str) -> DriverError {
    DriverError::NotFound(format!("template {name}"))
}

/// The template an `import` error says is missing, if that is what it says.
pub fn is_missing_template(e: &DriverError) -> Option<&str> {
    match e {
        DriverError::NotFound(what) => what.strip_prefix("template "),
        _ => None,
    }
}

/// The metric label for a driver name an agent reported: one of a small fixed set.
pub fn backend_label(driver: &str) -> &'static str {
    match driver {
        "sim" => "sim",
        "libvirt" => "libvirt",
        "desktop" => "desktop",
        _ => "other",
    }
}

#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// Short driver name for logs and metric labels ("sim", "libvirt").
    fn kind(&self) -> &'static str;
    /// Define a VM as a linked clone of its template; returns the driver's domain name.
    async fn create(&self, spec: &VmSpec) -> Result<String, DriverError>;
    async fn start(&self, domain: &str) -> Result<(), DriverError>;
    async fn stop(&self, domain: &str) -> Result<(), DriverError>;
    async fn suspend(&self, domain: &str) -> Result<(), DriverError>;
    async fn resume(&self, domain: &str) -> Result<(), DriverError>;
    async fn snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError>;
    async fn revert(&self, domain: &str, name: &str) -> Result<(), DriverError>;
    /// Remove a snapshot. Removing a missing snapshot is `NotFound`.
    async fn delete_snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError>;
    /// Run `command` in the running guest through the command channel; the exit status,
    /// stdout and stderr come back whatever the status.
    async fn exec(&self, domain: &str, command: &str) -> Result<ExecOutput, DriverError> {
        let _ = (domain, command);
        Err(DriverError::Unsupported("a command channel".into()))
    }
    /// Stop the VM if running and remove it and its disk. Destroying a missing domain is Ok.
    async fn destroy(&self, domain: &str) -> Result<(), DriverError>;
    async fn console(&self, domain: &str) -> Result<Console, DriverError>;
    /// Health check of a running guest. `NotReady` while it boots.
    async fn ping(&self, domain: &str) -> Result<GuestStatus, DriverError>;
    async fn prepare(&self, domain: &str, spec: &PrepareSpec) -> Result<(), DriverError>;
    async fn stats(&self, domain: &str) -> Result<VmStats, DriverError>;
    /// Names of the domains this hypervisor holds (for reconciliation after a restart).
    async fn list(&self) -> Result<Vec<String>, DriverError>;
    /// Make the disk `image` (a file on this host) a template called `name`, whose guest is up
    /// once it prints `ready` on its console (if given). An existing template is never
    /// replaced: its VMs' overlays depend on its disk.
    async fn install_template(&self, name: &str, image: &std::path::Path, ready: Option<&str>) -> Result<(), DriverError> {
        let _ = (name, image, ready);
        Err(DriverError::Unsupported("installing templates".into()))
    }
    /// Cold move, the giving side: stop the domain and hand out its disk. The domain stays
    /// defined (and its disk in place) until `destroy`, so a move that fails can start it again.
    async fn export(&self, domain: &str) -> Result<ExportedDisk, DriverError> {
        let _ = domain;
        Err(DriverError::Unsupported("moving VMs to another node".into()))
    }
    /// Cold move, the taking side: define domain `spec.name` from an exported disk, with the
    /// disk put back to its `clean` snapshot and every internal snapshot removed; not started.
    /// `NotFound("template <name>")` when this node lacks the template (the mover then ships
    /// it with `export_template` + `install_exported_template` and tries again); `Failed`
    /// when this node's template of that name has another digest.
    async fn import(&self, spec: &VmSpec, disk: &ExportedDisk) -> Result<String, DriverError> {
        let _ = (spec, disk);
        Err(DriverError::Unsupported("moving VMs to another node".into()))
    }
    /// A template's disk, for a node that lacks it. `Unsupported` for a template its disk alone
    /// cannot rebuild on the other node (libvirt: one that boots a kernel directly, or a raw disk).
    async fn export_template(&self, name: &str) -> Result<ExportedTemplate, DriverError> {
        let _ = name;
        Err(DriverError::Unsupported("exporting templates".into()))
    }
    /// Live move, the giving side, first step: describe the running domain (`Unsupported` where
    /// the driver cannot move a running VM).
    async fn live_source(&self, domain: &str) -> Result<LiveSource, DriverError> {
        let _ = domain;
        Err(DriverError::Unsupported("moving running VMs (live)".into()))
    }
    /// Live move, the taking side: get domain `spec.name` ready to receive `source` (libvirt:
    /// an empty overlay on this node's copy of the template, and the definition with this
    /// node's paths and VNC port). Nothing is defined yet; `destroy(spec.name)` undoes it.
    /// `NotFound("template <name>")` when this node lacks the template, as for `import`.
    async fn prepare_incoming(&self, spec: &VmSpec, source: &LiveSource) -> Result<LiveTarget, DriverError> {
        let _ = (spec, source);
        Err(DriverError::Unsupported("taking running VMs (live)".into()))
    }
    /// Live move, the giving side: send the running domain to `target`, memory and disk, while
    /// it runs. On success it runs there and is gone here (definition and files); on failure
    /// it still runs here, as it was, snapshots included.
    async fn migrate_live(&self, domain: &str, target: &LiveTarget) -> Result<(), DriverError> {
        let _ = (domain, target);
        Err(DriverError::Unsupported("moving running VMs (live)".into()))
    }
    /// Install a template another node exported.
    async fn install_exported_template(&self, template: &ExportedTemplate) -> Result<(), DriverError> {
        match &template.disk {
            DiskRef::File { path } => self.install_template(&template.name, path, template.ready.as_deref()).await,
            DiskRef::Image { .. } => Err(DriverError::Unsupported("templates from the hive's registry".into())),
        }
    }
}
