//! Apache Guacamole in front of the desktops: a user gets a browser link to the VM they were
//! handed, through Guacamole's web app and `guacd`. Two ways, chosen by `guacamole.mode`:
//!
//! - `json` (default): the `guacamole-auth-json` extension. The hive seals a short-lived,
//!   single-use JSON naming exactly one VNC connection (`json_auth`); Guacamole keeps no
//!   state and needs no database. Nothing to prepare or clean up.
//! - `rest`: connections live in Guacamole's own database and the hive manages them over the
//!   REST API (`rest`): create one when a VM is prepared, end its live sessions and delete it
//!   when the VM is released.
//!
//! `Guacamole` is the one handle the session code needs: `prepare` → `link` → `release`.
//! Secrets (the JSON key, the REST password, VNC passwords, tokens) never reach logs or `Debug`.

pub mod fake;
pub mod json_auth;
pub mod rest;
pub mod sync;

#[cfg(test)]
mod json_tests;
#[cfg(test)]
mod rest_doc_shapes;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub use json_auth::{Connection, JsonAuth, JsonLink, JsonSecretKey, link_for, seal};
pub use rest::{ActiveConnection, RestClient, client_link};
pub use sync::ConnectionSync;

/// The `[guacamole]` section. The integration is off until `url` is set.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuacamoleConfig {
    /// Base URL of the Guacamole web app as browsers reach it, e.g.
    /// `https://desk.example.org/guacamole`. Unset: no Guacamole links.
    pub url: Option<String>,
    /// Where the hive itself reaches the REST API (`rest` mode), e.g. `http://guacamole:8080/guacamole`
    /// on an internal network. Default: `url`. Plain http only: the hive's HTTP client is built
    /// without TLS.
    pub api_url: Option<String>,
    pub mode: GuacamoleMode,
    /// `json-secret-key` of Guacamole's `guacamole.properties`: 32 hex digits (128 bits).
    #[serde(serialize_with = "crate::config::redacted")]
    pub json_secret_key: Option<SecretString>,
    /// A sealed link is accepted this long after it was issued, and once (`singleUse`).
    pub link_ttl_secs: u64,
    /// `rest`: a Guacamole administrator allowed to create and delete connections and to end
    /// sessions.
    pub username: Option<String>,
    #[serde(serialize_with = "crate::config::redacted")]
    pub password: Option<SecretString>,
    /// `rest`: the data source holding the connections (`postgresql`, `mysql`, `sqlserver`…).
    /// Unset: the one Guacamole reports at login (`dataSource`), which is right when the
    /// database is the only authentication back end; set it when LDAP or another provider also
    /// authenticates the administrator, or connections may land in the wrong place.
    pub data_source: Option<String>,
    /// The port of the `guacd` next to each node, for connections routed to it.
    pub guacd_port: u16,
    /// `rest`: the Guacamole user group whose members may open the hive's connections; each
    /// connection is granted READ to it when created. Unset: only Guacamole administrators (and
    /// whoever they grant) can follow the links, since Guacamole shows a connection only to
    /// users holding a permission on it.
    pub grant_group: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuacamoleMode {
    #[default]
    Json,
    Rest,
}

impl Default for GuacamoleConfig {
    fn default() -> Self {
        GuacamoleConfig {
            url: None,
            api_url: None,
            mode: GuacamoleMode::Json,
            json_secret_key: None,
            link_ttl_secs: 300,
            username: None,
            password: None,
            data_source: None,
            guacd_port: 4822,
            grant_group: None,
        }
    }
}

impl GuacamoleConfig {
    pub fn enabled(&self) -> bool {
        self.url.is_some()
    }

