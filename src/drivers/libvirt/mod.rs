//! The production hypervisor driver: libvirt through the `virt` crate (cargo feature
//! `libvirt`). A VM is a persistent domain on a qcow2 overlay (a linked clone made with
//! `qemu-img` in milliseconds) of its template, marked with the hive's metadata element so
//! `list` and every operation only ever see the hive's own domains.
//!
//! Template layout (see `domain_xml`): `<templates_dir>/<template>/disk.qcow2` or `disk.raw`,
//! plus optional `kernel`, `initrd` and `cmdline` for direct kernel boot. Per VM, `vm_dir`
//! holds `<name>.qcow2` (the overlay) and `<name>.serial` (the serial console's unix socket).
//!
//! Every libvirt and qemu-img call runs in `spawn_blocking`. libvirt errors become
//! `DriverError::NotFound` for a missing domain or snapshot, `Failed` with libvirt's message
//! otherwise. Fixed addresses (dnsmasq) and the guest command channel are optional.
//!
//! Cold moves between nodes (`export`, `import`, `export_template`) are in `moves`, live
//! moves (peer-to-peer migration of a running VM) in `live`. `list`
//! answers only the domains whose overlay is in this driver's `vm_dir`, so agents sharing one
//! libvirtd never see each other's VMs.

mod live;
mod moves;
mod ops;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::addresses::{AddressBook, AddressConfig, AddressError};
use super::domain_xml::{DomainType, NetworkMode};
use super::{
    Console, DriverError, ExecOutput, ExportedDisk, ExportedTemplate, GuestStatus, Hypervisor, LiveSource, LiveTarget, PrepareSpec, VmSpec,
    VmStats,
};
use crate::guest::{CommandChannel, GuestError};

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("connecting to {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("fixed addresses: {0}")]
    Addresses(#[from] AddressError),
    #[error("creating {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bad libvirt driver config: {0}")]
    Config(String),
}

/// How the node runs its VMs under libvirt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LibvirtConfig {
    /// `qemu:///system` on a host; `test:///default` is libvirt's in-process test driver.
    pub uri: String,
    pub templates_dir: PathBuf,
    /// Overlays and serial sockets.
    pub vm_dir: PathBuf,
    /// Where VNC displays listen; also the host handed out in `Console`.
    pub vnc_listen: String,
    /// The first of the 2000 ports VNC displays take (the lowest free one is taken).
    pub vnc_first_port: u16,
    pub network: NetworkMode,
    pub emulator: String,
    pub machine: String,
    /// kvm, qemu (TCG) or test; default: guessed from the URI and /dev/kvm.
    pub domain_type: Option<DomainType>,
    pub qemu_img: PathBuf,
    /// Fixed MAC + IP per VM through dnsmasq; needed for the command channel.
    pub addresses: Option<AddressConfig>,
    /// Run by `prepare` through the command channel; `{home_page}` and `{profile}` are
    /// replaced by the shell-quoted values.
    pub prepare_command: Option<String>,
    /// The longest a command through the channel may take.
    pub guest_timeout_secs: u64,
    /// How other nodes' libvirtd reach this node's for a live move to it (e.g.
    /// `qemu+tls://node-b.example/system`); without it, this node takes no live moves.
    pub peer_uri: Option<String>,
    /// Where a live move to this node sends the memory and disk (e.g. `tcp://10.0.0.2`);
    /// default: libvirt's (this host's name).
    pub migrate_uri: Option<String>,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        Self {
            uri: "qemu:///system".into(),
            templates_dir: "/var/lib/guaca-hive/templates".into(),
            vm_dir: "/var/lib/guaca-hive/vms".into(),
            vnc_listen: "127.0.0.1".into(),
            vnc_first_port: 5900,
            network: NetworkMode::None,
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            machine: "q35".into(),
            domain_type: None,
            qemu_img: "qemu-img".into(),
            addresses: None,
            prepare_command: None,
            guest_timeout_secs: 30,
            peer_uri: None,
            migrate_uri: None,
        }
    }
}

/// What the blocking half shares: config, the connection, the address book.
pub(crate) struct Shared {
    cfg: LibvirtConfig,
    kind: DomainType,
    conn: parking_lot::Mutex<virt::connect::Connect>,
    addresses: Option<AddressBook>,
    /// Held while a VNC port is chosen and the domain defined, so two creates never pick one port.
    vnc_ports: parking_lot::Mutex<()>,
}

pub struct LibvirtHypervisor {
    shared: Arc<Shared>,
    channel: Option<Arc<dyn CommandChannel>>,
}

