//! The pool manager's hands: carrying out one effect of the rules (a session told to boot,
//! prepare, clean up or die; a notice queued until its commit is durable; a ledger row), and
//! turning the rows the rules marked dirty into store changes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{ActorProcessingErr, ActorRef};
use serde_json::json;

use super::{DriverReport, PoolError, PoolManagerState, PoolMsg, key, spawn_session, view};
use crate::actors::session::{SessionMsg, destroy_domain};
use crate::domain::Millis;
use crate::domain::pool::{Effect, Handle, HandleEnd, PoolInputError};
use crate::drivers::PrepareSpec;
use crate::metrics;
use crate::store::{Change, ServedRecord};

pub(super) async fn run_effect(
    me: &ActorRef<PoolMsg>,
    st: &mut PoolManagerState,
    effect: Effect,
    now: Millis,
) -> Result<(), ActorProcessingErr> {
    let pool_name = st.args.handle.name().to_string();
    if let Some(hooks) = &st.args.hooks {
        match &effect {
            Effect::Cleanup { vm, .. } | Effect::Kill { vm, .. } | Effect::Destroy { vm, .. } => hooks.cleaned(&pool_name, *vm),
            Effect::Served { vm, .. } => hooks.released(&pool_name, *vm),
            _ => {}
        }
    }
    match effect {
        Effect::Boot { vm, op } => {
            let session = spawn_session(me, st, vm, None).await?;
            session.cast(SessionMsg::Boot { op })?;
        }
        Effect::Prepare { vm, op, home_page, profile_name, .. } => match st.sessions.get(&vm) {
            Some(s) => s.cast(SessionMsg::Prepare { op, spec: PrepareSpec { home_page, profile_name } })?,
            None => st.args.handle.report(DriverReport::Prepared { vm, op, ok: false, vnc_passwd: None }),
        },
        Effect::Cleanup { vm, op } => match st.sessions.get(&vm) {
            Some(s) => s.cast(SessionMsg::Cleanup { op })?,
            None => st.args.handle.report(DriverReport::Cleaned { vm, op, ok: false, vnc_passwd: None }),
        },
        Effect::Kill { vm, placement } => match st.sessions.remove(&vm) {
            Some(s) => {
                let _ = s.cast(SessionMsg::Kill);
            }
            None => {
                if let Some(p) = placement {
                    let (nodes, k) = (st.args.nodes.clone(), key(&st.args, vm));
                    tokio::spawn(async move { destroy_domain(&nodes, &k, &p, None).await });
                }
            }
        },
        Effect::Destroy { vm, placement } => {
            tracing::info!(pool = %pool_name, vm, domain = %placement.domain, "destroying a domain made for a VM no longer in the pool");
            let (nodes, k) = (st.args.nodes.clone(), key(&st.args, vm));
            tokio::spawn(async move { destroy_domain(&nodes, &k, &placement, None).await });
        }
        Effect::Assigned { handle, vm, locked_at } => {
            match super::claims::claim(st, vm, handle).await {
                Ok(c) => {
                    st.claims.insert(vm, c);
                }
                // Without the claim the assignment must not be committed: the manager stops
                // before this commit and starts again from the store once the coordinator
                // answers (or its lease is confirmed).
                Err(e) => {
                    st.stopping.get_or_insert_with(|| format!("cannot claim VM {vm} for handle {handle}: {e}"));
                    return Ok(());
                }
            }
            let events = st.args.handle.events().clone();
            let waiters = st.waiters.remove(&handle).unwrap_or_default();
            let v = view(&st.pool, handle).ok();
            // Precise when the lock arrived in this incarnation; from the stored ms otherwise.
            let waited = match st.locked_at.remove(&handle) {
                Some(at) => at.elapsed(),
                None => Duration::from_millis(now.saturating_sub(locked_at)),
            };
            metrics::lock_to_assigned(&pool_name, waited);
            st.after_commit.push(Box::new(move || {
                events.push(handle, json!({"type": "assigned", "vmid": vm}), now);
                for w in waiters {
                    let _ = w.send(v.clone().ok_or(PoolError::Input(PoolInputError::UnknownHandle(handle))));
                }
            }));
        }
        Effect::SessionEnding { handle, ends_at } => {
            let events = st.args.handle.events().clone();
            st.after_commit.push(Box::new(move || events.push(handle, json!({"type": "session-ending", "endsAt": ends_at}), now)));
        }
        Effect::Served { handle, vm, node, from, to } => {
            let cores = st.args.vm_spec.cores;
            st.ledger.push(Change::Served(ServedRecord {
                node_id: node,
                pool: pool_name,
                handle,
                vm,
                cores,
                started_at: from,
                ended_at: to,
            }));
        }
        Effect::Move { vm, op, from, to, live } => {
            let job = super::moves::MoveJob {
                key: key(&st.args, vm),
                op,
                from,
                to,
                live,
                spec: st.args.vm_spec.clone(),
                boot_timeout: Duration::from_millis(st.args.rules.timeouts.booting),
                images: st.args.images.clone(),
                nodes: st.args.nodes.clone(),
                pool: st.args.handle.clone(),
                session: st.sessions.get(&vm).cloned(),
            };
            tokio::spawn(super::moves::run(job));
        }
        Effect::HandleEnded { handle, why } => {
            if why == HandleEnd::Released {
                metrics::release(&pool_name);
            }
            st.locked_at.remove(&handle);
            super::claims::release(st, handle);
            let events = st.args.handle.events().clone();
            let waiters = st.waiters.remove(&handle).unwrap_or_default();
            st.after_commit.push(Box::new(move || {
                let kind = serde_json::to_value(why).unwrap_or_default();
                events.push(handle, json!({"type": kind}), now);
                events.close(handle, now);
                for w in waiters {
                    let _ = w.send(Err(PoolError::Input(PoolInputError::UnknownHandle(handle))));
                }
            }));
        }
    }
    Ok(())
}