    /// Every problem of this section, for `HiveConfig::validate`.
    pub fn problems(&self) -> Vec<String> {
        let mut bad = Vec::new();
        if let Some(key) = &self.json_secret_key {
            if JsonSecretKey::parse(key.expose_secret()).is_none() {
                // The value itself is a secret: say what is wrong, not what it is.
                bad.push(format!("guacamole.json_secret_key must be exactly 32 hex digits (got {} characters)", key.expose_secret().len()));
            }
        }
        for (field, url) in [("url", &self.url), ("api_url", &self.api_url)] {
            if let Some(u) = url {
                if !is_http_url(u) {
                    bad.push(format!("guacamole.{field} must be an http:// or https:// URL with a host"));
                }
            }
        }
        if self.api_url.is_some() && self.url.is_none() {
            bad.push("guacamole.api_url is set but guacamole.url is not (the integration is off without url)".into());
        }
        if self.guacd_port == 0 {
            bad.push("guacamole.guacd_port must be above 0".into());
        }
        match self.grant_group.as_deref() {
            Some("") => bad.push("guacamole.grant_group must not be empty (leave it out to grant nobody)".into()),
            Some(_) if self.mode == GuacamoleMode::Json => {
                bad.push("guacamole.grant_group is for mode = \"rest\" (json links carry their own permission)".into())
            }
            _ => {}
        }
        if !self.enabled() {
            return bad;
        }
        match self.mode {
            GuacamoleMode::Json => {
                if self.json_secret_key.is_none() {
                    bad.push("guacamole.mode = \"json\" needs guacamole.json_secret_key".into());
                }
                if self.link_ttl_secs == 0 {
                    bad.push("guacamole.link_ttl_secs must be above 0 (single-use links need an expiry)".into());
                }
            }
            GuacamoleMode::Rest => {
                if self.username.as_deref().is_none_or(str::is_empty) || self.password.is_none() {
                    bad.push("guacamole.mode = \"rest\" needs guacamole.username and guacamole.password".into());
                }
                if let Some(api) = self.api_url.as_ref().or(self.url.as_ref()) {
                    if api.starts_with("https://") {
                        bad.push(
                            "guacamole: the hive reaches the REST API over plain http only; set guacamole.api_url to an http:// address"
                                .into(),
                        );
                    }
                }
            }
        }
        bad
    }
}

