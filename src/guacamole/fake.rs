//! `FakeGuacamole`: a stand-in for Guacamole's REST API, for tests. No Guacamole server runs on
//! the machines this project is tested on (it needs a servlet container and guacd, neither of
//! which the platform provides), so this server answers as the documentation says Guacamole does
//! (specs/guacamole.md §2), records every request, and keeps just enough state (API sessions,
//! connections, live sessions, granted permissions) for a test to see what the hive left behind.
//! It proves the hive speaks the documented protocol, not that a real Guacamole accepts it.
//! Never used by the hive itself.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method};
use parking_lot::Mutex;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Reply;

use super::rest::RestClient;
use super::{GuacamoleConfig, GuacamoleMode};

/// The administrator the stand-in accepts, and its password (with characters a form must escape).
pub const ADMIN: &str = "hive-admin";
pub const PASSWORD: &str = "p@ss w+rd&=";

/// One request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    /// The `Guacamole-Token` header.
    pub token: Option<String>,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn form(&self) -> BTreeMap<String, String> {
        url_form(&self.body)
    }
}

fn url_form(body: &[u8]) -> BTreeMap<String, String> {
    let s = String::from_utf8_lossy(body);
    s.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let dec = |x: &str| percent_encoding::percent_decode_str(&x.replace('+', " ")).decode_utf8_lossy().to_string();
            Some((dec(k), dec(v)))
        })
        .collect()
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    /// Tokens the stand-in still honours.
    live_tokens: Vec<String>,
    logins: u32,
    next_connection: u32,
    connections: BTreeMap<String, Value>,
    active: BTreeMap<String, Value>,
    /// `(user group, JSON Patch operation)` in the order received.
    grants: Vec<(String, Value)>,
}

