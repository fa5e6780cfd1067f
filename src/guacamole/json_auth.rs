//! Encrypted JSON authentication (`guacamole-auth-json`): the payload, its sealing, and the link.
//!
//! Sealing, as the extension verifies it: `HMAC-SHA256(key, json)` (32 raw bytes) is prepended
//! to the JSON bytes; that is encrypted with AES-128-CBC, PKCS#7 padding, an all-zero IV and the
//! same key; then base64 (standard alphabet, padded). The IV is zero by the extension's design;
//! the HMAC at the front makes the first block differ whenever the JSON does.
//!
//! Delivery, per the Guacamole manual ("Generating encrypted JSON"): the token is POSTed to
//! `/api/tokens` as the form field `data`, *or* included "in the URL of any Guacamole page as a
//! query parameter named `data`", URL-encoded either way. A browser needs the second form: a
//! POST to `/api/tokens` answers JSON to a script, it does not log a browser in. The extension
//! reads the `data` parameter of the request (`UserDataService.ENCRYPTED_DATA_PARAMETER`), and
//! Guacamole's web app makes a user's only connection their home page, so a link carrying one
//! connection opens the desktop directly. The token sits in the URL (history, proxy logs), which
//! is why the hive's tokens are single-use and expire within minutes.

use std::collections::BTreeMap;

use aes::Aes128;
use base64::Engine;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockModeEncrypt, KeyIvInit};
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::ExposeSecret;
use serde::Serialize;
use sha2::Sha256;

use super::VncTarget;

/// The 128-bit `json-secret-key`. Never printed.
#[derive(Clone)]
pub struct JsonSecretKey([u8; 16]);

impl JsonSecretKey {
    /// Exactly 32 hex digits, either case.
    pub fn parse(hex_digits: &str) -> Option<JsonSecretKey> {
        let mut key = [0u8; 16];
        hex::decode_to_slice(hex_digits, &mut key).ok()?;
        Some(JsonSecretKey(key))
    }

    pub fn bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl std::fmt::Debug for JsonSecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonSecretKey([redacted])")
    }
}

/// The signature the extension checks: HMAC-SHA256 of the JSON under the key.
pub fn sign(key: &[u8; 16], json: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(json);
    mac.finalize().into_bytes().into()
}

/// `base64(AES-128-CBC(key, IV = 0, PKCS#7)(HMAC-SHA256(key, json) ‖ json))`.
pub fn seal(key: &[u8; 16], json: &[u8]) -> String {
    let mut plain = Vec::with_capacity(32 + json.len());
    plain.extend_from_slice(&sign(key, json));
    plain.extend_from_slice(json);
    let cipher = cbc::Encryptor::<Aes128>::new(&(*key).into(), &[0u8; 16].into()).encrypt_padded_vec::<Pkcs7>(&plain);
    base64::engine::general_purpose::STANDARD.encode(cipher)
}

/// The payload. Field order is the serialization order, and matches the documented format:
/// `username`, `expires`, `singleUse` (only when set: the extension's default is false, and the
/// manual's own examples leave it out), `connections`.
#[derive(Clone, Serialize)]
pub struct JsonAuth {
    pub username: String,
    /// Epoch milliseconds after which Guacamole refuses the token.
    #[serde(rename = "expires")]
    pub expires_ms: u64,
    /// Refuse a second use of the same token (the extension keeps a denylist until expiry).
    #[serde(rename = "singleUse", skip_serializing_if = "std::ops::Not::not")]
    pub single_use: bool,
    /// By name; the name is also the connection's identifier in Guacamole's `json` data source.
    pub connections: BTreeMap<String, Connection>,
}

