//! `libvirt` sources against the private libvirtd of `scripts/libvirt-up.sh` (a shut-off domain
//! with a real qcow2 disk, copied locally and streamed through a storage pool), and against
//! `test:///default`, whose built-in domain `test` is always running.

use std::path::PathBuf;
use std::process::Command;

use tokio_util::sync::CancellationToken;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;

use super::super::tests::{entries, progress, sha256_file};
use super::{parse_disks, uri_is_local};
use crate::migration::fetch::{DiskFormat, DiskTransfer, FetchError, LibvirtParams, ResourceKind, SourceSpec, discover, fetch};

const PRIVATE_URI: &str = "qemu:///system?socket=/run/guaca-hive/libvirt/libvirt-sock";

fn source(uri: &str, transfer: DiskTransfer) -> SourceSpec {
    SourceSpec::Libvirt(LibvirtParams { uri: uri.into(), allow_running: false, transfer })
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}: run scripts/test-deps.sh"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A shut-off domain on the private libvirtd whose one disk is a qcow2 with data in it, and
/// optionally a transient storage pool over the disk's directory; both go when dropped.
struct Defined {
    conn: Connect,
    name: String,
    uuid: String,
    disk: PathBuf,
    pool: Option<StoragePool>,
    _dir: tempfile::TempDir,
}

impl Defined {
    fn new(tag: &str) -> Self {
        let mut conn = Connect::open(Some(PRIVATE_URI)).unwrap_or_else(|e| {
            panic!("the private libvirtd does not answer on {PRIVATE_URI} ({e}): run scripts/test-deps.sh (or scripts/libvirt-up.sh)")
        });
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("system.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("16M"));
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0xa5 1M 2M", "-c", "write -P 0x3c 9M 512k"]).arg(&disk));
        let name = format!("hive-fetch-test-{tag}-{:08x}", rand::random::<u32>());
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>2</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
             <target dev='vda' bus='virtio'/></disk>\
             <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>\
             </devices></domain>",
            disk.display()
        );
        let dom = match Domain::define_xml(&conn, &xml) {
            Ok(dom) => dom,
            Err(e) => {
                let _ = conn.close();
                panic!("define {name}: {e}");
            }
        };
        let uuid = dom.get_uuid_string().unwrap();
        Self { conn, name, uuid, disk, pool: None, _dir: dir }
    }

    /// Put the disk's directory in a transient pool, so libvirt can stream it as a volume.
    fn with_pool(mut self) -> Self {
        let dir = self.disk.parent().unwrap().display().to_string();
        let xml = format!("<pool type='dir'><name>{}</name><target><path>{dir}</path></target></pool>", self.name);
        self.pool = Some(StoragePool::create_xml(&self.conn, &xml, 0).unwrap_or_else(|e| panic!("pool over {dir}: {e}")));
        self
    }
}

impl Drop for Defined {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let _ = pool.destroy();
        }
        if let Ok(dom) = Domain::lookup_by_name(&self.conn, &self.name) {
            let _ = dom.undefine();
        }
        let _ = self.conn.close();
    }
}

#[test]
fn disks_come_from_the_domain_xml() {
    let xml = "<domain><name>w</name><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/w.qcow2'/><target dev='vda'/></disk>\
        <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/w-data'/><target dev='vdb'/></disk>\
        <disk type='volume' device='disk'><source pool='default' volume='w-logs'/><target dev='vdc'/></disk>\
        <disk type='file' device='cdrom'><target dev='sda'/></disk></devices></domain>";
    let disks = parse_disks(xml).unwrap();
    let summary: Vec<_> = disks.iter().map(|d| (d.device.as_str(), d.target.as_str(), d.source.as_deref(), d.format.as_deref())).collect();
    assert_eq!(
        summary,
        [
            ("disk", "vda", Some("/v/w.qcow2"), Some("qcow2")),
            ("disk", "vdb", Some("/dev/vg/w-data"), Some("raw")),
            ("disk", "vdc", None, None),
            ("cdrom", "sda", None, None),
        ]
    );
    assert_eq!(disks[2].pool_volume, Some(("default".into(), "w-logs".into())));
}

