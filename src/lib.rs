//! guaca-hive: warm pools of virtual desktops and VMs on hosts that lend their capacity.
//!
//! A map of the crate (see DESIGN.md for the whole):
//! - `domain`: plain types and pure state machines: the vmcloud pool rules (`domain::pool`),
//!   node life (`domain::node`), ball-into-bin distributors (`domain::placement`). No I/O.
//! - `actors`: the supervised actor tree (ractor): `HiveSupervisor` → `NodeRegistry` →
//!   `NodeActor`s, and `PoolManager`s → `SessionActor`s; each with a cloneable handle.
//! - `drivers`: the `Hypervisor` trait; `sim` (a simulator) and `remote` (a node's agent).
//! - `guacamole`: browser links to desktops through Apache Guacamole (encrypted JSON or REST).
//! - `guest`: the command channel into a running guest (`ssh` with keys).
//! - `agent`: `hive node`, the agent on a host: protocol, connection, host stats, images, stock.
//! - `distribution`: content-addressed pieces between nodes, the node cache, bandwidth caps.
//! - `images`: image uploads, blobs and manifests on the hive, and distributing replicas.
//! - `lifecycle`: users and the image lifecycle (baseimage → environment → deployment → app);
//!   the rules are `domain::lifecycle`, the backend steps `lifecycle::steps`.
//! - `migration`: VMs brought in from other hypervisors: the agent's worker pipeline (fetch,
//!   `qemu-img convert`, upload) and the hive's service (endpoints, scheduling, boot check);
//!   the rules are `domain::migration`.
//! - `membership`: join tokens and node credentials, the rewards ledger, ratings.
//! - `store`: the `Store` trait and SQLite (all SQL lives here); `StoreWriter` group commits.
//! - `coord`: coordination between hive instances: pool leases and VM claims with fencing
//!   tokens; in-process (`local`) or shared through Redis (`redis`).
//! - `http`: thin warp routes: vmcloud, `/api/v1`, images, nodes, the agents' WebSocket, ops.
//! - `app`: `Hive`, the control plane assembled from `config`; `ctl`: `hive ctl`; `metrics`.

pub mod actors;
pub mod agent;
pub mod app;
pub mod config;
pub mod coord;
pub mod ctl;
pub mod distribution;
pub mod domain;
pub mod drivers;
pub mod gateway;
pub mod guacamole;
pub mod guest;
pub mod http;
pub mod images;
pub mod lifecycle;
pub mod membership;
pub mod metrics;
pub mod migration;
pub mod store;
