//! Moving a VM to another node.
//!
//! FREE and READY VMs move cold: their domain is stopped, its disk copied, and it starts again
//! on the new node from its clean snapshot's disk. Nobody is using them, and both are a clean
//! VM (a READY one plus its batch's preparation, which is done again on the new node). While
//! it moves the VM is in WAIT, so no rule hands it out or prepares it.
//!
//! OCCUPIED VMs move live (the hypervisor migrates the running guest, so its user's session
//! goes on): the VM stays OCCUPIED with its handle. Its clean snapshot does not travel, so once
//! its user leaves it is replaced rather than cleaned. A user who leaves during the move puts
//! it in WAIT until the move ends: then it is replaced (moved) or cleaned where it was.
//!
//! No timeout applies to a moving VM: the mover has its own deadline and always reports. A
//! move's result carries its operation number; a VM that left the pool meanwhile makes the new
//! domain a stray, destroyed like any other.

use super::{Effect, PoolInputError, PoolState};
use crate::domain::vm::{Placement, VmAddress, VmState};
use crate::domain::{Millis, NodeId, VmId};

/// A move in flight: where to, and what the VM was before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Moving {
    pub op: u64,
    pub to: NodeId,
    pub was: VmState,
    /// Moved running (the VM was OCCUPIED).
    pub live: bool,
    /// Its user left during the live move.
    pub released: bool,
}

/// What `start_move` began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveStarted {
    pub vm: VmId,
    pub op: u64,
    pub from: Placement,
    pub to: NodeId,
    pub live: bool,
}

impl PoolState {
    /// Begin moving `vm` to node `to`: `Effect::Move` asks the shell to carry it out, cold for
    /// a FREE or READY VM (which enters WAIT), live for an OCCUPIED one (which stays so).
    /// Refused, changing nothing, unless the VM is one of those, placed, not already moving,
    /// and on another node.
    pub fn start_move(&mut self, vm: VmId, to: NodeId, now: Millis) -> Result<MoveStarted, PoolInputError> {
        let invalid = |reason: String| PoolInputError::Invalid { field: "vm", reason };
        let v = self.vms.get(&vm).ok_or(PoolInputError::UnknownVm(vm))?;
        if self.moves.contains_key(&vm) {
            return Err(invalid(format!("VM {vm} is already moving")));
        }
        if !matches!(v.state, VmState::Free | VmState::Ready | VmState::Occupied) {
            return Err(invalid(format!("VM {vm} is {}: only a free, ready or occupied VM can move", v.state.name())));
        }
        let from = v.placement.clone().ok_or_else(|| invalid(format!("VM {vm} has no domain yet")))?;
        if from.node == to {
            return Err(PoolInputError::Invalid { field: "node", reason: format!("VM {vm} already runs on node {to}") });
        }
        let was = v.state;
        let live = was == VmState::Occupied;
        let op = self.new_op();
        if !live {
            let v = self.vms.get_mut(&vm).expect("checked above");
            v.op = op;
            v.enter(VmState::Wait, now);
            self.dirty.vms.insert(vm);
        }
        self.moves.insert(vm, Moving { op, to, was, live, released: false });
        self.effects.push(Effect::Move { vm, op, from: from.clone(), to, live });
        self.run(now);
        Ok(MoveStarted { vm, op, from, to, live })
    }

    /// The move of `vm` in flight with operation `op`, if that is the current one.
    fn current_move(&mut self, vm: VmId, op: u64) -> Option<Moving> {
        let m = *self.moves.get(&vm).filter(|m| m.op == op)?;
        let cold_waits = m.live || self.vm_in(vm, op, VmState::Wait).is_some();
        (self.vms.contains_key(&vm) && cold_waits).then_some(m)
    }

    /// The user of `vm` left. An OCCUPIED VM is cleaned up, unless it is moving live (it waits
    /// for the move's end) or was moved live (replaced: its clean snapshot stayed behind).
    pub(crate) fn vm_released(&mut self, vm: VmId, now: Millis) {
        if !self.vms.get(&vm).is_some_and(|v| v.state == VmState::Occupied) {
            return;
        }
        if let Some(m) = self.moves.get_mut(&vm).filter(|m| m.live) {
            m.released = true;
            self.vms.get_mut(&vm).expect("checked above").enter(VmState::Wait, now);
            self.dirty.vms.insert(vm);
        } else if self.moved_live.contains(&vm) {
            self.kill(vm, now);
        } else {
            self.start_cleanup(vm, now);
        }
    }

    /// Whether `vm` is on its way to another node.
    pub fn is_moving(&self, vm: VmId) -> bool {
        self.moves.contains_key(&vm)
    }

    /// The move ended with the VM running on its new node: as a clean VM (cold), or as it was,
    /// with its user (live).
    pub fn moved(&mut self, vm: VmId, op: u64, placement: Placement, address: VmAddress, now: Millis) {
        let Some(m) = self.current_move(vm, op) else {
            self.destroy_stray_domain(vm, placement);
            self.run(now);
            return;
        };
        self.moves.remove(&vm);
        let v = self.vms.get_mut(&vm).expect("checked by current_move");
        v.placement = Some(placement);
        v.address = address;
        // Heard of just now: a health window from here (pings skipped it while it moved).
        v.contact = now;
        self.dirty.vms.insert(vm);
        match (m.live, m.released) {
            (false, _) => return self.resume_after_move(vm, m, now),
            (true, false) => {
                self.moved_live.insert(vm);
            }
            (true, true) => self.kill(vm, now),
        }
        self.run(now);
    }

    /// The move failed. `restored`: the VM runs again on its old node as it was (cold: a clean
    /// VM again, the mover reverted it); otherwise it is in ERROR (cold) or killed (live: its
    /// user loses it) and is replaced like any broken VM.
    pub fn move_failed(&mut self, vm: VmId, op: u64, restored: bool, now: Millis) {
        if let Some(m) = self.current_move(vm, op) {
            self.moves.remove(&vm);
            match (m.live, restored) {
                (false, true) => return self.resume_after_move(vm, m, now),
                (false, false) => {
                    self.vms.get_mut(&vm).expect("checked by current_move").enter(VmState::Error, now);
                    self.dirty.vms.insert(vm);
                }
                (true, true) if m.released => self.start_cleanup(vm, now),
                (true, true) => self.vms.get_mut(&vm).expect("checked by current_move").contact = now,
                (true, false) => self.kill(vm, now),
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
