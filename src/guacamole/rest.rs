//! Connection management over Guacamole's REST API, for deployments whose connections live in
//! Guacamole's database. The shapes follow the spec (`specs/guacamole.md` §2):
//!
//! - `POST /api/tokens` (form `username`, `password`) → `{authToken, dataSource, …}`; the token
//!   then rides in the `Guacamole-Token` header. `DELETE /api/tokens/{token}` logs out.
//! - `POST /api/session/data/{ds}/connections` creates (→ `{identifier}`),
//!   `DELETE …/connections/{id}` deletes, `GET …/activeConnections` lists live sessions and
//!   `PATCH …/activeConnections` with `[{"op":"remove","path":"/<id>"}]` ends them.
//! - The user's page: `{url}/#/client/<base64(identifier "\0" "c" "\0" dataSource)>`.
//!
//! API sessions idle out (60 minutes by default), so a 401 or 403 is answered by logging in
//! again once and repeating the request.

use std::collections::BTreeMap;

use base64::Engine;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::json_auth::encode_component;
use super::{GuacamoleConfig, GuacamoleError, VncTarget};

/// What Guacamole answers to a login.
#[derive(Clone)]
struct Session {
    token: SecretString,
    data_source: String,
}

/// One live session, as `GET …/activeConnections` lists them (a map by `identifier`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ActiveConnection {
    pub identifier: String,
    /// The connection the session runs on.
    #[serde(default)]
    pub connection_identifier: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub start_date: Option<i64>,
}

pub struct RestClient {
    http: reqwest::Client,
    /// The web app's base as browsers see it, for client links.
    public_url: String,
    /// The same app as the hive reaches it.
    api_url: String,
    username: String,
    password: SecretString,
    data_source: Option<String>,
    guacd_port: u16,
    session: Mutex<Option<Session>>,
}

impl std::fmt::Debug for RestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestClient")
            .field("public_url", &self.public_url)
            .field("api_url", &self.api_url)
            .field("username", &self.username)
            .field("data_source", &self.data_source)
            .finish_non_exhaustive()
    }
}

/// Escapes what would end or split a path segment.
const SEGMENT: &AsciiSet =
    &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'%').add(b'/').add(b'?').add(b'<').add(b'>').add(b'`').add(b'{').add(b'}');

fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// `{url}/#/client/<id>`, where the id is `base64(identifier + "\0c\0" + dataSource)`: standard
/// padded base64 (what `btoa` gives, and what newer Guacamole's base64url decoder also accepts)
/// then URL-encoded as the web app itself does before routing to it, since `/` and `+` would
/// break the route.
pub fn client_link(url: &str, identifier: &str, data_source: &str) -> String {
    let id = base64::engine::general_purpose::STANDARD.encode(format!("{identifier}\0c\0{data_source}"));
    format!("{}/#/client/{}", url.trim_end_matches('/'), encode_component(&id))
}

fn transport(what: &'static str) -> impl FnOnce(reqwest::Error) -> GuacamoleError {
    move |e| GuacamoleError::Transport { what, source: e.without_url() }
}

async fn status_error(what: &'static str, resp: reqwest::Response) -> GuacamoleError {
    let status = resp.status().as_u16();
    let body: String = resp.text().await.unwrap_or_default().chars().take(300).collect();
    GuacamoleError::Status { what, status, body }
}

impl RestClient {
    pub fn from_config(cfg: &GuacamoleConfig, http: reqwest::Client) -> Result<RestClient, GuacamoleError> {
        let public_url = cfg.url.clone().ok_or_else(|| GuacamoleError::Config("guacamole.url is not set".into()))?;
        let (Some(username), Some(password)) = (cfg.username.clone(), cfg.password.clone()) else {
            return Err(GuacamoleError::Config("rest mode needs username and password".into()));
        };
        let api_url = cfg.api_url.clone().unwrap_or_else(|| public_url.clone());
        Ok(RestClient {
            http,
            public_url: public_url.trim_end_matches('/').to_string(),
            api_url: api_url.trim_end_matches('/').to_string(),
            username,
            password,
            data_source: cfg.data_source.clone(),
            guacd_port: cfg.guacd_port,
            session: Mutex::new(None),
        })
    }

