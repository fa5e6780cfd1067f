//! The agent's half of cold moves against a real hive (in process: store, image registry, HTTP
//! routes) and a recording hypervisor: commands travel as JSON frames from `RemoteHypervisor`
//! to `moves::run` and back, as over the agent's WebSocket; disks go up to
//! `/api/v1/agent/exports/…` and down through the fetcher.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::*;
use crate::agent::images::Caps;
use crate::agent::proto::{AgentMsg, HiveMsg};
use crate::app::Hive;
use crate::config::HiveConfig;
use crate::drivers::remote::{AgentLink, RemoteHypervisor};
use crate::drivers::{Console, GuestStatus, PrepareSpec, VmSpec, VmStats, is_missing_template, missing_template};

const MIB: u64 = 1024 * 1024;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A qcow2-looking file (the header's magic and virtual size) of `len` bytes in all.
fn qcow2_like(virtual_size: u64, len: usize, seed: u8) -> Vec<u8> {
    let mut b: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(2654435761).wrapping_add(seed as u64) as u8).collect();
    b[..4].copy_from_slice(b"QFI\xfb");
    b[24..32].copy_from_slice(&virtual_size.to_be_bytes());
    b
}

/// A hypervisor that hands out files it was given and records what it takes in (the bytes of
/// the file it was handed, read at once: the agent removes a fetched disk afterwards).
#[derive(Default)]
struct Recorder {
    vm_disk: PathBuf,
    template_disk: PathBuf,
    templates: Mutex<HashMap<String, Installed>>,
    imported: Mutex<Vec<Imported>>,
}

/// An installed template: its bytes and ready line.
type Installed = (Vec<u8>, Option<String>);
/// What an import was given, with the bytes of its file.
type Imported = (VmSpec, ExportedDisk, Vec<u8>);

fn unsupported<T>(what: &str) -> Result<T, DriverError> {
    Err(DriverError::Unsupported(what.into()))
}

#[async_trait]
impl Hypervisor for Recorder {
    fn kind(&self) -> &'static str {
        "recorder"
    }
    async fn create(&self, _: &VmSpec) -> Result<String, DriverError> {
        unsupported("create")
    }
    async fn start(&self, _: &str) -> Result<(), DriverError> {
        unsupported("start")
    }
    async fn stop(&self, _: &str) -> Result<(), DriverError> {
        unsupported("stop")
    }
    async fn suspend(&self, _: &str) -> Result<(), DriverError> {
        unsupported("suspend")
    }
    async fn resume(&self, _: &str) -> Result<(), DriverError> {
        unsupported("resume")
    }
    async fn snapshot(&self, _: &str, _: &str) -> Result<(), DriverError> {
        unsupported("snapshot")
    }
    async fn revert(&self, _: &str, _: &str) -> Result<(), DriverError> {
        unsupported("revert")
    }
    async fn delete_snapshot(&self, _: &str, _: &str) -> Result<(), DriverError> {
        unsupported("delete_snapshot")
    }
    async fn destroy(&self, _: &str) -> Result<(), DriverError> {
        unsupported("destroy")
    }
    async fn console(&self, _: &str) -> Result<Console, DriverError> {
        unsupported("console")
    }
    async fn ping(&self, _: &str) -> Result<GuestStatus, DriverError> {
        unsupported("ping")
    }
    async fn prepare(&self, _: &str, _: &PrepareSpec) -> Result<(), DriverError> {
        unsupported("prepare")
    }
    async fn stats(&self, _: &str) -> Result<VmStats, DriverError> {
        unsupported("stats")
    }
    async fn list(&self) -> Result<Vec<String>, DriverError> {
        Ok(vec![])
    }
    async fn install_template(&self, name: &str, image: &Path, ready: Option<&str>) -> Result<(), DriverError> {
        let bytes = std::fs::read(image).map_err(|e| DriverError::NotFound(format!("{}: {e}", image.display())))?;
        self.templates.lock().insert(name.into(), (bytes, ready.map(str::to_string)));
        Ok(())
    }
    async fn export(&self, domain: &str) -> Result<ExportedDisk, DriverError> {
        if domain != "vm-1" {
            return Err(DriverError::NotFound(domain.into()));
        }
        let template_sha256 = sha(&std::fs::read(&self.template_disk).unwrap());
        Ok(ExportedDisk { disk: DiskRef::File { path: self.vm_disk.clone() }, template: "base".into(), template_sha256 })
    }
    async fn import(&self, spec: &VmSpec, disk: &ExportedDisk) -> Result<String, DriverError> {
        let DiskRef::File { path } = &disk.disk else { return Err(DriverError::Failed("not a file".into())) };
        if !self.templates.lock().contains_key(&disk.template) {
            return Err(missing_template(&disk.template));
        }
        let bytes = std::fs::read(path).map_err(|e| DriverError::NotFound(format!("{}: {e}", path.display())))?;
        self.imported.lock().push((spec.clone(), disk.clone(), bytes));
        Ok(format!("{}~recorder", spec.name))
    }
    async fn export_template(&self, name: &str) -> Result<ExportedTemplate, DriverError> {
        if name != "base" {
            return Err(DriverError::NotFound(format!("template {name}")));
        }
        Ok(ExportedTemplate { name: name.into(), disk: DiskRef::File { path: self.template_disk.clone() }, ready: Some("login:".into()) })
    }
}

