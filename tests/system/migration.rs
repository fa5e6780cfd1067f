//! Migrations on real processes: a `hive` and two `hive node` agents on loopback (simulated
//! hypervisors; the hive, the agents, their WebSockets, the store, `qemu-img` and the image
//! registry are real). A VMware-style export (a vmdk made by the test with known content) is
//! discovered at a source, migrated to the hive, converted by one agent, uploaded into the image
//! registry, fetched and booted by the destination; the image the hive keeps must equal the
//! source disk. A corrupt disk ends in Error with qemu-img's cause and is not retried; a cancel
//! in the middle ends Cancelled; no scratch files are left on any agent.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::agents::{Hive, Proc, join_token, start_agent, start_hive};
use crate::support::until;

struct Setup {
    hive: Hive,
    c: reqwest::Client,
    agents: Vec<(std::path::PathBuf, Proc)>,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start(agents: usize) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let hive = start_hive(&dir.path().join("hive"), "127.0.0.1:0", &[]);
        let c = reqwest::Client::new();
        let mut procs = Vec::new();
        for i in 1..=agents {
            let token = join_token(&c, &hive).await;
            let adir = dir.path().join(format!("agent-{i}"));
            procs.push((adir.clone(), start_agent(&hive.base, &token, &adir, &format!("agent-{i}"))));
        }
        let s = Setup { hive, c, agents: procs, dir };
        until("agents ready", Duration::from_secs(60), || async {
            let n = s.call("GET", "/api/v1/nodes", None).await.1;
            let ready = n.as_array().map(|a| a.iter().filter(|n| n["state"] == "ready").count()).unwrap_or(0);
            (ready == agents).then_some(())
        })
        .await;
        s
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.c.request(method.parse().unwrap(), format!("{}{path}", self.hive.base)).bearer_auth(&self.hive.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        // Status 0: the hive could not be reached (it may be restarting; callers that poll retry).
        let Ok(resp) = r.send().await else { return (0, Value::Null) };
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }

    /// A source over `exports` and a destination on any node; answers (resources, destination id).
    async fn source_and_destination(&self, exports: &Path) -> (Vec<Value>, u64) {
        let src = self
            .ok("POST", "/api/v1/migration-sources", Some(json!({"name": "esx-exports", "type": "vmware", "params": {"dir": exports}})))
            .await;
        let resources = self.ok("POST", &format!("/api/v1/migration-sources/{}/discover", src["id"]), None).await;
        let dst = self.ok("POST", "/api/v1/migration-destinations", Some(json!({"name": "this-hive", "type": "hive", "params": {}}))).await;
        (resources.as_array().cloned().unwrap_or_default(), dst["id"].as_u64().unwrap())
    }

    /// Polls migration `id` until it is finished; answers it and the events seen on the way.
    async fn until_finished(&self, id: u64) -> (Value, Vec<String>) {
        let events = std::sync::Mutex::new(Vec::<String>::new());
        let m = until("the migration finished", Duration::from_secs(180), || async {
            let (status, m) = self.call("GET", &format!("/api/v1/migrations/{id}"), None).await;
            if status != 200 {
                return None;
            }
            let e = m["event"].as_str().unwrap_or_default().to_string();
            let mut seen = events.lock().unwrap();
            if seen.last() != Some(&e) {
                seen.push(e);
            }
            matches!(m["status"].as_str(), Some("Completed" | "Error" | "Cancelled")).then_some(m)
        })
        .await;
        (m, events.into_inner().unwrap())
    }

