//! The invariants every reachable pool state keeps. Checked after every step of the property
//! tests; cheap enough to call from a debug assertion.

use std::collections::BTreeSet;

use super::PoolState;
use crate::domain::vm::VmState;

impl PoolState {
    /// The invariants every reachable state keeps; returns the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut held = BTreeSet::new();
        for h in self.handles.values() {
            if let Some(vm) = h.vm {
                if !held.insert(vm) {
                    return Err(format!("vm {vm} is held by two handles"));
                }
            }
        }
        let mut in_batch = BTreeSet::new();
        for b in self.batches.values() {
            for vm in &b.vms {
                if !in_batch.insert(*vm) {
                    return Err(format!("vm {vm} is in two batches (or twice in batch {})", b.id));
                }
                if held.contains(vm) {
                    return Err(format!("vm {vm} is both held and in batch {}", b.id));
                }
                if let Some(v) = self.vms.get(vm) {
                    if v.batch != Some(b.id) {
                        return Err(format!("batch {} lists vm {vm} but the vm says {:?}", b.id, v.batch));
                    }
                }
            }
        }
        for v in self.vms.values() {
            if let Some(b) = v.batch {
                if !self.batches.get(&b).is_some_and(|b| b.vms.contains(&v.id)) {
                    return Err(format!("vm {} says batch {b} but the batch does not list it", v.id));
                }
            }
            if v.state == VmState::Occupied && !held.contains(&v.id) {
                return Err(format!("vm {} is OCCUPIED but no handle holds it", v.id));
            }
            if v.state == VmState::Ready && v.batch.is_none() {
                return Err(format!("vm {} is READY outside any batch", v.id));
            }
        }
        for p in &self.pending {
            match self.handles.get(&p.handle) {
                Some(h) if h.vm.is_none() && h.batch == p.batch => {}
                _ => return Err(format!("pending lock {p:?} has no matching pending handle")),
            }
        }
        let pending_handles = self.handles.values().filter(|h| h.vm.is_none()).count();
        if pending_handles != self.pending.len() {
            return Err(format!("{pending_handles} pending handles but {} pending locks", self.pending.len()));
        }
        Ok(())
    }
}