    async fn login(&self) -> Result<Session, GuacamoleError> {
        const WHAT: &str = "login";
        let form = [("username", self.username.as_str()), ("password", self.password.expose_secret())];
        let resp = self.http.post(format!("{}/api/tokens", self.api_url)).form(&form).send().await.map_err(transport(WHAT))?;
        if !resp.status().is_success() {
            return Err(status_error(WHAT, resp).await);
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            auth_token: String,
            data_source: String,
        }
        let a: Answer = resp.json().await.map_err(|e| GuacamoleError::Answer { what: WHAT, detail: e.without_url().to_string() })?;
        let data_source = self.data_source.clone().unwrap_or(a.data_source);
        tracing::debug!(user = %self.username, data_source = %data_source, "logged in to Guacamole's API");
        Ok(Session { token: SecretString::from(a.auth_token), data_source })
    }

    /// The current API session, logging in if there is none.
    async fn session(&self) -> Result<Session, GuacamoleError> {
        let mut s = self.session.lock().await;
        if let Some(s) = &*s {
            return Ok(s.clone());
        }
        let fresh = self.login().await?;
        *s = Some(fresh.clone());
        Ok(fresh)
    }

    /// Replaces `stale` with a new login, unless a concurrent caller already did.
    async fn relogin(&self, stale: &Session) -> Result<Session, GuacamoleError> {
        let mut s = self.session.lock().await;
        if let Some(cur) = &*s {
            if cur.token.expose_secret() != stale.token.expose_secret() {
                return Ok(cur.clone());
            }
        }
        *s = None;
        let fresh = self.login().await?;
        *s = Some(fresh.clone());
        Ok(fresh)
    }

