//! `RemoteHypervisor`: the `Hypervisor` of a node that runs `hive node`. Each call becomes a
//! `Command` over the agent's WebSocket (an `AgentLink`) and waits for the `Reply` with the
//! same id. The link is swapped when the agent reconnects; while there is none, calls fail at
//! once with "node offline" instead of queueing work for a host that may never come back.
//! A dropped link fails every call still waiting on it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::{
    Console, DriverError, ExecOutput, ExportedDisk, ExportedTemplate, GuestStatus, Hypervisor, LiveSource, LiveTarget, PrepareSpec, VmSpec,
    VmStats,
};
use crate::agent::proto::{CmdOk, Command, Fetched, HiveMsg, Peer};

/// How long a call that moves a disk (`Export`, `Import`, `ExportTemplate`,
/// `InstallExportedTemplate`) may take: the disk crosses the network once, which may take hours
/// for a big one (see `RemoteHypervisor::set_move_timeout`).
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

type Pending = HashMap<u64, oneshot::Sender<Result<CmdOk, DriverError>>>;

/// What arrives from the node's end of a tunnel: bytes, or why it broke.
pub type TunnelRx = mpsc::UnboundedReceiver<Result<Vec<u8>, String>>;

/// One live connection to an agent: frames to send, the calls waiting for replies, and the
/// open tunnels (by id) whose incoming bytes go to their receivers.
pub struct AgentLink {
    out: mpsc::UnboundedSender<HiveMsg>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    tunnels: Mutex<HashMap<u64, mpsc::UnboundedSender<Result<Vec<u8>, String>>>>,
}

/// The hive's sending end of a tunnel; dropping it tells the agent to close the stream.
pub struct TunnelTx {
    id: u64,
    link: Arc<AgentLink>,
}

impl TunnelTx {
    /// False once the connection to the agent is gone.
    pub fn send(&self, bytes: &[u8]) -> bool {
        use base64::Engine;
        self.link.send(HiveMsg::TunnelData { tunnel: self.id, data: base64::engine::general_purpose::STANDARD.encode(bytes) })
    }
}

impl Drop for TunnelTx {
    fn drop(&mut self) {
        self.link.tunnels.lock().remove(&self.id);
        self.link.send(HiveMsg::TunnelClose { tunnel: self.id });
    }
}

impl AgentLink {
    /// A link whose outgoing frames the connection task reads from the returned receiver.
    pub fn new() -> (Arc<AgentLink>, mpsc::UnboundedReceiver<HiveMsg>) {
        let (out, rx) = mpsc::unbounded_channel();
        let link = AgentLink { out, pending: Mutex::new(HashMap::new()), next_id: AtomicU64::new(1), tunnels: Mutex::default() };
        (Arc::new(link), rx)
    }

    /// Have the agent open a TCP stream to `port` on its node (loopback, or `host` if that is
    /// one of the node's addresses) and carry it over this connection.
    pub fn open_tunnel(self: &Arc<Self>, port: u16, host: Option<String>) -> Option<(TunnelTx, TunnelRx)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.tunnels.lock().insert(id, tx);
        let sender = TunnelTx { id, link: self.clone() };
        self.send(HiveMsg::TunnelOpen { tunnel: id, port, host }).then_some((sender, rx))
    }

    /// Bytes (base64) from the node's end of tunnel `id`.
    pub fn tunnel_data(&self, id: u64, data: &str) {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(data).map_err(|_| "the node sent data that is not base64".to_string());
        let mut tunnels = self.tunnels.lock();
        let failed = bytes.is_err();
        if tunnels.get(&id).is_some_and(|t| t.send(bytes).is_err()) || failed {
            tunnels.remove(&id);
        }
    }

    /// The node's end of tunnel `id` ended (EOF when `error` is none).
    pub fn tunnel_closed(&self, id: u64, error: Option<String>) {
        if let Some(t) = self.tunnels.lock().remove(&id) {
            if let Some(e) = error {
                let _ = t.send(Err(e));
            }
        }
    }

    /// Send a frame that expects no reply (e.g. `Welcome`). False if the connection is gone.
    pub fn send(&self, msg: HiveMsg) -> bool {
        self.out.send(msg).is_ok()
    }

    /// The agent answered command `id`.
    pub fn complete(&self, id: u64, result: Result<CmdOk, DriverError>) {
        if let Some(tx) = self.pending.lock().remove(&id) {
            let _ = tx.send(result);
        }
    }

    /// The connection ended: every waiting call fails now, and every tunnel ends.
    pub fn close(&self) {
        self.pending.lock().clear();
        self.tunnels.lock().clear();
    }

    async fn call(&self, cmd: Command, timeout: Duration) -> Result<CmdOk, DriverError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        if self.out.send(HiveMsg::Command { id, cmd }).is_err() {
            self.pending.lock().remove(&id);
            return Err(DriverError::Failed("node offline".into()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(DriverError::Failed("connection to the node was lost".into())),
            Err(_) => {
                self.pending.lock().remove(&id);
                Err(DriverError::Failed(format!("the node did not answer within {} ms", timeout.as_millis())))
            }
        }
    }
}