    /// Every agent's migration scratch space is empty.
    fn scratch_empty(&self) -> bool {
        self.agents.iter().all(|(d, _)| std::fs::read_dir(d.join("migrations")).map(|mut r| r.next().is_none()).unwrap_or(true))
    }
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A raw disk with known patterns at known places, and its vmdk export in `exports`.
fn vmdk_export(dir: &Path, exports: &Path, mb: u64) -> std::path::PathBuf {
    let raw = dir.join("original.raw");
    let mut bytes = vec![0u8; (mb * 1024 * 1024) as usize];
    for (i, chunk) in bytes.chunks_mut(1024 * 1024).enumerate() {
        if i % 3 != 2 {
            chunk.iter_mut().enumerate().for_each(|(j, b)| *b = ((i * 31 + j * 7) % 251) as u8);
        }
    }
    std::fs::write(&raw, bytes).unwrap();
    std::fs::create_dir_all(exports).unwrap();
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", raw.to_str().unwrap(), exports.join("web-01.vmdk").to_str().unwrap()]);
    raw
}

#[tokio::test]
async fn a_vmdk_export_is_discovered_converted_uploaded_and_booted_at_the_destination() {
    let s = Setup::start(2).await;
    let exports = s.dir.path().join("exports");
    let raw = vmdk_export(s.dir.path(), &exports, 24);
    let (resources, dst) = s.source_and_destination(&exports).await;
    assert_eq!(resources.len(), 1, "{resources:?}");
    let r = &resources[0];
    assert_eq!(r["id_at_source"], "web-01.vmdk");

    let (status, m) =
        s.call("POST", "/api/v1/migrations", Some(json!({"name": "web-01", "resource_id": r["id"], "destination_id": dst}))).await;
    assert_eq!(status, 201, "{m}");
    assert_eq!(m["status"], "Initiating");
    let id = m["id"].as_u64().unwrap();
    let (m, events) = s.until_finished(id).await;
    assert_eq!(m["status"], "Completed", "{m}");
    assert_eq!(m["event"], "done");
    assert_eq!(m["progress"], 100);
    assert!(m["worker"].as_u64().is_some(), "{m}");
    // Steps are seen in order (polling may miss short ones, never reorder them).
    let order = [
        "Scheduling",
        "Connecting to source",
        "Fetching disk(s)",
        "Converting disk(s)",
        "Uploading to destination",
        "Booting instance",
        "done",
    ];
    let ranks: Vec<usize> = events.iter().map(|e| order.iter().position(|o| o == e).unwrap_or_else(|| panic!("event {e}"))).collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{events:?}");

    // The image the hive keeps is the source disk, as qcow2.
    let sha = m["result"]["image"]["sha256"].as_str().unwrap_or_else(|| panic!("{m}")).to_string();
    let image = s.ok("GET", &format!("/api/v1/images/{sha}"), None).await;
    assert_eq!(image["name"], "web-01");
    let blob = s.dir.path().join("hive/images/blobs").join(&sha);
    let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&raw).arg(&blob).output().unwrap();
    assert!(out.status.success(), "the migrated image equals the source: {}", String::from_utf8_lossy(&out.stdout));
    assert!(m["result"]["instance"]["node"].as_u64().is_some(), "booted on a node: {m}");
    let res = s.ok("GET", "/api/v1/migration-resources", None).await;
    assert_eq!(res[0]["migrated"], true, "{res}");
    assert!(s.scratch_empty(), "no scratch files left");

    // Lists answer plain GETs (no body, no Content-Length).
    let all = s.ok("GET", "/api/v1/migrations", None).await;
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    let sources = s.ok("GET", "/api/v1/migration-sources", None).await;
    assert_eq!(sources[0]["name"], "esx-exports");
    assert_eq!(sources[0]["state"], "Up", "discover reached it: {sources}");

    // A finished migration can be deleted; a second delete finds nothing.
    s.ok("DELETE", &format!("/api/v1/migrations/{id}"), None).await;
    assert_eq!(s.call("DELETE", &format!("/api/v1/migrations/{id}"), None).await.0, 404);
}