    /// A request under `/api/session/data/{dataSource}/{rest}`, repeated once after a fresh
    /// login when the session has idled out.
    async fn call(
        &self,
        what: &'static str,
        method: Method,
        rest: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, GuacamoleError> {
        let mut session = self.session().await?;
        for attempt in 0..2 {
            let url = format!("{}/api/session/data/{}/{}", self.api_url, seg(&session.data_source), rest);
            let mut req = self.http.request(method.clone(), url).header("Guacamole-Token", session.token.expose_secret());
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(transport(what))?;
            let denied = matches!(resp.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
            if denied && attempt == 0 {
                tracing::debug!(what, status = resp.status().as_u16(), "Guacamole API session refused; logging in again");
                session = self.relogin(&session).await?;
                continue;
            }
            return Ok(resp);
        }
        unreachable!("the loop returns on its second pass")
    }

    /// Creates a VNC connection for `target` (at most one user, one session), routed to the
    /// guacd next to its node when it names one; returns Guacamole's identifier.
    pub async fn create_vnc(&self, name: &str, target: &VncTarget) -> Result<String, GuacamoleError> {
        const WHAT: &str = "create connection";
        let mut parameters = json!({"hostname": target.hostname, "port": target.port.to_string()});
        if let Some(pw) = &target.password {
            parameters["password"] = pw.expose_secret().into();
        }
        let mut attributes = json!({"max-connections": "1", "max-connections-per-user": "1"});
        if let Some(guacd) = &target.guacd_hostname {
            attributes["guacd-hostname"] = guacd.as_str().into();
            attributes["guacd-port"] = self.guacd_port.to_string().into();
        }
        let body = json!({
            "parentIdentifier": "ROOT",
            "name": name,
            "protocol": "vnc",
            "parameters": parameters,
            "attributes": attributes,
        });
        let resp = self.call(WHAT, Method::POST, "connections", Some(&body)).await?;
        if !resp.status().is_success() {
            return Err(status_error(WHAT, resp).await);
        }
        let v: Value = resp.json().await.map_err(|e| GuacamoleError::Answer { what: WHAT, detail: e.without_url().to_string() })?;
        let id = match &v["identifier"] {
            Value::String(s) => s.clone(),
            // Tolerated, though Guacamole sends a string.
            Value::Number(n) => n.to_string(),
            _ => return Err(GuacamoleError::Answer { what: WHAT, detail: "no identifier".into() }),
        };
        tracing::info!(connection = %id, name, "created Guacamole connection");
        Ok(id)
    }

    /// Deletes a connection; one already gone (404) counts as deleted.
    pub async fn delete_connection(&self, identifier: &str) -> Result<(), GuacamoleError> {
        const WHAT: &str = "delete connection";
        let resp = self.call(WHAT, Method::DELETE, &format!("connections/{}", seg(identifier)), None).await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            tracing::info!(connection = %identifier, "deleted Guacamole connection");
            return Ok(());
        }
        Err(status_error(WHAT, resp).await)
    }

    /// The identifiers of the connections called `name` (normally one): how the hive finds its
    /// connections again after a restart, or from another instance, without storing them.
    pub async fn connections_named(&self, name: &str) -> Result<Vec<String>, GuacamoleError> {
        const WHAT: &str = "list connections";
        let resp = self.call(WHAT, Method::GET, "connections", None).await?;
        if !resp.status().is_success() {
            return Err(status_error(WHAT, resp).await);
        }
        let all: BTreeMap<String, Value> =
            resp.json().await.map_err(|e| GuacamoleError::Answer { what: WHAT, detail: e.without_url().to_string() })?;
        Ok(all.into_iter().filter(|(_, c)| c["name"].as_str() == Some(name)).map(|(id, _)| id).collect())
    }

    /// Lets the members of user group `group` open (READ) connection `identifier`:
    /// `PATCH …/userGroups/{group}/permissions` with a JSON Patch `add` of
    /// `/connectionPermissions/{identifier}`.
    pub async fn grant_read(&self, group: &str, identifier: &str) -> Result<(), GuacamoleError> {
        const WHAT: &str = "grant connection permission";
        let patch = json!([{"op": "add", "path": format!("/connectionPermissions/{identifier}"), "value": "READ"}]);
        let resp = self.call(WHAT, Method::PATCH, &format!("userGroups/{}/permissions", seg(group)), Some(&patch)).await?;
        if !resp.status().is_success() {
            return Err(status_error(WHAT, resp).await);
        }
        Ok(())
    }

    /// Every live session in the data source, by active-connection identifier.
    pub async fn active_connections(&self) -> Result<BTreeMap<String, ActiveConnection>, GuacamoleError> {
        const WHAT: &str = "list active connections";
        let resp = self.call(WHAT, Method::GET, "activeConnections", None).await?;
        if !resp.status().is_success() {
            return Err(status_error(WHAT, resp).await);
        }
        resp.json().await.map_err(|e| GuacamoleError::Answer { what: WHAT, detail: e.without_url().to_string() })
    }

    /// Ends every live session on `connection`; returns how many there were.
    pub async fn end_sessions_of(&self, connection: &str) -> Result<usize, GuacamoleError> {
        const WHAT: &str = "end active connections";
        let doomed: Vec<String> = self
            .active_connections()
            .await?
            .into_iter()
            .filter(|(_, a)| a.connection_identifier.as_deref() == Some(connection))
            .map(|(key, _)| key)
            .collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        let patch: Vec<Value> = doomed.iter().map(|id| json!({"op": "remove", "path": format!("/{id}")})).collect();
        let resp = self.call(WHAT, Method::PATCH, "activeConnections", Some(&Value::Array(patch))).await?;
        if !resp.status().is_success() {
            return Err(status_error(WHAT, resp).await);
        }
        tracing::info!(connection, sessions = doomed.len(), "ended Guacamole sessions");
        Ok(doomed.len())
    }

    /// The user's page for `identifier`, in the data source of the API session.
    pub async fn link(&self, identifier: &str) -> Result<String, GuacamoleError> {
        let s = self.session().await?;
        Ok(client_link(&self.public_url, identifier, &s.data_source))
    }

    /// Ends the API session (at shutdown); a no-op without one.
    pub async fn logout(&self) -> Result<(), GuacamoleError> {
        const WHAT: &str = "logout";
        let Some(s) = self.session.lock().await.take() else { return Ok(()) };
        let url = format!("{}/api/tokens/{}", self.api_url, seg(s.token.expose_secret()));
        let resp = self.http.delete(url).send().await.map_err(transport(WHAT))?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(status_error(WHAT, resp).await)
    }
}
