//! The image lifecycle over `/api/v1`: users with bearer tokens; baseimage → environment →
//! deployment → app on simulated nodes (the sim driver records what was exec'd in each
//! guest); the per-user environment limit; refusals across users; bad transitions and bad
//! input refused with a clear error and nothing changed; a restart fails in-flight steps.

use std::time::Duration;

use guaca_hive::drivers::sim::SimTimings;
use reqwest::{Method as M, StatusCode};
use serde_json::{Value, json};

use crate::support::{ADMIN, TestApp, until};

async fn send(app: &TestApp, method: M, path: &str, body: Option<Value>, token: Option<&str>) -> (StatusCode, Value) {
    crate::support::send_json(&app.client, method, format!("{}{path}", app.base), body, token).await
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

async fn user(app: &TestApp, name: &str) -> String {
    let (s, v) = send(app, M::POST, "/api/v1/users", Some(json!({"name": name})), Some(ADMIN)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["max_environments"], 1, "one environment by default");
    v["token"].as_str().expect("token").to_string()
}

/// POST that must be accepted (202); the object.
async fn accepted(app: &TestApp, path: &str, body: Value, token: &str) -> Value {
    let (s, v) = send(app, M::POST, path, Some(body), Some(token)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "POST {path}: {v}");
    v
}

/// Poll `path` until the object reaches `phase`; answers it and every phase seen on the way.
async fn until_phase(app: &TestApp, path: &str, phase: &str, token: &str) -> (Value, Vec<String>) {
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = send(app, M::GET, path, None, Some(token)).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
        let now = v["phase"].as_str().expect("phase").to_string();
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        assert!(now != "failed" || phase == "failed", "{path} failed: {v}");
        if now == phase {
            return (v, seen);
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {path} in phase {phase}; seen {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval, bounded by the deadline
    }
}

const ORDER: [&str; 5] = ["create", "config_auto", "config_interactive", "finalize", "ready"];

/// The phases seen only ever went forward.
fn in_order(seen: &[String]) {
    let ranks: Vec<usize> = seen.iter().map(|p| ORDER.iter().position(|o| o == p).expect("a live phase")).collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "phases went backwards: {seen:?}");
}

async fn ready_baseimage(app: &TestApp) -> u64 {
    let b = accepted(app, "/api/v1/baseimages", json!({"name": "ubuntu", "template": "desktop"}), ADMIN).await;
    assert_eq!(b["phase"], "create");
    let id = b["id"].as_u64().expect("id");
    until_phase(app, &format!("/api/v1/baseimages/{id}"), "ready", ADMIN).await;
    id
}

/// An environment of `token`'s user that needs no interaction, ready.
async fn ready_environment(app: &TestApp, base: u64, token: &str) -> u64 {
    let e = accepted(app, &format!("/api/v1/baseimages/{base}/environments"), json!({"name": "e", "interactive": false}), token).await;
    let id = e["id"].as_u64().expect("id");
    until_phase(app, &format!("/api/v1/environments/{id}"), "ready", token).await;
    id
}

async fn ready_deployment(app: &TestApp, env: u64, token: &str) -> u64 {
    let d = accepted(app, &format!("/api/v1/environments/{env}/deployments"), json!({"name": "d", "interactive": false}), token).await;
    let id = d["id"].as_u64().expect("id");
    until_phase(app, &format!("/api/v1/deployments/{id}"), "ready", token).await;
    id
}

#[tokio::test]
async fn baseimage_to_environment_to_deployment_to_app() {
    let app = TestApp::spawn().await;
    let alice = user(&app, "alice").await;
    let base = ready_baseimage(&app).await;

    let scripts = ["apt-get install -y firefox", "useradd alice"];
    let e = accepted(
        &app,
        &format!("/api/v1/baseimages/{base}/environments"),
        json!({"name": "work", "scripts": scripts, "hostname": "alice-pc"}),
        &alice,
    )
    .await;
    assert_eq!((e["phase"].as_str(), e["owner"].as_str(), e["parent"].as_u64()), (Some("create"), Some("alice"), Some(base)));
    let env = e["id"].as_u64().expect("id");
    let env_path = format!("/api/v1/environments/{env}");
    let (e, mut seen) = until_phase(&app, &env_path, "config_interactive", &alice).await;
    let console = &e["console"];
    assert!(console["port"].as_u64().is_some() && console["password"].as_str().is_some_and(|p| !p.is_empty()), "{e}");
    assert_eq!(console["protocol"], "vnc");
    let runs: Vec<&str> = e["runs"].as_array().expect("runs").iter().map(|r| r["command"].as_str().expect("command")).collect();
    assert_eq!(runs, ["hostnamectl set-hostname alice-pc", scripts[0], scripts[1]]);
    let (node, domain) = (e["node"].as_u64().expect("node"), e["domain"].as_str().expect("domain").to_string());
    let sim = app.hive.sim(node).expect("a simulated node");
    let ran: Vec<String> = sim.executed().into_iter().filter(|(d, _)| *d == domain).map(|(_, c)| c).collect();
    assert_eq!(ran, runs, "the scripts reached the driver, in order");

    let d = accepted(&app, &format!("{env_path}/done"), json!({}), &alice).await;
    assert_eq!(d["phase"], "finalize");
    let (e, more) = until_phase(&app, &env_path, "ready", &alice).await;
    seen.extend(more);
    seen.dedup();
    in_order(&seen);
    assert_eq!(e["snapshot"], "environment");
    assert!(e["console"].is_null(), "the console is shown only while configuring");

    let d = accepted(&app, &format!("{env_path}/deployments"), json!({"name": "with-app", "scripts": ["install-app.sh"]}), &alice).await;
    let dep = d["id"].as_u64().expect("id");
    let dep_path = format!("/api/v1/deployments/{dep}");
    let (d, seen) = until_phase(&app, &dep_path, "config_interactive", &alice).await;
    assert_eq!(d["domain"].as_str(), Some(domain.as_str()), "a deployment lives on its environment's VM");
    accepted(&app, &format!("{dep_path}/done"), json!({}), &alice).await;
    let (d, more) = until_phase(&app, &dep_path, "ready", &alice).await;
    in_order(&[seen, more].concat().into_iter().fold(Vec::new(), |mut v, p| {
        if v.last() != Some(&p) {
            v.push(p);
        }
        v
    }));
    assert_eq!(d["snapshot"].as_str(), Some(format!("deployment-{dep}").as_str()));

    let a = accepted(&app, &format!("{dep_path}/apps"), json!({"command": "firefox --kiosk"}), &alice).await;
    let app_id = a["id"].as_u64().expect("id");
    let app_path = format!("/api/v1/apps/{app_id}");
    let (a, seen) = until_phase(&app, &app_path, "ready", &alice).await;
    assert!(seen.iter().all(|p| p == "create" || p == "ready"), "an app has no sub-phases: {seen:?}");
    assert!(a["console"]["port"].as_u64().is_some(), "a ready app shows its console: {a}");
    assert_eq!(a["runs"][0]["command"], "firefox --kiosk");
    let ran: Vec<String> = sim.executed().into_iter().filter(|(d, _)| *d == domain).map(|(_, c)| c).collect();
    assert_eq!(ran.last().map(String::as_str), Some("firefox --kiosk"));
    assert_eq!(ran.iter().filter(|c| *c == "install-app.sh").count(), 1);

    // Lists hold the caller's objects.
    let (_, apps) = send(&app, M::GET, "/api/v1/apps", None, Some(&alice)).await;
    assert_eq!(apps.as_array().map(Vec::len), Some(1));
    let (_, m) = send(&app, M::GET, "/metrics", None, None).await;
    let m = m.as_str().unwrap_or_default();
    for step in ["clone", "boot", "snapshot", "revert", "app"] {
        assert!(m.contains(&format!("step=\"{step}\"")), "hive_instantiation_seconds has step {step}");
    }

    // A parent goes only after its children; deleting ends with the object gone.
    let (s, v) = send(&app, M::DELETE, &env_path, None, Some(&alice)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "has_children"), "{v}");
    for path in [&app_path, &dep_path, &env_path] {
        let (s, v) = send(&app, M::DELETE, path, None, Some(&alice)).await;
        assert_eq!(s, StatusCode::ACCEPTED, "DELETE {path}: {v}");
        until(&format!("{path} gone"), Duration::from_secs(10), || async {
            let (s, _) = send(&app, M::GET, path, None, Some(&alice)).await;
            (s == StatusCode::NOT_FOUND).then_some(())
        })
        .await;
    }
    assert!(!sim.domains().contains(&domain), "the environment's VM was destroyed");
    app.stop().await;
}

