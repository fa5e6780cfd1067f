//! `/api/v1`: pools, batches, sessions and nodes as JSON, with the admin token on pool
//! administration; `/healthz`, `/readyz`, `/metrics` and the monitor page.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{ADMIN, TestApp};

async fn send(app: &TestApp, method: reqwest::Method, path: &str, body: Option<Value>, admin: bool) -> (StatusCode, Value) {
    let mut req = app.client.request(method, format!("{}{path}", app.base));
    if admin {
        req = req.bearer_auth(ADMIN);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
}

#[tokio::test]
async fn pool_lifecycle_batches_and_sessions() {
    use reqwest::Method as M;
    let app = TestApp::spawn().await;
    let (s, e) = send(&app, M::POST, "/api/v1/pools", Some(json!({"name": "kiosk", "min": 1, "max": 4})), false).await;
    assert_eq!((s, e["error"]["code"].clone()), (StatusCode::UNAUTHORIZED, json!("unauthorized")));
    let (s, e) = send(&app, M::POST, "/api/v1/pools", Some(json!({"name": "kiosk", "min": 5, "max": 4})), true).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("min"));
    let (s, e) = send(&app, M::POST, "/api/v1/pools", Some(json!({"name": "kiosk", "mx": 4})), true).await;
    assert_eq!((s, e["error"]["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_body")));
    assert!(e["error"]["message"].as_str().unwrap().contains("mx"), "names the unknown field: {e}");
    let (s, p) = send(&app, M::POST, "/api/v1/pools", Some(json!({"name": "kiosk", "min": 1, "max": 4, "linger": 1000})), true).await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    assert_eq!(p["size"], json!({"min": 1, "max": 4, "linger": 1000}));
    let (s, _) = send(&app, M::POST, "/api/v1/pools", Some(json!({"name": "kiosk", "max": 1})), true).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (_, list) = send(&app, M::GET, "/api/v1/pools", None, false).await;
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["default", "kiosk"]);

    let (s, b) =
        send(&app, M::POST, "/api/v1/pools/kiosk/batches", Some(json!({"size": 1, "home_page": "https://example.org"})), false).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let bid = b["id"].as_u64().unwrap();
    let (s, sess) = send(&app, M::POST, "/api/v1/pools/kiosk/sessions", Some(json!({"batch": bid, "wait_ms": 10000})), false).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(sess["assigned"], true, "wait_ms answers once the VM is assigned: {sess}");
    assert_eq!(sess["vm"]["state"], "occupied");
    assert!(sess["vnc"]["password"].as_str().is_some_and(|p| !p.is_empty()));
    let id = sess["id"].as_u64().unwrap();
    let (s, ext) = send(&app, M::POST, &format!("/api/v1/pools/kiosk/sessions/{id}/extend"), Some(json!({"ms": 60000})), false).await;
    assert_eq!(s, StatusCode::OK);
    assert!(ext["expires_at"].as_u64().unwrap() > app.hive.now());
    let (s, _) = send(&app, M::GET, &format!("/api/v1/pools/kiosk/sessions/{id}"), None, false).await;
    assert_eq!(s, StatusCode::OK);
    let (s, busy) = send(&app, M::DELETE, "/api/v1/pools/kiosk", None, true).await;
    assert_eq!(s, StatusCode::CONFLICT, "a pool in use is not deleted: {busy}");
    let (s, _) = send(&app, M::DELETE, &format!("/api/v1/pools/kiosk/sessions/{id}"), None, false).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = send(&app, M::GET, &format!("/api/v1/pools/kiosk/sessions/{id}"), None, false).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = send(&app, M::DELETE, &format!("/api/v1/pools/kiosk/batches/{bid}"), None, false).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, r) = send(&app, M::PUT, "/api/v1/pools/kiosk/size", Some(json!({"min": 0, "max": 0})), true).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["size"], json!({"min": 0, "max": 0, "linger": 1000}), "linger kept when not given");
    crate::support::until("kiosk empty", std::time::Duration::from_secs(10), || async {
        let (_, d) = send(&app, M::GET, "/api/v1/pools/kiosk", None, false).await;
        (d["vm_list"].as_array().unwrap().is_empty() && d["batch_list"].as_array().unwrap().is_empty()).then_some(())
    })
    .await;
    let (s, _) = send(&app, M::DELETE, "/api/v1/pools/kiosk", None, true).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, e) = send(&app, M::GET, "/api/v1/pools/kiosk", None, false).await;
    assert_eq!((s, e["error"]["code"].clone()), (StatusCode::NOT_FOUND, json!("unknown_pool")));
    app.stop().await;
}