pub struct RemoteHypervisor {
    link: Mutex<Option<Arc<AgentLink>>>,
    timeout: Duration,
    move_timeout: Mutex<Duration>,
    backend: Mutex<&'static str>,
    behind_nat: AtomicBool,
}

impl RemoteHypervisor {
    pub fn new(timeout: Duration) -> RemoteHypervisor {
        RemoteHypervisor {
            link: Mutex::new(None),
            timeout,
            move_timeout: Mutex::new(MOVE_TIMEOUT),
            backend: Mutex::new("agent"),
            behind_nat: AtomicBool::new(false),
        }
    }

    /// How long the calls that move a disk may take from now on (default `MOVE_TIMEOUT`).
    pub fn set_move_timeout(&self, timeout: Duration) {
        *self.move_timeout.lock() = timeout;
    }

    /// Remember whether the agent said its node is behind NAT (VNC through the tunnel).
    pub fn set_behind_nat(&self, yes: bool) {
        self.behind_nat.store(yes, Ordering::Relaxed);
    }

    pub fn behind_nat(&self) -> bool {
        self.behind_nat.load(Ordering::Relaxed)
    }

    /// A tunnel to `port` on the node, over the current connection.
    pub fn open_tunnel(&self, port: u16, host: Option<String>) -> Result<(TunnelTx, TunnelRx), DriverError> {
        let link = self.link.lock().clone().ok_or_else(|| DriverError::Failed("node offline".into()))?;
        link.open_tunnel(port, host).ok_or_else(|| DriverError::Failed("node offline".into()))
    }

    /// Remember which driver the agent runs, for `kind()` (metric labels).
    pub fn set_backend(&self, driver: &str) {
        *self.backend.lock() = super::backend_label(driver);
    }

    /// Route calls through `link` from now on (the agent (re)connected); `None` when it left.
    pub fn attach(&self, link: Option<Arc<AgentLink>>) {
        if let Some(old) = std::mem::replace(&mut *self.link.lock(), link) {
            old.close();
        }
    }

