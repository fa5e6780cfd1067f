//! Cold moves against the private libvirtd of `scripts/libvirt-up.sh`, with real QEMU (KVM or
//! TCG, as `scripts/accel.sh` says) and real qemu-img: two drivers, each with its own
//! `templates_dir` and `vm_dir`, on one libvirtd, as two node agents can share a host. The
//! guest is the BIOS-bootable disk of `scripts/build-test-guest-disk.sh`, converted to qcow2 and
//! installed as template `bootdisk`: it boots from its disk alone, so its template can be
//! exported too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;
use crate::drivers::{CLEAN_SNAPSHOT, DiskRef, ExportedTemplate, is_missing_template};

const PRIVATE_URI: &str = "qemu:///system?socket=/run/guaca-hive/libvirt/libvirt-sock";
pub(super) const TEMPLATE: &str = "bootdisk";

/// Run one of the project's (idempotent) scripts and answer the last line it printed.
pub(super) fn script(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name);
    let out = Command::new(&path).output().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(out.status.success(), "{name} failed ({}); run scripts/test-deps.sh as root first", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string()
}

pub(super) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}: run scripts/test-deps.sh"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(super) fn unique(tag: &str) -> String {
    format!("hive-move-{tag}-{:08x}", rand::random::<u32>())
}

pub(super) fn sha256_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// The guest's disk as a qcow2 image, and the line it prints once up.
pub(super) struct Guest {
    pub image: PathBuf,
    pub ready: String,
    _dir: tempfile::TempDir,
}

impl Guest {
    pub(super) fn new() -> Self {
        let built = PathBuf::from(script("build-test-guest-disk.sh"));
        let ready = std::fs::read_to_string(built.join("ready")).unwrap().trim().to_string();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("bootdisk.qcow2");
        run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(built.join("bootable.raw")).arg(&image));
        Self { image, ready, _dir: dir }
    }
}

/// One "node": a driver with its own directories on the shared libvirtd. Dropping it removes
/// every domain with an overlay in its `vm_dir`, so a failed test leaves no QEMU running.
pub(super) struct Node {
    pub cfg: LibvirtConfig,
    pub hv: LibvirtHypervisor,
    _dir: tempfile::TempDir,
}

impl Node {
    pub(super) fn new() -> Self {
        let uri = script("libvirt-up.sh");
        assert_eq!(uri, PRIVATE_URI);
        Self::on(uri, None)
    }

    /// A node on libvirtd `uri`, taking live moves through `peer_uri` (memory and disks sent
    /// to 127.0.0.1) if given.
    pub(super) fn on(uri: String, peer_uri: Option<String>) -> Self {
        let migrate_uri = peer_uri.as_ref().map(|_| "tcp://127.0.0.1".to_string());
        let accel = script("accel.sh");
        let dir = tempfile::tempdir().unwrap();
        // QEMU runs as another user, which must reach the overlays and templates.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let cfg = LibvirtConfig {
            uri,
            templates_dir: dir.path().join("templates"),
            vm_dir: dir.path().join("vms"),
            domain_type: Some(if accel == "kvm" { DomainType::Kvm } else { DomainType::Qemu }),
            // The peer's displays apart from the main daemon's: neither sees the other's
            // defined (not yet started) domains' ports.
            vnc_first_port: if peer_uri.is_some() { 7900 } else { 5900 },
            peer_uri,
            migrate_uri,
            ..LibvirtConfig::default()
        };
        std::fs::create_dir_all(&cfg.templates_dir).unwrap();
        let hv = LibvirtHypervisor::open(cfg.clone(), None).unwrap();
        Self { cfg, hv, _dir: dir }
    }

    pub(super) async fn install(&self, guest: &Guest) {
        self.hv.install_template(TEMPLATE, &guest.image, Some(&guest.ready)).await.unwrap();
    }

    pub(super) fn overlay(&self, name: &str) -> PathBuf {
        self.cfg.vm_dir.join(format!("{name}.qcow2"))
    }

    pub(super) fn template_disk(&self) -> PathBuf {
        self.cfg.templates_dir.join(TEMPLATE).join("disk.qcow2")
    }

    pub(super) async fn list(&self) -> Vec<String> {
        self.hv.list().await.unwrap()
    }

    pub(super) fn vm_files(&self) -> Vec<String> {
        let entries = std::fs::read_dir(&self.cfg.vm_dir).unwrap();
        entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }

    /// Poll the guest until it answers (its ready line on the console), with a deadline.
    pub(super) async fn up(&self, name: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
        loop {
            match self.hv.ping(name).await {
                Ok(_) => return,
                Err(DriverError::NotReady) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    let log = std::fs::read_to_string(self.cfg.vm_dir.join(format!("{name}.console.log"))).unwrap_or_default();
                    panic!("{name} did not come up: {e:?}; its console showed:\n{log}");
                }
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let Ok(conn) = virt::connect::Connect::open(Some(&self.cfg.uri)) else { return };
        for file in std::fs::read_dir(&self.cfg.vm_dir).into_iter().flatten().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if let Some(vm) = name.strip_suffix(".qcow2") {
                if let Ok(dom) = virt::domain::Domain::lookup_by_name(&conn, vm) {
                    let _ = dom.destroy();
                    let _ = dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA);
                }
            }
        }
        let mut conn = conn;
        let _ = conn.close();
    }
}