/// A hive in process, serving HTTP on loopback.
struct World {
    hive: Hive,
    base: String,
    dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl World {
    async fn start() -> World {
        let dir = TempDir::new().unwrap();
        let mut cfg =
            HiveConfig { data_dir: dir.path().join("hive"), admin_token: Some("admin".to_string().into()), ..HiveConfig::default() };
        cfg.sim.nodes = 0;
        // Small pieces and chunks: a few-MiB disk crosses several of each.
        cfg.images.piece_size_mb = 1;
        cfg.images.chunk_mb = 1;
        let hive = Hive::start(cfg).await.expect("hive starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(crate::http::serve(hive.clone(), listener, async move {
            let _ = stopped.await;
        }));
        World { hive, base, dir, stop: Some(stop) }
    }

    /// A node joined to the hive: its id and the context its connection gives move commands.
    async fn node(&self, name: &str) -> (u64, MoveContext) {
        let token = self.hive.create_join_token().await.unwrap().token;
        let joined = self.hive.join(&token, name).await.unwrap();
        let data = self.dir.path().join(name);
        let images = AgentImages::open(&data, &self.base, &joined.credential, Caps::default(), 0).await.unwrap();
        let ctx = MoveContext {
            hive: self.base.clone(),
            credential: joined.credential.clone().into(),
            images,
            scratch: open_scratch(&data).unwrap(),
            cancel: CancellationToken::new(),
        };
        (joined.node_id, ctx)
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.hive.stop().await;
    }
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(m: &T) -> T {
    serde_json::from_str(&serde_json::to_string(m).unwrap()).unwrap()
}