/// One connection of the payload. Optional fields are left out when unset.
#[derive(Clone, Serialize)]
pub struct Connection {
    /// `vnc`, `rdp` or `ssh`.
    pub protocol: String,
    /// All values are strings, as Guacamole's configuration parameters are.
    pub parameters: BTreeMap<String, String>,
    /// An opaque id other connections can `join` (share or shadow) while this one is live.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    /// Remove the connection from this login once it has been used.
    #[serde(rename = "singleUse", skip_serializing_if = "std::ops::Not::not")]
    pub single_use: bool,
    /// Route to the guacd next to the VM's node instead of Guacamole's default guacd.
    #[serde(rename = "guacdHostname", skip_serializing_if = "Option::is_none")]
    pub guacd_hostname: Option<String>,
    /// A number, not a string: the extension reads it as an `Integer`.
    #[serde(rename = "guacdPort", skip_serializing_if = "Option::is_none")]
    pub guacd_port: Option<u16>,
}

impl Connection {
    pub fn new(protocol: &str, parameters: BTreeMap<String, String>) -> Connection {
        Connection {
            protocol: protocol.to_string(),
            parameters,
            id: None,
            join: None,
            single_use: false,
            guacd_hostname: None,
            guacd_port: None,
        }
    }

    /// A VNC connection to `target`, routed to its node's guacd when it names one.
    pub fn vnc(target: &VncTarget, guacd_port: u16) -> Connection {
        let mut parameters =
            BTreeMap::from([("hostname".to_string(), target.hostname.clone()), ("port".to_string(), target.port.to_string())]);
        if let Some(pw) = &target.password {
            parameters.insert("password".into(), pw.expose_secret().to_string());
        }
        let routed = target.guacd_hostname.is_some();
        Connection {
            guacd_hostname: target.guacd_hostname.clone(),
            guacd_port: routed.then_some(guacd_port),
            ..Connection::new("vnc", parameters)
        }
    }
}

impl JsonAuth {
    /// What the hive issues: one VNC connection, single-use, expiring at `expires_ms`.
    pub fn single_vnc(username: &str, expires_ms: u64, name: &str, target: &VncTarget, guacd_port: u16) -> JsonAuth {
        JsonAuth {
            username: username.to_string(),
            expires_ms,
            single_use: true,
            connections: BTreeMap::from([(name.to_string(), Connection::vnc(target, guacd_port))]),
        }
    }

    /// The exact bytes that are signed: compact JSON, no trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain maps and strings serialize")
    }

    pub fn seal(&self, key: &JsonSecretKey) -> String {
        seal(key.bytes(), &self.to_json())
    }
}

// Parameters carry VNC passwords: show their names only.
impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("protocol", &self.protocol)
            .field("parameters", &self.parameters.keys().collect::<Vec<_>>())
            .field("id", &self.id)
            .field("join", &self.join)
            .field("single_use", &self.single_use)
            .field("guacd_hostname", &self.guacd_hostname)
            .field("guacd_port", &self.guacd_port)
            .finish()
    }
}

impl std::fmt::Debug for JsonAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonAuth")
            .field("username", &self.username)
            .field("expires_ms", &self.expires_ms)
            .field("single_use", &self.single_use)
            .field("connections", &self.connections)
            .finish()
    }
}

/// Everything but unreserved characters is escaped, as `encodeURIComponent` does: base64's
/// `+`, `/` and `=` mean something in URLs and forms.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

pub(super) fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// Where and how a sealed token is delivered. Holds the token: never log it.
pub struct JsonLink {
    /// `{url}/api/tokens`: POST `form_body` here (`application/x-www-form-urlencoded`) to get an
    /// API session (`authToken`) as a script would.
    pub api_tokens_url: String,
    /// `data=<URL-encoded token>`.
    pub form_body: String,
    /// `{url}/?data=<URL-encoded token>`: the link a user opens in a browser.
    pub browser_url: String,
}

impl std::fmt::Debug for JsonLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLink").field("api_tokens_url", &self.api_tokens_url).finish_non_exhaustive()
    }
}

/// `url` is the base URL of the Guacamole web app (a trailing `/` is ignored).
pub fn link_for(url: &str, token: &str) -> JsonLink {
    let base = url.trim_end_matches('/');
    let data = encode_component(token);
    JsonLink {
        api_tokens_url: format!("{base}/api/tokens"),
        form_body: format!("data={data}"),
        browser_url: format!("{base}/?data={data}"),
    }
}