/// Whether libvirt (anyone's) holds a domain of this name.
fn defined(name: &str) -> bool {
    let mut conn = virt::connect::Connect::open(Some(PRIVATE_URI)).unwrap();
    let found = virt::domain::Domain::lookup_by_name(&conn, name).is_ok();
    let _ = conn.close();
    found
}

pub(super) fn spec(name: &str) -> VmSpec {
    VmSpec { name: name.into(), template: TEMPLATE.into(), cores: 1, ram_mb: 256, disk_mb: 64 }
}

fn snapshots(overlay: &Path) -> String {
    run(Command::new("qemu-img").args(["snapshot", "-l"]).arg(overlay))
}

/// qemu-io's answer to one command on a qcow2 image; a pattern that does not match says so.
fn qemu_io(image: &Path, command: &str) -> String {
    let out = run(Command::new("qemu-io").args(["-f", "qcow2", "-c", command]).arg(image));
    assert!(!out.contains("verification failed"), "{command} on {}: {out}", image.display());
    out
}

fn backing_of(overlay: &Path) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&run(Command::new("qemu-img").args(["info", "--output=json"]).arg(overlay))).unwrap();
    info["backing-filename"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_moved_vm_boots_on_the_other_node_from_that_nodes_template() {
    let guest = Guest::new();
    let (a, b) = (Node::new(), Node::new());
    a.install(&guest).await;
    b.install(&guest).await;
    let (src, dst) = (unique("src"), unique("dst"));
    a.hv.create(&spec(&src)).await.unwrap();
    // Data the guest never touches (the end of its 64 MiB disk): one pattern in the clean
    // state, another written after it, which the move must not carry.
    qemu_io(&a.overlay(&src), "write -P 0x11 60M 64k");
    a.hv.start(&src).await.unwrap();
    a.up(&src).await;
    a.hv.snapshot(&src, CLEAN_SNAPSHOT).await.unwrap();
    a.hv.snapshot(&src, "later").await.unwrap();

    let disk = a.hv.export(&src).await.unwrap();
    qemu_io(&a.overlay(&src), "write -P 0x22 60M 64k");
    assert!(qemu_io(&a.overlay(&src), "read -P 0x22 60M 64k").contains("read 65536/65536"));
    assert_eq!(a.hv.ping(&src).await, Err(DriverError::NotReady), "export stops the domain");
    assert_eq!(disk.disk, DiskRef::File { path: a.overlay(&src) });
    assert!(a.overlay(&src).is_file() && a.list().await.contains(&src), "the source stays until destroy");
    assert_eq!(disk.template, TEMPLATE);
    assert_eq!(disk.template_sha256, sha256_hex(&a.template_disk()));
    let cache = std::fs::read_to_string(a.cfg.templates_dir.join(TEMPLATE).join("disk.sha256")).unwrap();
    assert!(cache.starts_with(&disk.template_sha256), "the digest is cached beside the disk: {cache}");
    let before = snapshots(&a.overlay(&src));
    assert!(before.contains(CLEAN_SNAPSHOT) && before.contains("later"), "{before}");

    assert_eq!(b.hv.import(&spec(&dst), &disk).await.unwrap(), dst);
    let (on_a, on_b) = (a.list().await, b.list().await);
    assert!(on_b.contains(&dst) && !on_b.contains(&src), "B lists only its own: {on_b:?}");
    assert!(on_a.contains(&src) && !on_a.contains(&dst), "A lists only its own: {on_a:?}");
    assert_eq!(snapshots(&b.overlay(&dst)), "", "no internal snapshot survives the import");
    let read = qemu_io(&b.overlay(&dst), "read -P 0x11 60M 64k");
    assert!(read.contains("read 65536/65536") && !read.contains("verification failed"), "the disk is back at clean: {read}");
    let b_template = std::fs::canonicalize(b.template_disk()).unwrap();
    assert_eq!(backing_of(&b.overlay(&dst)), b_template.display().to_string());
    assert_eq!(b.hv.ping(&dst).await, Err(DriverError::NotReady), "imported, not started");

    b.hv.start(&dst).await.unwrap();
    b.up(&dst).await;
    let printed = std::fs::read_to_string(b.cfg.vm_dir.join(format!("{dst}.console.log"))).unwrap();
    assert!(printed.contains(&guest.ready), "B's copy printed the ready line itself");
    a.hv.destroy(&src).await.unwrap();
    assert!(!defined(&src) && !a.overlay(&src).exists());
    assert!(b.hv.ping(&dst).await.is_ok(), "the moved VM runs on after the source is gone");
    b.hv.snapshot(&dst, CLEAN_SNAPSHOT).await.unwrap();
    b.hv.destroy(&dst).await.unwrap();
}

#[tokio::test]
async fn a_template_the_node_lacks_is_named_then_shipped() {
    let guest = Guest::new();
    let (a, b) = (Node::new(), Node::new());
    a.install(&guest).await;
    let (src, dst) = (unique("src"), unique("dst"));
    a.hv.create(&spec(&src)).await.unwrap();
    let disk = a.hv.export(&src).await.unwrap();

    let err = b.hv.import(&spec(&dst), &disk).await.unwrap_err();
    assert_eq!(is_missing_template(&err), Some(TEMPLATE), "{err:?}");
    assert!(!defined(&dst) && b.vm_files().is_empty(), "nothing made: {:?}", b.vm_files());

    let tpl = a.hv.export_template(TEMPLATE).await.unwrap();
    let want =
        ExportedTemplate { name: TEMPLATE.into(), disk: DiskRef::File { path: a.template_disk() }, ready: Some(guest.ready.clone()) };
    assert_eq!(tpl, want);
    b.hv.install_exported_template(&tpl).await.unwrap();
    assert_eq!(sha256_hex(&b.template_disk()), disk.template_sha256);
    let ready = std::fs::read_to_string(b.cfg.templates_dir.join(TEMPLATE).join("ready")).unwrap();
    assert_eq!(ready.trim(), guest.ready);

    assert_eq!(b.hv.import(&spec(&dst), &disk).await.unwrap(), dst);
    assert!(b.list().await.contains(&dst));
    assert_eq!(backing_of(&b.overlay(&dst)), std::fs::canonicalize(b.template_disk()).unwrap().display().to_string());
    b.hv.destroy(&dst).await.unwrap();
    a.hv.destroy(&src).await.unwrap();
}

#[tokio::test]
async fn another_template_of_the_same_name_is_refused_and_nothing_is_left() {
    let guest = Guest::new();
    let (a, b) = (Node::new(), Node::new());
    a.install(&guest).await;
    let other = b.cfg.templates_dir.join(TEMPLATE);
    std::fs::create_dir_all(&other).unwrap();
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(other.join("disk.qcow2")).arg("64M"));
    let (src, dst) = (unique("src"), unique("dst"));
    a.hv.create(&spec(&src)).await.unwrap();
    let disk = a.hv.export(&src).await.unwrap();

    let err = b.hv.import(&spec(&dst), &disk).await.unwrap_err();
    assert!(matches!(&err, DriverError::Failed(m) if m.contains("differs from the source's")), "{err:?}");
    assert!(!defined(&dst), "no domain");
    assert!(b.vm_files().is_empty(), "no overlay, no ready file: {:?}", b.vm_files());
    assert!(!b.list().await.contains(&dst));
    a.hv.destroy(&src).await.unwrap();
}

