//! `SessionActor`: one per VM. It carries out what the pool's rules decide for that VM (boot,
//! prepare, clean up, kill) and pings the guest on an interval. Every hypervisor call runs in
//! a spawned task that reports its result to the pool (through the `PoolHandle`, so results
//! survive a restart of either actor) tagged with the operation number the rules gave it.
//! A restarted session picks up its VM from the placement the pool stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::node::{NodeRegistryHandle, VmKey};
use super::pool::{DriverReport, PoolHandle};
use crate::domain::VmId;
use crate::domain::vm::{Placement, VmAddress};
use crate::drivers::{CLEAN_SNAPSHOT, DriverError, Hypervisor, PrepareSpec, VmSpec};

pub enum SessionMsg {
    Boot {
        op: u64,
    },
    Prepare {
        op: u64,
        spec: PrepareSpec,
    },
    Cleanup {
        op: u64,
    },
    /// The VM has left the pool: destroy it, free its node's capacity, stop.
    Kill,
    PingTick,
    PingDone,
    /// A boot task placed the VM.
    Placed {
        placement: Placement,
        driver: Arc<dyn Hypervisor>,
    },
    /// Destroy finished; the session ends.
    Destroyed,
    /// Fault injection for supervision tests.
    Crash,
}

pub struct SessionArgs {
    pub vm: VmId,
    pub pool: PoolHandle,
    pub nodes: NodeRegistryHandle,
    pub spec: VmSpec,
    /// Set when the VM already exists (restart): the session re-attaches to it.
    pub placement: Option<Placement>,
    pub ping_interval: Duration,
    /// How long a booting guest may take to answer its first ping.
    pub boot_timeout: Duration,
}

pub struct SessionState {
    args: SessionArgs,
    key: VmKey,
    driver: Option<Arc<dyn Hypervisor>>,
    pinging: bool,
    killing: bool,
}

impl SessionState {
    fn domain(&self) -> Option<(String, Arc<dyn Hypervisor>)> {
        Some((self.args.placement.as_ref()?.domain.clone(), self.driver.clone()?))
    }
}

pub struct SessionActor;

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(&self, me: ActorRef<SessionMsg>, args: SessionArgs) -> Result<SessionState, ActorProcessingErr> {
        me.send_interval(args.ping_interval, || SessionMsg::PingTick);
        let key = VmKey { pool: args.pool.name().to_string(), vm: args.vm };
        let mut st = SessionState { args, key, driver: None, pinging: false, killing: false };
        if let Some(p) = &st.args.placement {
            // Re-attach to a VM that already runs (the pool claimed its capacity on restore).
            match st.args.nodes.driver(p.node).await {
                Ok(d) => st.driver = Some(d),
                Err(e) => tracing::warn!(vm = st.args.vm, node.id = p.node, error = %e, "session cannot re-attach to its node"),
            }
        }
        Ok(st)
    }

    async fn handle(&self, me: ActorRef<SessionMsg>, msg: SessionMsg, st: &mut SessionState) -> Result<(), ActorProcessingErr> {
        let vm = st.args.vm;
        match msg {
            SessionMsg::Boot { op } => {
                let (pool, nodes, spec, timeout) =
                    (st.args.pool.clone(), st.args.nodes.clone(), st.args.spec.clone(), st.args.boot_timeout);
                tokio::spawn(boot(me, st.key.clone(), op, pool, nodes, spec, timeout));
            }
            SessionMsg::Placed { placement, driver } => {
                st.args.placement = Some(placement);
                st.driver = Some(driver);
                if st.killing {
                    destroy(&me, st);
                }
            }
            SessionMsg::Prepare { op, spec } => {
                let pool = st.args.pool.clone();
                match st.domain() {
                    Some((domain, driver)) => {
                        tokio::spawn(async move {
                            let r = driver.prepare(&domain, &spec).await;
                            log_failure(vm, "prepare", &r);
                            let vnc_passwd = vnc_password(&driver, &domain, &r).await;
                            pool.report(DriverReport::Prepared { vm, op, ok: r.is_ok(), vnc_passwd });
                        });
                    }
                    None => pool.report(DriverReport::Prepared { vm, op, ok: false, vnc_passwd: None }),
                }
            }
            SessionMsg::Cleanup { op } => {
                let pool = st.args.pool.clone();
                match st.domain() {
                    Some((domain, driver)) => {
                        tokio::spawn(async move {
                            // Revert to the clean snapshot instead of rebooting: seconds, not minutes.
                            let t = Instant::now();
                            let r = driver.revert(&domain, CLEAN_SNAPSHOT).await;
                            if r.is_ok() {
                                crate::metrics::instantiation(driver.kind(), "revert", t.elapsed());
                            }
                            log_failure(vm, "cleanup", &r);
                            let vnc_passwd = vnc_password(&driver, &domain, &r).await;
                            pool.report(DriverReport::Cleaned { vm, op, ok: r.is_ok(), vnc_passwd });
                        });
                    }
                    None => pool.report(DriverReport::Cleaned { vm, op, ok: false, vnc_passwd: None }),
                }
            }
            SessionMsg::Kill => {
                st.killing = true;
                if st.args.placement.is_some() {
                    destroy(&me, st);
                } else {
                    // Not placed yet. If the boot task still creates the domain, its `Created`
                    // report reaches a pool that no longer has the VM, and the pool's rules
                    // destroy it (`Effect::Destroy`), freeing its reservation.
                    me.stop(None);
                }
            }
            SessionMsg::PingTick => {
                if st.pinging || st.killing {
                    return Ok(());
                }
                if let Some((domain, driver)) = st.domain() {
                    st.pinging = true;
                    let pool = st.args.pool.clone();
                    tokio::spawn(async move {
                        let ok = driver.ping(&domain).await.is_ok();
                        pool.report(DriverReport::Pinged { vm, ok });
                        let _ = me.cast(SessionMsg::PingDone);
                    });
                }
            }
            SessionMsg::PingDone => st.pinging = false,
            SessionMsg::Destroyed => me.stop(None),
            SessionMsg::Crash => panic!("injected session crash (vm {vm})"),
        }
        Ok(())
    }
}

