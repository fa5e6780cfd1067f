//! The simulated hypervisor: VMs are entries in a table, operations take configurable time and
//! fail at a configurable rate, and tests can make a VM's health pings fail on demand.
//!
//! It is a simulator. It stands in for a real hypervisor in `hive up`, in tests at scale and
//! in benchmarks; it is never the only evidence that a feature works against real VMs.
//! With a state file, its table survives a restart of the hive, as a real host's VMs would.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{
    Console, DiskRef, DriverError, ExecOutput, ExportedDisk, ExportedTemplate, GuestStatus, Hypervisor, PrepareSpec, VmSpec, VmStats,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimTimings {
    pub create_ms: u64,
    pub boot_ms: u64,
    pub prepare_ms: u64,
    pub cleanup_ms: u64,
    /// Probability (0..=1) that create, prepare or revert fails.
    pub failure_rate: f64,
}

impl Default for SimTimings {
    fn default() -> Self {
        SimTimings { create_ms: 50, boot_ms: 300, prepare_ms: 100, cleanup_ms: 100, failure_rate: 0.0 }
    }
}

impl SimTimings {
    /// No delays and no failures: for benchmarks and tests of pool logic.
    pub fn instant() -> SimTimings {
        SimTimings { create_ms: 0, boot_ms: 0, prepare_ms: 0, cleanup_ms: 0, failure_rate: 0.0 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SimVm {
    running: bool,
    paused: bool,
    snapshots: Vec<String>,
    ip: String,
    vnc_port: u16,
    password: String,
    /// The template it was created from (empty in state files from before moves).
    #[serde(default)]
    template: String,
    /// Boot finishes (the guest answers pings) this many ms after the sim's epoch.
    #[serde(skip)]
    up_at: Option<tokio::time::Instant>,
}

pub struct SimHypervisor {
    node: String,
    /// Octet that keeps addresses of different simulated nodes apart (10.<n>.x.y).
    net: u8,
    timings: Mutex<SimTimings>,
    vms: Mutex<BTreeMap<String, SimVm>>,
    next: AtomicU64,
    failing_pings: Mutex<HashSet<String>>,
    executed: Mutex<Vec<(String, String)>>,
    saving: tokio::sync::Mutex<()>,
    state_file: Option<PathBuf>,
}

impl SimHypervisor {
    /// A simulated host named `node`. With `state_file`, the table is loaded from it (VMs that
    /// were running are up at once) and rewritten after every change.
    /// Where exports' stand-in files go: beside the state file, else in the temp directory.
    fn exports_dir(&self) -> PathBuf {
        match self.state_file.as_ref().and_then(|p| p.parent()) {
            Some(dir) => dir.join("sim-exports"),
            None => std::env::temp_dir().join(format!("guaca-hive-sim-exports-{}", std::process::id())),
        }
    }

    /// A simulated disk: a small JSON file naming the node, the domain and its template.
    fn stand_in(&self, name: &str, template: &str) -> Result<PathBuf, DriverError> {
        let dir = self.exports_dir().join(&self.node);
        let path = dir.join(format!("{name}.json"));
        let body = serde_json::json!({"simulated": true, "node": self.node, "domain": name, "template": template});
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, body.to_string()))
            .map_err(|e| DriverError::Failed(format!("writing the simulated disk {}: {e}", path.display())))?;
        Ok(path)
    }

    pub fn new(node: &str, net: u8, timings: SimTimings, state_file: Option<PathBuf>) -> SimHypervisor {
        let mut vms: BTreeMap<String, SimVm> =
            state_file.as_ref().and_then(|p| std::fs::read(p).ok()).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let now = tokio::time::Instant::now();
        for vm in vms.values_mut() {
            vm.up_at = vm.running.then_some(now);
        }
        let next = vms.keys().filter_map(|k| k.rsplit('-').next()?.parse::<u64>().ok()).max().unwrap_or(0) + 1;
        SimHypervisor {
            node: node.to_string(),
            net,
            timings: Mutex::new(timings),
            vms: Mutex::new(vms),
            next: AtomicU64::new(next),
            failing_pings: Mutex::new(HashSet::new()),
            executed: Mutex::new(Vec::new()),
            saving: tokio::sync::Mutex::new(()),
            state_file,
        }
    }

    pub fn set_timings(&self, t: SimTimings) {
        *self.timings.lock() = t;
    }

    /// Failure injection: make (or stop making) this domain's health pings fail.
    pub fn fail_pings(&self, domain: &str, fail: bool) {
        let mut f = self.failing_pings.lock();
        if fail {
            f.insert(domain.to_string());
        } else {
            f.remove(domain);
        }
    }

    /// Commands run through `exec`, in order, as (domain, command).
    pub fn executed(&self) -> Vec<(String, String)> {
        self.executed.lock().clone()
    }

    pub fn domains(&self) -> Vec<String> {
        self.vms.lock().keys().cloned().collect()
    }

    async fn delay(&self, ms: u64) {
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    fn roll(&self, what: &str) -> Result<(), DriverError> {
        let rate = self.timings.lock().failure_rate;
        if rate > 0.0 && rand::rng().random_bool(rate.clamp(0.0, 1.0)) {
            return Err(DriverError::Failed(format!("simulated {what} failure")));
        }
        Ok(())
    }

    /// The stand-in for a template disk's SHA-256: a simulator has no disks, so it is derived
    /// from the template's name alone, the same on every simulated node (every simulated node
    /// "has" every template, and they are all the same).
    pub fn template_sha256(template: &str) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(format!("simulated template {template}").as_bytes()))
    }