/// The agent's end of a connection without the socket: every frame is written as JSON and read
/// back, each command runs as the agent runs it.
fn serve(hv: Arc<dyn Hypervisor>, ctx: MoveContext) -> RemoteHypervisor {
    let (link, mut rx) = AgentLink::new();
    let l = link.clone();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let HiveMsg::Command { id, cmd } = roundtrip(&msg) else { continue };
            let (hv, ctx, l) = (hv.clone(), ctx.clone(), l.clone());
            tokio::spawn(async move {
                let result = if is_move(&cmd) { run(hv.as_ref(), cmd, &ctx).await } else { execute(hv.as_ref(), cmd).await };
                if let AgentMsg::Reply { id, result } = roundtrip(&AgentMsg::Reply { id, result }) {
                    l.complete(id, result);
                }
            });
        }
    });
    let remote = RemoteHypervisor::new(Duration::from_secs(5));
    remote.set_move_timeout(Duration::from_secs(60));
    remote.attach(Some(link));
    remote
}

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[tokio::test]
async fn a_vm_and_its_template_move_between_two_agents_through_the_registry() {
    let w = World::start().await;
    let (giver_id, giver_ctx) = w.node("giver").await;
    let (_, taker_ctx) = w.node("taker").await;
    let files = w.dir.path().join("giver-files");
    std::fs::create_dir_all(&files).unwrap();
    let (vm_bytes, template_bytes) =
        (qcow2_like(3 * 1024 * MIB, (3 * MIB + 4321) as usize, 1), qcow2_like(8 * 1024 * MIB, 2 * MIB as usize, 2));
    let giver = Arc::new(Recorder { vm_disk: files.join("vm-1.qcow2"), template_disk: files.join("base.qcow2"), ..Recorder::default() });
    std::fs::write(&giver.vm_disk, &vm_bytes).unwrap();
    std::fs::write(&giver.template_disk, &template_bytes).unwrap();
    let taker = Arc::new(Recorder::default());
    let taker_scratch = taker_ctx.scratch.clone();
    let taker_images = taker_ctx.images.clone();
    let from = serve(giver.clone(), giver_ctx);
    let to = serve(taker.clone(), taker_ctx);

    // The giver's disk goes up as a new image named after the domain.
    let exported = from.export("vm-1").await.expect("export");
    assert_eq!(exported.disk, DiskRef::Image { sha256: sha(&vm_bytes), fresh: true });
    assert_eq!((exported.template.as_str(), exported.template_sha256.clone()), ("base", sha(&template_bytes)));
    let image = w.hive.images().get(&sha(&vm_bytes)).await.expect("registered");
    assert_eq!(image.name, "move-vm-1");
    assert_eq!(image.size, vm_bytes.len() as u64);
    assert_eq!(image.disk_mb, 3 * 1024, "the qcow2's virtual size, not its file size");
    assert_eq!(image.readme, format!("Exported by node {giver_id} to move a VM to another node."));
    assert!(giver.vm_disk.is_file(), "the driver's disk stays until destroy");
    // Exported again: the registry had it, so it is not the move's to delete.
    assert_eq!(from.export("vm-1").await.unwrap().disk, DiskRef::Image { sha256: sha(&vm_bytes), fresh: false });
    assert_eq!(w.hive.images().list().await.unwrap().len(), 1);

    // The taker lacks the template: the error keeps its kind across the wire.
    let spec = VmSpec { name: "vm-1".into(), template: "base".into(), cores: 2, ram_mb: 1024, disk_mb: 3072 };
    let e = to.import(&spec, &exported).await.expect_err("no template yet");
    assert_eq!(is_missing_template(&e), Some("base"), "{e:?}");
    assert!(empty(&taker_scratch), "the fetched disk is removed after a failed import");

    // The template is shipped the same way and installed from the fetched image.
    let template = from.export_template("base").await.expect("export template");
    assert_eq!(template.disk, DiskRef::Image { sha256: sha(&template_bytes), fresh: true });
    assert_eq!((template.name.as_str(), template.ready.as_deref()), ("base", Some("login:")));
    assert_eq!(w.hive.images().get(&sha(&template_bytes)).await.unwrap().name, "template-base");
    to.install_exported_template(&template).await.expect("install");
    assert_eq!(taker.templates.lock().get("base"), Some(&(template_bytes.clone(), Some("login:".to_string()))));
    assert!(taker_images.held().contains(&sha(&template_bytes)), "a shipped template is an image the node holds");

    // Now the import takes: the driver got the giver's bytes as a local file.
    assert_eq!(to.import(&spec, &exported).await.expect("import"), "vm-1~recorder");
    let imported = taker.imported.lock().clone();
    assert_eq!(imported.len(), 1);
    let (got_spec, got_disk, got_bytes) = &imported[0];
    assert_eq!(got_spec, &spec);
    assert!(matches!(&got_disk.disk, DiskRef::File { path } if path.starts_with(&taker_scratch)), "{got_disk:?}");
    assert_eq!((got_disk.template.as_str(), &got_disk.template_sha256), ("base", &sha(&template_bytes)));
    assert!(*got_bytes == vm_bytes, "the taker's file holds the giver's disk");
    assert!(empty(&taker_scratch), "the fetched disk is removed once imported");
    assert!(!taker_images.held().contains(&sha(&vm_bytes)), "a VM's disk is not kept as an image");

    // Driver errors come back as they are.
    assert!(matches!(from.export("nope").await, Err(DriverError::NotFound(d)) if d == "nope"));
    assert!(matches!(from.export_template("other").await, Err(DriverError::NotFound(d)) if d == "template other"));
    w.stop().await;
}

