//! System tests: the real hive (actors, SQLite file, warp) on 127.0.0.1:0, driven over HTTP.
//! One binary; each test gets its own server and data directory. Nothing sleeps to
//! synchronise: `support::until` polls with a deadline.
//!
//! The VMs here come from the in-process simulator (`drivers::sim`), which stands in for a
//! hypervisor; what is under test is the pool logic, the API, the store and supervision.

#![allow(clippy::field_reassign_with_default)]

mod support;

mod agent_multi;
mod agents;
mod api_v1;
mod bad_input;
mod browser;
mod ctl_migration;
mod durability;
mod fencing;
mod gateway;
mod gateway_nat;
mod guacamole_rest;
mod images;
#[cfg(feature = "libvirt")]
mod libvirt_e2e;
#[cfg(feature = "libvirt")]
mod libvirt_net;
mod lifecycle;
mod migration;
#[cfg(feature = "libvirt")]
mod migration_libvirt;
mod monitor_page;
mod moves;
mod moves_agents;
#[cfg(feature = "libvirt")]
mod moves_libvirt;
#[cfg(feature = "libvirt")]
mod moves_live;
mod multi;
mod nodes_admin;
mod observability;
mod outages;
mod postgres;
mod servers;
mod session_page;
mod supervision;
mod vmcloud_rules;
