//! Typed, layered configuration: built-in defaults → a TOML file → `HIVE_…` environment
//! variables (nested keys split on `__`, e.g. `HIVE_POOL__MAX_CAP=50`) → command-line flags.
//! `validate` reports every bad value at once; the admin token is a secret that never prints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::domain::pool::{PoolRules, PoolSize, Timeouts};
use crate::drivers::sim::SimTimings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration has {} problem(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HiveConfig {
    /// Address of the HTTP API. Loopback by default: expose it on purpose, not by accident.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `sqlite://…`; default `sqlite://<data_dir>/hive.db`.
    pub database_url: Option<String>,
    /// Bearer token for mutating admin routes. `hive up` generates one when unset.
    #[serde(serialize_with = "redacted")]
    pub admin_token: Option<SecretString>,
    pub pool: PoolConfig,
    pub vm: VmConfig,
    pub sim: SimConfig,
    pub supervision: SupervisionConfig,
    pub images: ImagesConfig,
    pub node: NodeConfig,
    pub cloud: CloudConfig,
    pub coord: CoordConfig,
    /// Browser links to desktops through Apache Guacamole; off unless `guacamole.url` is set.
    pub guacamole: crate::guacamole::GuacamoleConfig,
    /// The browser pages' assets (noVNC for the session page).
    pub web: crate::http::pages::WebConfig,
    /// How long an HTTP handler waits for an actor before answering 503.
    pub call_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Largest `max` a client may set; larger values are clamped and the clamp reported.
    pub max_cap: u32,
    /// Largest batch size a client may prepare.
    pub max_batch: u32,
    pub timeouts_ms: Timeouts,
    pub boot_backoff_ms: u64,
    pub boot_backoff_max_ms: u64,
    /// How often FREE, READY and OCCUPIED VMs are health-pinged.
    pub ping_interval_ms: u64,
    /// Size of the `default` pool when it is first created.
    pub default_size: PoolSize,
    /// A user's session ends this long after its VM was handed over (0: never), with a
    /// `session-ending` event `session_warning_ms` before.
    pub max_session_ms: u64,
    pub session_warning_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    pub template: String,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
}

/// Simulated nodes (`hive up`). The simulator stands in for real hosts; see `drivers::sim`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    pub nodes: u32,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
    pub timings: SimTimings,
}

/// Nodes that join over the network (`hive node`), and placement.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Agents send a heartbeat this often; silent for `suspect_after_ms` a node is suspect,
    /// for `dead_after_ms` dead (its VMs are replaced elsewhere).
    pub heartbeat_ms: u64,
    pub suspect_after_ms: u64,
    pub dead_after_ms: u64,
    /// How long the hive waits for an agent to answer one hypervisor command.
    pub command_timeout_ms: u64,
    /// How long a join token may be exchanged for a node credential.
    pub join_token_ttl_secs: u64,
    /// Placement picks at random among this many best-weighted nodes (1: always the best).
    pub placement_top_k: usize,
}

/// Elastic cloud capacity, used only when no participant node has room. Until a cloud driver
/// exists, the simulator stands in for it (and says so).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    pub nodes: u32,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisionConfig {
    /// A child is restarted at most `max_restarts` times within `window_secs`; one more
    /// failure in that window escalates to its supervisor.
    pub max_restarts: u32,
    pub window_secs: u64,
}

/// Image uploads and the origin's pieces (`images/`). Sizes in MiB.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    pub max_size_mb: u64,
    pub piece_size_mb: u64,
    /// Largest body of one upload PATCH (held in memory while it is written).
    pub chunk_mb: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig { max_size_mb: 20_480, piece_size_mb: 4, chunk_mb: 16 }
    }
}