fn is_http_url(u: &str) -> bool {
    let rest = u.strip_prefix("http://").or_else(|| u.strip_prefix("https://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
}

/// The VM's VNC server, as guacd must reach it.
pub struct VncTarget {
    pub hostname: String,
    pub port: u16,
    pub password: Option<SecretString>,
    /// The guacd next to the VM's node; `None`: Guacamole's default guacd.
    pub guacd_hostname: Option<String>,
}

impl std::fmt::Debug for VncTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VncTarget")
            .field("hostname", &self.hostname)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("guacd_hostname", &self.guacd_hostname)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuacamoleError {
    #[error("guacamole: {0}")]
    Config(String),
    /// Transport failure; the URL is left out (a logout URL holds the session token).
    #[error("guacamole: {what}: {source}")]
    Transport { what: &'static str, source: reqwest::Error },
    #[error("guacamole: {what}: HTTP {status}: {body}")]
    Status { what: &'static str, status: u16, body: String },
    #[error("guacamole: {what}: unexpected answer: {detail}")]
    Answer { what: &'static str, detail: String },
}

/// The handle the session code holds: one per hive, cheap to share behind an `Arc`.
#[derive(Debug)]
pub enum Guacamole {
    Json { url: String, key: JsonSecretKey, ttl: Duration, guacd_port: u16 },
    Rest(RestClient),
}

impl Guacamole {
    /// `None` when the integration is off. Expects a validated config.
    pub fn from_config(cfg: &GuacamoleConfig) -> Result<Option<Guacamole>, GuacamoleError> {
        let Some(url) = &cfg.url else { return Ok(None) };
        let url = url.trim_end_matches('/').to_string();
        match cfg.mode {
            GuacamoleMode::Json => {
                let key = cfg
                    .json_secret_key
                    .as_ref()
                    .and_then(|k| JsonSecretKey::parse(k.expose_secret()))
                    .ok_or_else(|| GuacamoleError::Config("json_secret_key must be 32 hex digits".into()))?;
                Ok(Some(Guacamole::Json { url, key, ttl: Duration::from_secs(cfg.link_ttl_secs), guacd_port: cfg.guacd_port }))
            }
            GuacamoleMode::Rest => {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(15))
                    .build()
                    .map_err(|e| GuacamoleError::Config(format!("HTTP client: {e}")))?;
                Ok(Some(Guacamole::Rest(RestClient::from_config(cfg, http)?)))
            }
        }
    }

    /// The REST client, in `rest` mode.
    pub fn rest(&self) -> Option<&RestClient> {
        match self {
            Guacamole::Rest(c) => Some(c),
            Guacamole::Json { .. } => None,
        }
    }

    /// When a VM is prepared for a user. `rest`: creates its connection and returns the
    /// identifier, which the session keeps for `link` and `release`. `json`: nothing to do
    /// (`None`).
    pub async fn prepare(&self, name: &str, target: &VncTarget) -> Result<Option<String>, GuacamoleError> {
        match self {
            Guacamole::Json { .. } => Ok(None),
            Guacamole::Rest(c) => c.create_vnc(name, target).await.map(Some),
        }
    }

    /// The link to give the user. `json`: a fresh sealed, single-use token for `user`, naming
    /// one connection called `name` (the connection is in the link; `identifier` is unused).
    /// `rest`: the client page of the connection `prepare` created; the user must be able to
    /// log in to Guacamole and read that connection.
    /// `expires_ms`: when the user's hold on the VM ends (the handle's expiry), if it does; the
    /// JSON token expires then, or `link_ttl_secs` from now when the handle never expires.
    pub async fn link(
        &self,
        user: &str,
        name: &str,
        target: &VncTarget,
        identifier: Option<&str>,
        expires_ms: Option<u64>,
    ) -> Result<String, GuacamoleError> {
        match self {
            Guacamole::Json { url, key, ttl, guacd_port } => {
                let expires = expires_ms.unwrap_or_else(|| now_ms() + ttl.as_millis() as u64);
                let auth = JsonAuth::single_vnc(user, expires, name, target, *guacd_port);
                Ok(link_for(url, &auth.seal(key)).browser_url)
            }
            Guacamole::Rest(c) => {
                let id = identifier.ok_or_else(|| GuacamoleError::Config("rest mode: link needs the identifier from prepare".into()))?;
                c.link(id).await
            }
        }
    }

    /// When the VM is released or recycled. `rest`: ends the connection's live sessions, then
    /// deletes it (idempotent: an identifier already gone is fine). `json`: nothing to do;
    /// the token was single-use and the VNC server goes away with the VM.
    pub async fn release(&self, identifier: Option<&str>) -> Result<(), GuacamoleError> {
        match (self, identifier) {
            (Guacamole::Rest(c), Some(id)) => {
                c.end_sessions_of(id).await?;
                c.delete_connection(id).await
            }
            _ => Ok(()),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_cfg() -> GuacamoleConfig {
        GuacamoleConfig {
            url: Some("https://desk.example.org/guacamole/".into()),
            json_secret_key: Some(SecretString::from("4c0b569e4c96df157eee1b65dd0e4d41")),
            ..GuacamoleConfig::default()
        }
    }

    #[test]
    fn off_by_default_and_valid() {
        let c = GuacamoleConfig::default();
        assert!(!c.enabled());
        assert_eq!(c.problems(), Vec::<String>::new());
        assert!(Guacamole::from_config(&c).unwrap().is_none());
        assert_eq!(c.guacd_port, 4822);
        assert_eq!(c.mode, GuacamoleMode::Json);
    }

    #[test]
    fn key_must_be_32_hex_digits_and_urls_http() {
        for bad_key in ["4c0b569e4c96df157eee1b65dd0e4d4", "4c0b569e4c96df157eee1b65dd0e4d411", "zc0b569e4c96df157eee1b65dd0e4d41"] {
            let c = GuacamoleConfig { json_secret_key: Some(SecretString::from(bad_key)), ..json_cfg() };
            let p = c.problems();
            assert!(p.iter().any(|m| m.contains("json_secret_key")), "{bad_key}: {p:?}");
            assert!(!p.join(" ").contains(bad_key), "the key never prints");
        }
        let upper = GuacamoleConfig { json_secret_key: Some(SecretString::from("4C0B569E4C96DF157EEE1B65DD0E4D41")), ..json_cfg() };
        assert_eq!(upper.problems(), Vec::<String>::new());
        for bad_url in ["ftp://x", "desk.example.org", "http://", "https:///x"] {
            let c = GuacamoleConfig { url: Some(bad_url.into()), ..json_cfg() };
            assert!(c.problems().iter().any(|m| m.contains("guacamole.url")), "{bad_url}");
        }
        assert_eq!(json_cfg().problems(), Vec::<String>::new());
    }

    #[test]
    fn each_mode_names_what_it_lacks() {
        let no_key = GuacamoleConfig { json_secret_key: None, ..json_cfg() };
        assert!(no_key.problems().iter().any(|m| m.contains("needs guacamole.json_secret_key")));
        let rest = GuacamoleConfig { mode: GuacamoleMode::Rest, json_secret_key: None, ..json_cfg() };
        let p = rest.problems().join("\n");
        assert!(p.contains("needs guacamole.username and guacamole.password"), "{p}");
        assert!(p.contains("api_url"), "an https API address is refused: {p}");
        let ok = GuacamoleConfig {
            api_url: Some("http://guacamole:8080/guacamole".into()),
            username: Some("hive".into()),
            password: Some(SecretString::from("pw")),
            ..rest
        };
        assert_eq!(ok.problems(), Vec::<String>::new());
    }

    #[test]
    fn secrets_are_redacted_in_serialization_and_debug() {
        let c = GuacamoleConfig {
            mode: GuacamoleMode::Rest,
            username: Some("hive".into()),
            password: Some(SecretString::from("hunter2-admin")),
            ..json_cfg()
        };
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("4c0b569e"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        let g = Guacamole::from_config(&json_cfg()).unwrap().unwrap();
        let t = VncTarget { hostname: "h".into(), port: 5900, password: Some(SecretString::from("vnc-pw-9")), guacd_hostname: None };
        let shown = format!("{g:?} {t:?}");
        assert!(shown.contains("JsonSecretKey([redacted])") && !shown.contains("vnc-pw-9"), "{shown}");
    }

    #[test]
    fn the_hive_config_carries_the_section() {
        let cfg = crate::config::HiveConfig::load(
            None,
            &[
                ("HIVE_GUACAMOLE__URL".to_string(), "https://desk.example.org/guacamole".to_string()),
                ("HIVE_GUACAMOLE__JSON_SECRET_KEY".to_string(), "4c0b569e4c96df157eee1b65dd0e4d41".to_string()),
            ],
        )
        .unwrap();
        assert!(cfg.guacamole.enabled());
        let bad = crate::config::HiveConfig::load(None, &[("HIVE_GUACAMOLE__URL".to_string(), "https://desk.example.org".to_string())])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("json_secret_key"), "{bad}");
    }

    #[tokio::test]
    async fn json_mode_links_need_no_preparation() {
        let g = Guacamole::from_config(&json_cfg()).unwrap().unwrap();
        let t = VncTarget { hostname: "10.0.0.5".into(), port: 5900, password: None, guacd_hostname: None };
        assert_eq!(g.prepare("vm-1", &t).await.unwrap(), None);
        let link = g.link("alice", "vm-1", &t, None, None).await.unwrap();
        assert!(link.starts_with("https://desk.example.org/guacamole/?data="), "{link}");
        g.release(None).await.unwrap();
    }
}