    /// Detach `link` if it is still the current one (a newer connection may have replaced it).
    pub fn detach(&self, link: &Arc<AgentLink>) {
        let mut cur = self.link.lock();
        if cur.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *cur = None;
        }
        link.close();
    }

    /// Tell the agent the hive will not talk to it again, and drop its connection.
    pub fn refuse(&self, reason: &str) {
        if let Some(link) = self.link.lock().take() {
            link.send(HiveMsg::Refused { reason: reason.to_string() });
            link.close();
        }
    }

    /// Have the agent fetch and verify an image, from `peers` and the hive; may take long.
    pub async fn fetch_image(&self, sha256: &str, peers: Vec<Peer>, timeout: Duration) -> Result<Fetched, DriverError> {
        let link = self.link.lock().clone().ok_or_else(|| DriverError::Failed("node offline".into()))?;
        match link.call(Command::FetchImage { sha256: sha256.into(), peers }, timeout).await? {
            CmdOk::Fetched(f) => Ok(f),
            other => Err(unexpected(other)),
        }
    }

    /// Run migration `job`'s worker pipeline on this node (see `Command::Migrate`); answers
    /// when it ended, which may take hours for a big disk.
    pub async fn migrate(&self, cmd: Command, timeout: Duration) -> Result<CmdOk, DriverError> {
        let link = self.link.lock().clone().ok_or_else(|| DriverError::Failed("node offline".into()))?;
        link.call(cmd, timeout).await
    }

    /// Have the agent make image `sha256` (which it holds) a template called `name`.
    pub async fn install_template_image(&self, sha256: &str, name: &str, ready: Option<String>) -> Result<(), DriverError> {
        match self.call(Command::InstallTemplate { sha256: sha256.into(), name: name.into(), ready }).await? {
            CmdOk::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// An agent-side command with the usual timeout (cancel, discover, probe).
    pub async fn agent_call(&self, cmd: Command) -> Result<CmdOk, DriverError> {
        self.call(cmd).await
    }

    /// `Hypervisor::destroy`, callable without the trait in scope.
    pub async fn destroy_domain(&self, domain: &str) -> Result<(), DriverError> {
        self.destroy(domain).await
    }

    pub fn connected(&self) -> bool {
        self.link.lock().is_some()
    }

    async fn call(&self, cmd: Command) -> Result<CmdOk, DriverError> {
        let link = self.link.lock().clone().ok_or_else(|| DriverError::Failed("node offline".into()))?;
        link.call(cmd, self.timeout).await
    }

    /// A call that moves a disk, with the move timeout.
    async fn call_long(&self, cmd: Command) -> Result<CmdOk, DriverError> {
        let link = self.link.lock().clone().ok_or_else(|| DriverError::Failed("node offline".into()))?;
        let timeout = *self.move_timeout.lock();
        link.call(cmd, timeout).await
    }
}

fn unexpected(got: CmdOk) -> DriverError {
    DriverError::Failed(format!("unexpected reply from the node: {got:?}"))
}

macro_rules! expect {
    ($call:expr, $pat:pat => $out:expr) => {
        match $call.await? {
            $pat => Ok($out),
            other => Err(unexpected(other)),
        }
    };
}

#[async_trait]
impl Hypervisor for RemoteHypervisor {
    /// The driver the agent runs (sim, libvirt), as it said in its hello; "agent" before that.
    fn kind(&self) -> &'static str {
        *self.backend.lock()
    }

    async fn create(&self, spec: &VmSpec) -> Result<String, DriverError> {
        expect!(self.call(Command::Create { spec: spec.clone() }), CmdOk::Domain(d) => d)
    }

    async fn start(&self, domain: &str) -> Result<(), DriverError> {
        expect!(self.call(Command::Start { domain: domain.into() }), CmdOk::Done => ())
    }

    async fn stop(&self, domain: &str) -> Result<(), DriverError> {
        expect!(self.call(Command::Stop { domain: domain.into() }), CmdOk::Done => ())
    }

    async fn suspend(&self, domain: &str) -> Result<(), DriverError> {
        expect!(self.call(Command::Suspend { domain: domain.into() }), CmdOk::Done => ())
    }

    async fn resume(&self, domain: &str) -> Result<(), DriverError> {
        expect!(self.call(Command::Resume { domain: domain.into() }), CmdOk::Done => ())
    }

    async fn snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        expect!(self.call(Command::Snapshot { domain: domain.into(), name: name.into() }), CmdOk::Done => ())
    }

    async fn revert(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        expect!(self.call(Command::Revert { domain: domain.into(), name: name.into() }), CmdOk::Done => ())
    }

    async fn destroy(&self, domain: &str) -> Result<(), DriverError> {
        expect!(self.call(Command::Destroy { domain: domain.into() }), CmdOk::Done => ())
    }

    async fn console(&self, domain: &str) -> Result<Console, DriverError> {
        expect!(self.call(Command::Console { domain: domain.into() }), CmdOk::Console(c) => c)
    }

    async fn ping(&self, domain: &str) -> Result<GuestStatus, DriverError> {
        expect!(self.call(Command::Ping { domain: domain.into() }), CmdOk::Guest(g) => g)
    }

    async fn prepare(&self, domain: &str, spec: &PrepareSpec) -> Result<(), DriverError> {
        expect!(self.call(Command::Prepare { domain: domain.into(), spec: spec.clone() }), CmdOk::Done => ())
    }

    async fn stats(&self, domain: &str) -> Result<VmStats, DriverError> {
        expect!(self.call(Command::Stats { domain: domain.into() }), CmdOk::Stats(s) => s)
    }

    async fn list(&self) -> Result<Vec<String>, DriverError> {
        expect!(self.call(Command::List), CmdOk::Domains(d) => d)
    }

    async fn delete_snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        expect!(self.call(Command::DeleteSnapshot { domain: domain.into(), name: name.into() }), CmdOk::Done => ())
    }

    async fn exec(&self, domain: &str, command: &str) -> Result<ExecOutput, DriverError> {
        expect!(self.call(Command::Exec { domain: domain.into(), command: command.into() }), CmdOk::Exec(o) => o)
    }

    /// The agent uploads the disk to this hive instance: the answer's disk is a `DiskRef::Image`.
    async fn export(&self, domain: &str) -> Result<ExportedDisk, DriverError> {
        expect!(self.call_long(Command::Export { domain: domain.into() }), CmdOk::Exported(d) => d)
    }

    /// The agent fetches a `DiskRef::Image` disk from this hive instance first.
    async fn import(&self, spec: &VmSpec, disk: &ExportedDisk) -> Result<String, DriverError> {
        expect!(self.call_long(Command::Import { spec: spec.clone(), disk: disk.clone() }), CmdOk::Domain(d) => d)
    }

    async fn export_template(&self, name: &str) -> Result<ExportedTemplate, DriverError> {
        expect!(self.call_long(Command::ExportTemplate { name: name.into() }), CmdOk::ExportedTemplate(t) => t)
    }

    async fn install_exported_template(&self, template: &ExportedTemplate) -> Result<(), DriverError> {
        expect!(self.call_long(Command::InstallExportedTemplate { template: template.clone() }), CmdOk::Done => ())
    }

    async fn live_source(&self, domain: &str) -> Result<LiveSource, DriverError> {
        expect!(self.call_long(Command::LiveSource { domain: domain.into() }), CmdOk::LiveSource(s) => s)
    }

    async fn prepare_incoming(&self, spec: &VmSpec, source: &LiveSource) -> Result<LiveTarget, DriverError> {
        expect!(self.call_long(Command::PrepareIncoming { spec: spec.clone(), source: source.clone() }), CmdOk::LiveTarget(t) => t)
    }

    async fn migrate_live(&self, domain: &str, target: &LiveTarget) -> Result<(), DriverError> {
        expect!(self.call_long(Command::MigrateLive { domain: domain.into(), target: target.clone() }), CmdOk::Done => ())
    }
}

