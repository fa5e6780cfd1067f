//! The node agent (`hive node`): runs on a host machine, connects out to the hive over one
//! WebSocket (so a host behind NAT needs no open port), and drives the host's hypervisor on
//! the hive's command.
//!
//! - `proto`: the wire messages both sides speak.
//! - `run`: credential, connection, heartbeats, commands, reconnection.
//! - `host`: host context for heartbeats, read from the OS.
//! - `images`: images fetched as pieces from peers and the hive, and served to peers.
//! - `stock`: ready copies of each image, so a new VM gets its disk at once.
//! - `moves`: a VM's or template's disk handed out to, or taken in from, the hive (cold moves).
//! - `tunnel`: TCP streams on the host (a VM's VNC) carried over the connection, for NAT.

pub mod host;
pub mod images;
pub mod migrate;
pub mod moves;
pub mod proto;
pub mod run;
pub mod stock;
pub mod tunnel;

pub use run::{AgentConfig, AgentError, run};