#[tokio::test]
async fn an_import_over_an_existing_name_is_refused_and_leaves_that_domain_alone() {
    let guest = Guest::new();
    let (a, b) = (Node::new(), Node::new());
    a.install(&guest).await;
    b.install(&guest).await;
    let (src, mine) = (unique("src"), unique("mine"));
    a.hv.create(&spec(&src)).await.unwrap();
    b.hv.create(&spec(&mine)).await.unwrap();
    b.hv.snapshot(&mine, "kept").await.unwrap();
    let mine_disk = sha256_hex(&b.overlay(&mine));
    let disk = a.hv.export(&src).await.unwrap();

    let err = b.hv.import(&spec(&mine), &disk).await.unwrap_err();
    assert!(matches!(&err, DriverError::Failed(m) if m.contains("already exists")), "{err:?}");
    assert_eq!(sha256_hex(&b.overlay(&mine)), mine_disk, "its overlay is untouched");
    assert!(snapshots(&b.overlay(&mine)).contains("kept"));
    assert!(b.list().await.contains(&mine));
    b.hv.revert(&mine, "kept").await.expect("its snapshot metadata is untouched");

    // The source's own name: libvirt's names are the host's, so the other node's domain counts.
    let err = b.hv.import(&spec(&src), &disk).await.unwrap_err();
    assert!(matches!(&err, DriverError::Failed(m) if m.contains("already exists")), "{err:?}");
    assert!(!b.overlay(&src).exists() && !b.list().await.contains(&src));
    assert!(a.list().await.contains(&src) && a.overlay(&src).is_file(), "the source is untouched");

    let image = ExportedDisk { disk: DiskRef::Image { sha256: disk.template_sha256.clone(), fresh: false }, ..disk.clone() };
    assert!(matches!(b.hv.import(&spec(&unique("img")), &image).await, Err(DriverError::Unsupported(_))));
    assert!(matches!(a.hv.export(&unique("nope")).await, Err(DriverError::NotFound(_))));
    a.hv.destroy(&src).await.unwrap();
    b.hv.destroy(&mine).await.unwrap();
}

