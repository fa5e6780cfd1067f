//! The REST client's requests checked against the documented shapes (spec §2). `FakeGuacamole`
//! stands in for Guacamole's REST API: no Guacamole server runs here (it needs a servlet
//! container and guacd, neither of which this platform provides). It records every request and
//! answers as the documentation says Guacamole does; the tests assert method, path, headers and
//! bodies exactly. They prove the hive speaks the documented protocol, not that a real
//! Guacamole accepts it.

use std::collections::BTreeMap;

use http::Method;
use secrecy::SecretString;
use serde_json::json;

use super::fake::{ADMIN, FakeGuacamole, PASSWORD, token};
use super::rest::client_link;
use super::{Guacamole, VncTarget};

fn target() -> VncTarget {
    VncTarget {
        hostname: "10.1.2.3".into(),
        port: 5901,
        password: Some(SecretString::from("vnc-secret")),
        guacd_hostname: Some("node-7.internal".into()),
    }
}

#[tokio::test]
async fn doc_shape_login_form_then_token_header_on_create() {
    let fake = FakeGuacamole::start().await;
    let c = fake.client(PASSWORD);
    let id = c.create_vnc("vm-42 (alice)", &target()).await.unwrap();
    assert_eq!(id, "1");

    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let login = &seen[0];
    assert_eq!(login.method, Method::POST);
    assert_eq!(login.path, "/guacamole/api/tokens");
    assert_eq!(login.content_type.as_deref(), Some("application/x-www-form-urlencoded"));
    assert_eq!(login.form(), BTreeMap::from([("username".into(), ADMIN.into()), ("password".into(), PASSWORD.into())]));
    assert_eq!(login.token, None);

    let create = &seen[1];
    assert_eq!(create.method, Method::POST);
    assert_eq!(create.path, "/guacamole/api/session/data/postgresql/connections");
    assert_eq!(create.token.as_deref(), Some(token(1).as_str()), "the token rides in Guacamole-Token");
    assert_eq!(create.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        create.json(),
        json!({
            "parentIdentifier": "ROOT",
            "name": "vm-42 (alice)",
            "protocol": "vnc",
            "parameters": {"hostname": "10.1.2.3", "port": "5901", "password": "vnc-secret"},
            "attributes": {"max-connections": "1", "max-connections-per-user": "1", "guacd-hostname": "node-7.internal", "guacd-port": "4822"}
        })
    );
    assert!(!format!("{c:?}").contains(PASSWORD), "the admin password never prints");
}

#[tokio::test]
async fn doc_shape_release_ends_live_sessions_with_json_patch_then_deletes() {
    let fake = FakeGuacamole::start().await;
    let c = fake.client(PASSWORD);
    let id = c.create_vnc("vm-1", &target()).await.unwrap();
    let other = c.create_vnc("vm-2", &target()).await.unwrap();
    fake.add_active("a-111", &id);
    fake.add_active("a-222", &other);
    fake.add_active("a-333", &id);
    let before = fake.seen().len();

    let g = Guacamole::Rest(c);
    g.release(Some(&id)).await.unwrap();

    let seen = fake.seen()[before..].to_vec();
    let calls: Vec<(Method, &str)> = seen.iter().map(|s| (s.method.clone(), s.path.as_str())).collect();
    let conn_path = format!("/guacamole/api/session/data/postgresql/connections/{id}");
    assert_eq!(
        calls,
        vec![
            (Method::GET, "/guacamole/api/session/data/postgresql/activeConnections"),
            (Method::PATCH, "/guacamole/api/session/data/postgresql/activeConnections"),
            (Method::DELETE, conn_path.as_str()),
        ]
    );
    assert_eq!(seen[1].content_type.as_deref(), Some("application/json"));
    assert_eq!(seen[1].json(), json!([{"op": "remove", "path": "/a-111"}, {"op": "remove", "path": "/a-333"}]));
    assert!(seen.iter().all(|s| s.token.as_deref() == Some(token(1).as_str())));
    assert_eq!(fake.active().keys().collect::<Vec<_>>(), vec!["a-222"], "only the released connection's sessions end");

    // Releasing again: no sessions to end (no PATCH), and a connection already gone is fine.
    let before = fake.seen().len();
    g.release(Some(&id)).await.unwrap();
    let again: Vec<Method> = fake.seen()[before..].iter().map(|s| s.method.clone()).collect();
    assert_eq!(again, vec![Method::GET, Method::DELETE]);
}

