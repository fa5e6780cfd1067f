//! Sources and destinations (hypervisor endpoints) and the resources a source holds.
//! An endpoint is Up or Down as the latest worker heartbeat said, and Down once no heartbeat
//! came for longer than the stale window. Connection parameters hold secrets: `redacted()` is
//! the only form that may be shown or logged (`Debug` uses it too). A source's periodic report
//! replaces its resource list through `reconcile`, which keeps ids and `migrated` flags.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{Millis, NodeId};

/// Drivers an endpoint may name.
pub const DRIVERS: [&str; 7] = ["libvirt", "file", "http", "vmware", "hyperv", "virtualbox", "hive"];

pub fn known_driver(kind: &str) -> bool {
    DRIVERS.contains(&kind)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Destination,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Source, Role::Destination].into_iter().find(|r| r.name() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EndpointState {
    Up,
    Down,
    /// Never reported on.
    Unknown,
}

impl EndpointState {
    pub fn name(self) -> &'static str {
        match self {
            EndpointState::Up => "Up",
            EndpointState::Down => "Down",
            EndpointState::Unknown => "Unknown",
        }
    }

    pub fn parse(s: &str) -> Option<EndpointState> {
        [EndpointState::Up, EndpointState::Down, EndpointState::Unknown].into_iter().find(|st| st.name() == s)
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: u64,
    pub role: Role,
    pub name: String,
    /// The driver (`DRIVERS`).
    pub kind: String,
    /// Connection parameters, secrets included: show only `redacted()`.
    pub params: Value,
    /// As the latest heartbeat said; `effective_state` also accounts for silence.
    pub state: EndpointState,
    pub last_seen: Option<Millis>,
    /// The node whose worker sent the latest heartbeat.
    pub checked_by: Option<NodeId>,
}

impl Endpoint {
    pub fn new(role: Role, name: String, kind: String, params: Value) -> Endpoint {
        Endpoint { id: 0, role, name, kind, params, state: EndpointState::Unknown, last_seen: None, checked_by: None }
    }

    /// A worker on `node` could (`ok`) or could not reach the endpoint at `now`. A report older
    /// than the latest one is ignored (heartbeats from several nodes may cross). Answers whether
    /// the reported state changed.
    pub fn heartbeat(&mut self, ok: bool, node: NodeId, now: Millis) -> bool {
        if self.last_seen.is_some_and(|seen| now < seen) {
            return false;
        }
        let state = if ok { EndpointState::Up } else { EndpointState::Down };
        let changed = state != self.state;
        self.state = state;
        self.last_seen = Some(now);
        self.checked_by = Some(node);
        changed
    }

    /// The state to show and schedule by: Down when no heartbeat came for more than
    /// `stale_after` ms, since nobody is vouching for the endpoint any more.
    pub fn effective_state(&self, now: Millis, stale_after: Millis) -> EndpointState {
        match self.last_seen {
            None => EndpointState::Unknown,
            Some(seen) if now.saturating_sub(seen) > stale_after => EndpointState::Down,
            Some(_) => self.state,
        }
    }

    /// The endpoint with every secret in its parameters replaced by `***`.
    pub fn redacted(&self) -> Endpoint {
        Endpoint { params: redact_params(&self.params), ..self.clone() }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("params", &redact_params(&self.params))
            .field("state", &self.state)
            .field("last_seen", &self.last_seen)
            .field("checked_by", &self.checked_by)
            .finish()
    }
}

const MASK: &str = "***";

/// Words that make a parameter's name a secret's (`password`, `api_key`, `accessToken`, …).
const SECRET_WORDS: [&str; 8] = ["password", "passwd", "passphrase", "secret", "token", "key", "apikey", "credentials"];

/// `params` with the values of secret-named keys (at any depth) replaced by `***`, and the
/// password of any URL with credentials (`https://user:pw@host/…`) too.
pub fn redact_params(params: &Value) -> Value {
    match params {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if secret_key(k) && !v.is_null() { Value::String(MASK.into()) } else { redact_params(v) };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact_params).collect()),
        Value::String(s) => Value::String(redact_url(s)),
        other => other.clone(),
    }
}

