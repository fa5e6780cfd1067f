//! Cold moves of real QEMU VMs between two `hive node --driver libvirt` agents. Both use the
//! test suite's private libvirtd, each with its own templates and VM directories, so each sees
//! only its own domains. Node A has the template (the BIOS-bootable test disk); node B starts
//! empty, so the first move ships the template's base disk too, and the move back finds it
//! there. Each time the VM boots from its disk on the new node until the guest prints its
//! ready line, and afterwards it serves a user. Nothing simulated.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::agents::{Hive, Proc, join_token, start_hive};
use crate::libvirt_e2e::{REAL_VMS, script, virsh};
use crate::moves::{call, move_and_wait, vms};
use crate::support::until;

pub(crate) const READY: &str = "guaca-hive test guest ready";

/// A `hive node --driver libvirt` on libvirtd `uri` with its own directories under `dir`. With
/// `peer` it takes live moves: the URI the giving node's libvirtd dials (libvirt takes a
/// destination on the same machine only as qemu+unix with a socket), memory and disks sent to
/// 127.0.0.1, and its displays apart from the main daemon's (neither libvirtd sees the other's
/// domains).
pub(crate) fn agent(hive: &str, token: String, accel: &str, dir: &Path, name: &str, uri: &str, peer: Option<&str>) -> Proc {
    let mut cmd = Command::new(crate::support::hive_bin());
    cmd.args(["node", "--hive", hive, "--driver", "libvirt", "--libvirt-uri", uri, "--accel", accel])
        .args(["--cores", "2", "--ram-mb", "2048", "--disk-mb", "10000", "--name", name])
        .arg("--templates-dir")
        .arg(dir.join("templates"))
        .arg("--vm-dir")
        .arg(dir.join("vms"))
        .arg("--data-dir")
        .arg(dir.join("node"));
    if let Some(peer) = peer {
        let dial = peer.replacen("qemu://", "qemu+unix://", 1);
        cmd.args(["--libvirt-peer-uri", &dial, "--libvirt-migrate-uri", "tcp://127.0.0.1", "--vnc-first-port", "7900"]);
    }
    Proc {
        child: cmd
            .env("HIVE_NODE_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a libvirt node"),
    }
}

/// Two nodes' directories, A holding template `desk` (the BIOS-bootable test disk, with its
/// ready line) and B none, and a hive whose pool VMs use `desk`, no pool at start.
pub(crate) struct TwoNodes {
    pub dir: tempfile::TempDir,
    pub a: PathBuf,
    pub b: PathBuf,
    pub hive: Hive,
}

pub(crate) fn two_nodes() -> TwoNodes {
    let bootdisk = script("build-test-guest-disk.sh");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let template = a.join("templates/desk");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::create_dir_all(b.join("templates")).unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", &format!("{bootdisk}/bootable.raw")])
        .arg(template.join("disk.qcow2"))
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(template.join("ready"), READY).unwrap();
    let env = [
        ("HIVE_VM__TEMPLATE", "desk".to_string()),
        ("HIVE_VM__CORES", "1".to_string()),
        ("HIVE_VM__RAM_MB", "256".to_string()),
        ("HIVE_VM__DISK_MB", "64".to_string()),
        ("HIVE_POOL__DEFAULT_SIZE__MIN", "0".to_string()),
    ];
    let hive = start_hive(&dir.path().join("hive"), "127.0.0.1:0", &env);
    TwoNodes { dir, a, b, hive }
}

/// The id of node `name` once it is ready.
pub(crate) async fn node_id(c: &reqwest::Client, base: &str, name: &str) -> u64 {
    until(&format!("node {name} is ready"), Duration::from_secs(60), || async {
        let (_, n) = call(c, base, None, "GET", "/api/v1/nodes", None).await;
        n.as_array()?.iter().find(|n| n["name"] == name && n["state"] == "ready")?["id"].as_u64()
    })
    .await
}

