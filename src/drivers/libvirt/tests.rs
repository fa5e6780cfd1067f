//! The libvirt driver against libvirt's built-in `test:///default` driver (in-process, shared
//! by every connection of this test binary, so each test uses its own domain names) with real
//! qemu-img overlays of a tiny template. The guest command channel is a recording stand-in:
//! nothing runs inside a test-driver domain.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::*;
use crate::drivers::addresses::AddressConfig;

fn unique(tag: &str) -> String {
    format!("hive-test-{tag}-{:08x}", rand::random::<u32>())
}

struct Env {
    dir: tempfile::TempDir,
    cfg: LibvirtConfig,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tpl = dir.path().join("templates/tiny");
        std::fs::create_dir_all(&tpl).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(tpl.join("disk.qcow2"))
            .arg("16M")
            .output()
            .unwrap_or_else(|e| panic!("qemu-img: {e}: run scripts/test-deps.sh"));
        assert!(out.status.success(), "qemu-img: {}", String::from_utf8_lossy(&out.stderr));
        let cfg = LibvirtConfig {
            uri: "test:///default".into(),
            templates_dir: dir.path().join("templates"),
            vm_dir: dir.path().join("vms"),
            ..LibvirtConfig::default()
        };
        Self { dir, cfg }
    }

    fn with_addresses(mut self, last: u8) -> Self {
        self.cfg.addresses = Some(AddressConfig {
            range_start: [10, 77, 0, 10].into(),
            range_end: [10, 77, 0, last].into(),
            hosts_file: self.dir.path().join("hosts"),
            addn_hosts_file: None,
            pid_file: None,
            lease: "infinite".into(),
        });
        self
    }

    fn open(&self) -> LibvirtHypervisor {
        LibvirtHypervisor::open(self.cfg.clone(), None).unwrap()
    }

    fn overlay(&self, name: &str) -> PathBuf {
        self.cfg.vm_dir.join(format!("{name}.qcow2"))
    }
}

fn spec(name: &str) -> VmSpec {
    VmSpec { name: name.into(), template: "tiny".into(), cores: 2, ram_mb: 256, disk_mb: 16 }
}