#[tokio::test]
async fn a_refused_upload_registers_nothing_and_says_why() {
    let w = World::start().await;
    let (_, mut ctx) = w.node("giver").await;
    let disk = w.dir.path().join("vm-1.img");
    std::fs::write(&disk, vec![7u8; 300_000]).unwrap();
    let hv = Arc::new(Recorder { vm_disk: disk.clone(), template_disk: disk.clone(), ..Recorder::default() });

    ctx.credential = "hnc_not-a-node".to_string().into();
    let e = run(hv.as_ref(), Command::Export { domain: "vm-1".into() }, &ctx).await.expect_err("refused");
    let DriverError::Failed(why) = &e else { panic!("{e:?}") };
    assert!(why.contains("401") && !why.contains("hnc_not-a-node"), "{why}");
    assert!(w.hive.images().list().await.unwrap().is_empty());

    // A connection that ended stops the upload before it starts.
    let (_, ctx) = w.node("other").await;
    ctx.cancel.cancel();
    let e = run(hv.as_ref(), Command::Export { domain: "vm-1".into() }, &ctx).await.expect_err("cancelled");
    assert!(matches!(&e, DriverError::Failed(m) if m.contains("connection")), "{e:?}");
    assert!(w.hive.images().list().await.unwrap().is_empty());
    w.stop().await;
}

#[tokio::test]
async fn local_files_pass_through_and_other_commands_run_as_execute_does() {
    let dir = TempDir::new().unwrap();
    // No hive is asked: a File import and a File template need none.
    let images = AgentImages::open(dir.path(), "http://127.0.0.1:9", "hnc_x", Caps::default(), 0).await.unwrap();
    let ctx = MoveContext {
        hive: "http://127.0.0.1:9".into(),
        credential: "hnc_x".to_string().into(),
        images,
        scratch: open_scratch(dir.path()).unwrap(),
        cancel: CancellationToken::new(),
    };
    let file = dir.path().join("disk.img");
    std::fs::write(&file, b"local disk").unwrap();
    let hv = Recorder::default();
    let template = ExportedTemplate { name: "base".into(), disk: DiskRef::File { path: file.clone() }, ready: None };
    let done = run(&hv, Command::InstallExportedTemplate { template }, &ctx).await.unwrap();
    assert_eq!(done, CmdOk::Done);
    let disk = ExportedDisk { disk: DiskRef::File { path: file.clone() }, template: "base".into(), template_sha256: "ab".repeat(32) };
    let spec = VmSpec { name: "vm".into(), template: "base".into(), cores: 1, ram_mb: 512, disk_mb: 1 };
    assert_eq!(run(&hv, Command::Import { spec, disk: disk.clone() }, &ctx).await.unwrap(), CmdOk::Domain("vm~recorder".into()));
    assert_eq!(hv.imported.lock()[0].1, disk, "the file is handed on unchanged");
    assert!(file.is_file(), "a local file is not the agent's to remove");
    assert_eq!(run(&hv, Command::List, &ctx).await.unwrap(), CmdOk::Domains(vec![]));
    assert!(!is_move(&Command::List) && is_move(&Command::Export { domain: "d".into() }));
}

#[test]
fn export_names_fit_the_registry_and_are_escaped_in_the_url() {
    assert_eq!(image_name("move-", "vm-1"), "move-vm-1");
    let long = image_name("move-", &"é".repeat(100));
    assert_eq!(long.chars().count(), crate::images::NAME_MAX_CHARS);
    assert!(long.starts_with("move-é"));
    assert_eq!(export_url("http://h:1/", "move-a b/c~d"), "http://h:1/api/v1/agent/exports/move-a%20b%2Fc~d");
}

#[tokio::test]
async fn the_scratch_directory_starts_empty() {
    let dir = TempDir::new().unwrap();
    std::fs::create_dir_all(dir.path().join("moves")).unwrap();
    std::fs::write(dir.path().join("moves/left.part"), b"x").unwrap();
    let scratch = open_scratch(dir.path()).unwrap();
    assert_eq!(scratch, dir.path().join("moves"));
    assert!(empty(&scratch));
    assert_eq!(qcow2_virtual_size(&dir.path().join("missing")).await, None);
    std::fs::write(dir.path().join("raw"), vec![0u8; 64]).unwrap();
    assert_eq!(qcow2_virtual_size(&dir.path().join("raw")).await, None);
    std::fs::write(dir.path().join("q"), qcow2_like(5 * MIB, 64, 0)).unwrap();
    assert_eq!(qcow2_virtual_size(&dir.path().join("q")).await, Some(5 * MIB));
}