#[tokio::test]
async fn a_corrupt_disk_ends_in_error_with_its_cause_and_a_cancel_stops_a_running_one() {
    let s = Setup::start(1).await;
    let exports = s.dir.path().join("exports");
    std::fs::create_dir_all(&exports).unwrap();
    let mut junk = b"KDMV".to_vec();
    junk.extend(std::iter::repeat_n(0x5a, 4096));
    std::fs::write(exports.join("broken.vmdk"), junk).unwrap();
    vmdk_export(s.dir.path(), &exports, 768);
    let (resources, dst) = s.source_and_destination(&exports).await;
    let id_of = |name: &str| resources.iter().find(|r| r["id_at_source"] == name).unwrap_or_else(|| panic!("{resources:?}"))["id"].clone();

    let m = s
        .ok("POST", "/api/v1/migrations", Some(json!({"name": "broken", "resource_id": id_of("broken.vmdk"), "destination_id": dst})))
        .await;
    let (m, _) = s.until_finished(m["id"].as_u64().unwrap()).await;
    assert_eq!(m["status"], "Error", "{m}");
    let why = m["error"].as_str().unwrap_or_default();
    assert!(why.contains("broken.vmdk"), "the cause names the disk: {why}");
    assert_eq!(m["attempts"].as_array().map(Vec::len), Some(1), "a bad source is not retried elsewhere: {m}");

    // Bad input changes nothing: a name no image could take, an unknown resource.
    let (status, e) = s
        .call(
            "POST",
            "/api/v1/migrations",
            Some(json!({"name": "n".repeat(81), "resource_id": id_of("broken.vmdk"), "destination_id": dst})),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("1 to 80 characters"), "{e}");
    let (status, e) = s.call("POST", "/api/v1/migrations", Some(json!({"name": "x", "resource_id": 999, "destination_id": dst}))).await;
    assert_eq!(status, 404, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("resource 999"), "{e}");

    let big =
        s.ok("POST", "/api/v1/migrations", Some(json!({"name": "big", "resource_id": id_of("web-01.vmdk"), "destination_id": dst}))).await;
    let big = big["id"].as_u64().unwrap();
    until("the big one is under way", Duration::from_secs(60), || async {
        let m = s.ok("GET", &format!("/api/v1/migrations/{big}"), None).await;
        (m["progress"].as_u64().unwrap_or(0) > 5).then_some(())
    })
    .await;
    let cancelled = s.ok("POST", &format!("/api/v1/migrations/{big}/cancel"), None).await;
    assert_eq!(cancelled["status"], "Cancelled");
    let (status, e) = s.call("POST", &format!("/api/v1/migrations/{big}/cancel"), None).await;
    assert_eq!(status, 409, "a finished migration cannot be cancelled again: {e}");
    until("the worker cleaned up", Duration::from_secs(30), || async { s.scratch_empty().then_some(()) }).await;
    assert_eq!(s.ok("GET", &format!("/api/v1/migrations/{big}"), None).await["status"], "Cancelled", "stays cancelled");
}

#[tokio::test]
async fn a_migration_cut_by_a_hive_restart_is_retried_on_another_node_and_completes() {
    let mut s = Setup::start(2).await;
    let exports = s.dir.path().join("exports");
    let raw = vmdk_export(s.dir.path(), &exports, 512);
    let (resources, dst) = s.source_and_destination(&exports).await;
    let m =
        s.ok("POST", "/api/v1/migrations", Some(json!({"name": "cut", "resource_id": resources[0]["id"], "destination_id": dst}))).await;
    let id = m["id"].as_u64().unwrap();
    let first = until("the first attempt is under way", Duration::from_secs(60), || async {
        let m = s.ok("GET", &format!("/api/v1/migrations/{id}"), None).await;
        (m["progress"].as_u64().unwrap_or(0) > 5).then(|| m["worker"].as_u64()).flatten()
    })
    .await;

    // Kill the hive (no shutdown path runs) and start it again on the same address.
    let listen = s.hive.base.trim_start_matches("http://").to_string();
    s.hive.proc.child.kill().unwrap();
    s.hive.proc.child.wait().unwrap();
    s.hive = start_hive(&s.dir.path().join("hive"), &listen, &[]);

    let (m, _) = s.until_finished(id).await;
    assert_eq!(m["status"], "Completed", "{m}");
    let attempts = m["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{m}");
    assert_eq!(attempts[0]["node"], first);
    assert!(attempts[0]["error"].as_str().unwrap().contains("restarted"), "{m}");
    assert_ne!(m["worker"], first, "retried on the other node: {m}");
    let sha = m["result"]["image"]["sha256"].as_str().unwrap().to_string();
    let blob = s.dir.path().join("hive/images/blobs").join(&sha);
    let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&raw).arg(&blob).output().unwrap();
    assert!(out.status.success(), "the image equals the source: {}", String::from_utf8_lossy(&out.stdout));
    until("no scratch left", Duration::from_secs(30), || async { s.scratch_empty().then_some(()) }).await;
}

