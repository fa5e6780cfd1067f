//! The wire protocol between a node agent and the hive: JSON text frames over one WebSocket
//! that the agent opens (so a node behind NAT needs no open port). The agent authenticates in
//! the upgrade request (`Authorization: Bearer <node credential>`), then says `Hello`; the hive
//! answers `Welcome`. After that the agent sends heartbeats and the hive sends commands, each
//! with an id that the agent's `Reply` carries back. Unknown fields are ignored so that either
//! side can be upgraded first.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::drivers::{
    Console, DriverError, ExecOutput, ExportedDisk, ExportedTemplate, GuestStatus, LiveSource, LiveTarget, PrepareSpec, VmSpec, VmStats,
};

/// Version of this protocol; the hive refuses a `Hello` with a different major version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Path of the agents' WebSocket endpoint on the hive.
pub const AGENT_WS_PATH: &str = "/api/v1/agent";

/// What a host lends to the hive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
}

/// Host context with every heartbeat, read from the OS (what cAdvisor would report).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostStats {
    /// Whole-host CPU use, 0..=100 (percent of all cores).
    pub cpu_pct: f32,
    pub load1: f64,
    pub mem_total_mb: u64,
    pub mem_used_mb: u64,
    pub disk_total_mb: u64,
    pub disk_used_mb: u64,
    /// Bytes received and sent over all interfaces since the agent started.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// The agent's introduction, first frame on every connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub name: String,
    pub offer: Offer,
    /// Hypervisor driver the agent runs ("sim", "libvirt").
    pub driver: String,
    /// Addresses at which the host's VMs (VNC) and pieces can be reached.
    pub addresses: Vec<String>,
    /// Domains the hypervisor holds right now, so the hive reconciles instead of duplicating.
    pub domains: Vec<String>,
    /// Images (SHA-256) the node holds ready.
    #[serde(default)]
    pub images: Vec<String>,
    /// Where the node's piece server answers peers (`http://host:port`).
    #[serde(default)]
    pub peer_url: Option<String>,
    /// The hive cannot reach this host's addresses (NAT): VNC goes through this connection
    /// (`TunnelOpen`) instead of straight to `addresses`.
    #[serde(default)]
    pub behind_nat: bool,
}

/// The node cache's read counters (every read is exactly one of the first four).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheCounters {
    pub local_hit: u64,
    pub remote_hit: u64,
    pub miss: u64,
    pub skip: u64,
    /// Pieces served to peers.
    pub served: u64,
}

/// A peer that holds (or is fetching) an image's pieces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub node: u64,
    pub url: String,
}

