//! Migration of VMs between hypervisors (specs/migration.md).
//!
//! In a node agent, the worker pipeline: `fetch` brings a source disk to local scratch space
//! (from a libvirt source, a file or an HTTP URL); `convert` turns it into qcow2 with
//! `qemu-img convert`, reporting progress and honouring cancel; `worker` runs both and uploads
//! the result to the hive. Each always removes its temporary files.
//!
//! In the hive: `service` keeps endpoints, resources and migrations, schedules each attempt on a
//! node and applies the workers' reports to the rules (`domain::migration`); `boot` checks the
//! result boots at the destination.

pub mod boot;
pub mod convert;
pub mod fetch;
pub mod service;
pub mod worker;