impl Default for HiveConfig {
    fn default() -> Self {
        HiveConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("hive-data"),
            database_url: None,
            admin_token: None,
            pool: PoolConfig::default(),
            vm: VmConfig::default(),
            sim: SimConfig::default(),
            supervision: SupervisionConfig::default(),
            images: ImagesConfig::default(),
            node: NodeConfig::default(),
            cloud: CloudConfig::default(),
            coord: CoordConfig::default(),
            guacamole: Default::default(),
            web: Default::default(),
            call_timeout_ms: 5_000,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        let rules = PoolRules::default();
        PoolConfig {
            max_cap: rules.max_cap,
            max_batch: rules.max_batch,
            timeouts_ms: rules.timeouts,
            boot_backoff_ms: rules.boot_backoff,
            boot_backoff_max_ms: rules.boot_backoff_max,
            ping_interval_ms: 5_000,
            default_size: PoolSize { min: 2, max: 10, linger: 60_000 },
            max_session_ms: rules.max_session,
            session_warning_ms: rules.session_warning,
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig { template: "desktop".into(), cores: 1, ram_mb: 1024, disk_mb: 8192 }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { nodes: 3, cores: 8, ram_mb: 16 * 1024, disk_mb: 200 * 1024, timings: SimTimings::default() }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        let t = crate::domain::node::NodeTimings::default();
        NodeConfig {
            heartbeat_ms: t.heartbeat_ms,
            suspect_after_ms: t.suspect_after_ms,
            dead_after_ms: t.dead_after_ms,
            command_timeout_ms: 60_000,
            join_token_ttl_secs: 24 * 3600,
            placement_top_k: 3,
        }
    }
}

/// Coordination between hive instances (`coord/`): Redis when `redis_url` is set, else the
/// in-process coordinator of a single hive.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordConfig {
    /// `redis://[user:password@]host:port[/db]`; a secret, since it may hold a password.
    #[serde(serialize_with = "redacted")]
    pub redis_url: Option<SecretString>,
    /// A pool's lease lasts this long unless renewed; another instance takes the pool over
    /// this long after its holder died.
    pub lease_ttl_ms: u64,
    /// Longest wait for one coordinator call before it fails as unavailable (503).
    pub op_timeout_ms: u64,
    /// The base URL at which the other instances reach this one, to forward requests for the
    /// pools it runs. Default: `http://<listen address>` (set it when listening on 0.0.0.0
    /// or behind NAT).
    pub advertise_url: Option<String>,
}

impl Default for CoordConfig {
    fn default() -> Self {
        CoordConfig { redis_url: None, lease_ttl_ms: 10_000, op_timeout_ms: 300, advertise_url: None }
    }
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig { nodes: 0, cores: 64, ram_mb: 256 * 1024, disk_mb: 2048 * 1024 }
    }
}

impl NodeConfig {
    pub fn timings(&self) -> crate::domain::node::NodeTimings {
        crate::domain::node::NodeTimings {
            heartbeat_ms: self.heartbeat_ms,
            suspect_after_ms: self.suspect_after_ms,
            dead_after_ms: self.dead_after_ms,
        }
    }
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig { max_restarts: 5, window_secs: 60 }
    }
}

pub(crate) fn redacted<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

