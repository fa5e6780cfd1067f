//! The mover: carries out `Effect::Move` for a pool's VM in a spawned task, and keeps the last
//! move of each VM for the API. Live moves (an OCCUPIED VM, migrated running) are in
//! `moves_live`; this is the cold one.
//!
//! Cold steps: the target node's capacity is claimed; the source stops the domain and exports its
//! disk (an overlay on its template); the target imports it (if it lacks the template, the
//! source exports that too and the target installs it, after which the import is tried again;
//! a template of that name with other content is refused by the target); the target starts
//! the new domain, waits for the guest, takes a new `clean` snapshot and reads its console.
//! Only then is the old domain destroyed. Any failure destroys what the target made and
//! reverts the source to its clean snapshot, so the VM runs where it was (`restored`). Images
//! the export added to the hive's registry (moves between agents) are deleted at the end.

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use serde::Serialize;

use super::{DriverReport, PoolHandle};
use crate::actors::node::{NodeRegistryHandle, VmKey};
use crate::actors::session::SessionMsg;
use crate::domain::pool::MoveStarted;
use crate::domain::vm::{Placement, VmAddress};
use crate::domain::{Millis, NodeId, VmId};
use crate::drivers::{CLEAN_SNAPSHOT, DiskRef, DriverError, Hypervisor, VmSpec, is_missing_template};
use crate::images::ImageRegistry;

/// The last move of a VM, as `GET /api/v1/pools/{pool}/vms/{vm}/move` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MoveView {
    pub vm: VmId,
    pub from: NodeId,
    pub to: NodeId,
    /// `cold` (a free or ready VM: stopped, copied, booted there) or `live` (an occupied VM,
    /// migrated running).
    pub mode: &'static str,
    /// `moving`, `done` or `failed`.
    pub status: &'static str,
    /// The domain on the new node once done.
    pub domain: Option<String>,
    /// Why it failed, and whether the VM runs again where it was.
    pub error: Option<String>,
    pub restored: Option<bool>,
    pub started_at: Millis,
    pub finished_at: Option<Millis>,
}

impl MoveView {
    pub fn started(m: &MoveStarted, now: Millis) -> MoveView {
        MoveView {
            vm: m.vm,
            from: m.from.node,
            to: m.to,
            mode: if m.live { "live" } else { "cold" },
            status: "moving",
            domain: None,
            error: None,
            restored: None,
            started_at: now,
            finished_at: None,
        }
    }

    pub fn finish(&mut self, outcome: &MoveOutcome, now: Millis) {
        self.finished_at = Some(now);
        match outcome {
            MoveOutcome::Done { placement, .. } => {
                self.status = "done";
                self.domain = Some(placement.domain.clone());
            }
            MoveOutcome::Failed { error, restored } => {
                self.status = "failed";
                self.error = Some(error.clone());
                self.restored = Some(*restored);
            }
        }
    }
}

/// How a move ended, reported to the pool with the move's operation number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoveOutcome {
    Done { placement: Placement, address: VmAddress },
    Failed { error: String, restored: bool },
}

/// What the mover needs; everything else it asks the node registry for.
pub struct MoveJob {
    pub key: VmKey,
    pub op: u64,
    pub from: Placement,
    pub to: NodeId,
    pub live: bool,
    pub spec: VmSpec,
    pub boot_timeout: Duration,
    pub images: Option<ImageRegistry>,
    pub nodes: NodeRegistryHandle,
    pub pool: PoolHandle,
    pub session: Option<ActorRef<SessionMsg>>,
}

/// Carry out the move and report it; never panics, always reports.
pub async fn run(job: MoveJob) {
    let (vm, op) = (job.key.vm, job.op);
    let started = std::time::Instant::now();
    let moved = if job.live { super::moves_live::move_vm(&job).await } else { move_vm(&job).await };
    let outcome = match moved {
        Ok((placement, address, driver)) => {
            tracing::info!(vm, from = job.from.node, to = job.to, live = job.live, domain = %placement.domain, duration_ms = started.elapsed().as_millis() as u64, "VM moved");
            if let Some(s) = &job.session {
                let _ = s.cast(SessionMsg::Placed { placement: placement.clone(), driver });
            }
            MoveOutcome::Done { placement, address }
        }
        Err(Failure { error, restored }) => {
            tracing::warn!(vm, from = job.from.node, to = job.to, live = job.live, error = %error, restored, "VM move failed");
            MoveOutcome::Failed { error, restored }
        }
    };
    job.pool.report(DriverReport::Moved { vm, op, outcome });
}

pub(super) struct Failure {
    pub error: String,
    pub restored: bool,
}

/// The source is untouched: the VM still runs where it was.
pub(super) fn untouched(error: String) -> Failure {
    Failure { error, restored: true }
}

pub(super) type Moved = (Placement, VmAddress, Arc<dyn Hypervisor>);

