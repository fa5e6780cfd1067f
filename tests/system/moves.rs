//! Moving a pool's VM to another node through the API (`/api/v1/pools/{pool}/vms/{vm}/move`).
//! Here on the simulated hypervisor (named as such: its domains have no disks), in process and
//! between two real `hive node --driver sim` agents whose disks pass through the hive's image
//! registry; `moves_libvirt` moves real QEMU VMs.

use std::time::Duration;

use serde_json::{Value, json};

use crate::agents::{join_token, start_agent, start_hive};
use crate::support::{ADMIN, TestApp, until};

/// `method path` with the admin token (or none), answering status and JSON body.
pub(crate) async fn call(
    c: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = c.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The pool's VMs as `{id: (state, node)}`.
pub(crate) async fn vms(c: &reqwest::Client, base: &str, pool: &str) -> Vec<(u64, String, u64)> {
    let (_, p) = call(c, base, None, "GET", &format!("/api/v1/pools/{pool}"), None).await;
    let mut out: Vec<(u64, String, u64)> = p["vm_list"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|v| (v["id"].as_u64().unwrap(), v["state"].as_str().unwrap().to_string(), v["node"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Ask for a move, then wait for it to end; answers the final move record.
pub(crate) async fn move_and_wait(c: &reqwest::Client, base: &str, token: &str, pool: &str, vm: u64, node: u64, within: Duration) -> Value {
    let path = format!("/api/v1/pools/{pool}/vms/{vm}/move");
    let (status, started) = call(c, base, Some(token), "POST", &path, Some(json!({"node": node}))).await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["status"], "moving");
    assert_eq!(started["to"], node);
    until("the move ends", within, || async {
        let (_, m) = call(c, base, Some(token), "GET", &path, None).await;
        (m["status"] != "moving").then_some(m)
    })
    .await
}

#[tokio::test]
async fn a_free_and_a_ready_vm_move_between_simulated_nodes_and_bad_moves_change_nothing() {
    let app = TestApp::spawn().await;
    let (c, base) = (&app.client, app.base.as_str());
    let (s, p) = call(c, base, Some(ADMIN), "POST", "/api/v1/pools", Some(json!({"name": "mv", "min": 3, "max": 4}))).await;
    assert_eq!(s, 201, "{p}");
    let all_free = until("three free VMs", Duration::from_secs(20), || async {
        let v = vms(c, base, "mv").await;
        (v.len() == 3 && v.iter().all(|(_, s, _)| s == "free")).then_some(v)
    })
    .await;
    let (vm, _, from) = all_free[0].clone();
    let to = if from == 1 { 2 } else { 1 };
    let path = format!("/api/v1/pools/mv/vms/{vm}/move");

    // Refused, each with its reason, and nothing changes.
    let before = vms(c, base, "mv").await;
    let bad: [(Option<&str>, String, Value, u16, &str); 7] = [
        (None, path.clone(), json!({"node": to}), 401, ""),
        (Some(ADMIN), path.clone(), json!({"node": "two"}), 400, "body"),
        (Some(ADMIN), path.clone(), json!({"node": to, "live": true}), 400, "live"),
        (Some(ADMIN), path.clone(), json!({"node": 99}), 404, "no node 99"),
        (Some(ADMIN), path.clone(), json!({"node": from}), 400, "already runs on node"),
        (Some(ADMIN), "/api/v1/pools/mv/vms/999/move".into(), json!({"node": to}), 404, "no VM 999"),
        (Some(ADMIN), "/api/v1/pools/nope/vms/1/move".into(), json!({"node": to}), 404, "nope"),
    ];
    for (token, path, body, status, says) in bad {
        let (s, e) = call(c, base, token, "POST", &path, Some(body.clone())).await;
        assert_eq!(s, status, "{path} {body}: {e}");
        assert!(e.to_string().contains(says), "{path} {body}: {e}");
    }
    let (s, e) = call(c, base, Some(ADMIN), "POST", &format!("/api/v1/nodes/{to}/cordon"), None).await;
    assert_eq!(s, 200, "{e}");
    let (s, e) = call(c, base, Some(ADMIN), "POST", &path, Some(json!({"node": to}))).await;
    assert_eq!((s, e.to_string().contains("cordoned")), (409, true), "{e}");
    let (s, e) = call(c, base, Some(ADMIN), "GET", &path, None).await;
    assert_eq!(s, 404, "no move yet: {e}");
    assert_eq!(vms(c, base, "mv").await, before);
    call(c, base, Some(ADMIN), "POST", &format!("/api/v1/nodes/{to}/activate"), None).await;

    // A free VM moves and is free on its new node.
    let m = move_and_wait(c, base, ADMIN, "mv", vm, to, Duration::from_secs(20)).await;
    assert_eq!((m["status"].as_str(), m["mode"].as_str()), (Some("done"), Some("cold")), "{m}");
    assert_eq!((m["from"].as_u64(), m["to"].as_u64()), (Some(from), Some(to)));
    assert!(m["domain"].as_str().is_some_and(|d| d.contains(&format!("-n{to}"))), "{m}");
    let after = vms(c, base, "mv").await;
    assert!(after.contains(&(vm, "free".into(), to)), "{after:?}");
    assert_eq!(after.len(), 3, "no VM added or lost: {after:?}");

    // Ready VMs: moved back, prepared again for their batch, then handed out.
    let (s, b) = call(c, base, None, "POST", "/api/v1/pools/mv/batches", Some(json!({"size": 3, "home_page": "http://home.test/"}))).await;
    assert_eq!(s, 201, "{b}");
    let batch = b["id"].as_u64().unwrap();
    until("three ready VMs", Duration::from_secs(20), || async {
        let v = vms(c, base, "mv").await;
        v.iter().all(|(_, s, _)| s == "ready").then_some(())
    })
    .await;
    let m = move_and_wait(c, base, ADMIN, "mv", vm, from, Duration::from_secs(20)).await;
    assert_eq!(m["status"], "done", "{m}");
    until("the moved VM is ready again on its old node", Duration::from_secs(20), || async {
        vms(c, base, "mv").await.contains(&(vm, "ready".into(), from)).then_some(())
    })
    .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let (s, h) = call(c, base, None, "POST", "/api/v1/pools/mv/sessions", Some(json!({"batch": batch}))).await;
        assert_eq!(s, 201, "{h}");
        let id = h["id"].as_u64().unwrap();
        let h = until("assigned", Duration::from_secs(20), || async {
            let (_, h) = call(c, base, None, "GET", &format!("/api/v1/pools/mv/sessions/{id}"), None).await;
            h["vm"]["id"].as_u64()
        })
        .await;
        got.push(h);
    }
    assert!(got.contains(&vm), "the moved VM is handed out too: {got:?}");
    // An occupied VM moves only live, which simulated nodes cannot do: refused, nothing changes.
    let before = vms(c, base, "mv").await;
    assert!(before.contains(&(vm, "occupied".into(), from)), "{before:?}");
    let (s, e) = call(c, base, Some(ADMIN), "POST", &path, Some(json!({"node": to}))).await;
    assert_eq!((s, e.to_string().contains("would move live")), (409, true), "{e}");
    assert_eq!(vms(c, base, "mv").await, before);
}

#[tokio::test]
async fn a_vm_moves_between_two_agents_through_the_registry_and_leaves_no_image_behind() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("HIVE_POOL__DEFAULT_SIZE__MIN", "0".to_string())];
    let hive = start_hive(&dir.path().join("hive"), "127.0.0.1:0", &env);
    let c = reqwest::Client::new();
    let mut agents = Vec::new();
    for name in ["agent-1", "agent-2"] {
        let jt = join_token(&c, &hive).await;
        agents.push(start_agent(&hive.base, &jt, &dir.path().join(name), name));
    }
    let base = hive.base.as_str();
    let token = hive.token.as_str();
    until("two ready nodes", Duration::from_secs(60), || async {
        let (_, n) = call(&c, base, None, "GET", "/api/v1/nodes", None).await;
        n.as_array().is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["state"] == "ready")).then_some(())
    })
    .await;
    let (s, p) = call(&c, base, Some(token), "POST", "/api/v1/pools", Some(json!({"name": "far", "min": 1, "max": 2}))).await;
    assert_eq!(s, 201, "{p}");
    let (vm, _, from) =
        until("a free VM", Duration::from_secs(60), || async { vms(&c, base, "far").await.into_iter().find(|(_, s, _)| s == "free") })
            .await;
    let (_, nodes) = call(&c, base, None, "GET", "/api/v1/nodes", None).await;
    let to = nodes.as_array().unwrap().iter().map(|n| n["id"].as_u64().unwrap()).find(|id| *id != from).unwrap();
    let m = move_and_wait(&c, base, token, "far", vm, to, Duration::from_secs(60)).await;
    assert_eq!(m["status"], "done", "{m}");
    assert!(vms(&c, base, "far").await.contains(&(vm, "free".into(), to)));
    let (_, images) = call(&c, base, Some(token), "GET", "/api/v1/images", None).await;
    assert_eq!(images.as_array().map(Vec::len), Some(0), "the move's disk left the registry: {images}");
    // The VM serves a user on its new node.
    let (_, b) =
        call(&c, base, None, "POST", "/api/v1/pools/far/batches", Some(json!({"size": 1, "home_page": "http://home.test/"}))).await;
    let batch = b["id"].as_u64().unwrap();
    let (s, h) = call(&c, base, None, "POST", "/api/v1/pools/far/sessions", Some(json!({"batch": batch}))).await;
    assert_eq!(s, 201, "{h}");
    let id = h["id"].as_u64().unwrap();
    let held = until("assigned", Duration::from_secs(60), || async {
        let (_, h) = call(&c, base, None, "GET", &format!("/api/v1/pools/far/sessions/{id}"), None).await;
        h["vm"]["id"].as_u64().map(|v| (v, h["vm"]["node"].as_u64()))
    })
    .await;
    assert_eq!(held, (vm, Some(to)), "the moved VM, on its new node");
    drop(agents);
}