impl LibvirtHypervisor {
    /// Connect to libvirt and load the address book. Blocks briefly: call it from
    /// `spawn_blocking` on a runtime.
    pub fn open(cfg: LibvirtConfig, channel: Option<Arc<dyn CommandChannel>>) -> Result<Self, LibvirtError> {
        static QUIET: std::sync::Once = std::sync::Once::new();
        // libvirt's default error handler prints every error to stderr; ours are returned.
        QUIET.call_once(virt::error::clear_error_callback);
        if channel.is_some() && cfg.addresses.is_none() {
            return Err(LibvirtError::Config("a command channel needs fixed addresses to reach the guests".into()));
        }
        if cfg.prepare_command.is_some() && channel.is_none() {
            return Err(LibvirtError::Config("prepare_command needs a command channel".into()));
        }
        std::fs::create_dir_all(&cfg.vm_dir).map_err(|source| LibvirtError::Io { path: cfg.vm_dir.clone(), source })?;
        let conn = ops::connect(&cfg.uri).map_err(|message| LibvirtError::Connect { uri: cfg.uri.clone(), message })?;
        let addresses = cfg.addresses.clone().map(AddressBook::open).transpose()?;
        let kind = cfg.domain_type.unwrap_or_else(|| DomainType::for_uri(&cfg.uri));
        tracing::info!(uri = %cfg.uri, domain_type = kind.as_str(), "libvirt driver connected");
        Ok(Self {
            shared: Arc::new(Shared { cfg, kind, conn: parking_lot::Mutex::new(conn), addresses, vnc_ports: parking_lot::Mutex::new(()) }),
            channel,
        })
    }

    pub fn domain_type(&self) -> DomainType {
        self.shared.kind
    }

    /// Run `f` on the blocking pool, with the shared state.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T, DriverError> + Send + 'static,
    ) -> Result<T, DriverError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared)).await.map_err(|e| DriverError::Failed(format!("libvirt task ended: {e}")))?
    }

    /// The guest's fixed IP, for the command channel.
    fn guest_ip(&self, domain: &str) -> Result<String, DriverError> {
        let book = self.shared.addresses.as_ref().ok_or_else(|| DriverError::Unsupported("fixed addresses".into()))?;
        book.get(domain).map(|a| a.ip.to_string()).ok_or_else(|| DriverError::Failed(format!("{domain} has no fixed address")))
    }

    async fn run_in_guest(&self, domain: &str, command: &str) -> Result<ExecOutput, GuestError> {
        let Some(channel) = &self.channel else { return Err(GuestError::Failed("no command channel".into())) };
        let ip = self.guest_ip(domain).map_err(|e| GuestError::Failed(e.to_string()))?;
        channel.exec(&ip, command, Duration::from_secs(self.shared.cfg.guest_timeout_secs)).await
    }

    async fn require_running(&self, domain: &str) -> Result<bool, DriverError> {
        let name = domain.to_string();
        self.blocking(move |s| ops::is_running(s, &name)).await
    }
}

#[async_trait]
impl Hypervisor for LibvirtHypervisor {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    async fn create(&self, spec: &VmSpec) -> Result<String, DriverError> {
        let spec = spec.clone();
        self.blocking(move |s| ops::create(s, &spec)).await
    }

    async fn start(&self, domain: &str) -> Result<(), DriverError> {
        let name = domain.to_string();
        self.blocking(move |s| ops::start(s, &name)).await
    }

    async fn stop(&self, domain: &str) -> Result<(), DriverError> {
        let name = domain.to_string();
        self.blocking(move |s| ops::stop(s, &name)).await
    }

    async fn suspend(&self, domain: &str) -> Result<(), DriverError> {
        let name = domain.to_string();
        self.blocking(move |s| ops::with_domain(s, &name, |d| d.suspend().map(drop))).await
    }

    async fn resume(&self, domain: &str) -> Result<(), DriverError> {
        let name = domain.to_string();
        // Idempotent, like the simulator's: reverting to a live snapshot leaves the domain
        // running, and libvirt refuses to resume a domain that is not paused.
        self.blocking(move |s| {
            ops::with_domain(s, &name, |d| match d.get_state()?.0 {
                virt::sys::VIR_DOMAIN_RUNNING => Ok(()),
                _ => d.resume().map(drop),
            })
        })
        .await
    }

