//! Node administration over `/api/v1/nodes/…`: cordon, drain, activate and removal (admin
//! token), end users' ratings of sessions (checked, once each, moving the node's score), the
//! rewards ledger per node and period, and the fall-back to cloud nodes when participants are
//! full. Placement is read from the pool's own snapshot; everything else goes over HTTP.

use std::time::Duration;

use guaca_hive::domain::vm::VmState;
use reqwest::{Method as M, StatusCode};
use serde_json::{Value, json};

use crate::support::{ADMIN, TestApp, until};

async fn send(app: &TestApp, method: M, path: &str, body: Option<Value>, admin: bool) -> (StatusCode, Value) {
    crate::support::send_json(&app.client, method, format!("{}{path}", app.base), body, admin.then_some(ADMIN)).await
}

/// The error code and message of a refusal, for one-line asserts.
fn err(v: &Value) -> (&str, &str) {
    (v["error"]["code"].as_str().unwrap_or(""), v["error"]["message"].as_str().unwrap_or(""))
}

async fn node(app: &TestApp, id: u64) -> Value {
    let (s, v) = send(app, M::GET, &format!("/api/v1/nodes/{id}"), None, false).await;
    assert_eq!(s, StatusCode::OK, "node {id}: {v}");
    v
}

async fn node_ids(app: &TestApp) -> Vec<u64> {
    let (_, list) = send(app, M::GET, "/api/v1/nodes", None, false).await;
    list.as_array().expect("node list").iter().map(|n| n["id"].as_u64().expect("id")).collect()
}

/// (vm, node, state) of every VM of the default pool that has a placement.
async fn placed(app: &TestApp) -> Vec<(u64, u64, VmState)> {
    let snap = app.hive.pool("default").expect("default pool").status().await.expect("status");
    snap.vms.iter().filter_map(|v| Some((v.id, v.placement.as_ref()?.node, v.state))).collect()
}

async fn node_of(app: &TestApp, vm: u64) -> u64 {
    placed(app).await.into_iter().find(|p| p.0 == vm).map(|p| p.1).expect("the VM is placed")
}