/// Stands in for Guacamole's REST API: no Guacamole server runs here.
pub struct FakeGuacamole {
    /// Base URL, ending in `/guacamole` like a default deployment.
    pub url: String,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FakeGuacamole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(status: StatusCode, body: Value) -> warp::reply::Response {
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

fn no_content() -> warp::reply::Response {
    warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response()
}

fn not_found(what: &str) -> warp::reply::Response {
    answer(StatusCode::NOT_FOUND, json!({"message": format!("No such {what}."), "type": "NOT_FOUND"}))
}

fn handle(state: &Mutex<State>, seen: Seen) -> warp::reply::Response {
    let mut st = state.lock();
    st.seen.push(seen.clone());
    let path = seen.path.strip_prefix("/guacamole").unwrap_or(&seen.path).to_string();
    if path == "/api/tokens" && seen.method == Method::POST {
        let form = seen.form();
        if form.get("username").map(String::as_str) != Some(ADMIN) || form.get("password").map(String::as_str) != Some(PASSWORD) {
            return answer(StatusCode::FORBIDDEN, json!({"message": "Invalid login.", "type": "INVALID_CREDENTIALS"}));
        }
        st.logins += 1;
        let token = token(st.logins);
        st.live_tokens.push(token.clone());
        return answer(
            StatusCode::OK,
            json!({"authToken": token, "username": ADMIN, "dataSource": "postgresql", "availableDataSources": ["postgresql", "postgresql-shared"]}),
        );
    }
    if let Some(token) = path.strip_prefix("/api/tokens/") {
        let token = token.to_string();
        st.live_tokens.retain(|t| *t != token);
        return no_content();
    }
    let Some(rest) = path.strip_prefix("/api/session/data/postgresql/") else {
        return not_found("resource");
    };
    if !seen.token.as_ref().is_some_and(|t| st.live_tokens.contains(t)) {
        return answer(StatusCode::FORBIDDEN, json!({"message": "Permission Denied.", "type": "PERMISSION_DENIED"}));
    }
    match (seen.method.clone(), rest) {
        (Method::POST, "connections") => {
            st.next_connection += 1;
            let id = st.next_connection.to_string();
            let mut created = seen.json();
            created["identifier"] = id.clone().into();
            st.connections.insert(id, created.clone());
            answer(StatusCode::OK, created)
        }
        // Listing leaves the parameters out, as Guacamole does.
        (Method::GET, "connections") => {
            let listed = st.connections.iter().map(|(id, c)| {
                let mut c = c.clone();
                if let Some(o) = c.as_object_mut() {
                    o.remove("parameters");
                }
                (id.clone(), c)
            });
            answer(StatusCode::OK, Value::Object(listed.collect()))
        }
        (Method::DELETE, r) if r.starts_with("connections/") => match st.connections.remove(&r["connections/".len()..]) {
            Some(_) => no_content(),
            None => not_found("connection"),
        },
        (Method::GET, "activeConnections") => answer(StatusCode::OK, Value::Object(st.active.clone().into_iter().collect())),
        (Method::PATCH, "activeConnections") => {
            for op in seen.json().as_array().cloned().unwrap_or_default() {
                let id = op["path"].as_str().unwrap_or_default().trim_start_matches('/').to_string();
                st.active.remove(&id);
            }
            no_content()
        }
        (Method::PATCH, r) if r.starts_with("userGroups/") && r.ends_with("/permissions") => {
            let group = &r["userGroups/".len()..r.len() - "/permissions".len()];
            let group = percent_encoding::percent_decode_str(group).decode_utf8_lossy().to_string();
            let ops = seen.json().as_array().cloned().unwrap_or_default();
            for op in &ops {
                let target = op["path"].as_str().unwrap_or_default().strip_prefix("/connectionPermissions/").unwrap_or_default();
                if !st.connections.contains_key(target) {
                    return answer(StatusCode::BAD_REQUEST, json!({"message": "No such connection.", "type": "BAD_REQUEST"}));
                }
            }
            st.grants.extend(ops.into_iter().map(|op| (group.clone(), op)));
            no_content()
        }
        _ => not_found("resource"),
    }
}

/// The token the stand-in hands out at its `login`-th login.
pub fn token(login: u32) -> String {
    format!("{:064X}", 0xA0 + login)
}

impl FakeGuacamole {
    pub async fn start() -> FakeGuacamole {
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let routes = warp::method().and(warp::path::full()).and(warp::header::headers_cloned()).and(warp::body::bytes()).map(
            move |method: Method, path: warp::path::FullPath, headers: HeaderMap, body: Bytes| {
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                let seen = Seen {
                    method,
                    path: path.as_str().to_string(),
                    token: header("guacamole-token"),
                    content_type: header("content-type"),
                    body,
                };
                handle(&s, seen)
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the Guacamole stand-in on loopback");
        let url = format!("http://{}/guacamole", listener.local_addr().expect("a bound address"));
        let task = tokio::spawn(warp::serve(routes).incoming(listener).run());
        FakeGuacamole { url, state, task }
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().seen.clone()
    }

    /// Forgets every API session, as Guacamole does after 60 idle minutes.
    pub fn expire_sessions(&self) {
        self.state.lock().live_tokens.clear();
    }

    pub fn live_tokens(&self) -> Vec<String> {
        self.state.lock().live_tokens.clone()
    }

    /// Someone is connected to `connection` (Guacamole's identifier) as `active_id`.
    pub fn add_active(&self, active_id: &str, connection: &str) {
        self.state.lock().active.insert(
            active_id.into(),
            json!({"identifier": active_id, "connectionIdentifier": connection, "username": "alice", "startDate": 1718153645993i64, "remoteHost": "10.0.0.1"}),
        );
    }

    /// Live sessions by active-connection identifier.
    pub fn active(&self) -> BTreeMap<String, Value> {
        self.state.lock().active.clone()
    }

    /// Connections by identifier, as created (parameters included).
    pub fn connections(&self) -> BTreeMap<String, Value> {
        self.state.lock().connections.clone()
    }

    /// `(user group, patch operation)` of every permission granted.
    pub fn grants(&self) -> Vec<(String, Value)> {
        self.state.lock().grants.clone()
    }

    /// A `[guacamole]` section in `rest` mode pointing at the stand-in, with browsers told
    /// `https://desk.example.org/guacamole`.
    pub fn config(&self, password: &str) -> GuacamoleConfig {
        GuacamoleConfig {
            url: Some("https://desk.example.org/guacamole/".into()),
            api_url: Some(self.url.clone()),
            mode: GuacamoleMode::Rest,
            username: Some(ADMIN.into()),
            password: Some(SecretString::from(password)),
            ..GuacamoleConfig::default()
        }
    }

    pub fn client(&self, password: &str) -> RestClient {
        let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
        RestClient::from_config(&self.config(password), http).expect("a valid rest config")
    }
}
