//! VM placement, Nova's shape: filters (state accepts VMs, capacity left, image present or
//! fetchable) → weighers (free RAM, node score, image locality, recent failures) → a random
//! pick among the top few, so that schedulers racing for the same nodes spread out instead of
//! piling on one. Participant nodes first; `cloud` nodes only when no participant fits.

use rand::Rng;

use super::{Entry, RegistryState, Replica};
use crate::domain::node::NodeClass;
use crate::domain::{Millis, NodeId};
use crate::drivers::VmSpec;

/// A node that passed the capacity and state filters, as the weighers see it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Candidate {
    pub id: NodeId,
    pub class: NodeClass,
    /// Free RAM after placing, 0..=1.
    pub free_ram: f64,
    pub score: f64,
    pub recent_failures: u32,
    /// The VM's image is on the node already (no fetch before the boot).
    pub has_image: bool,
}

/// Higher is better.
fn weight(c: &Candidate) -> f64 {
    c.free_ram + 0.5 * c.score + if c.has_image { 0.5 } else { 0.0 } - 0.25 * f64::from(c.recent_failures.min(4))
}

/// Participants first; among them the best `top_k` by weight, one at random.
pub(super) fn pick(cands: &[Candidate], top_k: usize, rng: &mut impl Rng) -> Option<NodeId> {
    for class in [NodeClass::Participant, NodeClass::Cloud] {
        let mut fit: Vec<(f64, NodeId)> = cands.iter().filter(|c| c.class == class).map(|c| (weight(c), c.id)).collect();
        if fit.is_empty() {
            continue;
        }
        // Best first; equal weights in id order, so a top_k of 1 is deterministic.
        fit.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let k = top_k.clamp(1, fit.len());
        return Some(fit[rng.random_range(0..k)].1);
    }
    None
}

/// Is the template an image the hive distributes (a SHA-256), rather than a driver's name?
fn is_image(template: &str) -> bool {
    template.len() == 64 && template.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Filter: the node holds the VM's image, or can fetch it (an agent with a piece server).
/// In-process simulated nodes have no image store and pass.
fn image_ok(e: &Entry, vm: &VmSpec) -> bool {
    !is_image(&vm.template) || e.spec.remote.is_none() || holds(e, vm) || e.peer_url.is_some()
}

fn holds(e: &Entry, vm: &VmSpec) -> bool {
    matches!(e.images.get(&vm.template), Some(Replica::Ready { .. }))
}

pub(super) fn choose(st: &RegistryState, vm: &VmSpec, now: Millis) -> Option<NodeId> {
    let cands: Vec<Candidate> = st
        .nodes
        .values()
        .filter(|e| e.fits(vm) && image_ok(e, vm))
        .map(|e| Candidate {
            id: e.spec.id,
            class: e.spec.class,
            free_ram: (e.spec.ram_mb - e.used_ram_mb - vm.ram_mb) as f64 / e.spec.ram_mb.max(1) as f64,
            score: e.score(now),
            recent_failures: e.recent_failures(now),
            has_image: holds(e, vm),
        })
        .collect();
    pick(&cands, st.args.top_k, &mut rand::rng())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn c(id: NodeId, class: NodeClass, free_ram: f64) -> Candidate {
        Candidate { id, class, free_ram, score: 0.9, recent_failures: 0, has_image: false }
    }

    #[test]
    fn weighers_prefer_room_locality_and_health() {
        let mut rng = StdRng::seed_from_u64(1);
        let p = NodeClass::Participant;
        assert_eq!(pick(&[c(1, p, 0.2), c(2, p, 0.8)], 1, &mut rng), Some(2), "more free RAM");
        let local = Candidate { has_image: true, ..c(1, p, 0.5) };
        assert_eq!(pick(&[local, c(2, p, 0.7)], 1, &mut rng), Some(1), "the image is there: no fetch before boot");
        let failing = Candidate { recent_failures: 3, ..c(2, p, 0.8) };
        assert_eq!(pick(&[c(1, p, 0.5), failing], 1, &mut rng), Some(1), "recent failures weigh against a node");
        assert_eq!(pick(&[c(1, p, 0.5), c(2, p, 0.5)], 1, &mut rng), Some(1), "ties in id order");
    }

    #[test]
    fn cloud_only_when_no_participant_fits_and_top_k_spreads() {
        let mut rng = StdRng::seed_from_u64(2);
        let (p, cl) = (NodeClass::Participant, NodeClass::Cloud);
        assert_eq!(pick(&[c(1, cl, 1.0), c(2, p, 0.1)], 3, &mut rng), Some(2));
        assert_eq!(pick(&[c(1, cl, 1.0)], 3, &mut rng), Some(1));
        assert_eq!(pick(&[], 3, &mut rng), None);
        let three = [c(1, p, 0.9), c(2, p, 0.8), c(3, p, 0.7), c(4, p, 0.1)];
        let picked: std::collections::BTreeSet<NodeId> = (0..200).filter_map(|_| pick(&three, 3, &mut rng)).collect();
        assert_eq!(picked, [1, 2, 3].into(), "a random pick among the best three, never the worst");
    }
}
