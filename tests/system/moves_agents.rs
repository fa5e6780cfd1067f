//! Cold moves between agents, the parts under the pool: a hive in process and two real
//! `hive node --driver sim` agents. The agents' upload route (`PUT /api/v1/agent/exports/{name}`)
//! takes a node's credential only, checks the name, registers a new disk (201) and answers an
//! image it holds (200) without registering it twice. Through the hive's `RemoteHypervisor`, an
//! agent imports a VM from a registry image (fetched, verified and handed to its driver, the
//! fetched file removed after) and installs a template from one; driver errors keep their kind.

use std::path::Path;
use std::time::Duration;

use guaca_hive::drivers::sim::SimHypervisor;
use guaca_hive::drivers::{DiskRef, DriverError, ExportedDisk, ExportedTemplate, Hypervisor, VmSpec};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::agents::{Proc, start_agent};
use crate::support::{ADMIN, TestApp, until};

struct Node {
    id: u64,
    credential: String,
    dir: std::path::PathBuf,
    _proc: Proc,
}

/// A hive (no simulated nodes of its own) and two agents, both ready.
async fn setup(dir: &Path) -> (TestApp, Node, Node) {
    let app = TestApp::builder().configure(|c| c.sim.nodes = 0).spawn().await;
    let mut nodes = Vec::new();
    for name in ["giver", "taker"] {
        let r = app.client.post(format!("{}/api/v1/nodes/join-tokens", app.base)).bearer_auth(ADMIN).send().await.unwrap();
        let token = r.json::<Value>().await.unwrap()["token"].as_str().expect("a join token").to_string();
        let adir = dir.join(name);
        let proc = start_agent(&app.base, &token, &adir, name);
        let saved: Value = until("the agent saved its credential", Duration::from_secs(30), || async {
            std::fs::read_to_string(adir.join("credential.json")).ok().and_then(|t| serde_json::from_str(&t).ok())
        })
        .await;
        let id = saved["node_id"].as_u64().expect("node id");
        until("the agent is ready", Duration::from_secs(30), || async {
            let n = app.json(&format!("/api/v1/nodes/{id}")).await;
            (n["state"] == "ready").then_some(())
        })
        .await;
        nodes.push(Node { id, credential: saved["credential"].as_str().unwrap().to_string(), dir: adir, _proc: proc });
    }
    let taker = nodes.pop().unwrap();
    let giver = nodes.pop().unwrap();
    (app, giver, taker)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `PUT /api/v1/agent/exports/{name}` of `body` (its SHA-256 in `x-sha256` unless given).
async fn put(app: &TestApp, name: &str, credential: &str, body: &[u8], sha256: Option<&str>) -> (StatusCode, Value) {
    let r = app
        .client
        .put(format!("{}/api/v1/agent/exports/{name}", app.base))
        .bearer_auth(credential)
        .header("x-sha256", sha256.map(str::to_string).unwrap_or_else(|| sha(body)))
        .body(body.to_vec())
        .send()
        .await
        .expect("request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn images(app: &TestApp) -> Vec<Value> {
    let r = app.client.get(format!("{}/api/v1/images", app.base)).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap().as_array().cloned().expect("a list of images")
}

fn disk_bytes(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8).collect()
}

#[tokio::test]
async fn the_export_route_takes_a_nodes_disk_once_and_refuses_strangers_and_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let (app, giver, _taker) = setup(dir.path()).await;
    let disk = disk_bytes(5 * 1024 * 1024 + 77, 1);
    // Refusals come before the body is read: a body the hive's first read takes whole, so the
    // answer is not lost to a reset.
    let small = disk_bytes(2000, 9);

    let (status, e) = put(&app, "move-vm-1", "hnc_not-a-node", &small, None).await;
    assert_eq!(status, 401, "{e}");
    assert_eq!(e["error"]["code"], "bad_credential", "{e}");
    let (status, e) = put(&app, "move-vm-1", ADMIN, &small, None).await;
    assert_eq!(status, 401, "the admin token is no node credential: {e}");
    assert!(images(&app).await.is_empty(), "nothing registered");

    for bad in ["move%0Avm", &"n".repeat(81), "%20"] {
        let (status, e) = put(&app, bad, &giver.credential, &small, None).await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert_eq!(e["error"]["code"], "invalid_param", "{e}");
        assert!(e["error"]["message"].as_str().unwrap().starts_with("name:"), "{e}");
    }
    let (status, e) = put(&app, "move-vm-1", &giver.credential, &disk, Some(&"0".repeat(64))).await;
    assert_eq!(status, 422, "what arrived is checked: {e}");
    assert!(images(&app).await.is_empty(), "nothing registered");

    let (status, image) = put(&app, "move-vm%201", &giver.credential, &disk, None).await;
    assert_eq!(status, 201, "{image}");
    assert_eq!(image["sha256"], sha(&disk));
    assert_eq!(image["name"], "move-vm 1", "the name is percent-decoded");
    assert_eq!(image["size"], disk.len() as u64);
    assert_eq!(image["disk_mb"], 6, "the file's size rounded up, without x-virtual-size");
    assert_eq!(image["readme"], format!("Exported by node {} to move a VM to another node.", giver.id));
    let listed = images(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["sha256"], sha(&disk));

    // The same content again: the image it is, not a second one.
    let (status, again) = put(&app, "move-vm-2", &giver.credential, &disk, None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!((again["sha256"].clone(), again["name"].clone()), (image["sha256"].clone(), image["name"].clone()));
    assert_eq!(images(&app).await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn an_agent_imports_a_vm_and_installs_a_template_from_registry_images() {
    let dir = tempfile::tempdir().unwrap();
    let (app, giver, taker) = setup(dir.path()).await;
    let (vm_disk, template_disk) = (disk_bytes(3 * 1024 * 1024 + 5, 2), disk_bytes(2 * 1024 * 1024, 3));
    for (name, bytes) in [("move-web-01", &vm_disk), ("template-base", &template_disk)] {
        let (status, image) = put(&app, name, &giver.credential, bytes, None).await;
        assert_eq!(status, 201, "{image}");
    }
    let to = app.hive.nodes_handle().remote(taker.id);
    let held = |sha: String| std::fs::read_dir(taker.dir.join("images")).unwrap().flatten().any(|f| f.file_name().to_string_lossy() == sha);

    // A template shipped from the registry: fetched, verified, kept as an image the node holds.
    let template = ExportedTemplate {
        name: "base".into(),
        disk: DiskRef::Image { sha256: sha(&template_disk), fresh: true },
        ready: Some("login:".into()),
    };
    to.install_exported_template(&template).await.expect("install");
    assert!(held(sha(&template_disk)), "the template's image is held on the node");

    // A VM's disk: fetched into the move's scratch, handed to the driver, removed after.
    let spec = VmSpec { name: "web-01".into(), template: "base".into(), cores: 1, ram_mb: 512, disk_mb: 4 };
    let exported = ExportedDisk {
        disk: DiskRef::Image { sha256: sha(&vm_disk), fresh: true },
        template: "base".into(),
        template_sha256: SimHypervisor::template_sha256("base"),
    };
    let domain = to.import(&spec, &exported).await.expect("import");
    assert!(domain.starts_with("web-01"), "{domain}");
    assert!(to.list().await.unwrap().contains(&domain), "the taker holds the new domain");
    let scratch = taker.dir.join("moves");
    assert!(std::fs::read_dir(&scratch).unwrap().next().is_none(), "no fetched disk left in {}", scratch.display());
    assert!(!held(sha(&vm_disk)), "a VM's disk is not kept as an image");

    // Errors keep their kind across the wire: the driver's, the fetch's.
    let other = ExportedDisk { template_sha256: "ab".repeat(32), ..exported.clone() };
    let e = to.import(&VmSpec { name: "web-02".into(), ..spec.clone() }, &other).await.expect_err("another template");
    assert!(matches!(&e, DriverError::Failed(m) if m.contains("differs")), "{e:?}");
    let unknown = ExportedDisk { disk: DiskRef::Image { sha256: "cd".repeat(32), fresh: true }, ..exported.clone() };
    let e = to.import(&VmSpec { name: "web-03".into(), ..spec }, &unknown).await.expect_err("no such image");
    assert!(matches!(&e, DriverError::Failed(_)), "{e:?}");
    let from = app.hive.nodes_handle().remote(giver.id);
    let e = from.export("no-such-domain").await.expect_err("no such domain");
    assert!(matches!(&e, DriverError::NotFound(d) if d.contains("no-such-domain")), "{e:?}");
    assert_eq!(to.list().await.unwrap(), vec![domain], "only the one import made a domain");
    app.stop().await;
}