/// The rows the last event changed, as store changes.
pub(super) fn changes(st: &mut PoolManagerState) -> Vec<Change> {
    let pool = st.args.handle.name().to_string();
    let dirty = st.pool.take_dirty();
    let snap_row = {
        let s = &st.pool;
        Change::Pool {
            pool: pool.clone(),
            size: s.size(),
            next_vm: s.next_vm,
            next_batch: s.next_batch,
            next_handle: s.next_handle,
            preps: s.preps().copied().collect(),
            pending: s.pending().copied().collect(),
        }
    };
    let mut out = std::mem::take(&mut st.ledger);
    if st.written_row.as_ref() != Some(&snap_row) {
        st.written_row = Some(snap_row.clone());
        out.push(snap_row);
    }
    for id in dirty.vms {
        out.push(match st.pool.vm(id) {
            Some(vm) => Change::Vm { pool: pool.clone(), vm: vm.clone() },
            None => Change::VmDeleted { pool: pool.clone(), id },
        });
    }
    for id in dirty.batches {
        out.push(match st.pool.batch(id) {
            Some(b) => Change::Batch { pool: pool.clone(), batch: b.clone() },
            None => Change::BatchDeleted { pool: pool.clone(), id },
        });
    }
    for id in dirty.handles {
        out.push(match st.pool.handle(id) {
            Some(h) => Change::Handle { pool: pool.clone(), handle: h.clone() },
            None => Change::HandleDeleted { pool: pool.clone(), id },
        });
    }
    out
}

/// Remember which commit last wrote each handle; forget the ones long durable.
pub(super) fn note_handles(st: &mut PoolManagerState, changes: &[Change], seq: u64) {
    for c in changes {
        if let Change::Handle { handle: Handle { id, .. }, .. } | Change::HandleDeleted { id, .. } = c {
            st.handle_written.insert(*id, seq);
        }
    }
    if st.handle_written.len() > 4096 {
        let durable = st.durable.load(Ordering::Acquire);
        st.handle_written.retain(|_, s| *s > durable);
    }
}
