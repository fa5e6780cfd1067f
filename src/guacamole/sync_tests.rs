//! `ConnectionSync` against `FakeGuacamole`, the stand-in for Guacamole's REST API (no
//! Guacamole server runs here): what the hive leaves in Guacamole after each step of a VM's life.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::guacamole::client_link;
use crate::guacamole::fake::{FakeGuacamole, PASSWORD};

fn address(passwd: &str) -> VmAddress {
    VmAddress { ip: "10.0.0.9".into(), public_ip: "192.168.7.3".into(), vnc_port: 5907, vnc_passwd: passwd.into() }
}

fn sync(fake: &FakeGuacamole, password: &str, group: Option<&str>) -> Arc<ConnectionSync> {
    let g = Guacamole::from_config(&fake.config(password)).unwrap().unwrap();
    ConnectionSync::start(Arc::new(g), group.map(str::to_string)).unwrap()
}

/// Waits until the steps queued before now are done: a link is carried out after them.
async fn settle(s: &ConnectionSync) {
    let _ = tokio::time::timeout(Duration::from_secs(10), s.link("settle", 0)).await.expect("the sync task answers");
}

fn only_connection(fake: &FakeGuacamole) -> (String, Value) {
    let all = fake.connections();
    assert_eq!(all.len(), 1, "{all:?}");
    all.into_iter().next().unwrap()
}

#[tokio::test]
async fn prepare_creates_a_routed_connection_granted_to_the_group_and_links_to_it() {
    let fake = FakeGuacamole::start().await;
    let s = sync(&fake, PASSWORD, Some("desktop users"));
    s.prepared("default", 7, &address("pw-one"));
    let link = s.link("default", 7).await.unwrap();

    let (id, c) = only_connection(&fake);
    assert_eq!(c["name"], "default-vm-7");
    assert_eq!(c["protocol"], "vnc");
    assert_eq!(c["parameters"], json!({"hostname": "192.168.7.3", "port": "5907", "password": "pw-one"}));
    assert_eq!(c["attributes"]["guacd-hostname"], "192.168.7.3", "routed to the guacd on the VM's node");
    assert_eq!(c["attributes"]["guacd-port"], "4822");
    assert_eq!(link, client_link("https://desk.example.org/guacamole", &id, "postgresql"));
    assert_eq!(
        fake.grants(),
        vec![("desktop users".to_string(), json!({"op": "add", "path": format!("/connectionPermissions/{id}"), "value": "READ"}))]
    );
    let grant = fake.seen().into_iter().find(|r| r.path.contains("/permissions")).unwrap();
    assert_eq!(grant.path, "/guacamole/api/session/data/postgresql/userGroups/desktop%20users/permissions");
}

#[tokio::test]
async fn a_new_preparation_replaces_the_connection_with_the_new_password() {
    let fake = FakeGuacamole::start().await;
    let s = sync(&fake, PASSWORD, None);
    s.prepared("default", 7, &address("pw-one"));
    settle(&s).await;
    let (first, _) = only_connection(&fake);
    s.prepared("default", 7, &address("pw-two"));
    settle(&s).await;
    let (second, c) = only_connection(&fake);
    assert_ne!(first, second);
    assert_eq!(c["parameters"]["password"], "pw-two");
    assert!(fake.grants().is_empty(), "no group configured, nothing granted");
}

#[tokio::test]
async fn release_ends_live_sessions_and_cleanup_deletes_the_connection() {
    let fake = FakeGuacamole::start().await;
    let s = sync(&fake, PASSWORD, None);
    s.prepared("default", 7, &address("pw"));
    s.prepared("default", 8, &address("pw"));
    settle(&s).await;
    let ids: Vec<String> = fake.connections().keys().cloned().collect();
    fake.add_active("a-1", &ids[0]);
    fake.add_active("a-2", &ids[1]);

    s.released("default", 7);
    settle(&s).await;
    assert_eq!(fake.active().keys().collect::<Vec<_>>(), vec!["a-2"], "only VM 7's session ends");
    assert_eq!(fake.connections().len(), 2, "a released VM keeps its connection until it is cleaned");

    s.cleaned("default", 7);
    settle(&s).await;
    assert_eq!(fake.connections().keys().cloned().collect::<Vec<_>>(), vec![ids[1].clone()]);
    let e = s.link("default", 7).await.unwrap_err().to_string();
    assert!(e.contains("VM 7 of pool default has no Guacamole connection"), "{e}");
}

#[tokio::test]
async fn after_a_restart_connections_are_found_again_by_name() {
    let fake = FakeGuacamole::start().await;
    let before = sync(&fake, PASSWORD, None);
    before.prepared("default", 3, &address("pw"));
    settle(&before).await;
    let (id, _) = only_connection(&fake);
    drop(before);

    let after = sync(&fake, PASSWORD, None);
    assert_eq!(after.link("default", 3).await.unwrap(), client_link("https://desk.example.org/guacamole", &id, "postgresql"));
    fake.add_active("a-9", &id);
    after.cleaned("default", 3);
    settle(&after).await;
    assert!(fake.connections().is_empty(), "deleted by name");
    assert!(fake.active().is_empty(), "its live session ended first");
}

#[tokio::test]
async fn guacamole_refusing_the_hive_fails_the_link_not_the_caller() {
    let fake = FakeGuacamole::start().await;
    let s = sync(&fake, "not the password", None);
    s.prepared("default", 1, &address("pw"));
    s.released("default", 1);
    s.cleaned("default", 1);
    let e = s.link("default", 1).await.unwrap_err().to_string();
    assert!(e.contains("login") && e.contains("403"), "{e}");
    assert!(!e.contains("not the password"), "{e}");
    assert!(fake.connections().is_empty());
}

#[test]
fn only_rest_mode_has_a_sync() {
    let json = crate::guacamole::GuacamoleConfig {
        url: Some("https://desk.example.org/guacamole".into()),
        json_secret_key: Some(secrecy::SecretString::from("4c0b569e4c96df157eee1b65dd0e4d41")),
        ..Default::default()
    };
    let g = Guacamole::from_config(&json).unwrap().unwrap();
    assert!(ConnectionSync::start(Arc::new(g), None).is_none());
}