fn destroy(me: &ActorRef<SessionMsg>, st: &mut SessionState) {
    let Some(placement) = st.args.placement.take() else {
        me.stop(None);
        return;
    };
    // Only one destroy per session: the placement is taken.
    let (nodes, key, driver, me) = (st.args.nodes.clone(), st.key.clone(), st.driver.clone(), me.clone());
    tokio::spawn(async move {
        destroy_domain(&nodes, &key, &placement, driver).await;
        let _ = me.cast(SessionMsg::Destroyed);
    });
}

/// Destroy a domain and free what its VM reserved. Without a driver at hand (a session that
/// could not re-attach), the node registry is asked for one.
pub(crate) async fn destroy_domain(nodes: &NodeRegistryHandle, key: &VmKey, placement: &Placement, driver: Option<Arc<dyn Hypervisor>>) {
    let driver = match driver {
        Some(d) => Some(d),
        None => nodes.driver(placement.node).await.ok(),
    };
    match driver {
        Some(d) => log_failure(key.vm, "destroy", &d.destroy(&placement.domain).await),
        None => {
            tracing::warn!(vm = key.vm, node.id = placement.node, domain = %placement.domain, "cannot reach the node to destroy a domain")
        }
    }
    nodes.free(key);
}

fn log_failure<T>(vm: VmId, what: &str, r: &Result<T, DriverError>) {
    if let Err(e) = r {
        tracing::warn!(vm, op = what, error = %e, "hypervisor operation failed");
    }
}

async fn boot(me: ActorRef<SessionMsg>, key: VmKey, op: u64, pool: PoolHandle, nodes: NodeRegistryHandle, spec: VmSpec, timeout: Duration) {
    let vm = key.vm;
    // The domain's name carries the pool and the VM id, so an operator can tell VMs apart in
    // `virsh list` and the driver can tie a fixed address to it.
    let spec = VmSpec { name: format!("{}-{}", key.pool, key.vm), ..spec };
    let placed = match nodes.place(&key, &spec).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(vm, error = %e, "no node for a new VM");
            return pool.report(DriverReport::BootFailed { vm, op, placement: None });
        }
    };
    let backend = placed.driver.kind();
    let t = Instant::now();
    let domain = match placed.driver.create(&spec).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(vm, node.id = placed.node, error = %e, "create failed");
            nodes.failed(placed.node);
            nodes.free(&key);
            return pool.report(DriverReport::BootFailed { vm, op, placement: None });
        }
    };
    crate::metrics::instantiation(backend, "clone", t.elapsed());
    let placement = Placement { node: placed.node, domain: domain.clone() };
    let _ = me.cast(SessionMsg::Placed { placement: placement.clone(), driver: placed.driver.clone() });
    pool.report(DriverReport::Created { vm, op, placement: placement.clone() });
    let driver = placed.driver;
    let fail = |why: String| {
        tracing::warn!(vm, node.id = placed.node, error = %why, "boot failed");
        nodes.failed(placed.node);
        pool.report(DriverReport::BootFailed { vm, op, placement: Some(placement.clone()) });
    };
    let t = Instant::now();
    if let Err(e) = driver.start(&domain).await {
        return fail(e.to_string());
    }
    // Wait for the guest to check in, polling with a growing interval.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut every = Duration::from_millis(5);
    let guest = loop {
        match driver.ping(&domain).await {
            Ok(g) => break g,
            Err(DriverError::NotReady) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(every).await;
                every = (every * 2).min(Duration::from_millis(500));
            }
            Err(e) => return fail(e.to_string()),
        }
    };
    crate::metrics::instantiation(backend, "boot", t.elapsed());
    let t = Instant::now();
    if let Err(e) = driver.snapshot(&domain, CLEAN_SNAPSHOT).await {
        return fail(e.to_string());
    }
    crate::metrics::instantiation(backend, "snapshot", t.elapsed());
    let console = match driver.console(&domain).await {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let address = VmAddress { ip: guest.ip, public_ip: placed.address, vnc_port: console.port, vnc_passwd: console.password };
    pool.report(DriverReport::Booted { vm, op, address });
}

/// After a step that succeeded, the VNC password as the driver has it now (some drivers give
/// every user a new one).
async fn vnc_password<T>(
    driver: &std::sync::Arc<dyn crate::drivers::Hypervisor>,
    domain: &str,
    step: &Result<T, crate::drivers::DriverError>,
) -> Option<String> {
    if step.is_err() {
        return None;
    }
    driver.console(domain).await.ok().map(|c| c.password)
}
