//! The monitor page in a real headless Chromium (`browser.rs`). It follows `/api/v1/live`, so
//! a resize made through the API, the VMs it starts, a batch, a session, an uploaded image and
//! a node's new admin state all show up without a reload; its admin actions (cordon, cancel a
//! batch, resize) need the token typed into the page and reach the API, and the API's
//! refusals are shown in the page.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use sha2::{Digest, Sha256};

use crate::browser::{Browser, artifacts};
use crate::support::{ADMIN, TestApp, send_json, until};

const WAIT: Duration = Duration::from_secs(15);

/// Some(text) once the default pool's size reads min/max, else null.
fn size_is(min: u32, max: u32) -> String {
    format!(
        "const s = document.querySelector('[data-pool=\"default\"] .size');
         return s && s.dataset.min === '{min}' && s.dataset.max === '{max}' ? s.textContent : null;"
    )
}

/// Type `value` into the field `id` as a user would (the page listens to `input`).
fn type_into(id: &str, value: &str) -> String {
    format!(
        "const f = document.getElementById('{id}'); f.value = {v}; f.dispatchEvent(new Event('input', {{bubbles: true}})); return true;",
        v = Value::from(value)
    )
}

/// Upload a small image through the API (one chunk); its SHA-256.
async fn upload_image(app: &TestApp, name: &str) -> String {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let sha = hex::encode(Sha256::digest(&data));
    let spec = json!({"name": name, "sha256": sha, "size": data.len(), "readme": "", "cores": 1, "ram_mb": 512, "disk_mb": 1024});
    let (st, up) = send_json(&app.client, Method::POST, format!("{}/api/v1/images/uploads", app.base), Some(spec), Some(ADMIN)).await;
    assert!(st.is_success(), "upload: {st} {up}");
    let id = up["upload_id"].as_str().expect("upload id");
    let r = app
        .client
        .patch(format!("{}/api/v1/images/uploads/{id}?offset=0", app.base))
        .bearer_auth(ADMIN)
        .body(data)
        .send()
        .await
        .expect("patch");
    assert!(r.status().is_success(), "chunk: {}", r.status());
    let done = format!("{}/api/v1/images/uploads/{id}/complete", app.base);
    let (st, img) = send_json(&app.client, Method::POST, done, None, Some(ADMIN)).await;
    assert!(st.is_success(), "complete: {st} {img}");
    sha
}