#[tokio::test]
async fn a_second_environment_waits_for_the_admin() {
    let app = TestApp::spawn().await;
    let bob = user(&app, "bob").await;
    let base = ready_baseimage(&app).await;
    ready_environment(&app, base, &bob).await;
    let path = format!("/api/v1/baseimages/{base}/environments");
    let (s, v) = send(&app, M::POST, &path, Some(json!({"name": "second"})), Some(&bob)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "limit_reached"), "{v}");
    let (_, list) = send(&app, M::GET, "/api/v1/environments", None, Some(&bob)).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "nothing was created");

    let (s, v) = send(&app, M::PATCH, "/api/v1/users/bob", Some(json!({"max_environments": 2})), Some(&bob)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "only an admin raises the limit: {v}");
    let (s, v) = send(&app, M::PATCH, "/api/v1/users/bob", Some(json!({"max_environments": 2})), Some(ADMIN)).await;
    assert_eq!((s, &v["max_environments"]), (StatusCode::OK, &json!(2)), "{v}");
    let (s, v) = send(&app, M::PATCH, "/api/v1/users/nobody", Some(json!({"max_environments": 2})), Some(ADMIN)).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "unknown_user"));
    accepted(&app, &path, json!({"name": "second"}), &bob).await;
    let (s, v) = send(&app, M::POST, &path, Some(json!({"name": "third"})), Some(&bob)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "limit_reached"), "{v}");
    let (s, v) = send(&app, M::POST, "/api/v1/users", Some(json!({"name": "bob"})), Some(ADMIN)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "exists"), "{v}");
    app.stop().await;
}

