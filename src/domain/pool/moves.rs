//! Moving a VM to another node (cold: its domain is stopped, its disk copied, and it starts
//! again on the new node from its clean snapshot's disk).
//!
//! Only FREE and READY VMs move: nobody is using them, and both are a clean VM (a READY one
//! plus its batch's preparation, which is done again on the new node). An OCCUPIED VM would
//! lose its user's running session. While it moves the VM is in WAIT, so no rule hands it out
//! or prepares it, and the WAIT timeout does not apply: the mover has its own deadline and
//! always reports. A move's result carries its operation number like every driver result; a
//! VM that left the pool meanwhile makes the new domain a stray, destroyed like any other.

use super::{Effect, PoolInputError, PoolState};
use crate::domain::vm::{Placement, VmAddress, VmState};
use crate::domain::{Millis, NodeId, VmId};

/// A move in flight: where to, and what the VM was before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Moving {
    pub op: u64,
    pub to: NodeId,
    pub was: VmState,
}

/// What `start_move` began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveStarted {
    pub vm: VmId,
    pub op: u64,
    pub from: Placement,
    pub to: NodeId,
}

impl PoolState {
    /// Begin moving `vm` to node `to`: the VM enters WAIT and `Effect::Move` asks the shell to
    /// carry it out. Refused, changing nothing, unless the VM is FREE or READY, placed, not
    /// already moving, and on another node.
    pub fn start_move(&mut self, vm: VmId, to: NodeId, now: Millis) -> Result<MoveStarted, PoolInputError> {
        let invalid = |reason: String| PoolInputError::Invalid { field: "vm", reason };
        let v = self.vms.get(&vm).ok_or(PoolInputError::UnknownVm(vm))?;
        if self.moves.contains_key(&vm) {
            return Err(invalid(format!("VM {vm} is already moving")));
        }
        if !matches!(v.state, VmState::Free | VmState::Ready) {
            return Err(invalid(format!("VM {vm} is {}: only a free or ready VM can move (nobody is using it)", v.state.name())));
        }
        let from = v.placement.clone().ok_or_else(|| invalid(format!("VM {vm} has no domain yet")))?;
        if from.node == to {
            return Err(PoolInputError::Invalid { field: "node", reason: format!("VM {vm} already runs on node {to}") });
        }
        let was = v.state;
        let op = self.new_op();
        let v = self.vms.get_mut(&vm).expect("checked above");
        v.op = op;
        v.enter(VmState::Wait, now);
        self.dirty.vms.insert(vm);
        self.moves.insert(vm, Moving { op, to, was });
        self.effects.push(Effect::Move { vm, op, from: from.clone(), to });
        self.run(now);
        Ok(MoveStarted { vm, op, from, to })
    }

    /// Whether `vm` is on its way to another node.
    pub fn is_moving(&self, vm: VmId) -> bool {
        self.moves.contains_key(&vm)
    }

    /// The move ended with the VM running on its new node as a clean VM.
    pub fn moved(&mut self, vm: VmId, op: u64, placement: Placement, address: VmAddress, now: Millis) {
        let current = self.vm_in(vm, op, VmState::Wait).is_some() && self.moves.get(&vm).is_some_and(|m| m.op == op);
        if !current {
            self.destroy_stray_domain(vm, placement);
            self.run(now);
            return;
        }
        let m = self.moves.remove(&vm).expect("checked above");
        let v = self.vms.get_mut(&vm).expect("checked above");
        v.placement = Some(placement);
        v.address = address;
        self.resume_after_move(vm, m, now);
    }

    /// The move failed. `restored`: the VM runs again on its old node as a clean VM (the
    /// mover reverted it); otherwise it is in ERROR and is replaced like any broken VM.
    pub fn move_failed(&mut self, vm: VmId, op: u64, restored: bool, now: Millis) {
        let current = self.vm_in(vm, op, VmState::Wait).is_some() && self.moves.get(&vm).is_some_and(|m| m.op == op);
        if current {
            let m = self.moves.remove(&vm).expect("checked above");
            if restored {
                self.resume_after_move(vm, m, now);
            } else {
                self.vms.get_mut(&vm).expect("checked above").enter(VmState::Error, now);
                self.dirty.vms.insert(vm);
            }
        }
        self.run(now);
    }

    /// A clean VM again: FREE, or prepared anew for the batch it was READY for (if the batch
    /// still counts on it).
    fn resume_after_move(&mut self, vm: VmId, m: Moving, now: Millis) {
        self.dirty.vms.insert(vm);
        let batch = self.vms.get(&vm).and_then(|v| v.batch);
        let listed = batch.filter(|b| self.batches.get(b).is_some_and(|b| b.vms.contains(&vm)));
        match (m.was, listed) {
            (VmState::Ready, Some(b)) => {
                self.batches.get_mut(&b).expect("checked above").vms.retain(|v| *v != vm);
                self.prepare_vm(vm, b, now);
            }
            _ => {
                let v = self.vms.get_mut(&vm).expect("caller checked the VM");
                v.batch = None;
                v.enter(VmState::Free, now);
            }
        }
        self.run(now);
    }

    /// A domain made by a move whose VM left the pool (or moved on) meanwhile.
    fn destroy_stray_domain(&mut self, vm: VmId, placement: Placement) {
        if self.vms.get(&vm).and_then(|v| v.placement.as_ref()) != Some(&placement) {
            self.effects.push(Effect::Destroy { vm, placement });
        }
    }
}