fn running(uri: &str) -> Vec<String> {
    String::from_utf8_lossy(&virsh(uri, &["list", "--name"]).stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[tokio::test]
async fn a_qemu_vm_moves_to_a_node_without_its_template_and_back_and_serves_a_user() {
    let _turn = REAL_VMS.lock().await;
    let uri = script("libvirt-up.sh");
    let accel = script("accel.sh");
    let TwoNodes { dir: _dir, a, b, hive } = two_nodes();
    let (base, token) = (hive.base.as_str(), hive.token.as_str());
    let c = reqwest::Client::new();
    let _a = agent(base, join_token(&c, &hive).await, &accel, &a, "qemu-a", &uri, None);
    let node_a = node_id(&c, base, "qemu-a").await;
    // The pool's VM boots on A, the only node; then B joins.
    let (s, p) = call(&c, base, Some(token), "POST", "/api/v1/pools", Some(json!({"name": "desk", "min": 1, "max": 1}))).await;
    assert_eq!(s, 201, "{p}");
    let vm = until("a free VM on node A", Duration::from_secs(240), || async {
        vms(&c, base, "desk").await.into_iter().find(|(_, s, n)| s == "free" && *n == node_a).map(|v| v.0)
    })
    .await;
    let _b = agent(base, join_token(&c, &hive).await, &accel, &b, "qemu-b", &uri, None);
    let node_b = node_id(&c, base, "qemu-b").await;
    assert!(running(&uri).contains(&format!("desk-{vm}")), "{:?}", running(&uri));

    // A → B: B lacks the template, so its base disk travels too.
    let m = move_and_wait(&c, base, token, "desk", vm, node_b, Duration::from_secs(300)).await;
    assert_eq!(m["status"], "done", "{m}");
    let on_b = m["domain"].as_str().unwrap().to_string();
    assert!(b.join("templates/desk/disk.qcow2").is_file(), "the template was installed on B");
    let names = running(&uri);
    assert!(names.contains(&on_b) && !names.iter().any(|n| *n == format!("desk-{vm}")), "{names:?}");
    let all = String::from_utf8_lossy(&virsh(&uri, &["list", "--all", "--name"]).stdout).to_string();
    assert!(!all.lines().any(|l| l.trim() == format!("desk-{vm}")), "the old domain is gone: {all}");
    assert!(!a.join(format!("vms/desk-{vm}.qcow2")).exists(), "and its disk");
    let (_, images) = call(&c, base, Some(token), "GET", "/api/v1/images", None).await;
    assert_eq!(images.as_array().map(Vec::len), Some(0), "the move's disks left the registry: {images}");
    let console = std::fs::read_to_string(b.join(format!("vms/{on_b}.console.log"))).unwrap_or_default();
    assert!(console.contains(READY), "the guest booted from its disk on B: {console}");

    // B → A: the template is there (same content), only the overlay travels.
    let m = move_and_wait(&c, base, token, "desk", vm, node_a, Duration::from_secs(300)).await;
    assert_eq!(m["status"], "done", "{m}");
    assert!(vms(&c, base, "desk").await.contains(&(vm, "free".into(), node_a)));
    assert!(!running(&uri).contains(&on_b), "B's domain is gone");

    // The moved VM serves a user.
    let (_, bt) =
        call(&c, base, None, "POST", "/api/v1/pools/desk/batches", Some(json!({"size": 1, "home_page": "http://home.test/"}))).await;
    let (s, h) = call(&c, base, None, "POST", "/api/v1/pools/desk/sessions", Some(json!({"batch": bt["id"]}))).await;
    assert_eq!(s, 201, "{h}");
    let id = h["id"].as_u64().unwrap();
    let held = until("assigned", Duration::from_secs(120), || async {
        let (_, h) = call(&c, base, None, "GET", &format!("/api/v1/pools/desk/sessions/{id}"), None).await;
        h["vm"]["id"].as_u64()
    })
    .await;
    assert_eq!(held, vm);
    call(&c, base, Some(token), "DELETE", &format!("/api/v1/pools/desk/sessions/{id}"), None).await;
    call(&c, base, Some(token), "PUT", "/api/v1/pools/desk/size", Some(json!({"min": 0, "max": 0}))).await;
    until("the pool's domains are gone", Duration::from_secs(60), || async {
        let all = String::from_utf8_lossy(&virsh(&uri, &["list", "--all", "--name"]).stdout).to_string();
        (!all.lines().any(|l| l.trim().starts_with("desk-"))).then_some(())
    })
    .await;
}