/// What `token`'s user sees of environments, deployments and apps.
async fn lists(app: &TestApp, token: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for path in ["/api/v1/environments", "/api/v1/deployments", "/api/v1/apps"] {
        out.push(send(app, M::GET, path, None, Some(token)).await.1);
    }
    out
}

#[tokio::test]
async fn nothing_crosses_from_one_user_to_another() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (user(&app, "alice").await, user(&app, "bob").await);
    let base = ready_baseimage(&app).await;
    let env = ready_environment(&app, base, &alice).await;
    let dep = ready_deployment(&app, env, &alice).await;
    let before = lists(&app, &alice).await;
    let (s, v) = send(&app, M::POST, &format!("/api/v1/environments/{env}/deployments"), Some(json!({"name": "x"})), Some(&bob)).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}");
    let (s, v) = send(&app, M::POST, &format!("/api/v1/deployments/{dep}/apps"), Some(json!({"command": "steal"})), Some(&bob)).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}");
    for path in [format!("/api/v1/environments/{env}"), format!("/api/v1/deployments/{dep}")] {
        let (s, _) = send(&app, M::GET, &path, None, Some(&bob)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "GET {path}");
        let (s, _) = send(&app, M::DELETE, &path, None, Some(&bob)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "DELETE {path}");
    }
    let (_, mine) = send(&app, M::GET, "/api/v1/environments", None, Some(&bob)).await;
    assert_eq!(mine, json!([]), "bob sees none of alice's objects");
    assert_eq!(lists(&app, &alice).await, before, "nothing changed");
    let (_, all) = send(&app, M::GET, "/api/v1/deployments", None, Some(ADMIN)).await;
    assert_eq!(all.as_array().map(Vec::len), Some(1), "the admin sees everyone's");
    let (s, _) = send(&app, M::GET, "/api/v1/environments", None, Some("hut_not-a-token")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = send(&app, M::GET, "/api/v1/environments", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn bad_transitions_and_bad_input_change_nothing() {
    let app = TestApp::spawn().await;
    let carol = user(&app, "carol").await;
    let base = ready_baseimage(&app).await;
    let (_, bases_before) = send(&app, M::GET, "/api/v1/baseimages", None, Some(&carol)).await;

    // Containers: not supported yet, whatever else is asked.
    let (s, v) =
        send(&app, M::POST, "/api/v1/baseimages", Some(json!({"name": "c", "template": "t", "type": "container"})), Some(ADMIN)).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_IMPLEMENTED, "not_supported"), "{v}");
    let env_path = format!("/api/v1/baseimages/{base}/environments");
    let (s, v) = send(&app, M::POST, &env_path, Some(json!({"name": "c", "type": "container"})), Some(&carol)).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_IMPLEMENTED, "not_supported"), "{v}");
    // RDP is for Windows guests.
    let (s, v) =
        send(&app, M::POST, "/api/v1/baseimages", Some(json!({"name": "l", "template": "t", "protocol": "rdp"})), Some(ADMIN)).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_param"), "{v}");
    assert!(message(&v).starts_with("protocol:"), "{v}");
    let (s, v) = send(&app, M::POST, &env_path, Some(json!({"name": "r", "protocol": "rdp"})), Some(&carol)).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_param"), "{v}");
    let (s, v) = send(
        &app,
        M::POST,
        "/api/v1/baseimages",
        Some(json!({"name": "w", "template": "win", "os": "windows", "protocol": "rdp"})),
        Some(ADMIN),
    )
    .await;
    assert_eq!((s, &v["protocol"]), (StatusCode::ACCEPTED, &json!("rdp")), "rdp with windows is fine: {v}");
    let windows = v["id"].as_u64().expect("id");
    let (s, v) = send(&app, M::POST, &env_path, Some(json!({"name": "x", "colour": "red"})), Some(&carol)).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_body"), "{v}");
    assert!(message(&v).contains("colour"), "the message names the field: {v}");
    let (s, v) = send(&app, M::POST, &env_path, Some(json!({"name": "x", "hostname": "bad host;rm"})), Some(&carol)).await;
    assert!(s == StatusCode::BAD_REQUEST && message(&v).starts_with("hostname:"), "{v}");
    let (s, v) = send(&app, M::POST, "/api/v1/baseimages", Some(json!({"name": "u", "template": "t"})), Some(&carol)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "baseimages are the admins': {v}");
    let (s, v) = send(&app, M::POST, "/api/v1/baseimages/999/environments", Some(json!({"name": "x"})), Some(&carol)).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "unknown_object"), "{v}");
    let (s, v) = send(&app, M::GET, "/api/v1/environments/abc", None, Some(&carol)).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_param"), "{v}");
    let (s, v) = send(&app, M::GET, &format!("/api/v1/environments/{base}"), None, Some(&carol)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a baseimage's id is no environment's: {v}");
    let (_, envs) = send(&app, M::GET, "/api/v1/environments", None, Some(&carol)).await;
    assert_eq!(envs, json!([]), "no refusal created anything");
    until_phase(&app, &format!("/api/v1/baseimages/{windows}"), "ready", ADMIN).await;
    let (_, bases) = send(&app, M::GET, "/api/v1/baseimages", None, Some(&carol)).await;
    assert_eq!(bases.as_array().map(Vec::len), bases_before.as_array().map(|b| b.len() + 1), "only the windows baseimage was added");

    // CreateSnapshot on an environment still in ConfigInteractive.
    let e = accepted(&app, &env_path, json!({"name": "e"}), &carol).await;
    let env = e["id"].as_u64().expect("id");
    let path = format!("/api/v1/environments/{env}");
    let (before, _) = until_phase(&app, &path, "config_interactive", &carol).await;
    let (s, v) = send(&app, M::POST, &format!("{path}/deployments"), Some(json!({"name": "d"})), Some(&carol)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "bad_transition"), "{v}");
    assert!(message(&v).contains("config_interactive") && message(&v).contains("CreateSnapshot"), "{v}");
    let (s, v) = send(&app, M::DELETE, &format!("/api/v1/baseimages/{base}"), None, Some(ADMIN)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "has_children"), "{v}");
    assert_eq!(send(&app, M::GET, &path, None, Some(&carol)).await.1, before, "nothing changed");

    // done on an object not in ConfigInteractive.
    accepted(&app, &format!("{path}/done"), json!({}), &carol).await;
    until_phase(&app, &path, "ready", &carol).await;
    let (s, v) = send(&app, M::POST, &format!("{path}/done"), None, Some(&carol)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "bad_transition"), "{v}");
    assert!(message(&v).contains("ready") && message(&v).contains("done"), "{v}");

    // RunApp on a deployment that is not ready.
    let d = accepted(&app, &format!("{path}/deployments"), json!({"name": "d"}), &carol).await;
    let dep = d["id"].as_u64().expect("id");
    let dep_path = format!("/api/v1/deployments/{dep}");
    let (before, _) = until_phase(&app, &dep_path, "config_interactive", &carol).await;
    let (s, v) = send(&app, M::POST, &format!("{dep_path}/apps"), Some(json!({"command": "x"})), Some(&carol)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "bad_transition"), "{v}");
    assert!(message(&v).contains("RunApp"), "{v}");
    let (s, v) = send(&app, M::POST, &format!("{dep_path}/apps"), Some(json!({"command": " "})), Some(&carol)).await;
    assert!(s == StatusCode::BAD_REQUEST || s == StatusCode::CONFLICT, "{v}");
    let (_, apps) = send(&app, M::GET, "/api/v1/apps", None, Some(&carol)).await;
    assert_eq!(apps, json!([]));
    assert_eq!(send(&app, M::GET, &dep_path, None, Some(&carol)).await.1, before, "nothing changed");
    app.stop().await;
}

