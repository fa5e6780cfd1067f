//! VM placement, Nova's shape: filters (state accepts VMs, capacity left) → weighers (free
//! RAM, node score, recent failures) → a random pick among the top few, so that schedulers
//! racing for the same nodes spread out instead of piling on one. Participant nodes first;
//! `cloud` nodes only when no participant fits.

use rand::Rng;

use super::{Entry, RegistryState};
use crate::domain::node::NodeClass;
use crate::domain::{Millis, NodeId};
use crate::drivers::VmSpec;

/// Weight of a node that passed the filters; higher is better.
fn weight(e: &Entry, now: Millis) -> f64 {
    let free_ram = (e.spec.ram_mb - e.used_ram_mb) as f64 / e.spec.ram_mb.max(1) as f64;
    let failures = f64::from(e.recent_failures(now).min(4));
    free_ram + 0.5 * e.score(now) - 0.25 * failures
}

pub(super) fn choose(st: &RegistryState, vm: &VmSpec, now: Millis) -> Option<NodeId> {
    for class in [NodeClass::Participant, NodeClass::Cloud] {
        let mut fit: Vec<(f64, NodeId)> =
            st.nodes.values().filter(|e| e.spec.class == class && e.fits(vm)).map(|e| (weight(e, now), e.spec.id)).collect();
        if fit.is_empty() {
            continue;
        }
        // Best first; equal weights in id order, so a top_k of 1 is deterministic.
        fit.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let k = st.args.top_k.clamp(1, fit.len());
        return Some(fit[rand::rng().random_range(0..k)].1);
    }
    None
}
