//! Claims on VMs: a VM is handed to a handle only once the coordinator has recorded that
//! handle's claim on it, so two managers of one pool that both believe they hold its lease (one
//! of them paused past its expiry) cannot hand one VM to two users; the store's fence then
//! refuses the stale manager's commit. The store is the truth: a claim held by a handle the
//! pool does not have on that VM (an earlier holder's assignment that was never committed, or a
//! release that did not reach the coordinator) is stale and is released before claiming.

use crate::coord::{Claim, CoordError, Coordinator};
use crate::domain::{HandleId, VmId};

use super::PoolManagerState;

/// Claim again every VM the restored pool has handed out: a new manager (restart, takeover)
/// starts with the claims the store says it has. Fails the start if the coordinator is away.
pub(super) async fn restore(st: &mut PoolManagerState) -> Result<(), ractor::ActorProcessingErr> {
    let held: Vec<(HandleId, VmId)> = st.pool.handles().filter_map(|h| Some((h.id, h.vm?))).collect();
    for (handle, vm) in held {
        let claim = claim(st, vm, handle).await.map_err(|e| format!("cannot claim VM {vm} for handle {handle} again: {e}"))?;
        st.claims.insert(vm, claim);
    }
    Ok(())
}

/// Claim `vm` for `handle`, releasing a stale claim in the way.
/// (Not an `async fn`: the future must not borrow the state, which is not `Sync`.)
pub(super) fn claim(st: &PoolManagerState, vm: VmId, handle: HandleId) -> impl Future<Output = Result<Claim, CoordError>> + Send + 'static {
    // Which other handle, if any, the pool says holds the VM (the rules never allow one).
    let rightful = st.pool.handles().find(|h| h.vm == Some(vm) && h.id != handle).map(|h| h.id.to_string());
    claim_with(st.args.coord.clone(), st.args.handle.name().to_string(), vm, handle, rightful)
}

async fn claim_with(
    coord: std::sync::Arc<dyn Coordinator>,
    pool: String,
    vm: VmId,
    handle: HandleId,
    rightful: Option<String>,
) -> Result<Claim, CoordError> {
    let (pool, vm_key, handle_key) = (pool.as_str(), vm.to_string(), handle.to_string());
    match coord.claim_vm(pool, &vm_key, &handle_key).await {
        Err(CoordError::Taken) => {
            let Some((other, token)) = coord.vm_holder(pool, &vm_key).await? else {
                return coord.claim_vm(pool, &vm_key, &handle_key).await;
            };
            if rightful.as_deref() == Some(other.as_str()) {
                return Err(CoordError::Taken);
            }
            tracing::info!(pool, vm, stale_handle = %other, "releasing a stale claim");
            let stale = Claim { pool: pool.to_string(), vm: vm_key.clone(), handle: other, token };
            match coord.release_vm(&stale).await {
                Ok(()) | Err(CoordError::Lost) => {}
                Err(e) => return Err(e),
            }
            coord.claim_vm(pool, &vm_key, &handle_key).await
        }
        r => r,
    }
}

/// Free the claim of the VM `handle` held, in the background: a release that does not reach
/// the coordinator leaves a stale claim, which the next claim of the VM clears.
pub(super) fn release(st: &mut PoolManagerState, handle: HandleId) {
    let key = handle.to_string();
    let Some(vm) = st.claims.iter().find(|(_, c)| c.handle == key).map(|(vm, _)| *vm) else { return };
    let Some(claim) = st.claims.remove(&vm) else { return };
    let coord: std::sync::Arc<dyn Coordinator> = st.args.coord.clone();
    tokio::spawn(async move {
        if let Err(e) = coord.release_vm(&claim).await {
            tracing::debug!(pool = %claim.pool, vm = %claim.vm, error = %e, "claim not released; the next claim clears it");
        }
    });
}