#[tokio::test]
async fn a_restart_fails_steps_in_flight_and_keeps_the_rest() {
    // Guests that never answer within the test: an environment stays in Create.
    let slow = SimTimings { create_ms: 1, boot_ms: 600_000, prepare_ms: 1, cleanup_ms: 1, failure_rate: 0.0 };
    let app = TestApp::builder().timings(slow).spawn().await;
    let dave = user(&app, "dave").await;
    let base = ready_baseimage(&app).await;
    let e = accepted(&app, &format!("/api/v1/baseimages/{base}/environments"), json!({"name": "e"}), &dave).await;
    let path = format!("/api/v1/environments/{}", e["id"]);
    until("the VM is cloned", Duration::from_secs(10), || async {
        let (_, v) = send(&app, M::GET, &path, None, Some(&dave)).await;
        v["domain"].as_str().map(drop)
    })
    .await;
    let app = app.restart().await;
    let (s, v) = send(&app, M::GET, &path, None, Some(&dave)).await;
    assert_eq!(s, StatusCode::OK, "the user and the object survived: {v}");
    assert_eq!(v["phase"], "failed");
    assert!(v["reason"].as_str().is_some_and(|r| r.contains("restarted during create")), "{v}");
    let (_, b) = send(&app, M::GET, &format!("/api/v1/baseimages/{base}"), None, Some(&dave)).await;
    assert_eq!(b["phase"], "ready", "objects not in a step are as they were");
    let (s, v) = send(&app, M::DELETE, &path, None, Some(&dave)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "a failed object can be deleted: {v}");
    until("the failed environment is gone", Duration::from_secs(10), || async {
        (send(&app, M::GET, &path, None, Some(&dave)).await.0 == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_ready_environment_keeps_its_vm_across_a_restart() {
    let app = TestApp::spawn().await;
    let erin = user(&app, "erin").await;
    let base = ready_baseimage(&app).await;
    let env = ready_environment(&app, base, &erin).await;
    let (_, v) = send(&app, M::GET, &format!("/api/v1/environments/{env}"), None, Some(&erin)).await;
    let (domain, node) = (v["domain"].as_str().expect("a domain").to_string(), v["node"].as_u64().expect("a node"));
    let app = app.restart().await;
    // The start-up reconciliation destroys domains no pool knows; a lifecycle VM is not one.
    let sim = app.hive.sim(node).expect("the simulated node");
    assert!(sim.domains().contains(&domain), "{domain} survived the restart: {:?}", sim.domains());
    let dep = ready_deployment(&app, env, &erin).await;
    let (_, d) = send(&app, M::GET, &format!("/api/v1/deployments/{dep}"), None, Some(&erin)).await;
    assert_eq!(d["domain"], domain.as_str(), "the deployment is made on the same VM");
    app.stop().await;
}

#[tokio::test]
async fn users_see_baseimages_but_not_their_console_or_configuration() {
    let app = TestApp::spawn().await;
    let frank = user(&app, "frank").await;
    let body = json!({"name": "golden", "template": "desktop", "scripts": ["echo join-password"], "interactive": true});
    let b = accepted(&app, "/api/v1/baseimages", body, ADMIN).await;
    let path = format!("/api/v1/baseimages/{}", b["id"].as_u64().expect("id"));
    let (admin_view, _) = until_phase(&app, &path, "config_interactive", ADMIN).await;
    assert!(admin_view["console"]["password"].as_str().is_some_and(|p| !p.is_empty()), "the admin configures it: {admin_view}");
    assert_eq!(admin_view["runs"].as_array().map(Vec::len), Some(1), "{admin_view}");
    let (s, one) = send(&app, M::GET, &path, None, Some(&frank)).await;
    let (_, all) = send(&app, M::GET, "/api/v1/baseimages", None, Some(&frank)).await;
    assert_eq!(s, StatusCode::OK, "baseimages are for everyone: {one}");
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    for v in [&one, &all[0]] {
        assert_eq!(v["phase"], "config_interactive", "{v}");
        assert!(v["console"].is_null(), "a user gets no console into the admins' template VM: {v}");
        assert_eq!(v["runs"], json!([]), "nor the output of the admins' scripts: {v}");
        assert_eq!(v["spec"]["scripts"], json!([]), "nor the scripts: {v}");
    }
    app.stop().await;
}
