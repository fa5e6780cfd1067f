//! Guacamole's connection-management (`rest`) mode wired into a running hive. The Guacamole
//! side is `FakeGuacamole`, a stand-in for its REST API (no Guacamole server runs here: it needs
//! a servlet container and guacd); the hive, its pool and its simulated VMs are real. What the
//! hive leaves in Guacamole is checked after each step of a VM's life: prepared → a connection
//! to the VM's VNC, routed to its node's guacd and granted to the users' group; linked → that
//! connection's page; released → live sessions ended; cleaned → connection deleted.

use std::time::Duration;

use guaca_hive::guacamole::client_link;
use guaca_hive::guacamole::fake::{FakeGuacamole, PASSWORD};
use serde_json::{Value, json};

use crate::support::{TestApp, until};

/// The identifier of the connection Guacamole holds for `vm` of the default pool, once there is one.
async fn connection_of(fake: &FakeGuacamole, vm: u64) -> (String, Value) {
    until("the VM's Guacamole connection", Duration::from_secs(10), || async {
        fake.connections().into_iter().find(|(_, c)| c["name"] == format!("default-vm-{vm}"))
    })
    .await
}

#[tokio::test]
async fn rest_mode_follows_a_vm_from_prepare_to_clean_up() {
    let fake = FakeGuacamole::start().await;
    let app = TestApp::builder()
        .configure(|c| {
            c.guacamole = fake.config(PASSWORD);
            c.guacamole.grant_group = Some("desktop-users".into());
        })
        .spawn()
        .await;
    let (_, handle, vm) = app.held_vm(1, 1).await;
    let s = app.json(&format!("/api/v1/pools/default/sessions/{handle}")).await;

    // Prepared: a connection to exactly this VM's VNC, through the guacd on its node.
    let (id, c) = connection_of(&fake, vm).await;
    assert_eq!(c["protocol"], "vnc");
    assert_eq!(c["parameters"]["hostname"], s["vnc"]["host"]);
    assert_eq!(c["parameters"]["port"], s["vnc"]["port"].as_u64().unwrap().to_string());
    assert_eq!(c["parameters"]["password"], s["vnc"]["password"]);
    assert_eq!(c["attributes"]["guacd-hostname"], s["vnc"]["host"]);
    assert_eq!(c["attributes"]["max-connections"], "1");
    assert!(
        fake.grants()
            .contains(&("desktop-users".into(), json!({"op": "add", "path": format!("/connectionPermissions/{id}"), "value": "READ"}))),
        "{:?}",
        fake.grants()
    );

    // The user's link is that connection's page.
    let r = app.post(&format!("/api/v1/pools/default/sessions/{handle}/guacamole")).await;
    assert_eq!(r.status(), 201);
    let link: Value = r.json().await.unwrap();
    assert_eq!(link["url"], client_link("https://desk.example.org/guacamole", &id, "postgresql"));

    // Released while someone is connected: the session is ended.
    fake.add_active("active-1", &id);
    assert_eq!(app.post(&format!("/release/{handle}")).await.status(), 200);
    until("the live session ended", Duration::from_secs(10), || async { fake.active().is_empty().then_some(()) }).await;
    // Cleaned for the next user: the old connection is deleted (a new preparation makes a new one).
    until("the connection deleted", Duration::from_secs(10), || async { (!fake.connections().contains_key(&id)).then_some(()) }).await;

    // A released session has no link.
    let r = app.post(&format!("/api/v1/pools/default/sessions/{handle}/guacamole")).await;
    assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());

    // Shrinking the pool to nothing kills the VM: nothing of it stays in Guacamole.
    app.post_ok("/set-pool-size/0/0/0").await;
    app.until_status("no VMs", |s| crate::support::vm_count(s) == 0).await;
    until("no connection left", Duration::from_secs(10), || async { fake.connections().is_empty().then_some(()) }).await;
    app.stop().await;
}

#[tokio::test]
async fn with_guacamole_refusing_the_hive_pools_still_serve_and_the_link_says_why() {
    let fake = FakeGuacamole::start().await;
    let app = TestApp::builder().configure(|c| c.guacamole = fake.config("a wrong password")).spawn().await;
    let (_, handle, _) = app.held_vm(1, 1).await;
    let r = app.post(&format!("/api/v1/pools/default/sessions/{handle}/guacamole")).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("login") && msg.contains("403"), "{msg}");
    assert!(!msg.contains("a wrong password"), "{msg}");
    assert_eq!(app.post(&format!("/release/{handle}")).await.status(), 200, "the pool works without Guacamole");
    app.stop().await;
}