    async fn snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        let (dom, snap) = (domain.to_string(), name.to_string());
        self.blocking(move |s| ops::snapshot(s, &dom, &snap)).await
    }

    async fn revert(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        let (dom, snap) = (domain.to_string(), name.to_string());
        self.blocking(move |s| ops::with_snapshot(s, &dom, &snap, |sn| sn.revert(0))).await
    }

    async fn delete_snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        let (dom, snap) = (domain.to_string(), name.to_string());
        self.blocking(move |s| ops::with_snapshot(s, &dom, &snap, |sn| sn.delete(0))).await
    }

    async fn exec(&self, domain: &str, command: &str) -> Result<ExecOutput, DriverError> {
        if self.channel.is_none() {
            return Err(DriverError::Unsupported("a command channel".into()));
        }
        if !self.require_running(domain).await? {
            return Err(DriverError::Failed(format!("{domain} is not running")));
        }
        self.run_in_guest(domain, command).await.map_err(|e| DriverError::Failed(e.to_string()))
    }

    async fn destroy(&self, domain: &str) -> Result<(), DriverError> {
        let name = domain.to_string();
        self.blocking(move |s| ops::destroy(s, &name)).await
    }

    async fn console(&self, domain: &str) -> Result<Console, DriverError> {
        let name = domain.to_string();
        let vnc = self.blocking(move |s| ops::vnc(s, &name)).await?;
        let port = vnc.port.ok_or_else(|| DriverError::Failed(format!("{domain} has no VNC port (is it running?)")))?;
        let password = vnc.password.unwrap_or_default();
        Ok(Console { host: self.shared.cfg.vnc_listen.clone(), port, password })
    }

    async fn ping(&self, domain: &str) -> Result<GuestStatus, DriverError> {
        if !self.require_running(domain).await? {
            return Err(DriverError::NotReady);
        }
        let ip = self.shared.addresses.as_ref().and_then(|b| b.get(domain)).map(|a| a.ip.to_string()).unwrap_or_default();
        // A template that names a ready line: the guest is up once its console printed it.
        let (ready, log) = (ops::ready_path(&self.shared, domain), ops::console_log_path(&self.shared, domain));
        if let Ok(line) = tokio::fs::read_to_string(&ready).await {
            let printed = tokio::fs::read(&log).await.unwrap_or_default();
            if !String::from_utf8_lossy(&printed).contains(line.trim()) {
                return Err(DriverError::NotReady);
            }
            // Seen once is enough: later pings (and snapshots, taken after this) skip the log.
            let _ = tokio::fs::remove_file(&ready).await;
        }
        if self.channel.is_some() {
            match self.run_in_guest(domain, "true").await {
                Ok(out) if out.status == 0 => {}
                Ok(_) | Err(GuestError::Unreachable(_) | GuestError::Timeout(_)) => return Err(DriverError::NotReady),
                Err(e) => return Err(DriverError::Failed(e.to_string())),
            }
        }
        Ok(GuestStatus { ip })
    }

    async fn prepare(&self, domain: &str, spec: &PrepareSpec) -> Result<(), DriverError> {
        let Some(template) = &self.shared.cfg.prepare_command else { return Ok(()) };
        let command = super::domain_xml::render_prepare(template, spec);
        let out = self.exec(domain, &command).await?;
        if out.status != 0 {
            return Err(DriverError::Failed(format!("prepare exited with {}: {}", out.status, out.stderr.trim())));
        }
        Ok(())
    }

    async fn stats(&self, domain: &str) -> Result<VmStats, DriverError> {
        let name = domain.to_string();
        self.blocking(move |s| {
            ops::with_domain(s, &name, |d| d.get_info().map(|i| VmStats { cpu_time_ns: i.cpu_time, memory_kb: i.memory }))
        })
        .await
    }

    async fn install_template(&self, name: &str, image: &std::path::Path, ready: Option<&str>) -> Result<(), DriverError> {
        let (name, image, ready) = (name.to_string(), image.to_path_buf(), ready.map(str::to_string));
        self.blocking(move |s| {
            super::domain_xml::TemplateFiles::install(&s.cfg.templates_dir, &name, &image, ready.as_deref())
                .map_err(|e| DriverError::Failed(e.to_string()))
        })
        .await
    }

    /// Only the domains whose overlay is in this driver's `vm_dir`: two agents may share one
    /// libvirtd, and neither may report (so have the hive reconcile away) the other's.
    async fn list(&self) -> Result<Vec<String>, DriverError> {
        self.blocking(ops::list).await
    }

    async fn export(&self, domain: &str) -> Result<ExportedDisk, DriverError> {
        let name = domain.to_string();
        self.blocking(move |s| moves::export(s, &name)).await
    }

    async fn import(&self, spec: &VmSpec, disk: &ExportedDisk) -> Result<String, DriverError> {
        let (spec, disk) = (spec.clone(), disk.clone());
        self.blocking(move |s| moves::import(s, &spec, &disk)).await
    }

    /// Refuses (`Unsupported`) templates that boot a kernel directly and raw ones: only a
    /// qcow2 disk that boots by itself can be rebuilt from what travels.
    async fn export_template(&self, name: &str) -> Result<ExportedTemplate, DriverError> {
        let name = name.to_string();
        self.blocking(move |s| moves::export_template(s, &name)).await
    }

    async fn live_source(&self, domain: &str) -> Result<LiveSource, DriverError> {
        let name = domain.to_string();
        self.blocking(move |s| live::live_source(s, &name)).await
    }

    async fn prepare_incoming(&self, spec: &VmSpec, source: &LiveSource) -> Result<LiveTarget, DriverError> {
        let (spec, source) = (spec.clone(), source.clone());
        self.blocking(move |s| live::prepare_incoming(s, &spec, &source)).await
    }

    async fn migrate_live(&self, domain: &str, target: &LiveTarget) -> Result<(), DriverError> {
        let (name, target) = (domain.to_string(), target.clone());
        self.blocking(move |s| live::migrate_live(s, &name, &target)).await
    }
}

#[cfg(test)]
mod live_move_tests;
#[cfg(test)]
mod live_tests;
#[cfg(test)]
mod move_tests;
#[cfg(test)]
mod tests;
