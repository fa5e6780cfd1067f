//! `PoolHandle`: the only way in to a pool manager. Cloneable; it outlives restarts of the
//! actor (the supervisor swaps the actor inside its slot) and carries the pool's event windows
//! and its change counter, which live views wait on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{DriverReport, HandleView, PoolError, PoolMsg, Reply};
use crate::actors::events::EventHub;
use crate::actors::{CallError, Slot};
use crate::domain::pool::{PoolSnapshot, Resized};
use crate::domain::vm::VmState;
use crate::domain::{BatchId, HandleId, Millis, VmId};

struct PoolInner {
    name: String,
    slot: Slot<PoolMsg>,
    events: EventHub,
    timeout: Duration,
    /// Bumped after every commit that changed the pool: live views wait on it.
    version: tokio::sync::watch::Sender<u64>,
}

/// The way in to one pool. Cloneable; survives restarts of the pool manager.
#[derive(Clone)]
pub struct PoolHandle {
    inner: Arc<PoolInner>,
}

impl PoolHandle {
    pub fn new(name: &str, timeout: Duration) -> PoolHandle {
        let inner = PoolInner {
            name: name.to_string(),
            slot: Slot::new("pool manager"),
            events: EventHub::default(),
            timeout,
            version: tokio::sync::watch::channel(0).0,
        };
        PoolHandle { inner: Arc::new(inner) }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn events(&self) -> &EventHub {
        &self.inner.events
    }

    /// Whether this pool's manager runs in this process now.
    pub fn running(&self) -> bool {
        self.inner.slot.get().is_some()
    }

    pub(crate) fn slot(&self) -> &Slot<PoolMsg> {
        &self.inner.slot
    }

    /// A receiver that changes after every durable change of the pool.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    pub(super) fn bump(&self) {
        self.inner.version.send_modify(|v| *v += 1);
    }

    async fn call<T: Send + 'static>(&self, build: impl Fn(Reply<T>) -> PoolMsg) -> Result<T, PoolError> {
        self.inner.slot.call(build, self.inner.timeout).await?
    }

    pub async fn set_size(&self, min: u32, max: u32, linger: u64) -> Result<Resized, PoolError> {
        self.call(|reply| PoolMsg::SetSize { min, max, linger, reply }).await
    }

    pub async fn prepare_batch(&self, size: u32, home_page: &str) -> Result<BatchId, PoolError> {
        self.call(|reply| PoolMsg::PrepareBatch { size, home_page: home_page.to_string(), reply }).await
    }

    pub async fn lock(&self, batch: BatchId) -> Result<HandleId, PoolError> {
        self.call(|reply| PoolMsg::Lock { batch, reply }).await
    }

    pub async fn release(&self, handle: HandleId) -> Result<(), PoolError> {
        self.call(|reply| PoolMsg::Release { handle, reply }).await
    }

    pub async fn cancel_batch(&self, batch: BatchId) -> Result<(), PoolError> {
        self.call(|reply| PoolMsg::CancelBatch { batch, reply }).await
    }

    pub async fn renew_expire(&self, handle: HandleId, ms: u64) -> Result<Millis, PoolError> {
        self.call(|reply| PoolMsg::RenewExpire { handle, ms, reply }).await
    }

    pub async fn shutdown(&self) -> Result<(), PoolError> {
        self.call(|reply| PoolMsg::Shutdown { reply }).await
    }

    /// Begin moving a FREE or READY VM to node `to`; answered once the move has begun (the VM
    /// is in WAIT and stays there until it runs on `to`, or again where it was).
    pub async fn move_vm(&self, vm: crate::domain::VmId, to: crate::domain::NodeId) -> Result<super::moves::MoveView, PoolError> {
        self.call(|reply| PoolMsg::MoveVm { vm, to, reply }).await
    }

    /// The VM's last move since the pool manager started.
    pub async fn move_status(&self, vm: crate::domain::VmId) -> Result<Option<super::moves::MoveView>, PoolError> {
        self.call(|reply| PoolMsg::MoveStatus { vm, reply }).await
    }

    pub async fn status(&self) -> Result<PoolSnapshot, PoolError> {
        self.call(|reply| PoolMsg::Status { reply }).await
    }

    pub async fn handle_status(&self, handle: HandleId) -> Result<HandleView, PoolError> {
        self.call(|reply| PoolMsg::HandleStatus { handle, reply }).await
    }

    /// The handle's status once it is assigned, or as it is after `wait`.
    pub async fn wait_assigned(&self, handle: HandleId, wait: Duration) -> Result<HandleView, PoolError> {
        match self.inner.slot.call(|reply| PoolMsg::WaitAssigned { handle, reply }, wait).await {
            Ok(r) => r,
            Err(CallError::Timeout(_)) => self.handle_status(handle).await,
            Err(e) => Err(e.into()),
        }
    }

    pub fn report(&self, r: DriverReport) {
        if !self.inner.slot.cast(PoolMsg::Report(r)) {
            tracing::debug!(pool = %self.inner.name, "driver report dropped: pool manager not running");
        }
    }

    /// Fault injection (tests): make the pool manager panic.
    #[doc(hidden)]
    /// A node's state changed; the pool adjusts how it uses the VMs there.
    pub fn node_use(&self, node: crate::domain::NodeId, usage: crate::domain::node::NodeUse) {
        self.inner.slot.cast(PoolMsg::NodeUse { node, usage });
    }

    /// A reconnected agent listed its domains; VMs of this pool there that it lacks are gone.
    pub fn domains_reported(&self, node: crate::domain::NodeId, domains: std::collections::BTreeSet<String>) {
        self.inner.slot.cast(PoolMsg::DomainsReported { node, domains });
    }

    pub fn inject_crash(&self) {
        self.inner.slot.cast(PoolMsg::Crash);
    }

    /// Fault injection (tests): make the session of `vm` panic.
    #[doc(hidden)]
    pub fn inject_session_crash(&self, vm: VmId) {
        self.inner.slot.cast(PoolMsg::CrashSession(vm));
    }

    /// Counts of this pool's VMs by state (for dashboards and tests).
    pub async fn vm_states(&self) -> Result<HashMap<VmState, usize>, PoolError> {
        let mut m = HashMap::new();
        for v in self.status().await?.vms {
            *m.entry(v.state).or_default() += 1;
        }
        Ok(m)
    }
}
