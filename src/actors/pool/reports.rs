//! Driver results fed back into the pool's rules: each driver report becomes one call of the
//! pure machine, plus what the shell keeps beside it (the VNC password a step rotated, the
//! Guacamole hooks of a VM that became ready, the record of a move).

use super::moves::MoveOutcome;
use super::{DriverReport, PoolManagerState};
use crate::domain::Millis;
use crate::domain::vm::VmState;

pub(super) fn apply_report(st: &mut PoolManagerState, r: DriverReport, now: Millis) {
    let pool = &mut st.pool;
    match r {
        DriverReport::Created { vm, op, placement } => pool.created(vm, op, placement, now),
        DriverReport::Booted { vm, op, address } => pool.booted(vm, op, address, now),
        DriverReport::BootFailed { vm, op, placement } => pool.boot_failed(vm, op, placement, now),
        DriverReport::Prepared { vm, op, ok, vnc_passwd } => {
            if let Some(pw) = vnc_passwd {
                pool.vnc_password(vm, op, pw);
            }
            let current = pool.vm(vm).is_some_and(|v| v.op == op && v.state == VmState::Wait);
            pool.prepared(vm, op, ok, now);
            if let (true, Some(hooks), Some(v)) = (ok && current, &st.args.hooks, pool.vm(vm)) {
                if matches!(v.state, VmState::Ready | VmState::Occupied) {
                    hooks.prepared(st.args.handle.name(), vm, &v.address);
                }
            }
        }
        DriverReport::Cleaned { vm, op, ok, vnc_passwd } => {
            if let Some(pw) = vnc_passwd {
                pool.vnc_password(vm, op, pw);
            }
            pool.cleaned(vm, op, ok, now)
        }
        DriverReport::Pinged { vm, ok } => pool.pinged(vm, ok, now),
        DriverReport::Moved { vm, op, outcome } => {
            if let Some(view) = st.moves.get_mut(&vm).filter(|v| v.status == "moving") {
                view.finish(&outcome, now);
            }
            match outcome {
                MoveOutcome::Done { placement, address } => pool.moved(vm, op, placement, address, now),
                MoveOutcome::Failed { restored, .. } => pool.move_failed(vm, op, restored, now),
            }
        }
    }
}