fn backing_of(overlay: &Path) -> String {
    let out = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(overlay).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["backing-filename"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn create_makes_a_marked_domain_on_a_linked_clone() {
    let env = Env::new();
    let hv = env.open();
    assert_eq!(hv.domain_type(), DomainType::Test);
    let name = unique("create");
    assert_eq!(hv.create(&spec(&name)).await.unwrap(), name);
    let overlay = env.overlay(&name);
    assert!(backing_of(&overlay).ends_with("templates/tiny/disk.qcow2"), "{}", backing_of(&overlay));
    let listed = hv.list().await.unwrap();
    assert!(listed.contains(&name), "{listed:?}");
    assert!(!listed.contains(&"test".to_string()), "the test driver's own domain is not the hive's");
    let stats = hv.stats(&name).await.unwrap();
    assert_eq!(stats.memory_kb, 256 * 1024);

    let again = hv.create(&spec(&name)).await.unwrap_err();
    assert!(matches!(&again, DriverError::Failed(m) if m.contains("already exists")), "{again:?}");
    assert!(overlay.exists(), "a refused duplicate leaves the original's disk alone");

    let other = unique("notpl");
    let err = hv.create(&VmSpec { template: "missing".into(), ..spec(&other) }).await.unwrap_err();
    assert!(matches!(&err, DriverError::Failed(m) if m.contains("no template")), "{err:?}");
    assert!(!env.overlay(&other).exists());
    hv.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn list_answers_only_the_domains_on_an_overlay_in_its_own_vm_dir() {
    // Two drivers on one libvirt (test:///default is shared by this test binary), as two
    // agents may share a libvirtd.
    let (one, two) = (Env::new(), Env::new());
    let (hv1, hv2) = (one.open(), two.open());
    let name = unique("mine");
    hv1.create(&spec(&name)).await.unwrap();
    assert!(hv1.list().await.unwrap().contains(&name));
    assert!(!hv2.list().await.unwrap().contains(&name), "the other driver's domain is not listed");
    std::fs::rename(one.overlay(&name), one.dir.path().join("aside.qcow2")).unwrap();
    assert!(!hv1.list().await.unwrap().contains(&name), "no overlay in vm_dir, not listed");
    std::fs::rename(one.dir.path().join("aside.qcow2"), one.overlay(&name)).unwrap();
    hv1.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn start_stop_suspend_resume_and_ping_follow_the_domain_state() {
    let env = Env::new();
    let hv = env.open();
    let name = unique("life");
    hv.create(&spec(&name)).await.unwrap();
    assert_eq!(hv.ping(&name).await, Err(DriverError::NotReady), "defined, not running");
    hv.start(&name).await.unwrap();
    hv.start(&name).await.unwrap();
    assert_eq!(hv.ping(&name).await, Ok(GuestStatus { ip: String::new() }));
    hv.suspend(&name).await.unwrap();
    assert_eq!(hv.ping(&name).await, Err(DriverError::NotReady), "paused");
    hv.resume(&name).await.unwrap();
    hv.resume(&name).await.expect("resuming a running domain changes nothing");
    assert!(hv.ping(&name).await.is_ok());
    hv.stop(&name).await.unwrap();
    assert_eq!(hv.ping(&name).await, Err(DriverError::NotReady));
    hv.stop(&name).await.unwrap();
    assert!(hv.list().await.unwrap().contains(&name), "stop keeps the definition");
    assert!(hv.resume(&name).await.is_err(), "nothing to resume");
    hv.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn console_reads_the_password_only_with_the_secure_flag() {
    let env = Env::new();
    let hv = env.open();
    let name = unique("vnc");
    hv.create(&spec(&name)).await.unwrap();
    hv.start(&name).await.unwrap();
    let shared = hv.shared.clone();
    let n = name.clone();
    let vnc = tokio::task::spawn_blocking(move || ops::vnc(&shared, &n)).await.unwrap().unwrap();
    let password = vnc.password.expect("the secure XML carries the password");
    assert!(password.len() == 8 && password.chars().all(|c| c.is_ascii_alphanumeric()), "{password}");
    let plain = hv.blocking({
        let n = name.clone();
        move |s| ops::with_domain(s, &n, |d| d.get_xml_desc(0))
    });
    assert!(!plain.await.unwrap().contains(&password), "the password stays out of the plain XML");
    // The test driver never assigns a VNC port (it stays -1): the driver says so.
    let err = hv.console(&name).await.unwrap_err();
    assert!(matches!(&err, DriverError::Failed(m) if m.contains("no VNC port")), "{err:?}");
    hv.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn snapshots_revert_to_their_state_and_can_be_deleted() {
    let env = Env::new();
    let hv = env.open();
    let name = unique("snap");
    hv.create(&spec(&name)).await.unwrap();
    hv.snapshot(&name, "offline").await.unwrap();
    hv.start(&name).await.unwrap();
    hv.snapshot(&name, "clean").await.unwrap();
    hv.stop(&name).await.unwrap();

    hv.revert(&name, "clean").await.unwrap();
    assert!(hv.ping(&name).await.is_ok(), "a live snapshot comes back running");
    hv.revert(&name, "offline").await.unwrap();
    assert_eq!(hv.ping(&name).await, Err(DriverError::NotReady), "an offline snapshot comes back shut off");

    hv.delete_snapshot(&name, "offline").await.unwrap();
    assert!(matches!(hv.delete_snapshot(&name, "offline").await, Err(DriverError::NotFound(_))));
    assert!(matches!(hv.revert(&name, "offline").await, Err(DriverError::NotFound(_))));
    assert!(matches!(hv.revert(&name, "never").await, Err(DriverError::NotFound(_))));
    hv.revert(&name, "clean").await.unwrap();
    hv.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn destroy_leaves_no_domain_no_overlay_and_no_address() {
    let env = Env::new().with_addresses(250);
    let hv = env.open();
    let name = unique("gone");
    hv.create(&spec(&name)).await.unwrap();
    hv.start(&name).await.unwrap();
    hv.snapshot(&name, "clean").await.unwrap();
    let hosts = env.cfg.addresses.as_ref().unwrap().hosts_file.clone();
    assert!(std::fs::read_to_string(&hosts).unwrap().contains(&name));
    std::fs::write(env.cfg.vm_dir.join(format!("{name}.serial")), b"").unwrap();

    hv.destroy(&name).await.unwrap();
    assert!(!hv.list().await.unwrap().contains(&name));
    assert!(!env.overlay(&name).exists(), "the overlay is deleted");
    assert!(!env.cfg.vm_dir.join(format!("{name}.serial")).exists(), "the serial socket is deleted");
    assert!(!std::fs::read_to_string(&hosts).unwrap().contains(&name), "the address is released");
    assert!(matches!(hv.start(&name).await, Err(DriverError::NotFound(_))));
    hv.destroy(&name).await.unwrap();

    // Not the hive's domain: destroy leaves it be, and nothing else may touch it either.
    hv.destroy("test").await.unwrap();
    let shared = hv.shared.clone();
    let still_there = tokio::task::spawn_blocking(move || {
        let conn = ops::connect(&shared.cfg.uri).unwrap();
        virt::domain::Domain::lookup_by_name(&conn, "test").is_ok()
    });
    assert!(still_there.await.unwrap(), "the test driver's own domain survives");
    assert!(matches!(hv.stop("test").await, Err(DriverError::NotFound(_))));
}

#[tokio::test]
async fn missing_domains_are_not_found() {
    let env = Env::new();
    let hv = env.open();
    let n = &unique("missing");
    let nf = |r: Result<(), DriverError>| matches!(r, Err(DriverError::NotFound(_)));
    assert!(nf(hv.start(n).await) && nf(hv.stop(n).await) && nf(hv.suspend(n).await) && nf(hv.resume(n).await));
    assert!(nf(hv.snapshot(n, "s").await) && nf(hv.revert(n, "s").await) && nf(hv.delete_snapshot(n, "s").await));
    assert!(matches!(hv.console(n).await, Err(DriverError::NotFound(_))));
    assert!(matches!(hv.ping(n).await, Err(DriverError::NotFound(_))));
    assert!(matches!(hv.stats(n).await, Err(DriverError::NotFound(_))));
    assert!(matches!(hv.exec(n, "true").await, Err(DriverError::Unsupported(_))), "no channel configured");
    hv.destroy(n).await.unwrap();
    assert!(hv.create(&spec("../escape")).await.is_err());
    assert!(hv.destroy("../escape").await.is_err(), "a path-like name is refused, not cleaned up");
}

#[tokio::test]
async fn a_failed_create_removes_its_overlay() {
    // One address only: the second create fails after its overlay was made.
    let env = Env::new().with_addresses(10);
    let hv = env.open();
    let (a, b) = (unique("first"), unique("second"));
    hv.create(&spec(&a)).await.unwrap();
    let err = hv.create(&spec(&b)).await.unwrap_err();
    assert!(matches!(&err, DriverError::Failed(m) if m.contains("no free address")), "{err:?}");
    assert!(!env.overlay(&b).exists(), "the failed create's overlay is gone");
    assert!(!hv.list().await.unwrap().contains(&b));
    hv.destroy(&a).await.unwrap();
    hv.create(&spec(&b)).await.unwrap();
    hv.destroy(&b).await.unwrap();
}

/// Records what ran where; answers `Unreachable` until `up` is set.
#[derive(Default)]
struct Recorder {
    up: Mutex<bool>,
    ran: Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl CommandChannel for Recorder {
    async fn exec(&self, host: &str, command: &str, _timeout: Duration) -> Result<ExecOutput, GuestError> {
        if !*self.up.lock() {
            return Err(GuestError::Unreachable(host.into()));
        }
        self.ran.lock().push((host.into(), command.into()));
        Ok(ExecOutput { status: 0, stdout: "ok\n".into(), stderr: String::new() })
    }
}

#[tokio::test]
async fn the_command_channel_reaches_the_fixed_address() {
    let mut env = Env::new().with_addresses(250);
    env.cfg.network = NetworkMode::User;
    env.cfg.prepare_command = Some("open-home {home_page} --profile {profile}".into());
    let rec = Arc::new(Recorder::default());
    let hv = LibvirtHypervisor::open(env.cfg.clone(), Some(rec.clone())).unwrap();
    let name = unique("guest");
    hv.create(&spec(&name)).await.unwrap();
    let addr = env.cfg.addresses.clone().map(crate::drivers::addresses::AddressBook::open).unwrap().unwrap().get(&name).unwrap();
    let mac = hv.blocking({
        let n = name.clone();
        move |s| ops::with_domain(s, &n, |d| d.get_xml_desc(0))
    });
    assert!(mac.await.unwrap().contains(&format!("<mac address='{}'/>", addr.mac)), "the NIC has the fixed MAC");

    assert!(matches!(hv.exec(&name, "true").await, Err(DriverError::Failed(_))), "not running");
    hv.start(&name).await.unwrap();
    assert_eq!(hv.ping(&name).await, Err(DriverError::NotReady), "the guest is not reachable yet");
    *rec.up.lock() = true;
    assert_eq!(hv.ping(&name).await, Ok(GuestStatus { ip: addr.ip.to_string() }));
    assert_eq!(hv.exec(&name, "uname").await.unwrap().stdout, "ok\n");
    let spec = PrepareSpec { home_page: "https://x.test/a b".into(), profile_name: "p1".into() };
    hv.prepare(&name, &spec).await.unwrap();
    let ran = rec.ran.lock().clone();
    let ip = addr.ip.to_string();
    assert_eq!(
        ran,
        [
            (ip.clone(), "true".to_string()),
            (ip.clone(), "uname".to_string()),
            (ip, "open-home 'https://x.test/a b' --profile p1".to_string())
        ]
    );
    hv.destroy(&name).await.unwrap();
}

#[test]
fn config_that_cannot_work_is_refused() {
    let env = Env::new();
    let chan: Arc<dyn CommandChannel> = Arc::new(Recorder::default());
    let err = LibvirtHypervisor::open(env.cfg.clone(), Some(chan)).err().unwrap();
    assert!(matches!(err, LibvirtError::Config(_)), "{err}");
    let cfg = LibvirtConfig { prepare_command: Some("x".into()), ..env.cfg.clone() };
    assert!(matches!(LibvirtHypervisor::open(cfg, None), Err(LibvirtError::Config(_))));
    let cfg = LibvirtConfig { uri: "nosuch:///x".into(), ..env.cfg.clone() };
    assert!(matches!(LibvirtHypervisor::open(cfg, None), Err(LibvirtError::Connect { .. })));
}