#[tokio::test]
async fn doc_shape_idle_session_relogs_in_once_and_repeats_the_request() {
    let fake = FakeGuacamole::start().await;
    let c = fake.client(PASSWORD);
    c.create_vnc("vm-1", &target()).await.unwrap();
    fake.expire_sessions();
    let before = fake.seen().len();

    let id = c.create_vnc("vm-2", &target()).await.unwrap();
    assert_eq!(id, "2");
    let seen = fake.seen()[before..].to_vec();
    let calls: Vec<(Method, &str, Option<String>)> = seen.iter().map(|s| (s.method.clone(), s.path.as_str(), s.token.clone())).collect();
    let conns = "/guacamole/api/session/data/postgresql/connections";
    assert_eq!(
        calls,
        vec![(Method::POST, conns, Some(token(1))), (Method::POST, "/guacamole/api/tokens", None), (Method::POST, conns, Some(token(2))),]
    );
    assert_eq!(seen[0].body, seen[2].body, "the same request, repeated");
    assert_eq!(seen[1].form()["password"], PASSWORD);
}

#[tokio::test]
async fn doc_shape_refused_login_is_an_error_not_a_loop() {
    let fake = FakeGuacamole::start().await;
    let c = fake.client("wrong");
    let e = c.create_vnc("vm-1", &target()).await.unwrap_err().to_string();
    assert!(e.contains("login") && e.contains("403"), "{e}");
    assert!(!e.contains("wrong"), "{e}");
    let seen = fake.seen();
    assert_eq!(seen.len(), 1, "one login attempt, no connection request: {seen:?}");
}

#[tokio::test]
async fn doc_shape_client_link_and_logout() {
    let fake = FakeGuacamole::start().await;
    let c = fake.client(PASSWORD);
    let link = c.link("17").await.unwrap();
    // base64("17\0c\0postgresql") = "MTcAYwBwb3N0Z3Jlc3Fs", on the browser-facing URL.
    assert_eq!(link, "https://desk.example.org/guacamole/#/client/MTcAYwBwb3N0Z3Jlc3Fs");
    // `/`, `+` and `=` of base64 are escaped so the route stays one segment.
    let padded = client_link("https://g.example/guacamole", "5", "mysql");
    assert_eq!(padded, "https://g.example/guacamole/#/client/NQBjAG15c3Fs");
    assert_eq!(client_link("https://g.example", "~~~", "x"), "https://g.example/#/client/fn5%2BAGMAeA%3D%3D");
    assert_eq!(client_link("https://g.example", "???", "x"), "https://g.example/#/client/Pz8%2FAGMAeA%3D%3D");

    c.logout().await.unwrap();
    let last = fake.seen().pop().unwrap();
    assert_eq!(last.method, Method::DELETE);
    assert_eq!(last.path, format!("/guacamole/api/tokens/{}", token(1)));
    assert!(fake.live_tokens().is_empty());
    let n = fake.seen().len();
    c.logout().await.unwrap();
    assert_eq!(fake.seen().len(), n, "no session, nothing to log out");
}

#[tokio::test]
async fn doc_shape_unrouted_vm_leaves_guacd_attributes_out() {
    let fake = FakeGuacamole::start().await;
    let c = fake.client(PASSWORD);
    let t = VncTarget { guacd_hostname: None, password: None, ..target() };
    c.create_vnc("vm-1", &t).await.unwrap();
    let create = fake.seen().pop().unwrap();
    assert_eq!(create.json()["attributes"], json!({"max-connections": "1", "max-connections-per-user": "1"}));
    assert_eq!(create.json()["parameters"], json!({"hostname": "10.1.2.3", "port": "5901"}));
}