async fn node_admin(app: &TestApp, id: u64) -> String {
    let (st, n) = send_json(&app.client, Method::GET, format!("{}/api/v1/nodes/{id}", app.base), None, None).await;
    assert!(st.is_success(), "GET node {id}: {st} {n}");
    n["admin"].as_str().expect("admin").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_monitor_page_follows_the_hive_live_and_its_admin_actions_reach_the_api() {
    // A short heartbeat interval: the stream re-reads the image list at least that often.
    let app = TestApp::builder()
        .configure(|c| {
            c.node.heartbeat_ms = 500;
            c.node.suspect_after_ms = 5_000;
            c.node.dead_after_ms = 10_000;
        })
        .spawn()
        .await;
    let browser = Browser::start().await;
    let started = std::time::Instant::now();
    browser.open(&format!("{}/", app.base)).await;
    let (root, vmcloud_path) = (app.get("/").await.text().await.unwrap(), app.get("/static/monitor.html").await.text().await.unwrap());
    assert!(root == vmcloud_path && root.contains("/api/v1/live"), "/ and /static/monitor.html serve the live monitor");

    // The first event: the default pool as configured, and the simulated nodes, ready.
    let shown = browser.wait_for("the default pool's configured size", &size_is(0, 10), WAIT).await;
    assert_eq!(shown, "min 0 · max 10 · linger 60000 ms");
    let node = browser
        .wait_for(
            "a node row in state ready",
            "const r = [...document.querySelectorAll('#nodes tr[data-node]')].find(r => r.querySelector('.state').textContent === 'ready');
             return r ? Number(r.dataset.node) : null;",
            WAIT,
        )
        .await
        .as_u64()
        .expect("a node id");
    assert_eq!(browser.eval("return document.getElementById('conn').className").await, "live");
    // Set on this document: it survives only if the page is never reloaded.
    browser.eval("window.sameDocument = 'yes'; return true;").await;

    // A resize through the API appears by itself, then the VMs it starts.
    let (st, body) = send_json(
        &app.client,
        Method::PUT,
        format!("{}/api/v1/pools/default/size", app.base),
        Some(json!({"min": 2, "max": 7})),
        Some(ADMIN),
    )
    .await;
    assert!(st.is_success(), "resize: {st} {body}");
    let resized_at = std::time::Instant::now();
    let shown = browser.wait_for("the new size, without a reload", &size_is(2, 7), WAIT).await;
    let latency = resized_at.elapsed();
    assert_eq!(shown, "min 2 · max 7 · linger 60000 ms");
    browser
        .wait_for(
            "the two VMs of min 2 counted",
            "const v = document.querySelector('[data-pool=\"default\"] .vms'); return v && v.dataset.total === '2';",
            WAIT,
        )
        .await;

    // A batch, a session on it and an image: each shows up by itself.
    let pool = format!("{}/api/v1/pools/default", app.base);
    let (st, b) = send_json(
        &app.client,
        Method::POST,
        format!("{pool}/batches"),
        Some(json!({"size": 1, "home_page": "https://example.org/"})),
        None,
    )
    .await;
    assert!(st.is_success(), "batch: {st} {b}");
    let batch = b["id"].as_u64().expect("batch id");
    let (st, sess) =
        send_json(&app.client, Method::POST, format!("{pool}/sessions"), Some(json!({"batch": batch, "wait_ms": 10_000})), None).await;
    assert!(st.is_success() && sess["assigned"] == true, "session: {st} {sess}");
    let sha = upload_image(&app, "monitor-test-image").await;
    let rows = format!(
        "const p = document.querySelector('[data-pool=\"default\"]');
         const b = p && p.querySelector('tr[data-batch=\"{batch}\"]');
         const h = p && p.querySelector('.handles tbody tr');
         const i = document.querySelector('#images tr[data-image=\"{sha}\"]');
         return b && h && i ? [b.textContent, h.textContent, i.textContent] : null;"
    );
    let shown = browser.wait_for("the batch, its session and the image", &rows, WAIT).await;
    assert!(shown[0].as_str().is_some_and(|t| t.contains("https://example.org/") && t.contains("open")), "batch row: {shown}");
    assert!(shown[1].as_str().is_some_and(|t| t.starts_with(&sess["id"].to_string())), "session row: {shown}");
    assert!(shown[2].as_str().is_some_and(|t| t.contains("monitor-test-image") && t.contains("none")), "image row: {shown}");
    // A pool created after the page opened joins the stream.
    let (st, created) =
        send_json(&app.client, Method::POST, format!("{}/api/v1/pools", app.base), Some(json!({"name": "later", "max": 3})), Some(ADMIN))
            .await;
    assert!(st.is_success(), "create pool: {st} {created}");
    browser
        .wait_for(
            "the pool created later",
            "const s = document.querySelector('[data-pool=\"later\"] .size'); return s && s.dataset.max === '3';",
            WAIT,
        )
        .await;
    assert_eq!(browser.eval("return window.sameDocument ?? null;").await, "yes", "the page was reloaded");
    browser.screenshot(&artifacts().join("monitor.png")).await;

    // Without a token the actions are disabled; the token stays out of the URL.
    let cordon = format!("#nodes tr[data-node=\"{node}\"] button[data-action=\"cordon\"]");
    let disabled = format!("return document.querySelector('{cordon}').disabled;");
    assert_eq!(browser.eval(&disabled).await, true, "cordon is enabled without a token");

    // A wrong token: the API's refusal is shown in the page, and nothing changes.
    browser.eval(&type_into("token", "not-the-token")).await;
    assert_eq!(browser.eval(&disabled).await, false, "cordon stays disabled with a token typed in");
    browser.click(&cordon).await;
    let error = browser.wait_for("the 401 shown", "return document.getElementById('error').textContent;", WAIT).await;
    assert!(error.as_str().is_some_and(|e| e.contains("401")), "page error: {error}");
    assert_eq!(node_admin(&app, node).await, "active");

    // The admin token: cordon through the page; the API has it, then the page shows it.
    browser.eval(&type_into("token", ADMIN)).await;
    browser.click(&cordon).await;
    until("the node cordoned through the page", WAIT, || async { (node_admin(&app, node).await == "cordoned").then_some(()) }).await;
    browser
        .wait_for(
            "the node's admin state cordoned in the page",
            &format!("return document.querySelector('#nodes tr[data-node=\"{node}\"] .admin').textContent === 'cordoned';"),
            WAIT,
        )
        .await;
    assert_eq!(browser.eval("return document.getElementById('error').textContent;").await, "");

    // Cancel the batch through the page.
    browser.click(&format!("[data-pool=\"default\"] tr[data-batch=\"{batch}\"] button[data-action=\"cancel\"]")).await;
    until("the batch cancelled through the page", WAIT, || async {
        let (st, b) = send_json(&app.client, Method::GET, format!("{pool}/batches/{batch}"), None, None).await;
        (st == reqwest::StatusCode::NOT_FOUND || b["cancelled"] == true).then_some(())
    })
    .await;

    // The page's resize form: max typed in, min and linger as they are.
    browser.eval(&type_into("rs-max", "8")).await;
    browser.click("#rs-go").await;
    until("the pool resized through the page", WAIT, || async {
        let (_, p) = send_json(&app.client, Method::GET, pool.clone(), None, None).await;
        (p["size"] == json!({"min": 2, "max": 8, "linger": 60000})).then_some(())
    })
    .await;
    browser.wait_for("max 8 shown", &size_is(2, 8), WAIT).await;

    let stored = browser.eval("return [sessionStorage.getItem('guaca-hive-admin-token'), location.href];").await;
    assert_eq!(stored[0], ADMIN, "the token is kept in the tab");
    assert!(!stored[1].as_str().unwrap_or_default().contains(ADMIN), "the token is in the URL: {}", stored[1]);
    eprintln!("monitor page: resize shown {latency:?} after the API answered; whole test {:?}", started.elapsed());

    // The page's stream holds a connection open: close the browser before the server.
    drop(browser);
    app.stop().await;
}

/// The `state` events' data received so far from an SSE body, and what is left of a partial one.
fn states(buf: &mut String) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(end) = buf.find("\n\n") {
        let event: String = buf.drain(..end + 2).collect();
        if event.lines().any(|l| l == "event:state") {
            let data = event.lines().find_map(|l| l.strip_prefix("data:")).expect("data line");
            out.push(serde_json::from_str(data).expect("JSON data"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_stream_coalesces_a_burst_of_changes_and_ends_on_the_last_state() {
    let app = TestApp::spawn().await;
    let mut r = app.get("/api/v1/live").await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let (mut buf, mut seen) = (String::new(), Vec::new());
    while seen.is_empty() {
        buf.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().expect("the first event")));
        seen.extend(states(&mut buf));
    }
    let pool = |s: &Value| s["pools"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "default")).cloned().expect("default pool");
    assert_eq!(pool(&seen[0])["size"]["max"], 10);
    assert!(seen[0]["nodes"].as_array().is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["state"] == "ready")), "{}", seen[0]["nodes"]);

    // Two hundred resizes as fast as the API takes them (each one durable, so the burst lasts
    // a while): at most five events a second, the last one showing the last size.
    let burst = std::time::Instant::now();
    for i in 0..200u64 {
        let body = json!({"min": 0, "max": 11 + i % 19, "linger": 1000 + i});
        let url = format!("{}/api/v1/pools/default/size", app.base);
        let (st, answer) = send_json(&app.client, Method::PUT, url, Some(body), Some(ADMIN)).await;
        assert!(st.is_success(), "resize {i}: {st} {answer}");
    }
    let mut events = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let chunk = tokio::time::timeout_at(deadline, r.chunk()).await.expect("the last size within the deadline").unwrap().unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        let new = states(&mut buf);
        events += new.len();
        if new.last().is_some_and(|s| pool(s)["size"]["linger"] == 1199) {
            break;
        }
    }
    let took = burst.elapsed();
    // At most five a second, plus the one that may go at once.
    let allowed = (took.as_millis() / 200) as usize + 1;
    assert!(events <= allowed, "{events} events in {took:?} (at most {allowed})");
    assert!(events >= 2 || took < Duration::from_secs(1), "a long burst is shown as it goes, not only at its end");
    eprintln!("live stream: 200 resizes in {took:?} gave {events} events");
    drop(r);
    app.stop().await;
}