impl HiveConfig {
    /// Defaults, then `file` (if given), then `HIVE_…` variables from `env`.
    pub fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<HiveConfig, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(HiveConfig::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError::Load(format!("config file {} does not exist", f.display())));
            }
            fig = fig.merge(Toml::file(f));
        }
        // The environment is passed in (not read here) so tests never set process variables.
        for (k, v) in env.iter().filter(|(k, _)| k.starts_with("HIVE_") && k != "HIVE_CONFIG") {
            let key = k["HIVE_".len()..].to_ascii_lowercase().replace("__", ".");
            // Text settings stay text: a token or key of digits only is still a string (and,
            // as a secret, must not be echoed in a type error).
            let value = if TEXT_KEYS.contains(&key.as_str()) { v.as_str().into() } else { parse_env_value(v) };
            fig = fig.merge(Serialized::default(&key, value));
        }
        let cfg: HiveConfig = fig.extract().map_err(|e| ConfigError::Invalid(e.into_iter().map(|e| e.to_string()).collect()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every problem, reported together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut bad = Vec::new();
        let p = &self.pool;
        if p.max_cap == 0 {
            bad.push("pool.max_cap must be at least 1".to_string());
        }
        if p.default_size.min > p.default_size.max {
            bad.push(format!("pool.default_size.min ({}) is above pool.default_size.max ({})", p.default_size.min, p.default_size.max));
        }
        if p.default_size.max > p.max_cap {
            bad.push(format!("pool.default_size.max ({}) is above pool.max_cap ({})", p.default_size.max, p.max_cap));
        }
        if p.ping_interval_ms == 0 {
            bad.push("pool.ping_interval_ms must be above 0".into());
        }
        if p.ping_interval_ms >= p.timeouts_ms.healthy && p.timeouts_ms.healthy > 0 {
            bad.push(format!(
                "pool.ping_interval_ms ({}) must be below pool.timeouts_ms.healthy ({}) or healthy VMs time out",
                p.ping_interval_ms, p.timeouts_ms.healthy
            ));
        }
        if p.max_session_ms > 0 && p.session_warning_ms >= p.max_session_ms {
            bad.push(format!(
                "pool.session_warning_ms ({}) must be below pool.max_session_ms ({})",
                p.session_warning_ms, p.max_session_ms
            ));
        }
        if self.vm.cores == 0 || self.vm.ram_mb == 0 {
            bad.push("vm.cores and vm.ram_mb must be above 0".into());
        }
        if !(0.0..=1.0).contains(&self.sim.timings.failure_rate) {
            bad.push(format!("sim.timings.failure_rate ({}) must be between 0 and 1", self.sim.timings.failure_rate));
        }
        if self.sim.nodes > 0 && (self.sim.cores < self.vm.cores || self.sim.ram_mb < self.vm.ram_mb) {
            bad.push("sim nodes are smaller than one VM (sim.cores/sim.ram_mb below vm.cores/vm.ram_mb)".into());
        }
        if self.supervision.max_restarts == 0 || self.supervision.window_secs == 0 {
            bad.push("supervision.max_restarts and supervision.window_secs must be above 0".into());
        }
        let i = &self.images;
        if i.max_size_mb == 0 || !(1..=1024).contains(&i.piece_size_mb) || !(1..=1024).contains(&i.chunk_mb) {
            bad.push("images.max_size_mb must be above 0; images.piece_size_mb and images.chunk_mb between 1 and 1024".into());
        }
        let n = &self.node;
        if n.heartbeat_ms == 0 || n.suspect_after_ms <= n.heartbeat_ms || n.dead_after_ms <= n.suspect_after_ms {
            bad.push(format!(
                "node: need 0 < heartbeat_ms ({}) < suspect_after_ms ({}) < dead_after_ms ({})",
                n.heartbeat_ms, n.suspect_after_ms, n.dead_after_ms
            ));
        }
        if n.command_timeout_ms == 0 || n.join_token_ttl_secs == 0 || n.placement_top_k == 0 {
            bad.push("node.command_timeout_ms, node.join_token_ttl_secs and node.placement_top_k must be above 0".into());
        }
        if self.cloud.nodes > 0 && (self.cloud.cores < self.vm.cores || self.cloud.ram_mb < self.vm.ram_mb) {
            bad.push("cloud nodes are smaller than one VM (cloud.cores/cloud.ram_mb below vm.cores/vm.ram_mb)".into());
        }
        if self.call_timeout_ms == 0 {
            bad.push("call_timeout_ms must be above 0".into());
        }
        let c = &self.coord;
        if c.op_timeout_ms == 0 || c.lease_ttl_ms < 3 * c.op_timeout_ms {
            bad.push(format!(
                "coord: need 0 < op_timeout_ms ({}) and lease_ttl_ms ({}) at least 3 × op_timeout_ms, so renewals fit in a lease",
                c.op_timeout_ms, c.lease_ttl_ms
            ));
        }
        if let Some(url) = &c.redis_url {
            use secrecy::ExposeSecret;
            if !url.expose_secret().starts_with("redis://") {
                bad.push("coord.redis_url must start with redis://".into());
            }
        }
        if let Some(url) = &self.database_url {
            if !["sqlite:", "postgres:", "postgresql:"].iter().any(|s| url.starts_with(s)) {
                bad.push(format!(
                    "database_url: unsupported scheme in {:?} (use sqlite: or postgres:)",
                    url.split(':').next().unwrap_or("")
                ));
            }
        }
        bad.extend(self.guacamole.problems());
        if bad.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(bad)) }
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("hive.db").display()))
    }

    pub fn pool_rules(&self) -> PoolRules {
        PoolRules {
            timeouts: self.pool.timeouts_ms,
            max_cap: self.pool.max_cap,
            max_batch: self.pool.max_batch,
            boot_backoff: self.pool.boot_backoff_ms,
            boot_backoff_max: self.pool.boot_backoff_max_ms,
            max_session: self.pool.max_session_ms,
            session_warning: self.pool.session_warning_ms,
        }
    }
}