#[tokio::test]
async fn endpoint_heartbeats_say_up_or_down_from_what_a_worker_reaches() {
    use crate::support::{ADMIN, TestApp};
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let admin = |method: &str, path: &str, body: Option<Value>| {
        let mut r = c.request(method.parse().unwrap(), format!("{}{path}", app.base)).bearer_auth(ADMIN);
        if let Some(b) = body {
            r = r.json(&b);
        }
        async move { r.send().await.expect("request").json::<Value>().await.expect("json") }
    };
    let token = admin("POST", "/api/v1/nodes/join-tokens", None).await["token"].as_str().unwrap().to_string();
    let _agent = start_agent(&app.base, &token, &dir.path().join("agent"), "worker-1");
    let exports = dir.path().join("exports");
    std::fs::create_dir_all(&exports).unwrap();
    let there =
        admin("POST", "/api/v1/migration-sources", Some(json!({"name": "there", "type": "file", "params": {"dir": exports}}))).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let gone = admin(
        "POST",
        "/api/v1/migration-sources",
        Some(json!({"name": "gone", "type": "http", "params": {"base_url": format!("http://{closed}/"), "connect_timeout_ms": 500}})),
    )
    .await;
    let nowhere =
        admin("POST", "/api/v1/migration-destinations", Some(json!({"name": "nowhere", "type": "hive", "params": {"node": 99}}))).await;
    assert_eq!(there["state"], "Unknown", "never checked yet");

    let state = |list: &Value, id: &Value| list.as_array().unwrap().iter().find(|e| e["id"] == *id).unwrap()["state"].clone();
    let sources = until("a worker checked the sources", Duration::from_secs(30), || async {
        app.hive.migrations().check_endpoints().await.unwrap();
        let l = admin("GET", "/api/v1/migration-sources", None).await;
        (state(&l, &there["id"]) == "Up").then_some(l)
    })
    .await;
    assert_eq!(state(&sources, &gone["id"]), "Down", "nothing answers at {closed}: {sources}");
    let dests = admin("GET", "/api/v1/migration-destinations", None).await;
    assert_eq!(state(&dests, &nowhere["id"]), "Down", "node 99 is not connected: {dests}");

    // The export directory disappears: the next heartbeat says so.
    std::fs::remove_dir_all(&exports).unwrap();
    app.hive.migrations().check_endpoints().await.unwrap();
    let sources = admin("GET", "/api/v1/migration-sources", None).await;
    assert_eq!(state(&sources, &there["id"]), "Down", "{sources}");
    app.stop().await;
}

#[tokio::test]
async fn an_endpoint_edit_is_checked_like_a_new_one_and_a_bad_one_changes_nothing() {
    use crate::support::{ADMIN, TestApp};
    let app = TestApp::spawn().await;
    let c = reqwest::Client::new();
    let call = |method: &str, path: String, body: Option<Value>| {
        let mut r = c.request(method.parse().unwrap(), format!("{}{path}", app.base)).bearer_auth(ADMIN);
        if let Some(b) = body {
            r = r.json(&b);
        }
        async move {
            let resp = r.send().await.expect("request");
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let src = json!({"name": "exports", "type": "file", "params": {"dir": dir.path()}});
    let (s, made) = call("POST", "/api/v1/migration-sources".into(), Some(src)).await;
    assert_eq!(s, 201, "{made}");
    let (s, dst) = call("POST", "/api/v1/migration-destinations".into(), Some(json!({"name": "here", "type": "hive", "params": {}}))).await;
    assert_eq!(s, 201, "{dst}");
    let (source, dest) = (format!("/api/v1/migration-sources/{}", made["id"]), format!("/api/v1/migration-destinations/{}", dst["id"]));
    let bad = [
        (&source, json!({"name": " ", "type": "file", "params": {"dir": dir.path()}}), "name"),
        (&source, json!({"name": "x".repeat(101), "type": "file", "params": {"dir": dir.path()}}), "name"),
        (&source, json!({"name": "exports", "type": "floppy", "params": {}}), "type"),
        (&source, json!({"name": "exports", "type": "file", "params": {}}), "dir"),
        (&dest, json!({"name": "here", "type": "hive", "params": {"node": "ten"}}), "node"),
    ];
    for (path, body, names) in bad {
        let (before_s, before) = call("GET", path.clone(), None).await;
        assert_eq!(before_s, 200);
        let (s, e) = call("PUT", path.clone(), Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {e}");
        assert!(e.to_string().contains(names), "{body}: {e}");
        assert_eq!(call("GET", path.clone(), None).await.1, before, "{body} changed nothing");
    }
    // A good edit goes through.
    let (s, e) = call("PUT", source.clone(), Some(json!({"name": "renamed", "type": "file", "params": {"dir": dir.path()}}))).await;
    assert_eq!((s, e["name"].as_str()), (200, Some("renamed")), "{e}");
}