fn secret_key(key: &str) -> bool {
    words(key).iter().any(|w| SECRET_WORDS.contains(&w.as_str()))
}

/// `api_key`, `api-key`, `apiKey` → ["api", "key"].
fn words(key: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in key.chars() {
        if !c.is_alphanumeric() || (c.is_uppercase() && prev_lower) {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        }
        if c.is_alphanumeric() {
            cur.extend(c.to_lowercase());
        }
        prev_lower = c.is_lowercase();
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `scheme://user:pw@host…` → `scheme://user:***@host…`; anything else unchanged.
fn redact_url(s: &str) -> String {
    let Some(start) = s.find("://").map(|i| i + 3) else { return s.to_string() };
    let authority_end = s[start..].find(['/', '?', '#']).map_or(s.len(), |i| start + i);
    let Some(at) = s[start..authority_end].rfind('@').map(|i| start + i) else { return s.to_string() };
    match s[start..at].find(':').map(|i| start + i) {
        Some(colon) => format!("{}{MASK}{}", &s[..colon + 1], &s[at..]),
        None => s.to_string(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Instance,
    Volume,
    Network,
}

impl ResourceKind {
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Instance => "instance",
            ResourceKind::Volume => "volume",
            ResourceKind::Network => "network",
        }
    }

    pub fn parse(s: &str) -> Option<ResourceKind> {
        [ResourceKind::Instance, ResourceKind::Volume, ResourceKind::Network].into_iter().find(|k| k.name() == s)
    }
}

/// Something a source holds, as the hive knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    /// The hive's id (0 until stored).
    pub id: u64,
    pub source_id: u64,
    /// The source's own name for it (a libvirt UUID, a file path, …); unique per source.
    pub id_at_source: String,
    pub kind: ResourceKind,
    pub name: String,
    pub properties: Value,
    pub migrated: bool,
}

/// Something a source reported holding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Discovered {
    pub id_at_source: String,
    pub kind: ResourceKind,
    pub name: String,
    #[serde(default)]
    pub properties: Value,
}

/// How a report changes a source's resource list. `added` have id 0 until stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceDiff {
    pub added: Vec<Resource>,
    pub updated: Vec<Resource>,
    pub removed: Vec<Resource>,
}

impl ResourceDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }
}

/// Replace `source_id`'s resources (`existing`; rows of other sources are ignored) with what it
/// reported. A resource is the same one as long as its `id_at_source` is: it keeps its id and
/// `migrated` flag and is listed as updated only if its kind, name or properties changed. Of
/// duplicates in the report the last one counts. Output lists are ordered by `id_at_source`.
pub fn reconcile(source_id: u64, existing: &[Resource], discovered: Vec<Discovered>) -> ResourceDiff {
    let mut reported: BTreeMap<String, Discovered> = BTreeMap::new();
    for d in discovered {
        reported.insert(d.id_at_source.clone(), d);
    }
    let mut known: BTreeMap<&str, &Resource> = BTreeMap::new();
    for r in existing.iter().filter(|r| r.source_id == source_id) {
        known.insert(r.id_at_source.as_str(), r);
    }
    let mut diff = ResourceDiff::default();
    for (key, d) in reported {
        match known.remove(key.as_str()) {
            Some(old) if old.kind == d.kind && old.name == d.name && old.properties == d.properties => {}
            Some(old) => diff.updated.push(Resource { kind: d.kind, name: d.name, properties: d.properties, ..old.clone() }),
            None => diff.added.push(Resource {
                id: 0,
                source_id,
                id_at_source: d.id_at_source,
                kind: d.kind,
                name: d.name,
                properties: d.properties,
                migrated: false,
            }),
        }
    }
    diff.removed = known.into_values().cloned().collect();
    diff
}
