//! Results of the shell's work (driver reports, pings, timer ticks) fed back into the machine.
//! Each carries the operation number the rules handed out; a stale result changes nothing.

use super::{Effect, PoolState};
use crate::domain::vm::{Placement, VmAddress, VmState};
use crate::domain::{Millis, VmId};

impl PoolState {
    /// The hypervisor accepted the VM: CREATING → BOOTING. A domain created for a VM that is
    /// no longer in the pool (killed while creating, or lost in a restart) is destroyed.
    pub fn created(&mut self, vm: VmId, op: u64, placement: Placement, now: Millis) {
        if let Some(v) = self.vm_in(vm, op, VmState::Creating) {
            v.placement = Some(placement);
            v.enter(VmState::Booting, now);
            self.dirty.vms.insert(vm);
        } else {
            self.destroy_stray(vm, placement);
        }
        self.run(now);
    }

    /// A domain that a driver task made but no VM of the pool refers to.
    fn destroy_stray(&mut self, vm: VmId, placement: Placement) {
        if self.vms.get(&vm).and_then(|v| v.placement.as_ref()) != Some(&placement) {
            self.effects.push(Effect::Destroy { vm, placement });
        }
    }

    /// The guest checked in: BOOTING → FREE.
    pub fn booted(&mut self, vm: VmId, op: u64, address: VmAddress, now: Millis) {
        if let Some(v) = self.vm_in(vm, op, VmState::Booting) {
            v.address = address;
            v.enter(VmState::Free, now);
            self.dirty.vms.insert(vm);
            self.boot_failures = 0;
            self.boot_not_before = 0;
        }
        self.run(now);
    }

    /// Creating or booting failed: → ERROR, and back off before the next boot.
    pub fn boot_failed(&mut self, vm: VmId, op: u64, placement: Option<Placement>, now: Millis) {
        let booting = self.vms.get(&vm).is_some_and(|v| v.op == op && matches!(v.state, VmState::Creating | VmState::Booting));
        if booting {
            let v = self.vms.get_mut(&vm).expect("checked above");
            if v.placement.is_none() {
                v.placement = placement;
            }
            v.enter(VmState::Error, now);
            self.dirty.vms.insert(vm);
            self.boot_failures = self.boot_failures.saturating_add(1);
            let shift = (self.boot_failures - 1).min(16);
            let delay = self.rules.boot_backoff.saturating_mul(1 << shift).min(self.rules.boot_backoff_max);
            self.boot_not_before = now.saturating_add(delay);
        } else if let Some(p) = placement {
            self.destroy_stray(vm, p);
        }
        self.run(now);
    }

    /// Preparation ended. If the batch is gone or no longer lists the VM, clean it up.
    pub fn prepared(&mut self, vm: VmId, op: u64, ok: bool, now: Millis) {
        if let Some(v) = self.vm_in(vm, op, VmState::Wait) {
            let batch = v.batch;
            if !ok {
                v.enter(VmState::Error, now);
            } else if batch.is_some_and(|b| self.batches.get(&b).is_some_and(|b| b.vms.contains(&vm))) {
                let v = self.vms.get_mut(&vm).expect("checked above");
                v.enter(VmState::Ready, now);
            } else {
                self.start_cleanup(vm, now);
            }
            self.dirty.vms.insert(vm);
        }
        self.run(now);
    }

    /// A driver that gives each user a new VNC password (the desktop driver, on prepare and
    /// clean-up) said what it is now; recorded before the step's result, so a VM is never handed
    /// over with a password that no longer works.
    pub fn vnc_password(&mut self, vm: VmId, op: u64, password: String) {
        if let Some(v) = self.vm_in(vm, op, VmState::Wait) {
            if v.address.vnc_passwd != password {
                v.address.vnc_passwd = password;
                self.dirty.vms.insert(vm);
            }
        }
    }

    /// Clean-up ended: WAIT → FREE, or ERROR.
    pub fn cleaned(&mut self, vm: VmId, op: u64, ok: bool, now: Millis) {
        if let Some(v) = self.vm_in(vm, op, VmState::Wait) {
            v.enter(if ok { VmState::Free } else { VmState::Error }, now);
            self.dirty.vms.insert(vm);
        }
        self.run(now);
    }

    /// A health ping answered (or not). Only FREE, READY and OCCUPIED VMs are pinged;
    /// a failed ping changes nothing: the VM just gets closer to its timeout.
    pub fn pinged(&mut self, vm: VmId, ok: bool, now: Millis) {
        if ok {
            if let Some(v) = self.vms.get_mut(&vm).filter(|v| v.state.is_stable()) {
                v.contact = now;
            }
        }
        self.run(now);
    }

    /// Time passed (a timer fired).
    pub fn tick(&mut self, now: Millis) {
        self.run(now);
    }
}