/// Settings that are text whatever they look like.
const TEXT_KEYS: &[&str] = &[
    "admin_token",
    "database_url",
    "coord.redis_url",
    "coord.advertise_url",
    "guacamole.json_secret_key",
    "guacamole.password",
    "guacamole.username",
];

/// Environment values are strings; numbers and booleans are given their type so that
/// `HIVE_POOL__MAX_CAP=50` fills a `u32`.
fn parse_env_value(v: &str) -> figment::value::Value {
    use figment::value::Value;
    if let Ok(n) = v.parse::<i64>() {
        return Value::from(n);
    }
    if let Ok(f) = v.parse::<f64>() {
        return Value::from(f);
    }
    match v {
        "true" => Value::from(true),
        "false" => Value::from(false),
        _ => Value::from(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn secrets_of_digits_only_stay_text() {
        let cfg = HiveConfig::load(
            None,
            &env(&[("HIVE_ADMIN_TOKEN", "12345678901234"), ("HIVE_GUACAMOLE__JSON_SECRET_KEY", "12345678901234567890123456789012")]),
        )
        .expect("loads");
        assert_eq!(cfg.admin_token.as_ref().map(|t| t.expose_secret().to_string()).as_deref(), Some("12345678901234"));
        let key = cfg.guacamole.json_secret_key.as_ref().map(|k| k.expose_secret().to_string());
        assert_eq!(key.as_deref(), Some("12345678901234567890123456789012"));
    }

    #[test]
    fn defaults_are_valid_and_bind_to_loopback() {
        let c = HiveConfig::load(None, &[]).unwrap();
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.database_url(), "sqlite://hive-data/hive.db");
    }

    #[test]
    fn file_then_env_layering() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hive.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:9000\"\n[pool]\nmax_cap = 40\n[pool.default_size]\nmin = 1\nmax = 4\nlinger = 10\n")
            .unwrap();
        let c =
            HiveConfig::load(Some(&f), &env(&[("HIVE_POOL__MAX_CAP", "50"), ("HIVE_ADMIN_TOKEN", "s3cret"), ("PATH", "/bin")])).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.pool.max_cap, 50);
        assert_eq!(c.pool.default_size.max, 4);
        assert_eq!(c.admin_token.as_ref().unwrap().expose_secret(), "s3cret");
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("s3cret"), "the token never prints");
    }

    #[test]
    fn every_problem_is_reported_together() {
        let e = HiveConfig::load(None, &env(&[("HIVE_POOL__MAX_CAP", "0"), ("HIVE_VM__CORES", "0"), ("HIVE_DATABASE_URL", "mysql://x")]))
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("pool.max_cap"), "{msg}");
        assert!(msg.contains("vm.cores"), "{msg}");
        assert!(msg.contains("database_url"), "{msg}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hive.toml");
        std::fs::write(&f, "[pool]\nmax_capp = 4\n").unwrap();
        let e = HiveConfig::load(Some(&f), &[]).unwrap_err();
        assert!(e.to_string().contains("max_capp"), "{e}");
    }
}