#[tokio::test]
async fn only_templates_that_boot_from_a_qcow2_disk_are_exported() {
    let node = Node::new();
    let err = node.hv.export_template("absent").await.unwrap_err();
    assert_eq!(is_missing_template(&err), Some("absent"), "{err:?}");
    let make = |name: &str, files: &[&str]| {
        let dir = node.cfg.templates_dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in files {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
    };
    make("kernel-boot", &["disk.qcow2", "kernel", "initrd", "cmdline"]);
    make("raw-disk", &["disk.raw"]);
    make("plain", &["disk.qcow2"]);
    for name in ["kernel-boot", "raw-disk"] {
        let err = node.hv.export_template(name).await.unwrap_err();
        assert!(matches!(&err, DriverError::Unsupported(m) if m.contains(name)), "{name}: {err:?}");
    }
    let plain = node.hv.export_template("plain").await.unwrap();
    assert_eq!(plain.disk, DiskRef::File { path: node.cfg.templates_dir.join("plain/disk.qcow2") });
    assert_eq!(plain.ready, None);
}

#[test]
fn the_template_digest_is_cached_while_it_is_newer_than_the_disk_and_of_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    std::fs::write(&disk, b"template bytes").unwrap();
    let real = sha256_hex(&disk);
    assert_eq!(moves::template_sha256(&disk).unwrap(), real);
    let cache = moves::digest_cache(&disk);
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), format!("{real} 14\n"));

    let bogus = "ab".repeat(32);
    std::fs::write(&cache, format!("{bogus} 14\n")).unwrap();
    assert_eq!(moves::template_sha256(&disk).unwrap(), bogus, "a good cache is not recomputed");

    std::fs::write(&cache, format!("{bogus} 15\n")).unwrap();
    assert_eq!(moves::template_sha256(&disk).unwrap(), real, "another size: recomputed");
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), format!("{real} 14\n"), "and rewritten");

    std::fs::write(&cache, format!("{bogus} 14\n")).unwrap();
    let disk_time = std::fs::metadata(&disk).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&cache).unwrap();
    f.set_modified(disk_time - Duration::from_secs(10)).unwrap();
    assert_eq!(moves::template_sha256(&disk).unwrap(), real, "older than the disk: recomputed");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "no temporary file stays: {leftovers:?}");
}

#[test]
fn the_template_comes_from_the_hive_metadata() {
    let ns = crate::drivers::domain_xml::HIVE_NS;
    let xml = format!("<hive:vm xmlns:hive=\"{ns}\"><hive:template>bootdisk</hive:template></hive:vm>");
    assert_eq!(moves::template_of(&xml).as_deref(), Some("bootdisk"));
    // As libvirt answers it: the element it keeps for our namespace, without one.
    assert_eq!(moves::template_of("<vm>\n  <template>tiny</template>\n</vm>\n").as_deref(), Some("tiny"));
    let other = "<x:vm xmlns:x=\"urn:other\"><x:template>bootdisk</x:template></x:vm>";
    assert_eq!(moves::template_of(other), None, "another namespace's element is not ours");
    assert_eq!(moves::template_of(&format!("<hive:vm xmlns:hive=\"{ns}\"/>")), None);
}
