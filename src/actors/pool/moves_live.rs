//! The live mover: an OCCUPIED VM migrated running to another node, its user's session going
//! on (their console connection drops at the switch; the VM's console answers from the new node).
//!
//! Steps: the target node's capacity is claimed; the source describes the running domain
//! (template, template digest, definition); the target gets ready to take it (if it lacks the
//! template, the source exports it and the target installs it first, as in a cold move); the
//! source's hypervisor migrates it straight to the target's, memory and disk. Until that
//! migration succeeds the VM runs where it was, untouched (`restored`), and what the target
//! got ready is removed. Afterwards the VM runs on the target: its console is read there.

use std::sync::Arc;

use super::moves::{Failure, MoveJob, Moved, claim_target, forget_images, reclaim, untouched};
use crate::domain::vm::{Placement, VmAddress};
use crate::drivers::{Hypervisor, LiveSource, LiveTarget, VmSpec, is_missing_template};

pub(super) async fn move_vm(job: &MoveJob) -> Result<Moved, Failure> {
    let (from, to) = (job.from.node, job.to);
    let (src, dst, placed) = claim_target(job).await?;
    // The domain keeps its name (libvirt's migration does): the target is another host.
    let spec = VmSpec { name: job.from.domain.clone(), ..job.spec.clone() };
    let target = async {
        let source = src.live_source(&job.from.domain).await.map_err(|e| format!("describing it on node {from}: {e}"))?;
        get_ready(job, &src, &dst, &spec, &source).await
    }
    .await;
    let target = match target {
        Ok(t) => t,
        // A preparation that failed removed what it made (and a name that was taken is not ours).
        Err(error) => {
            reclaim(job, from).await;
            return Err(untouched(error));
        }
    };
    if let Err(e) = src.migrate_live(&job.from.domain, &target).await {
        undo_target(job, &dst, &target.domain).await;
        reclaim(job, from).await;
        return Err(untouched(format!("migrating it to node {to}: {e}")));
    }
    // It runs on the target now, and only there.
    let console = match dst.console(&target.domain).await {
        Ok(c) => c,
        Err(e) => {
            undo_target(job, &dst, &target.domain).await;
            return Err(Failure { error: format!("it runs on node {to}, whose console does not answer: {e}"), restored: false });
        }
    };
    let ip = dst.ping(&target.domain).await.map(|g| g.ip).unwrap_or_default();
    let address = VmAddress { ip, public_ip: placed.address.clone(), vnc_port: console.port, vnc_passwd: console.password };
    Ok((Placement { node: to, domain: target.domain }, address, dst))
}

/// The target's preparation, shipping the template first if the target lacks it.
async fn get_ready(
    job: &MoveJob,
    src: &Arc<dyn Hypervisor>,
    dst: &Arc<dyn Hypervisor>,
    spec: &VmSpec,
    source: &LiveSource,
) -> Result<LiveTarget, String> {
    let (from, to) = (job.from.node, job.to);
    match dst.prepare_incoming(spec, source).await {
        Err(e) if is_missing_template(&e).is_some() => {
            let template = src
                .export_template(&source.template)
                .await
                .map_err(|e| format!("exporting template {:?} from node {from}: {e}", source.template))?;
            let installed = dst.install_exported_template(&template).await;
            forget_images(job, std::slice::from_ref(&template.disk)).await;
            installed.map_err(|e| format!("installing template {:?} on node {to}: {e}", template.name))?;
            dst.prepare_incoming(spec, source).await
        }
        r => r,
    }
    .map_err(|e| format!("getting node {to} ready to take it: {e}"))
}

/// Remove what the target got ready (or took, if the VM does not stay there).
async fn undo_target(job: &MoveJob, dst: &Arc<dyn Hypervisor>, domain: &str) {
    if let Err(e) = dst.destroy(domain).await {
        tracing::warn!(vm = job.key.vm, node.id = job.to, domain, error = %e, "cannot remove what a failed live move left on its target");
    }
}