#[tokio::test]
async fn hive_ctl_moves_a_vm_and_waits_for_the_end_and_reports_a_refusal() {
    use crate::ctl_migration::ctl;
    let app = TestApp::spawn().await;
    let (c, base) = (&app.client, app.base.as_str());
    let (s, p) = call(c, base, Some(ADMIN), "POST", "/api/v1/pools", Some(json!({"name": "cm", "min": 1, "max": 1}))).await;
    assert_eq!(s, 201, "{p}");
    let (vm, _, from) =
        until("a free VM", Duration::from_secs(20), || async { vms(c, base, "cm").await.into_iter().find(|(_, s, _)| s == "free") }).await;
    let to = if from == 1 { 2 } else { 1 };
    let (vm_s, to_s) = (vm.to_string(), to.to_string());

    let (ok, _, err) = ctl(&app, &["vm", "move", "cm", &vm_s, "--node", "99"]).await;
    assert!(!ok && err.contains("no node 99") && err.contains("HTTP 404"), "{err}");
    let (ok, out, err) = ctl(&app, &["vm", "move", "cm", &vm_s, "--node", &to_s, "--wait"]).await;
    assert!(ok, "{err}");
    let m: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((m["status"].as_str(), m["mode"].as_str(), m["to"].as_u64()), (Some("done"), Some("cold"), Some(to)), "{m}");
    assert!(vms(c, base, "cm").await.contains(&(vm, "free".into(), to)));
    let (ok, out, err) = ctl(&app, &["vm", "move-status", "cm", &vm_s]).await;
    assert!(ok && out.contains("\"done\""), "{out} {err}");
    let (ok, _, err) = ctl(&app, &["vm", "move-status", "cm", "999"]).await;
    assert!(!ok && err.contains("no_move"), "{err}");
}