#[test]
fn only_uris_without_a_remote_host_are_local() {
    for uri in [PRIVATE_URI, "test:///default", "qemu+unix:///system", "qemu+ssh://root@localhost/system", "qemu+tcp://[::1]:16509/system"]
    {
        assert!(uri_is_local(uri), "{uri}");
    }
    for uri in ["qemu+ssh://root@hv7.example/system", "qemu+tls://10.0.0.5:16514/system", "nonsense"] {
        assert!(!uri_is_local(uri), "{uri}");
    }
}

#[tokio::test]
async fn discovery_lists_a_shut_off_domain_with_its_qcow2_disk() {
    let d = Defined::new("discover");
    let found = discover(&source(PRIVATE_URI, DiskTransfer::Auto)).await.unwrap();
    let ours = found.iter().find(|r| r.name == d.name).unwrap_or_else(|| panic!("{} not in {found:?}", d.name));
    assert_eq!((ours.kind, ours.id_at_source.as_str()), (ResourceKind::Instance, d.uuid.as_str()));
    let p = &ours.properties;
    assert_eq!((p["state"].as_str(), p["vcpus"].as_u64(), p["memory_mib"].as_u64()), (Some("shutoff"), Some(2), Some(64)));
    assert_eq!(p["disks"][0]["target"], "vda");
    assert_eq!(p["disks"][0]["format"], "qcow2");
    assert_eq!(p["disks"][0]["source"], d.disk.display().to_string());
    assert_eq!(p["disks"][1]["device"], "cdrom");
}

async fn fetch_and_compare(d: &Defined, transfer: DiskTransfer) {
    let scratch = tempfile::tempdir().unwrap();
    let (tx, rx) = progress();
    let disks = fetch(&source(PRIVATE_URI, transfer), &d.uuid, scratch.path(), &tx, &CancellationToken::new()).await.unwrap();
    assert_eq!(disks.len(), 1, "the cdrom is not fetched: {disks:?}");
    let disk = &disks[0];
    assert_eq!(disk.path, scratch.path().join(format!("{}-vda.qcow2", d.name)));
    assert_eq!((disk.format_hint, disk.temporary, disk.crash_consistent), (Some(DiskFormat::Qcow2), true, false));
    assert_eq!(disk.bytes, std::fs::metadata(&d.disk).unwrap().len());
    assert_eq!(sha256_file(&disk.path), sha256_file(&d.disk), "the copy differs from {}", d.disk.display());
    assert_eq!(*rx.borrow(), (disk.bytes, Some(disk.bytes)));
}

#[tokio::test]
async fn fetch_copies_a_local_disk_exactly() {
    let d = Defined::new("local");
    fetch_and_compare(&d, DiskTransfer::Auto).await;
}

#[tokio::test]
async fn fetch_streams_a_pool_volume_exactly() {
    let d = Defined::new("stream").with_pool();
    fetch_and_compare(&d, DiskTransfer::Stream).await;
}

#[tokio::test]
async fn streaming_a_disk_outside_any_pool_says_so() {
    let d = Defined::new("nopool");
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    let err = fetch(&source(PRIVATE_URI, DiskTransfer::Stream), &d.name, scratch.path(), &tx, &CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("not in a libvirt storage pool"), "{err}");
    assert!(entries(scratch.path()).is_empty());
}

#[tokio::test]
async fn a_running_domain_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    let err =
        fetch(&source("test:///default", DiskTransfer::Auto), "test", scratch.path(), &tx, &CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, FetchError::DomainRunning(ref name) if name == "test"), "{err:?}");
    assert!(err.to_string().contains("crash-consistent"), "{err}");
    assert!(entries(scratch.path()).is_empty());
}

#[tokio::test]
async fn an_unknown_domain_is_not_found() {
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    let err = fetch(&source(PRIVATE_URI, DiskTransfer::Auto), "no-such-domain-4b1d", scratch.path(), &tx, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::NotFound(ref what) if what.contains("no-such-domain-4b1d")), "{err:?}");
}
