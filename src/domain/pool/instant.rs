//! An instant, always-successful hypervisor for the pure machine: carries out every pending
//! effect at once. Used by the unit tests and the benchmarks of the rules themselves; never
//! by the running hive.

use super::{Effect, PoolState};
use crate::domain::Millis;
use crate::domain::vm::{Placement, VmAddress};

impl PoolState {
    /// Boot, prepare and clean up everything the rules asked for, successfully, at `now`,
    /// until the rules ask for nothing more. Kills and notices need no answer.
    ///
    /// # Panics
    /// If the rules keep asking for work after 1000 rounds (they must settle).
    pub fn settle_instantly(&mut self, now: Millis) {
        self.settle_instantly_on(now, 1);
    }

    /// As `settle_instantly`, placing every new VM on `node`.
    pub fn settle_instantly_on(&mut self, now: Millis, node: crate::domain::NodeId) {
        for _ in 0..1000 {
            let effects = self.take_effects();
            if effects.is_empty() {
                return;
            }
            for e in effects {
                match e {
                    Effect::Boot { vm, op } => {
                        self.created(vm, op, Placement { node, domain: format!("d{vm}") }, now);
                        self.booted(vm, op, VmAddress { ip: format!("10.0.0.{vm}"), ..VmAddress::default() }, now);
                    }
                    Effect::Prepare { vm, op, .. } => self.prepared(vm, op, true, now),
                    Effect::Cleanup { vm, op } => self.cleaned(vm, op, true, now),
                    _ => {}
                }
            }
        }
        panic!("pool effects did not settle");
    }
}