    fn with_vm<T>(&self, domain: &str, f: impl FnOnce(&mut SimVm) -> Result<T, DriverError>) -> Result<T, DriverError> {
        let mut vms = self.vms.lock();
        let vm = vms.get_mut(domain).ok_or_else(|| DriverError::NotFound(domain.to_string()))?;
        f(vm)
    }

    async fn save(&self) {
        let Some(path) = &self.state_file else { return };
        // Saves one at a time, so the newest state is the one left on disk.
        let _one = self.saving.lock().await;
        let bytes = match serde_json::to_vec(&*self.vms.lock()) {
            Ok(b) => b,
            Err(e) => return tracing::warn!(error = %e, "sim: cannot encode state"),
        };
        let tmp = path.with_extension("tmp");
        let write = async {
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, path).await
        };
        if let Err(e) = write.await {
            tracing::warn!(error = %e, path = %path.display(), "sim: cannot save state");
        }
    }
}

#[async_trait]
impl Hypervisor for SimHypervisor {
    fn kind(&self) -> &'static str {
        "sim"
    }

    async fn create(&self, spec: &VmSpec) -> Result<String, DriverError> {
        let t = self.timings.lock().clone();
        self.delay(t.create_ms).await;
        self.roll("create")?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // The spec's name leads (pool VMs `<pool>-<id>`, lifecycle VMs `lc.…`, as on libvirt);
        // the rest says this is a simulated domain.
        let name = if spec.name.is_empty() { format!("sim-{}-{n}", self.node) } else { format!("{}~sim-{}-{n}", spec.name, self.node) };
        let password: String = {
            let mut rng = rand::rng();
            (0..8).map(|_| rng.random_range(b'a'..=b'z') as char).collect()
        };
        let vm = SimVm {
            running: false,
            paused: false,
            snapshots: Vec::new(),
            ip: format!("10.{}.{}.{}", self.net, (n / 250) % 250, n % 250 + 2),
            vnc_port: 5900 + (n % 1000) as u16,
            password,
            template: spec.template.clone(),
            up_at: None,
        };
        self.vms.lock().insert(name.clone(), vm);
        self.save().await;
        Ok(name)
    }

    async fn start(&self, domain: &str) -> Result<(), DriverError> {
        let boot = self.timings.lock().boot_ms;
        self.with_vm(domain, |vm| {
            vm.running = true;
            vm.paused = false;
            vm.up_at = Some(tokio::time::Instant::now() + Duration::from_millis(boot));
            Ok(())
        })?;
        self.save().await;
        Ok(())
    }

    async fn stop(&self, domain: &str) -> Result<(), DriverError> {
        self.with_vm(domain, |vm| {
            vm.running = false;
            vm.up_at = None;
            Ok(())
        })?;
        self.save().await;
        Ok(())
    }

    async fn suspend(&self, domain: &str) -> Result<(), DriverError> {
        self.with_vm(domain, |vm| {
            vm.paused = true;
            Ok(())
        })
    }

    async fn resume(&self, domain: &str) -> Result<(), DriverError> {
        self.with_vm(domain, |vm| {
            vm.paused = false;
            Ok(())
        })
    }

    async fn snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        self.with_vm(domain, |vm| {
            if !vm.snapshots.iter().any(|s| s == name) {
                vm.snapshots.push(name.to_string());
            }
            Ok(())
        })?;
        self.save().await;
        Ok(())
    }

    async fn revert(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        let ms = self.timings.lock().cleanup_ms;
        self.delay(ms).await;
        self.roll("revert")?;
        self.with_vm(domain, |vm| {
            if vm.snapshots.iter().any(|s| s == name) { Ok(()) } else { Err(DriverError::Failed(format!("no snapshot {name}"))) }
        })
    }

    async fn delete_snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        self.with_vm(domain, |vm| {
            let before = vm.snapshots.len();
            vm.snapshots.retain(|s| s != name);
            if vm.snapshots.len() < before { Ok(()) } else { Err(DriverError::NotFound(format!("snapshot {name}"))) }
        })?;
        self.save().await;
        Ok(())
    }

    /// Simulated: no guest runs, so a command "succeeds" with empty output once the VM runs.
    /// The commands are recorded so that tests can see what ConfigAuto ran.
    async fn exec(&self, domain: &str, command: &str) -> Result<ExecOutput, DriverError> {
        self.with_vm(domain, |vm| if vm.running { Ok(()) } else { Err(DriverError::Failed(format!("{domain} is not running"))) })?;
        self.executed.lock().push((domain.to_string(), command.to_string()));
        Ok(ExecOutput::default())
    }

    async fn destroy(&self, domain: &str) -> Result<(), DriverError> {
        let _ = std::fs::remove_file(self.exports_dir().join(&self.node).join(format!("{domain}.json")));
        let removed = self.vms.lock().remove(domain).is_some();
        self.failing_pings.lock().remove(domain);
        if removed {
            self.save().await;
        }
        Ok(())
    }

    async fn console(&self, domain: &str) -> Result<Console, DriverError> {
        self.with_vm(domain, |vm| Ok(Console { host: vm.ip.clone(), port: vm.vnc_port, password: vm.password.clone() }))
    }

    async fn ping(&self, domain: &str) -> Result<GuestStatus, DriverError> {
        if self.failing_pings.lock().contains(domain) {
            return Err(DriverError::Failed("simulated ping failure".into()));
        }
        self.with_vm(domain, |vm| match vm.up_at {
            Some(at) if vm.running && !vm.paused && tokio::time::Instant::now() >= at => Ok(GuestStatus { ip: vm.ip.clone() }),
            Some(_) if vm.running => Err(DriverError::NotReady),
            _ => Err(DriverError::Failed("domain is not running".into())),
        })
    }

    async fn prepare(&self, domain: &str, _spec: &PrepareSpec) -> Result<(), DriverError> {
        let ms = self.timings.lock().prepare_ms;
        self.delay(ms).await;
        self.roll("prepare")?;
        self.with_vm(domain, |_| Ok(()))
    }

    async fn stats(&self, domain: &str) -> Result<VmStats, DriverError> {
        self.with_vm(domain, |vm| Ok(VmStats { cpu_time_ns: 0, memory_kb: if vm.running { 512 * 1024 } else { 0 } }))
    }

    /// Simulated VMs read no disk: any template name works, so there is nothing to install.
    async fn install_template(&self, _name: &str, image: &std::path::Path, _ready: Option<&str>) -> Result<(), DriverError> {
        if image.is_file() { Ok(()) } else { Err(DriverError::NotFound(image.display().to_string())) }
    }

    async fn list(&self) -> Result<Vec<String>, DriverError> {
        Ok(self.domains())
    }

    /// Stops the domain and hands out a small stand-in file that describes it (a simulator has
    /// no disks), so an agent has real bytes to send through the hive. The domain stays until
    /// `destroy`, as on a real host.
    async fn export(&self, domain: &str) -> Result<ExportedDisk, DriverError> {
        let template = self.with_vm(domain, |vm| {
            vm.running = false;
            vm.paused = false;
            vm.up_at = None;
            Ok(vm.template.clone())
        })?;
        self.save().await;
        let path = self.stand_in(domain, &template)?;
        let template_sha256 = Self::template_sha256(&template);
        Ok(ExportedDisk { disk: DiskRef::File { path }, template, template_sha256 })
    }

    /// A new stopped domain with no snapshots, made as `create` makes one (its timing and
    /// failure rate included) and named as `create` names one. Any disk reference will do, as
    /// nothing is read; a digest other than the simulated template's is refused, as a real
    /// node refuses a template that differs.
    async fn import(&self, spec: &VmSpec, disk: &ExportedDisk) -> Result<String, DriverError> {
        if disk.template_sha256 != Self::template_sha256(&disk.template) {
            return Err(DriverError::Failed(format!("template {} on this node differs from the source's", disk.template)));
        }
        self.create(&VmSpec { template: disk.template.clone(), ..spec.clone() }).await
    }

    async fn export_template(&self, name: &str) -> Result<ExportedTemplate, DriverError> {
        Ok(ExportedTemplate {
            name: name.to_string(),
            disk: DiskRef::File { path: self.stand_in(&format!("template-{name}"), name)? },
            ready: None,
        })
    }

    /// Every simulated node has every template already: nothing to install.
    async fn install_exported_template(&self, _template: &ExportedTemplate) -> Result<(), DriverError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec { name: "t".into(), template: "base".into(), cores: 1, ram_mb: 512, disk_mb: 1024 }
    }

    #[tokio::test(start_paused = true)]
    async fn guest_answers_only_after_boot_time() {
        let sim = SimHypervisor::new("n1", 1, SimTimings { boot_ms: 1000, ..SimTimings::instant() }, None);
        let d = sim.create(&spec()).await.unwrap();
        assert!(d.starts_with("t~sim-n1-"), "the spec's name, then the simulator's mark: {d}");
        assert!(matches!(sim.ping(&d).await, Err(DriverError::Failed(_))), "not started");
        sim.start(&d).await.unwrap();
        assert_eq!(sim.ping(&d).await, Err(DriverError::NotReady));
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(sim.ping(&d).await.is_ok());
        sim.fail_pings(&d, true);
        assert!(sim.ping(&d).await.is_err());
        sim.destroy(&d).await.unwrap();
        assert!(matches!(sim.console(&d).await, Err(DriverError::NotFound(_))));
    }

    #[tokio::test]
    async fn revert_needs_the_snapshot_and_failure_rate_one_always_fails() {
        let sim = SimHypervisor::new("n1", 1, SimTimings::instant(), None);
        let d = sim.create(&spec()).await.unwrap();
        assert!(sim.revert(&d, "clean").await.is_err());
        sim.snapshot(&d, "clean").await.unwrap();
        sim.revert(&d, "clean").await.unwrap();
        sim.set_timings(SimTimings { failure_rate: 1.0, ..SimTimings::instant() });
        assert!(sim.create(&spec()).await.is_err());
        assert!(sim.prepare(&d, &PrepareSpec { home_page: "x".into(), profile_name: "p".into() }).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_vm_moves_between_simulated_nodes() {
        let (a, b) = (SimHypervisor::new("a", 1, SimTimings::instant(), None), SimHypervisor::new("b", 2, SimTimings::instant(), None));
        let d = a.create(&spec()).await.unwrap();
        a.start(&d).await.unwrap();
        a.snapshot(&d, "clean").await.unwrap();
        assert!(a.ping(&d).await.is_ok());

        let disk = a.export(&d).await.unwrap();
        assert!(matches!(a.ping(&d).await, Err(DriverError::Failed(_))), "export stops the domain");
        assert!(a.domains().contains(&d), "and keeps it until destroy");
        assert_eq!(disk.template, "base");
        assert_eq!(disk.template_sha256, SimHypervisor::template_sha256("base"));
        assert_ne!(disk.template_sha256, SimHypervisor::template_sha256("other"));
        let DiskRef::File { path } = &disk.disk else { panic!("a file: {disk:?}") };
        assert!(std::fs::read_to_string(path).unwrap().contains(&d), "a stand-in file naming the domain");
        let stand_in = path.clone();

        let moved = b.import(&VmSpec { name: "m".into(), ..spec() }, &disk).await.unwrap();
        assert!(moved.starts_with("m~sim-b-"), "{moved}");
        assert_eq!(b.domains(), vec![moved.clone()]);
        assert!(matches!(b.ping(&moved).await, Err(DriverError::Failed(_))), "imported stopped");
        assert!(matches!(b.revert(&moved, "clean").await, Err(DriverError::Failed(_))), "without snapshots");
        b.start(&moved).await.unwrap();
        assert!(b.ping(&moved).await.is_ok());
        a.destroy(&d).await.unwrap();
        assert!(!stand_in.exists(), "destroy removes the stand-in file");
        assert!(b.ping(&moved).await.is_ok());
        let again = b.export(&moved).await.unwrap();
        assert_eq!(again.template, "base", "the template travels on");

        let forged = ExportedDisk { template_sha256: SimHypervisor::template_sha256("other"), ..disk.clone() };
        let err = b.import(&VmSpec { name: "f".into(), ..spec() }, &forged).await.unwrap_err();
        assert!(matches!(&err, DriverError::Failed(m) if m.contains("differs")), "{err:?}");
        assert_eq!(b.domains().len(), 1, "nothing made");

        let tpl = a.export_template("base").await.unwrap();
        assert_eq!(tpl.name, "base");
        b.install_exported_template(&tpl).await.unwrap();
        b.set_timings(SimTimings { failure_rate: 1.0, ..SimTimings::instant() });
        assert!(b.import(&VmSpec { name: "g".into(), ..spec() }, &disk).await.is_err(), "import fails as create does");
        assert!(matches!(a.export("nope").await, Err(DriverError::NotFound(_))));
    }

    #[tokio::test]
    async fn state_file_keeps_running_vms_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sim.json");
        let sim = SimHypervisor::new("n1", 1, SimTimings::instant(), Some(file.clone()));
        let d = sim.create(&spec()).await.unwrap();
        sim.start(&d).await.unwrap();
        let console = sim.console(&d).await.unwrap();
        drop(sim);
        let again = SimHypervisor::new("n1", 1, SimTimings::instant(), Some(file));
        assert_eq!(again.console(&d).await.unwrap(), console);
        assert!(again.ping(&d).await.is_ok());
        let d2 = again.create(&spec()).await.unwrap();
        assert_ne!(d, d2, "names are not reused");
    }
}