/// Both nodes' drivers (of one kind), with the VM's capacity claimed on the target; what the
/// target's claim answered.
pub(super) async fn claim_target(
    job: &MoveJob,
) -> Result<(Arc<dyn Hypervisor>, Arc<dyn Hypervisor>, crate::actors::node::Placed), Failure> {
    let (from, to) = (job.from.node, job.to);
    let src = job.nodes.driver(from).await.map_err(|e| untouched(format!("source node {from}: {e}")))?;
    let dst = job.nodes.driver(to).await.map_err(|e| untouched(format!("target node {to}: {e}")))?;
    if src.kind() != dst.kind() {
        return Err(untouched(format!("node {from} runs the {} driver and node {to} the {} driver", src.kind(), dst.kind())));
    }
    match job.nodes.claim(to, &job.key, &job.spec).await {
        Ok(p) => Ok((src, dst, p)),
        Err(e) => {
            reclaim(job, from).await;
            Err(untouched(format!("target node {to}: {e}")))
        }
    }
}

/// The domain name a move gives the VM on node `to`.
pub(super) fn moved_name(job: &MoveJob) -> String {
    format!("{}-{}-n{}", job.key.pool, job.key.vm, job.to)
}

async fn move_vm(job: &MoveJob) -> Result<Moved, Failure> {
    let (from, to) = (job.from.node, job.to);
    let (src, dst, placed) = claim_target(job).await?;
    let exported = match src.export(&job.from.domain).await {
        Ok(x) => x,
        Err(e) => return Err(restore(job, &src, format!("exporting from node {from}: {e}")).await),
    };
    let mut shipped = Vec::new();
    let spec = VmSpec { name: moved_name(job), ..job.spec.clone() };
    let result = async {
        let domain = match dst.import(&spec, &exported).await {
            Err(e) if is_missing_template(&e).is_some() => {
                let template = src
                    .export_template(&exported.template)
                    .await
                    .map_err(|e| format!("exporting template {:?} from node {from}: {e}", exported.template))?;
                shipped.push(template.disk.clone());
                dst.install_exported_template(&template)
                    .await
                    .map_err(|e| format!("installing template {:?} on node {to}: {e}", template.name))?;
                dst.import(&spec, &exported).await
            }
            r => r,
        }
        .map_err(|e| format!("importing on node {to}: {e}"))?;
        let up = start_clean(&dst, &domain, job.boot_timeout).await;
        match up {
            Ok((ip, console)) => Ok((domain, ip, console)),
            Err(e) => {
                if let Err(d) = dst.destroy(&domain).await {
                    tracing::warn!(vm = job.key.vm, node.id = to, domain = %domain, error = %d, "cannot destroy a failed move's domain");
                }
                Err(format!("starting on node {to}: {e}"))
            }
        }
    }
    .await;
    shipped.push(exported.disk.clone());
    forget_images(job, &shipped).await;
    match result {
        Ok((domain, ip, console)) => {
            if let Err(e) = src.destroy(&job.from.domain).await {
                tracing::warn!(vm = job.key.vm, node.id = from, domain = %job.from.domain, error = %e, "cannot destroy a moved VM's old domain");
            }
            let address = VmAddress { ip, public_ip: placed.address.clone(), vnc_port: console.port, vnc_passwd: console.password };
            Ok((Placement { node: to, domain }, address, dst))
        }
        Err(e) => Err(restore(job, &src, e).await),
    }
}

/// Start a domain, wait for its guest, take its clean snapshot, read its console.
async fn start_clean(
    driver: &Arc<dyn Hypervisor>,
    domain: &str,
    timeout: Duration,
) -> Result<(String, crate::drivers::Console), DriverError> {
    driver.start(domain).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut every = Duration::from_millis(5);
    let guest = loop {
        match driver.ping(domain).await {
            Ok(g) => break g,
            Err(DriverError::NotReady) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(every).await;
                every = (every * 2).min(Duration::from_millis(500));
            }
            Err(DriverError::NotReady) => return Err(DriverError::Failed(format!("the guest did not answer within {timeout:?}"))),
            Err(e) => return Err(e),
        }
    };
    driver.snapshot(domain, CLEAN_SNAPSHOT).await?;
    Ok((guest.ip, driver.console(domain).await?))
}

/// Put the VM back where it was: its clean snapshot, running, with its capacity held there.
async fn restore(job: &MoveJob, src: &Arc<dyn Hypervisor>, error: String) -> Failure {
    reclaim(job, job.from.node).await;
    match src.revert(&job.from.domain, CLEAN_SNAPSHOT).await {
        Ok(()) => Failure { error, restored: true },
        Err(e) => Failure { error: format!("{error}; and reverting it on node {} failed: {e}", job.from.node), restored: false },
    }
}

pub(super) async fn reclaim(job: &MoveJob, node: NodeId) {
    if let Err(e) = job.nodes.claim(node, &job.key, &job.spec).await {
        tracing::warn!(vm = job.key.vm, node.id = node, error = %e, "cannot hold the VM's capacity on its node again");
    }
}

/// Delete the registry images this move's exports added.
pub(super) async fn forget_images(job: &MoveJob, disks: &[DiskRef]) {
    for d in disks {
        if let DiskRef::Image { sha256, fresh: true } = d {
            match &job.images {
                Some(images) => {
                    if let Err(e) = images.delete(sha256).await {
                        tracing::warn!(image = %sha256, error = %e, "cannot delete a move's image from the registry");
                    }
                }
                None => tracing::warn!(image = %sha256, "a move's image stays in the registry: this pool has no registry at hand"),
            }
        }
    }
}
