//! Every bad-input row of the vmcloud table gets a clear error (status + JSON envelope naming
//! what was wrong) and leaves the state exactly as it was.

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{ADMIN, TestApp, until};

async fn refused(app: &TestApp, method: &str, path: &str, status: StatusCode, code: &str, mention: &str) {
    let before = app.all_status().await;
    let req = match method {
        "GET" => app.client.get(format!("{}{path}", app.base)),
        _ => app.client.post(format!("{}{path}", app.base)),
    };
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), status, "{method} {path}");
    assert_eq!(r.headers()["access-control-allow-origin"], "*", "CORS on errors too");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(mention), "{method} {path}: message {msg:?} should mention {mention:?}");
    assert_eq!(app.all_status().await, before, "{method} {path} changed the state");
}

#[tokio::test]
async fn bad_vmcloud_input_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let (_, h, _) = app.held_vm(1, 4).await;
    app.until_status("settled", |s| s["preps"].as_array().unwrap().is_empty()).await;

    refused(&app, "POST", "/set-pool-size/5/2/0", StatusCode::BAD_REQUEST, "invalid_param", "min").await;
    refused(&app, "POST", "/set-pool-size/-1/2/0", StatusCode::BAD_REQUEST, "invalid_param", "min: must not be negative").await;
    refused(&app, "POST", "/set-pool-size/1/two/0", StatusCode::BAD_REQUEST, "invalid_param", "max").await;
    refused(&app, "POST", "/set-pool-size/1/2/-5", StatusCode::BAD_REQUEST, "invalid_param", "linger").await;
    refused(&app, "POST", "/prepare-batch/-1/h", StatusCode::BAD_REQUEST, "invalid_param", "size").await;
    refused(&app, "POST", "/prepare-batch/1/%FF", StatusCode::BAD_REQUEST, "invalid_param", "homepage").await;
    refused(&app, "POST", "/prepare-batch/1/http%3A%2F%2Fa%00b", StatusCode::BAD_REQUEST, "invalid_param", "control characters").await;
    refused(&app, "POST", "/lock/999", StatusCode::NOT_FOUND, "unknown_batch", "999").await;
    refused(&app, "POST", "/lock/x", StatusCode::BAD_REQUEST, "invalid_param", "batch").await;
    refused(&app, "POST", "/release/999", StatusCode::NOT_FOUND, "unknown_handle", "999").await;
    refused(&app, "GET", "/handle-status/999", StatusCode::NOT_FOUND, "unknown_handle", "999").await;
    refused(&app, "POST", "/cancel-batch/999", StatusCode::NOT_FOUND, "unknown_batch", "999").await;
    refused(&app, "POST", "/renew-expire/999/100", StatusCode::NOT_FOUND, "unknown_handle", "999").await;
    refused(&app, "POST", &format!("/renew-expire/{h}/soon"), StatusCode::BAD_REQUEST, "invalid_param", "ms").await;
    // The one bad-input row the spec keeps as the original answered it.
    let before = app.all_status().await;
    let r = app.get("/fetch-events/999/-1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"Invalid handle"}"#);
    assert_eq!(app.all_status().await, before);
    refused(&app, "GET", "/last-event-id/999", StatusCode::NOT_FOUND, "unknown_handle", "Invalid handle").await;
    refused(&app, "GET", &format!("/fetch-events/{h}/x"), StatusCode::BAD_REQUEST, "invalid_param", "lastid").await;
    refused(&app, "POST", "/shutdown", StatusCode::UNAUTHORIZED, "unauthorized", "admin token").await;
    refused(&app, "GET", "/no/such/route", StatusCode::NOT_FOUND, "no_route", "no route").await;
    refused(&app, "GET", "/lock/1", StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method").await;
    app.stop().await;
}

#[tokio::test]
async fn a_max_above_the_cap_is_clamped_and_the_clamp_reported() {
    let app = TestApp::spawn().await;
    let r = app.post("/set-pool-size/1/50/0").await;
    assert_eq!(r.status(), StatusCode::OK);
    let warning = r.headers()["warning"].to_str().unwrap().to_string();
    assert!(warning.contains("max clamped from 50 to 30"), "{warning}");
    assert_eq!(r.text().await.unwrap(), "", "success body stays empty, as the original's");
    assert_eq!(app.all_status().await["poolSize"]["max"], 30);
    app.stop().await;
}

#[tokio::test]
async fn shutdown_with_the_admin_token_empties_the_pool() {
    let app = TestApp::spawn().await;
    let (_, h, _) = app.held_vm(2, 4).await;
    let bad = app.client.post(format!("{}/shutdown", app.base)).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let r = app.client.post(format!("{}/shutdown", app.base)).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let s = app.all_status().await;
    assert_eq!(s["poolSize"], serde_json::json!({"min": 0, "max": 0, "linger": 0}));
    assert_eq!(s["handles"], serde_json::json!([]));
    assert_eq!(app.get(&format!("/handle-status/{h}")).await.status(), 404);
    app.until_status("every VM gone", |s| s["vms"].as_array().unwrap().is_empty() && s["batches"].as_array().unwrap().is_empty()).await;
    until("nodes freed", std::time::Duration::from_secs(5), || async {
        app.hive.nodes().await.unwrap().iter().all(|n| n.vms == 0 && n.used_cores == 0).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn preflight_and_success_responses_carry_cors_headers() {
    let app = TestApp::spawn().await;
    let r = app.client.request(reqwest::Method::OPTIONS, format!("{}/lock/1", app.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["access-control-allow-methods"], "PUT, GET, POST, DELETE, OPTIONS");
    assert_eq!(r.headers()["access-control-allow-headers"], "Content-Type");
    let r = app.get("/all-status").await;
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    app.stop().await;
}
