//! The automatic work of each phase on the VM backend, through the node registry and the
//! `Hypervisor` trait. `drive` runs one object's automatic phases in order until it reaches a
//! phase that waits for someone (ConfigInteractive, Ready, Failed) or the object is gone.
//! What a step produced (placement, domain, command output) is recorded even when it fails, so
//! the object can be inspected and deleted cleanly. Step times go to `hive_instantiation_seconds`.
//!
//! Mapping: a baseimage registers its template; given scripts (or `interactive`) it boots a VM
//! for them and is finalized with an offline snapshot `baseimage`. An environment is a linked
//! clone of the template, started and pinged; finalized with snapshot `environment`. A
//! deployment reverts its environment's VM to `environment`; finalized with a live snapshot
//! `deployment-<id>`. An app reverts to its deployment's snapshot, resumes, and runs its command.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Lifecycle, owns_vm, vm_key};
use crate::domain::lifecycle::{CommandRun, ConsoleInfo, Kind, Object, OsFamily, Phase, Runtime};
use crate::drivers::{DriverError, Hypervisor, VmSpec};
use crate::metrics;

pub const ENVIRONMENT_SNAPSHOT: &str = "environment";
pub const BASEIMAGE_SNAPSHOT: &str = "baseimage";

/// Why a step failed, and what it had produced by then.
struct Failure {
    reason: String,
    runtime: Runtime,
}

type Step = Result<Runtime, Failure>;

fn failed(runtime: &Runtime, what: &str, e: impl std::fmt::Display) -> Failure {
    Failure { reason: format!("{what}: {e}"), runtime: runtime.clone() }
}

/// Run `id`'s automatic phases until it waits for someone, fails or is gone.
pub(super) async fn drive(lc: Lifecycle, id: u64) {
    loop {
        let Some(o) = lc.object(id).await else { return };
        let step = match o.phase {
            Phase::Create => create(&lc, &o).await,
            Phase::ConfigAuto => config_auto(&lc, &o).await,
            Phase::Finalize => finalize(&lc, &o).await,
            Phase::Deleting => return delete(&lc, &o).await,
            Phase::ConfigInteractive | Phase::Ready | Phase::Failed => return,
        };
        match step {
            Ok(runtime) => {
                if let Err(e) = lc.advance(id, runtime).await {
                    return tracing::error!(object = id, error = %e, "cannot record a finished lifecycle step");
                }
            }
            Err(f) => {
                tracing::warn!(object = id, kind = o.kind.name(), phase = o.phase.name(), reason = %f.reason, "lifecycle step failed");
                return lc.fail(id, f.reason, f.runtime).await;
            }
        }
    }
}

fn needs_own_vm(o: &Object) -> bool {
    o.kind == Kind::Environment || (o.kind == Kind::Baseimage && (!o.spec.scripts.is_empty() || o.spec.interactive))
}

async fn driver(lc: &Lifecycle, rt: &Runtime) -> Result<(Arc<dyn Hypervisor>, String), Failure> {
    let (Some(node), Some(domain)) = (rt.node, rt.domain.clone()) else {
        return Err(Failure { reason: "the object has no VM".into(), runtime: rt.clone() });
    };
    let d = lc.inner.nodes.driver(node).await.map_err(|e| failed(rt, "node", e))?;
    Ok((d, domain))
}