/// Carry out one command on a local hypervisor: what the agent does with each `Command`.
pub async fn execute(h: &dyn Hypervisor, cmd: Command) -> Result<CmdOk, DriverError> {
    Ok(match cmd {
        Command::Create { spec } => CmdOk::Domain(h.create(&spec).await?),
        Command::Start { domain } => h.start(&domain).await.map(|_| CmdOk::Done)?,
        Command::Stop { domain } => h.stop(&domain).await.map(|_| CmdOk::Done)?,
        Command::Suspend { domain } => h.suspend(&domain).await.map(|_| CmdOk::Done)?,
        Command::Resume { domain } => h.resume(&domain).await.map(|_| CmdOk::Done)?,
        Command::Snapshot { domain, name } => h.snapshot(&domain, &name).await.map(|_| CmdOk::Done)?,
        Command::Revert { domain, name } => h.revert(&domain, &name).await.map(|_| CmdOk::Done)?,
        Command::DeleteSnapshot { domain, name } => h.delete_snapshot(&domain, &name).await.map(|_| CmdOk::Done)?,
        Command::Exec { domain, command } => CmdOk::Exec(h.exec(&domain, &command).await?),
        Command::Destroy { domain } => h.destroy(&domain).await.map(|_| CmdOk::Done)?,
        Command::Console { domain } => CmdOk::Console(h.console(&domain).await?),
        Command::Ping { domain } => CmdOk::Guest(h.ping(&domain).await?),
        Command::Prepare { domain, spec } => h.prepare(&domain, &spec).await.map(|_| CmdOk::Done)?,
        Command::Stats { domain } => CmdOk::Stats(h.stats(&domain).await?),
        Command::List => CmdOk::Domains(h.list().await?),
        // The driver's own answers: the agent uploads an exported `File` and fetches an `Image`
        // to import around these (`agent::moves`).
        Command::Export { domain } => CmdOk::Exported(h.export(&domain).await?),
        Command::Import { spec, disk } => CmdOk::Domain(h.import(&spec, &disk).await?),
        Command::ExportTemplate { name } => CmdOk::ExportedTemplate(h.export_template(&name).await?),
        Command::InstallExportedTemplate { template } => h.install_exported_template(&template).await.map(|_| CmdOk::Done)?,
        Command::LiveSource { domain } => CmdOk::LiveSource(h.live_source(&domain).await?),
        Command::PrepareIncoming { spec, source } => CmdOk::LiveTarget(h.prepare_incoming(&spec, &source).await?),
        Command::MigrateLive { domain, target } => h.migrate_live(&domain, &target).await.map(|_| CmdOk::Done)?,
        Command::FetchImage { .. }
        | Command::Migrate { .. }
        | Command::CancelMigration { .. }
        | Command::Discover { .. }
        | Command::ProbeSource { .. }
        | Command::InstallTemplate { .. } => {
            return Err(DriverError::Unsupported("that command is the agent's, not the hypervisor's".into()));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::sim::{SimHypervisor, SimTimings};

    /// A link served by a task that executes commands on a simulated hypervisor: the agent's
    /// half without the socket.
    fn serve(sim: Arc<SimHypervisor>) -> Arc<AgentLink> {
        let (link, mut rx) = AgentLink::new();
        let l = link.clone();
        tokio::spawn(async move {
            while let Some(HiveMsg::Command { id, cmd }) = rx.recv().await {
                let (sim, l) = (sim.clone(), l.clone());
                tokio::spawn(async move { l.complete(id, execute(sim.as_ref(), cmd).await) });
            }
        });
        link
    }

    #[tokio::test]
    async fn calls_travel_over_the_link_and_fail_fast_without_one() {
        let remote = RemoteHypervisor::new(Duration::from_secs(5));
        assert!(matches!(remote.list().await, Err(DriverError::Failed(m)) if m.contains("offline")));
        let sim = Arc::new(SimHypervisor::new("n", 1, SimTimings::instant(), None));
        remote.attach(Some(serve(sim.clone())));
        let spec = VmSpec { name: "vm".into(), template: "t".into(), cores: 1, ram_mb: 512, disk_mb: 1024 };
        let d = remote.create(&spec).await.unwrap();
        remote.start(&d).await.unwrap();
        assert_eq!(remote.list().await.unwrap(), vec![d.clone()]);
        assert_eq!(sim.domains(), vec![d.clone()]);
        assert!(matches!(remote.revert("nope", "clean").await, Err(DriverError::NotFound(_))));
        remote.destroy(&d).await.unwrap();
        assert!(sim.domains().is_empty());
    }

    #[tokio::test]
    async fn a_closed_link_fails_waiting_calls() {
        let remote = Arc::new(RemoteHypervisor::new(Duration::from_secs(30)));
        let (link, _rx) = AgentLink::new(); // nobody answers
        remote.attach(Some(link.clone()));
        let r = remote.clone();
        let call = tokio::spawn(async move { r.list().await });
        // The call is registered before the link closes: poll until it is.
        while link.pending.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        remote.detach(&link);
        assert!(matches!(call.await.unwrap(), Err(DriverError::Failed(m)) if m.contains("lost")));
        assert!(!remote.connected());
    }
}