async fn until_handle_gone(app: &TestApp, h: u64) {
    until("handle gone", Duration::from_secs(10), || async {
        (app.get(&format!("/handle-status/{h}")).await.status() == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
}

async fn rate(app: &TestApp, path: &str, body: Value) -> (StatusCode, Value) {
    send(app, M::POST, path, Some(body), false).await
}

async fn rewards(app: &TestApp, node: u64, query: &str) -> (StatusCode, Value) {
    send(app, M::GET, &format!("/api/v1/nodes/{node}/rewards{query}"), None, false).await
}

#[tokio::test]
async fn cordon_keeps_vms_places_new_ones_elsewhere_until_activated() {
    // Always the best-weighted node: the one with most free RAM, so placement is predictable.
    let app = TestApp::builder().configure(|c| c.node.placement_top_k = 1).spawn().await;
    app.post_ok("/set-pool-size/2/10/60000").await;
    app.until_status("two FREE", |s| crate::support::in_state(s, 3).len() == 2).await;
    let before = placed(&app).await;
    let n = before[0].1;
    let other = if n == 1 { 2 } else { 1 };
    let on_n: Vec<u64> = before.iter().filter(|p| p.1 == n).map(|p| p.0).collect();

    let path = format!("/api/v1/nodes/{n}/cordon");
    let (s, e) = send(&app, M::POST, &path, None, false).await;
    assert_eq!((s, err(&e).0), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let wrong = app.client.post(format!("{}{path}", app.base)).bearer_auth("not-the-token").send().await.expect("request");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let (s, e) = send(&app, M::POST, &format!("/api/v1/nodes/{n}/reboot"), None, true).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "an unknown action: {e}");
    let (s, e) = send(&app, M::POST, "/api/v1/nodes/77/cordon", None, true).await;
    assert_eq!((s, err(&e).0), (StatusCode::NOT_FOUND, "unknown_node"));
    assert_eq!(node(&app, n).await["state"], "ready", "refused requests changed nothing");

    let (s, v) = send(&app, M::POST, &path, None, true).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["id"].as_u64(), v["state"].clone(), v["admin"].clone()), (Some(n), json!("cordoned"), json!("cordoned")));

    app.post_ok("/set-pool-size/6/10/60000").await;
    app.until_status("six FREE", |s| crate::support::in_state(s, 3).len() == 6).await;
    let after = placed(&app).await;
    let now_on_n: Vec<u64> = after.iter().filter(|p| p.1 == n).map(|p| p.0).collect();
    assert_eq!(now_on_n, on_n, "the cordoned node kept its VMs and got no new one");
    assert_eq!(after.iter().filter(|p| p.1 == other).count(), 6 - on_n.len());
    let v = node(&app, n).await;
    assert_eq!((v["state"].clone(), v["vms"].as_u64()), (json!("cordoned"), Some(on_n.len() as u64)));

    let (s, v) = send(&app, M::POST, &format!("/api/v1/nodes/{n}/activate"), None, true).await;
    assert_eq!((s, v["state"].clone(), v["admin"].clone()), (StatusCode::OK, json!("ready"), json!("active")));
    // The emptier node is the best again: new VMs go there.
    app.post_ok("/set-pool-size/8/10/60000").await;
    app.until_status("eight FREE", |s| crate::support::in_state(s, 3).len() == 8).await;
    let back = placed(&app).await.iter().filter(|p| p.1 == n).count();
    assert!(back > on_n.len(), "an activated node takes VMs again ({back} there)");
    app.stop().await;
}

#[tokio::test]
async fn drain_replaces_idle_vms_and_keeps_a_held_one_until_release() {
    let app = TestApp::spawn().await;
    let (_, h, vm) = app.held_vm(3, 6).await;
    app.until_status("three VMs, one held", |s| crate::support::vm_count(s) == 3 && s["preps"] == json!([])).await;
    let n = node_of(&app, vm).await;
    let other = if n == 1 { 2 } else { 1 };

    let (s, v) = send(&app, M::POST, &format!("/api/v1/nodes/{n}/drain"), None, true).await;
    assert_eq!((s, v["state"].clone(), v["admin"].clone()), (StatusCode::OK, json!("draining"), json!("draining")), "{v}");
    // Idle VMs leave the draining node and are replaced on the other; the held one stays.
    until("idle VMs moved off the draining node", Duration::from_secs(10), || async {
        let p = placed(&app).await;
        let moved = p.len() == 3
            && p.iter()
                .all(|(id, node, state)| if *id == vm { *state == VmState::Occupied } else { *node == other && *state == VmState::Free });
        moved.then_some(())
    })
    .await;
    assert_eq!(app.json(&format!("/handle-status/{h}")).await["vmid"], vm, "the user keeps the VM");
    until("draining node holds only the user's VM", Duration::from_secs(10), || async { (node(&app, n).await["vms"] == 1).then_some(()) })
        .await;
    assert_eq!(node(&app, n).await["state"], "draining");

    // Released, the VM does not go back to the pool on the draining node: it leaves.
    app.post_ok(&format!("/release/{h}")).await;
    until("released VM left the draining node", Duration::from_secs(10), || async {
        let p = placed(&app).await;
        let done = p.len() == 3 && p.iter().all(|(_, node, state)| *node == other && *state == VmState::Free);
        done.then_some(())
    })
    .await;
    until("draining node empty", Duration::from_secs(10), || async {
        let v = node(&app, n).await;
        (v["vms"] == 0 && v["used_cores"] == 0).then_some(())
    })
    .await;
    let (s, v) = send(&app, M::POST, &format!("/api/v1/nodes/{n}/activate"), None, true).await;
    assert_eq!((s, v["state"].clone()), (StatusCode::OK, json!("ready")));
    app.stop().await;
}

#[tokio::test]
async fn removing_a_node_with_vms_needs_force_and_its_sessions_are_lost() {
    let app = TestApp::builder()
        .configure(|c| {
            c.sim.nodes = 3;
            c.node.placement_top_k = 1;
        })
        .spawn()
        .await;
    let (_, h, vm) = app.held_vm(1, 5).await;
    let n = node_of(&app, vm).await;
    let busy = format!("/api/v1/nodes/{n}");

    let (s, e) = send(&app, M::DELETE, &busy, None, false).await;
    assert_eq!((s, err(&e).0), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let (s, e) = send(&app, M::DELETE, &busy, None, true).await;
    assert_eq!((s, err(&e).0), (StatusCode::CONFLICT, "conflict"));
    assert!(err(&e).1.contains("force=true"), "says how to remove it anyway: {e}");
    let (s, e) = send(&app, M::DELETE, &format!("{busy}?force=maybe"), None, true).await;
    assert_eq!((s, err(&e).0), (StatusCode::BAD_REQUEST, "invalid_param"));
    assert!(err(&e).1.contains("force"), "{e}");
    let (s, e) = send(&app, M::DELETE, "/api/v1/nodes/77", None, true).await;
    assert_eq!((s, err(&e).0), (StatusCode::NOT_FOUND, "unknown_node"));
    assert_eq!(node_ids(&app).await, vec![1, 2, 3], "refused removals changed nothing");
    assert_eq!(app.json(&format!("/handle-status/{h}")).await["vmid"], vm);

    // A node with no VMs goes without force.
    let empty = *node_ids(&app).await.iter().find(|id| **id != n).expect("another node");
    assert_eq!(node(&app, empty).await["vms"], 0);
    let (s, _) = send(&app, M::DELETE, &format!("/api/v1/nodes/{empty}"), None, true).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!node_ids(&app).await.contains(&empty));

    let (s, v) = send(&app, M::DELETE, &format!("{busy}?force=true"), None, true).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    until_handle_gone(&app, h).await;
    let ev = app.json(&format!("/fetch-events/{h}/-1")).await;
    let kinds: Vec<&str> = ev["newEvents"].as_array().expect("events").iter().filter_map(|e| e["data"]["type"].as_str()).collect();
    assert!(kinds.contains(&"vm-lost"), "the user is told the VM is gone: {ev}");
    assert!(!node_ids(&app).await.contains(&n));
    let (s, e) = send(&app, M::GET, &busy, None, false).await;
    assert_eq!((s, err(&e).0), (StatusCode::NOT_FOUND, "unknown_node"));
    // The pool stays at min on the node that is left.
    let left = node_ids(&app).await;
    assert_eq!(left.len(), 1);
    until("replacement on the remaining node", Duration::from_secs(10), || async {
        let p = placed(&app).await;
        (p.len() == 1 && p[0].1 == left[0] && p[0].2 == VmState::Free).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn ratings_are_checked_taken_once_and_move_the_score() {
    let app = TestApp::builder().configure(|c| c.sim.nodes = 3).spawn().await;
    // A session with no VM yet cannot be rated.
    app.post_ok("/set-pool-size/0/0/60000").await;
    let b: u64 = app.post_ok("/prepare-batch/1/h").await.parse().expect("batch");
    let h1: u64 = app.post_ok(&format!("/lock/{b}")).await.parse().expect("handle");
    let r1 = format!("/api/v1/pools/default/sessions/{h1}/rating");
    let (s, e) = rate(&app, &r1, json!({"stars": 4})).await;
    assert_eq!((s, err(&e).0), (StatusCode::CONFLICT, "conflict"), "{e}");

    app.post_ok("/set-pool-size/0/5/60000").await;
    let vm1 = until("pending session assigned", Duration::from_secs(10), || async {
        app.json(&format!("/handle-status/{h1}")).await["vmid"].as_u64()
    })
    .await;
    let n1 = node_of(&app, vm1).await;
    for stars in [0, 6] {
        let (s, e) = rate(&app, &r1, json!({"stars": stars})).await;
        assert_eq!((s, err(&e).0), (StatusCode::BAD_REQUEST, "invalid_param"), "{stars} stars");
        assert!(err(&e).1.contains("stars"), "names the field: {e}");
    }
    let (s, e) = rate(&app, &r1, json!({"stars": "five"})).await;
    assert_eq!((s, err(&e).0), (StatusCode::BAD_REQUEST, "invalid_body"));
    let (s, e) = rate(&app, "/api/v1/pools/default/sessions/999/rating", json!({"stars": 5})).await;
    assert_eq!((s, err(&e).0), (StatusCode::NOT_FOUND, "unknown_session"));
    let (s, e) = rate(&app, &format!("/api/v1/pools/nope/sessions/{h1}/rating"), json!({"stars": 5})).await;
    assert_eq!((s, err(&e).0), (StatusCode::NOT_FOUND, "unknown_pool"));
    assert_eq!(node(&app, n1).await["ratings"], 0, "refused ratings count for nothing");

    let fresh = node(&app, n1).await["score"].as_f64().expect("score");
    let (s, r) = rate(&app, &r1, json!({"stars": 5, "comment": "smooth"})).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!((r["stars"].clone(), r["node_id"].as_u64(), r["comment"].clone()), (json!(5), Some(n1), json!("smooth")));
    let (s, e) = rate(&app, &r1, json!({"stars": 1})).await;
    assert_eq!((s, err(&e).0), (StatusCode::CONFLICT, "conflict"), "one rating per session");
    let v = node(&app, n1).await;
    assert_eq!((v["ratings"].as_u64(), v["rating_avg"].as_f64()), (Some(1), Some(5.0)), "the second rating was not counted");
    assert!(v["score"].as_f64().expect("score") > fresh, "five stars raise the score above {fresh}: {v}");

    // A second session, on another node (the first is cordoned), rated after it ended.
    let (s, _) = send(&app, M::POST, &format!("/api/v1/nodes/{n1}/cordon"), None, true).await;
    assert_eq!(s, StatusCode::OK);
    let b2: u64 = app.post_ok("/prepare-batch/1/h").await.parse().expect("batch");
    let (h2, vm2) = app.lock_assigned(b2).await;
    let n2 = node_of(&app, vm2).await;
    assert_ne!(n2, n1);
    app.post_ok(&format!("/release/{h2}")).await;
    until_handle_gone(&app, h2).await;
    let r2 = format!("/api/v1/sessions/default.{h2}/rating");
    let (s, r) = rate(&app, &r2, json!({"stars": 1})).await;
    assert_eq!(s, StatusCode::CREATED, "an ended session is rated from the ledger: {r}");
    assert_eq!(r["node_id"].as_u64(), Some(n2));
    let (s, _) = rate(&app, &r2, json!({"stars": 3})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, e) = rate(&app, &format!("/api/v1/sessions/default-{h2}/rating"), json!({"stars": 3})).await;
    assert_eq!((s, err(&e).0), (StatusCode::BAD_REQUEST, "invalid_param"));
    let v = node(&app, n2).await;
    assert_eq!((v["ratings"].as_u64(), v["rating_avg"].as_f64()), (Some(1), Some(1.0)));
    let unrated = node_ids(&app).await.into_iter().find(|id| *id != n1 && *id != n2).expect("a third node");
    let reference = node(&app, unrated).await;
    assert_eq!(reference["ratings"], 0);
    let (low, mid) = (v["score"].as_f64().expect("score"), reference["score"].as_f64().expect("score"));
    assert!(low < mid, "one star lowers the score ({low}) below an unrated node's ({mid})");
    app.stop().await;
}

#[tokio::test]
async fn rewards_count_running_and_ended_sessions_of_the_node() {
    let app = TestApp::builder().configure(|c| c.vm.cores = 2).spawn().await;
    let t0 = app.hive.now();
    let (_, h, vm) = app.held_vm(0, 5).await;
    let n = node_of(&app, vm).await;
    let other = if n == 1 { 2 } else { 1 };

    let (s, r) = rewards(&app, n, &format!("?from={}&to={t0}", t0 - 60_000)).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!((r["sessions"].as_u64(), r["vm_seconds"].as_f64(), r["core_seconds"].as_f64()), (Some(0), Some(0.0), Some(0.0)));
    // A running session counts, and grows with time.
    let running = until("the running session earns", Duration::from_secs(10), || async {
        let (_, r) = rewards(&app, n, "").await;
        (r["sessions"] == 1 && r["core_seconds"].as_f64().unwrap_or(0.0) > 0.0).then_some(r)
    })
    .await;
    assert_eq!(running["node"].as_u64(), Some(n));
    let secs = running["vm_seconds"].as_f64().expect("vm_seconds");
    assert!((running["core_seconds"].as_f64().expect("core_seconds") - 2.0 * secs).abs() < 1e-6, "{running}");
    assert_eq!(rewards(&app, other, "").await.1["sessions"], 0, "only the hosting node earns");

    app.post_ok(&format!("/release/{h}")).await;
    until_handle_gone(&app, h).await;
    let t1 = app.hive.now() + 1;
    let (s, r) = rewards(&app, n, &format!("?from={t0}&to={t1}")).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!((r["from"].as_u64(), r["to"].as_u64()), (Some(t0), Some(t1)));
    assert_eq!(r["sessions"], 1, "the ended session, once, from the ledger: {r}");
    let ended = r["vm_seconds"].as_f64().expect("vm_seconds");
    assert!(ended >= secs, "the ledger holds the whole session ({ended} s >= {secs} s)");
    assert!((r["core_seconds"].as_f64().expect("core_seconds") - 2.0 * ended).abs() < 1e-6, "{r}");

    for (q, field) in [(format!("?from={t1}&to={t0}"), "from"), (format!("?from={t0}&to={t0}"), "from"), ("?from=x".to_string(), "from")] {
        let (s, e) = rewards(&app, n, &q).await;
        assert_eq!((s, err(&e).0), (StatusCode::BAD_REQUEST, "invalid_param"), "{q}: {e}");
        assert!(err(&e).1.contains(field), "{q}: {e}");
    }
    let (s, e) = rewards(&app, 77, "").await;
    assert_eq!((s, err(&e).0), (StatusCode::NOT_FOUND, "unknown_node"));
    app.stop().await;
}

#[tokio::test]
async fn cloud_nodes_take_only_what_participants_cannot_host() {
    let app = TestApp::builder()
        .configure(|c| {
            c.sim.nodes = 1;
            c.sim.cores = 1;
            c.cloud.nodes = 1;
        })
        .spawn()
        .await;
    assert_eq!(node_ids(&app).await, vec![1, 5001]);
    app.post_ok("/set-pool-size/1/5/60000").await;
    app.until_status("one FREE", |s| crate::support::in_state(s, 3).len() == 1).await;
    assert_eq!(placed(&app).await.iter().map(|p| p.1).collect::<Vec<_>>(), vec![1], "participants first");

    app.post_ok("/set-pool-size/3/5/60000").await;
    app.until_status("three FREE", |s| crate::support::in_state(s, 3).len() == 3).await;
    let mut nodes: Vec<u64> = placed(&app).await.iter().map(|p| p.1).collect();
    nodes.sort();
    assert_eq!(nodes, vec![1, 5001, 5001], "what the participant cannot hold goes to the cloud");
    let (p, c) = (node(&app, 1).await, node(&app, 5001).await);
    assert_eq!((p["class"].clone(), p["used_cores"].as_u64(), p["vms"].as_u64()), (json!("participant"), Some(1), Some(1)));
    assert_eq!((c["class"].clone(), c["vms"].as_u64(), c["name"].clone()), (json!("cloud"), Some(2), json!("cloud-sim-1")));
    app.stop().await;
}

#[tokio::test]
async fn admin_state_ledger_and_ratings_survive_a_restart() {
    let app = TestApp::spawn().await;
    let (_, h, vm) = app.held_vm(0, 5).await;
    let n = node_of(&app, vm).await;
    let other = if n == 1 { 2 } else { 1 };
    app.post_ok(&format!("/release/{h}")).await;
    until_handle_gone(&app, h).await;
    let (s, _) = rate(&app, &format!("/api/v1/sessions/default.{h}/rating"), json!({"stars": 5})).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = send(&app, M::POST, &format!("/api/v1/nodes/{other}/cordon"), None, true).await;
    assert_eq!(s, StatusCode::OK);
    let earned = rewards(&app, n, "").await.1;
    assert_eq!(earned["sessions"], 1);

    let app = app.restart().await;
    let v = node(&app, other).await;
    assert_eq!((v["state"].clone(), v["admin"].clone()), (json!("cordoned"), json!("cordoned")), "the admin's intent is durable");
    let (_, r) = rewards(&app, n, &format!("?from={}&to={}", earned["from"], earned["to"])).await;
    assert_eq!(r, earned, "the ledger is durable");
    let v = node(&app, n).await;
    assert_eq!((v["ratings"].as_u64(), v["rating_avg"].as_f64()), (Some(1), Some(5.0)), "ratings still count after a restart: {v}");
    let (s, _) = rate(&app, &format!("/api/v1/sessions/default.{h}/rating"), json!({"stars": 1})).await;
    assert_eq!(s, StatusCode::CONFLICT, "still rated once");
    app.stop().await;
}

#[tokio::test]
async fn a_session_is_warned_then_ended_at_the_maximum_duration() {
    let app = TestApp::builder()
        .configure(|c| {
            c.pool.max_session_ms = 1_500;
            c.pool.session_warning_ms = 1_000;
        })
        .spawn()
        .await;
    let (_b, h, vm) = app.held_vm(1, 2).await;
    let events = until("the session warned, then ended", Duration::from_secs(10), || async {
        let ev = app.json(&format!("/fetch-events/{h}/-1")).await;
        let kinds: Vec<String> = ev["newEvents"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e["data"]["type"].as_str().map(String::from))
            .collect();
        kinds.contains(&"max-duration".to_string()).then_some(ev)
    })
    .await;
    let list = events["newEvents"].as_array().unwrap();
    let at = |kind: &str| list.iter().position(|e| e["data"]["type"] == kind).unwrap_or_else(|| panic!("no {kind}: {events}"));
    assert!(at("assigned") < at("session-ending") && at("session-ending") < at("max-duration"), "{events}");
    let warning = &list[at("session-ending")];
    let ends_at = warning["data"]["endsAt"].as_u64().expect("endsAt");
    assert!(list[at("max-duration")]["time"].as_u64().unwrap() >= ends_at, "not ended before the announced time: {events}");
    // The VM went back to the pool, and the session is in the ledger.
    let (status, _) = send(&app, M::GET, &format!("/api/v1/pools/default/sessions/{h}"), None, false).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let node = node_of(&app, vm).await;
    let r = app.json(&format!("/api/v1/nodes/{node}/rewards")).await;
    assert_eq!(r["sessions"], 1, "{r}");
}