async fn create(lc: &Lifecycle, o: &Object) -> Step {
    let mut rt = o.runtime.clone();
    match o.kind {
        Kind::Baseimage if !needs_own_vm(o) => Ok(rt),
        Kind::Baseimage => boot(lc, o, o.spec.template.clone().unwrap_or_default(), rt).await,
        Kind::Environment => {
            let parent = match o.parent {
                Some(p) => lc.object(p).await,
                None => None,
            };
            let template = parent.and_then(|p| p.spec.template).ok_or_else(|| failed(&rt, "clone", "the baseimage is gone"))?;
            boot(lc, o, template, rt).await
        }
        Kind::Deployment => {
            let (d, domain) = driver(lc, &rt).await?;
            timed(d.kind(), "revert", d.revert(&domain, ENVIRONMENT_SNAPSHOT)).await.map_err(|e| failed(&rt, "revert", e))?;
            wait_guest(lc, &*d, &domain).await.map_err(|e| failed(&rt, "guest", e))?;
            Ok(rt)
        }
        Kind::App => {
            let (d, domain) = driver(lc, &rt).await?;
            let snapshot = rt.snapshot.clone().ok_or_else(|| failed(&rt, "revert", "the deployment has no snapshot"))?;
            timed(d.kind(), "revert", d.revert(&domain, &snapshot)).await.map_err(|e| failed(&rt, "revert", e))?;
            match timed(d.kind(), "resume", d.resume(&domain)).await {
                Ok(()) | Err(DriverError::Unsupported(_)) => {}
                Err(e) => return Err(failed(&rt, "resume", e)),
            }
            wait_guest(lc, &*d, &domain).await.map_err(|e| failed(&rt, "guest", e))?;
            let command = o.spec.command.clone().unwrap_or_default();
            let out = timed(d.kind(), "app", d.exec(&domain, &command)).await.map_err(|e| failed(&rt, "app", e))?;
            let status = out.status;
            rt.runs.push(CommandRun { command, status: out.status, stdout: out.stdout, stderr: out.stderr });
            if status != 0 {
                return Err(Failure { reason: format!("the app's command exited with status {status}"), runtime: rt });
            }
            rt.console = Some(console(&*d, &domain, o).await.map_err(|e| failed(&rt, "console", e))?);
            Ok(rt)
        }
    }
}

/// Place, clone, start and wait for the guest. The placement and the domain are recorded as
/// soon as they exist, so a failure or a restart leaves nothing unaccounted for.
async fn boot(lc: &Lifecycle, o: &Object, template: String, mut rt: Runtime) -> Step {
    let key = vm_key(o.id);
    let spec =
        VmSpec { name: format!("{}{}-{}", crate::domain::lifecycle::DOMAIN_PREFIX, o.kind.name(), o.id), template, ..lc.inner.vm.clone() };
    let placed = lc.inner.nodes.place(&key, &spec).await.map_err(|e| failed(&rt, "placement", e))?;
    rt.node = Some(placed.node);
    let d = placed.driver;
    let domain = match timed(d.kind(), "clone", d.create(&spec)).await {
        Ok(domain) => domain,
        Err(e) => {
            lc.inner.nodes.free(&key);
            rt.node = None;
            return Err(failed(&rt, "clone", e));
        }
    };
    rt.domain = Some(domain.clone());
    if let Err(e) = lc.record(o.id, &rt).await {
        return Err(failed(&rt, "store", e));
    }
    let started = Instant::now();
    d.start(&domain).await.map_err(|e| failed(&rt, "start", e))?;
    wait_guest(lc, &*d, &domain).await.map_err(|e| failed(&rt, "boot", e))?;
    metrics::instantiation(d.kind(), "boot", started.elapsed());
    Ok(rt)
}

/// Poll the guest until it answers, with a growing interval, up to the boot deadline.
async fn wait_guest(lc: &Lifecycle, d: &dyn Hypervisor, domain: &str) -> Result<(), DriverError> {
    let deadline = tokio::time::Instant::now() + lc.inner.boot_timeout;
    let mut every = Duration::from_millis(5);
    loop {
        match d.ping(domain).await {
            Ok(_) => return Ok(()),
            Err(DriverError::NotReady) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(every).await; // poll interval, bounded by the deadline
                every = (every * 2).min(Duration::from_millis(500));
            }
            Err(DriverError::NotReady) => return Err(DriverError::Failed("the guest did not answer before the deadline".into())),
            Err(e) => return Err(e),
        }
    }
}

async fn console(d: &dyn Hypervisor, domain: &str, o: &Object) -> Result<ConsoleInfo, DriverError> {
    let c = d.console(domain).await?;
    Ok(ConsoleInfo { protocol: o.traits.protocol, host: c.host, port: c.port, password: c.password })
}