#[tokio::test]
async fn nodes_health_metrics_and_monitor() {
    use reqwest::Method as M;
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/2/4/60000").await;
    app.until_status("two FREE", |s| crate::support::in_state(s, 3).len() == 2).await;
    let (_, nodes) = send(&app, M::GET, "/api/v1/nodes", None, false).await;
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    let used: u64 = nodes.iter().map(|n| n["vms"].as_u64().unwrap()).sum();
    assert_eq!(used, 2, "placement reserved capacity for both VMs");
    assert_eq!(nodes[0]["driver"], "sim");
    let (s, n) = send(&app, M::GET, "/api/v1/nodes/1", None, false).await;
    assert_eq!((s, n["name"].clone()), (StatusCode::OK, json!("sim-1")));
    let (s, e) = send(&app, M::GET, "/api/v1/nodes/77", None, false).await;
    assert_eq!((s, e["error"]["code"].clone()), (StatusCode::NOT_FOUND, json!("unknown_node")));
    assert_eq!(send(&app, M::GET, "/healthz", None, false).await.1["status"], "ok");
    assert_eq!(send(&app, M::GET, "/readyz", None, false).await.1["store"], "ok");
    let b: u64 = app.post_ok("/prepare-batch/1/h").await.parse().unwrap();
    app.lock_assigned(b).await;
    let m = app.get("/metrics").await.text().await.unwrap();
    for needle in [
        "hive_vms{pool=\"default\",state=\"occupied\"}",
        "hive_locks_total{pool=\"default\"}",
        "hive_lock_to_assigned_seconds_bucket",
        "hive_rule_passes_total",
        "hive_http_requests_total{route=\"/lock\",status=\"2xx\"}",
        "hive_store_commits_total",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}");
    }
    assert!(!m.contains("handle=\""), "no id labels");
    let page = app.get("/static/monitor.html").await.text().await.unwrap();
    assert!(page.contains("EventSource"), "the monitor is pushed, not polled");
    app.stop().await;
}

#[tokio::test]
async fn live_feed_pushes_a_change_without_polling() {
    let app = TestApp::spawn().await;
    let mut r = app.get("/api/v1/pools/default/live").await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut seen = String::new();
    // First event: the current state.
    while !seen.contains("poolSize") {
        seen.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    app.post_ok("/set-pool-size/0/7/60000").await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !seen.contains("\"max\":7") {
        let chunk = tokio::time::timeout_at(deadline, r.chunk()).await.expect("pushed within 5 s").unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    app.stop().await;
}

#[tokio::test]
async fn bad_api_input_is_refused_and_changes_nothing() {
    use reqwest::Method as M;
    let app = TestApp::spawn().await;
    let (_, before) = send(&app, M::GET, "/api/v1/pools/default", None, false).await;
    let cases: Vec<(M, &str, Option<Value>, StatusCode, &str)> = vec![
        (M::POST, "/api/v1/pools/default/sessions", Some(json!({"batch": 42})), StatusCode::NOT_FOUND, "unknown_batch"),
        (M::POST, "/api/v1/pools/default/sessions", Some(json!({"batch": 1, "wait_ms": 600000})), StatusCode::BAD_REQUEST, "invalid_param"),
        (M::POST, "/api/v1/pools/default/sessions", Some(json!({"batch": "one"})), StatusCode::BAD_REQUEST, "invalid_body"),
        (M::POST, "/api/v1/pools/default/batches", Some(json!({"size": 5000, "home_page": "h"})), StatusCode::BAD_REQUEST, "invalid_param"),
        (M::POST, "/api/v1/pools/default/batches", Some(json!({"size": -1, "home_page": "h"})), StatusCode::BAD_REQUEST, "invalid_body"),
        (M::POST, "/api/v1/pools/nope/batches", Some(json!({"size": 1, "home_page": "h"})), StatusCode::NOT_FOUND, "unknown_pool"),
        (M::GET, "/api/v1/pools/default/sessions/x", None, StatusCode::BAD_REQUEST, "invalid_param"),
        (M::DELETE, "/api/v1/pools/default/sessions/77", None, StatusCode::NOT_FOUND, "unknown_handle"),
        (M::DELETE, "/api/v1/pools/default/batches/77", None, StatusCode::NOT_FOUND, "unknown_batch"),
        (M::PUT, "/api/v1/pools/default/size", Some(json!({"min": 3, "max": 1})), StatusCode::UNAUTHORIZED, "unauthorized"),
        (M::DELETE, "/api/v1/pools/default", None, StatusCode::UNAUTHORIZED, "unauthorized"),
    ];
    for (method, path, body, status, code) in cases {
        let (s, e) = send(&app, method.clone(), path, body, false).await;
        assert_eq!((s, e["error"]["code"].as_str().unwrap_or("")), (status, code), "{method} {path}: {e}");
    }
    let (s, e) = send(&app, M::PUT, "/api/v1/pools/default/size", Some(json!({"min": 3, "max": 1})), true).await;
    assert_eq!((s, e["error"]["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_param")));
    let (s, _) = send(&app, M::DELETE, "/api/v1/pools/default", None, true).await;
    assert_eq!(s, StatusCode::CONFLICT, "the default pool serves the vmcloud routes");
    let (_, after) = send(&app, M::GET, "/api/v1/pools/default", None, false).await;
    assert_eq!(after, before, "nothing changed");
    app.stop().await;
}