/// What fetching an image onto a node did; `verified` is the whole-file SHA-256 check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetched {
    pub sha256: String,
    pub size: u64,
    pub pieces: usize,
    pub elapsed_ms: u64,
    pub local_hits: u64,
    pub remote_hits: u64,
    pub misses: u64,
    pub peer_bytes: u64,
    pub origin_bytes: u64,
    pub bad_pieces: u64,
    pub verified: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    Hello(Hello),
    Heartbeat {
        seq: u64,
        stats: HostStats,
        #[serde(default)]
        cache: Option<CacheCounters>,
        /// Ready copies per image (the node's stock).
        #[serde(default)]
        stock: BTreeMap<String, u32>,
        /// Bytes free where the agent converts migrated disks (its data directory), for the
        /// migration scheduler. `None` from an agent that cannot tell.
        #[serde(default)]
        scratch_free: Option<u64>,
    },
    /// Migration `job`, running on this node, is `percent` through step `event`.
    MigrationStep {
        job: u64,
        event: crate::domain::migration::Event,
        percent: u8,
    },
    Reply {
        id: u64,
        result: Result<CmdOk, DriverError>,
    },
    /// Bytes (base64) read from the node's end of tunnel `tunnel`.
    TunnelData {
        tunnel: u64,
        data: String,
    },
    /// The node's end of the tunnel ended: EOF (`error` none) or it could not connect / broke.
    TunnelClose {
        tunnel: u64,
        #[serde(default)]
        error: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HiveMsg {
    Welcome {
        node_id: u64,
        /// Send a heartbeat this often.
        heartbeat_ms: u64,
    },
    Command {
        id: u64,
        cmd: Command,
    },
    /// The hive will not talk to this agent (removed node, wrong version); do not reconnect.
    Refused {
        reason: String,
    },
    /// Open a TCP stream on the node to `port` (a VM's VNC) and carry its bytes over this
    /// connection. The agent connects to loopback, or to `host` only when it is one of its own
    /// addresses: the hive cannot make a node connect anywhere else. Only a hive that saw
    /// `behind_nat` in the hello sends this, so an older agent never gets one.
    TunnelOpen {
        tunnel: u64,
        port: u16,
        #[serde(default)]
        host: Option<String>,
    },
    /// Bytes (base64) for the node's end of tunnel `tunnel`.
    TunnelData {
        tunnel: u64,
        data: String,
    },
    /// The hive's end is gone; the agent closes the stream.
    TunnelClose {
        tunnel: u64,
    },
    /// Never sent: what the agent makes of a command frame it cannot read (from a newer hive),
    /// so that it answers `Unsupported` at once instead of leaving the hive to its timeout.
    #[serde(skip)]
    UnreadableCommand {
        id: u64,
        error: String,
    },
}

/// The hypervisor operations of `drivers::Hypervisor`, sent to a remote node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    Create {
        spec: VmSpec,
    },
    Start {
        domain: String,
    },
    Stop {
        domain: String,
    },
    Suspend {
        domain: String,
    },
    Resume {
        domain: String,
    },
    Snapshot {
        domain: String,
        name: String,
    },
    Revert {
        domain: String,
        name: String,
    },
    DeleteSnapshot {
        domain: String,
        name: String,
    },
    Exec {
        domain: String,
        command: String,
    },
    Destroy {
        domain: String,
    },
    Console {
        domain: String,
    },
    Ping {
        domain: String,
    },
    Prepare {
        domain: String,
        spec: PrepareSpec,
    },
    Stats {
        domain: String,
    },
    List,
    /// Fetch an image (pieces from `peers` and the hive) and verify it; not a hypervisor call.
    FetchImage {
        sha256: String,
        peers: Vec<Peer>,
    },
    /// Run the worker pipeline of migration `job`: connect to `source`, fetch `id_at_source`'s
    /// boot disk, convert it to qcow2, and upload it to `upload_path` on the hive (with the
    /// node's credential). Progress comes as `MigrationStep`s; the reply is the hive's answer to
    /// the upload (`Migrated`).
    Migrate {
        job: u64,
        source: crate::migration::fetch::SourceSpec,
        id_at_source: String,
        upload_path: String,
    },
    /// Stop migration `job` if it runs here (its temporary files are removed); `Done` either way.
    CancelMigration {
        job: u64,
    },
    /// What `source` holds (`Resources`).
    Discover {
        source: crate::migration::fetch::SourceSpec,
    },
    /// Is `source` reachable from this node (`Done`)?
    ProbeSource {
        source: crate::migration::fetch::SourceSpec,
    },
    /// Make image `sha256`, held by the node, a template of its hypervisor called `name`
    /// (`Hypervisor::install_template`).
    InstallTemplate {
        sha256: String,
        name: String,
        #[serde(default)]
        ready: Option<String>,
    },
    /// Cold move, the giving side: `Hypervisor::export` on the node, whose disk the agent then
    /// uploads to the hive instance that sent this (`PUT /api/v1/agent/exports/move-<domain>`,
    /// node credential). `Exported`, its disk a `DiskRef::Image`.
    Export {
        domain: String,
    },
    /// Cold move, the taking side: `Hypervisor::import`; a `DiskRef::Image` disk is fetched from
    /// the hive instance that sent this and verified first. `Domain`.
    Import {
        spec: VmSpec,
        disk: ExportedDisk,
    },
    /// `Hypervisor::export_template`, uploaded like `Export` (as `template-<name>`).
    /// `ExportedTemplate`, its disk a `DiskRef::Image`.
    ExportTemplate {
        name: String,
    },
    /// `Hypervisor::install_exported_template`; an `Image` disk is fetched and verified first
    /// (and kept as an image the node holds). `Done`.
    InstallExportedTemplate {
        template: ExportedTemplate,
    },
    /// Live move, the giving side: `Hypervisor::live_source`. `LiveSource`.
    LiveSource {
        domain: String,
    },
    /// Live move, the taking side: `Hypervisor::prepare_incoming`. `LiveTarget`.
    PrepareIncoming {
        spec: VmSpec,
        source: LiveSource,
    },
    /// Live move, the giving side: `Hypervisor::migrate_live` (node to node, not through the
    /// hive). `Done`.
    MigrateLive {
        domain: String,
        target: LiveTarget,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum CmdOk {
    Done,
    Domain(String),
    Domains(Vec<String>),
    Console(Console),
    Guest(GuestStatus),
    Stats(VmStats),
    Fetched(Fetched),
    Exec(ExecOutput),
    Migrated(serde_json::Value),
    /// The migration stopped on this node: `retryable` if another node may succeed (its own
    /// space, network or source access), not if the source itself is bad; `cancelled` if asked to.
    MigrationFailed {
        error: String,
        retryable: bool,
        cancelled: bool,
    },
    Resources(Vec<crate::migration::fetch::DiscoveredResource>),
    /// What `Export` handed out.
    Exported(ExportedDisk),
    /// What `ExportTemplate` handed out.
    ExportedTemplate(ExportedTemplate),
    /// What `LiveSource` described.
    LiveSource(LiveSource),
    /// What `PrepareIncoming` got ready.
    LiveTarget(LiveTarget),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_are_tagged() {
        let hello = AgentMsg::Hello(Hello {
            version: PROTOCOL_VERSION,
            name: "n1".into(),
            offer: Offer { cores: 4, ram_mb: 8192, disk_mb: 100_000 },
            driver: "sim".into(),
            addresses: vec!["127.0.0.1".into()],
            domains: vec!["d1".into()],
            images: vec![],
            peer_url: None,
            behind_nat: false,
        });
        let s = serde_json::to_string(&hello).unwrap();
        assert!(s.starts_with(r#"{"type":"hello""#), "{s}");
        assert_eq!(serde_json::from_str::<AgentMsg>(&s).unwrap(), hello);

        let reply = AgentMsg::Reply { id: 7, result: Err(DriverError::NotReady) };
        let s = serde_json::to_string(&reply).unwrap();
        assert_eq!(serde_json::from_str::<AgentMsg>(&s).unwrap(), reply);

        let cmd = HiveMsg::Command { id: 3, cmd: Command::Revert { domain: "d".into(), name: "clean".into() } };
        let s = serde_json::to_string(&cmd).unwrap();
        assert!(s.contains(r#""op":"revert""#), "{s}");
        assert_eq!(serde_json::from_str::<HiveMsg>(&s).unwrap(), cmd);

        let open = HiveMsg::TunnelOpen { tunnel: 9, port: 5901, host: Some("192.0.2.1".into()) };
        let s = serde_json::to_string(&open).unwrap();
        assert!(s.starts_with(r#"{"type":"tunnel_open""#), "{s}");
        assert_eq!(serde_json::from_str::<HiveMsg>(&s).unwrap(), open);
        let close = AgentMsg::TunnelClose { tunnel: 9, error: Some("refused".into()) };
        assert_eq!(serde_json::from_str::<AgentMsg>(&serde_json::to_string(&close).unwrap()).unwrap(), close);
        // An older agent's hello (no `behind_nat`) still reads: the node is reachable directly.
        let old = r#"{"type":"hello","version":1,"name":"n","offer":{"cores":1,"ram_mb":1,"disk_mb":1},"driver":"sim",
                      "addresses":[],"domains":[]}"#;
        assert!(matches!(serde_json::from_str::<AgentMsg>(old).unwrap(), AgentMsg::Hello(Hello { behind_nat: false, .. })));
    }

    #[test]
    fn move_commands_and_answers_round_trip_in_the_usual_shapes() {
        use crate::drivers::{DiskRef, ExportedDisk, ExportedTemplate};
        let disk = ExportedDisk {
            disk: DiskRef::Image { sha256: "ab".repeat(32), fresh: true },
            template: "base".into(),
            template_sha256: "cd".repeat(32),
        };
        let spec = VmSpec { name: "vm".into(), template: "base".into(), cores: 1, ram_mb: 512, disk_mb: 1024 };
        let cmd = HiveMsg::Command { id: 4, cmd: Command::Import { spec, disk: disk.clone() } };
        let v = serde_json::to_value(&cmd).unwrap();
        assert_eq!(v["cmd"]["op"], "import", "{v}");
        assert_eq!(v["cmd"]["disk"]["disk"], serde_json::json!({"kind": "image", "sha256": "ab".repeat(32), "fresh": true}), "{v}");
        assert_eq!(serde_json::from_value::<HiveMsg>(v).unwrap(), cmd);
        let template = ExportedTemplate { name: "base".into(), disk: DiskRef::File { path: "/t.qcow2".into() }, ready: None };
        for cmd in [
            Command::Export { domain: "d".into() },
            Command::ExportTemplate { name: "base".into() },
            Command::InstallExportedTemplate { template: template.clone() },
        ] {
            let s = serde_json::to_string(&cmd).unwrap();
            assert_eq!(serde_json::from_str::<Command>(&s).unwrap(), cmd, "{s}");
        }
        let ok = AgentMsg::Reply { id: 4, result: Ok(CmdOk::Exported(disk)) };
        let v = serde_json::to_value(&ok).unwrap();
        assert_eq!(v["result"]["Ok"]["kind"], "exported", "{v}");
        assert_eq!(serde_json::from_value::<AgentMsg>(v).unwrap(), ok);
        let ok = AgentMsg::Reply { id: 5, result: Ok(CmdOk::ExportedTemplate(template)) };
        assert_eq!(serde_json::from_str::<AgentMsg>(&serde_json::to_string(&ok).unwrap()).unwrap(), ok);
        // The mover reads a missing template from the error, which keeps its kind.
        let err = AgentMsg::Reply { id: 6, result: Err(crate::drivers::missing_template("base")) };
        let back = serde_json::from_str::<AgentMsg>(&serde_json::to_string(&err).unwrap()).unwrap();
        let AgentMsg::Reply { result: Err(e), .. } = back else { panic!("not an error reply: {back:?}") };
        assert_eq!(crate::drivers::is_missing_template(&e), Some("base"));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let s = r#"{"type":"heartbeat","seq":1,"stats":{"cpu_pct":1.5,"load1":0.1,"mem_total_mb":1,"mem_used_mb":1,
                   "disk_total_mb":1,"disk_used_mb":1,"net_rx_bytes":0,"net_tx_bytes":0,"gpu":"none"},"extra":true}"#;
        assert!(matches!(serde_json::from_str::<AgentMsg>(s).unwrap(), AgentMsg::Heartbeat { seq: 1, .. }));
    }
}