/// Run the scripts (an environment's host name first) through the command channel; a
/// non-zero status fails the phase with the output attached. Then, if the owner is to work in
/// the VM, fetch its console.
async fn config_auto(lc: &Lifecycle, o: &Object) -> Step {
    let mut rt = o.runtime.clone();
    if rt.domain.is_none() {
        return Ok(rt); // a baseimage with nothing to configure
    }
    let (d, domain) = driver(lc, &rt).await?;
    let mut commands: Vec<String> = o.spec.hostname.iter().map(|h| hostname_command(o.traits.os, h)).collect();
    commands.extend(o.spec.scripts.iter().cloned());
    for (i, command) in commands.into_iter().enumerate() {
        let out = d.exec(&domain, &command).await.map_err(|e| failed(&rt, "command channel", e))?;
        let status = out.status;
        rt.runs.push(CommandRun { command, status, stdout: out.stdout, stderr: out.stderr });
        if status != 0 {
            return Err(Failure { reason: format!("script {i} exited with status {status} (its output is in runs)"), runtime: rt });
        }
    }
    if o.spec.interactive {
        rt.console = Some(console(&*d, &domain, o).await.map_err(|e| failed(&rt, "console", e))?);
    }
    Ok(rt)
}

fn hostname_command(os: OsFamily, name: &str) -> String {
    match os {
        OsFamily::Windows => format!("powershell -NoProfile -Command Rename-Computer -NewName {name} -Force"),
        OsFamily::Linux | OsFamily::LinuxWine => format!("hostnamectl set-hostname {name}"),
    }
}

async fn finalize(lc: &Lifecycle, o: &Object) -> Step {
    let mut rt = o.runtime.clone();
    if rt.domain.is_none() {
        return Ok(rt);
    }
    let (d, domain) = driver(lc, &rt).await?;
    let name = match o.kind {
        Kind::Baseimage => {
            // Offline: the template's disk must be quiescent.
            d.stop(&domain).await.map_err(|e| failed(&rt, "stop", e))?;
            BASEIMAGE_SNAPSHOT.to_string()
        }
        Kind::Environment => ENVIRONMENT_SNAPSHOT.to_string(),
        // Live: the running guest's RAM is part of it, so an app starts in seconds.
        Kind::Deployment => format!("deployment-{}", o.id),
        Kind::App => return Ok(rt),
    };
    timed(d.kind(), "snapshot", d.snapshot(&domain, &name)).await.map_err(|e| failed(&rt, "snapshot", e))?;
    rt.snapshot = Some(name);
    Ok(rt)
}

/// Remove what the object holds on its node, then the object. A failure leaves it Failed,
/// with the reason, to be deleted again.
async fn delete(lc: &Lifecycle, o: &Object) {
    let rt = &o.runtime;
    let result = async {
        match o.kind {
            // An app runs on its deployment's snapshot and holds nothing of its own.
            Kind::App => Ok(()),
            Kind::Deployment => match (rt.domain.is_some(), &rt.snapshot) {
                (true, Some(snap)) => {
                    let (d, domain) = driver(lc, rt).await.map_err(|f| f.reason)?;
                    match d.delete_snapshot(&domain, snap).await {
                        Ok(()) | Err(DriverError::NotFound(_)) => Ok(()),
                        Err(e) => Err(format!("delete_snapshot: {e}")),
                    }
                }
                _ => Ok(()),
            },
            Kind::Baseimage | Kind::Environment if owns_vm(o) => {
                if rt.domain.is_some() {
                    let (d, domain) = driver(lc, rt).await.map_err(|f| f.reason)?;
                    d.destroy(&domain).await.map_err(|e| format!("destroy: {e}"))?;
                }
                lc.inner.nodes.free(&vm_key(o.id));
                Ok(())
            }
            _ => Ok(()),
        }
    }
    .await;
    match result {
        Ok(()) => {
            if let Err(e) = lc.forget(o.id).await {
                tracing::error!(object = o.id, error = %e, "cannot forget a deleted lifecycle object");
            }
        }
        Err(reason) => lc.fail(o.id, format!("delete failed: {reason}"), rt.clone()).await,
    }
}

async fn timed<T>(backend: &'static str, step: &'static str, f: impl Future<Output = Result<T, DriverError>>) -> Result<T, DriverError> {
    let started = Instant::now();
    let r = f.await;
    if r.is_ok() {
        metrics::instantiation(backend, step, started.elapsed());
    }
    r
}
