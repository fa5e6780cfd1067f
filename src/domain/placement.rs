//! Placement of data items (images, disks: "balls") on nodes ("bins") by a pluggable
//! distributor, after Chaac (specs/nodes-images.md): ROUND_ROBIN, RANDOM, TWO_CHOICES, SORT_UF
//! and ROUND_ROBIN_WEIGHT, each with a replication factor. Pure: the caller passes the bins as
//! they are now and records the result; randomness comes from a seeded generator, so a run can
//! be repeated exactly.
//!
//! Guarantees: the replicas of one item go to distinct bins, each with room for the item; if
//! fewer bins have room than replicas are asked for, nothing is placed and the error says so.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::NodeId;

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bin {
    pub id: NodeId,
    /// Room in the unit of the items (MB, pieces, VMs).
    pub capacity: u64,
    pub used: u64,
    /// For ROUND_ROBIN_WEIGHT: share of the items, relative to the other bins.
    pub weight: u32,
}

impl Bin {
    fn fits(&self, size: u64) -> bool {
        self.capacity.saturating_sub(self.used) >= size
    }

    /// Utilization factor, compared without floating point: used / capacity.
    fn uf_less_than(&self, other: &Bin) -> bool {
        (u128::from(self.used) * u128::from(other.capacity.max(1))) < (u128::from(other.used) * u128::from(self.capacity.max(1)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Strategy {
    RoundRobin,
    Random,
    /// Sample two bins at random, take the less utilized: the maximum load drops from about
    /// ln n / ln ln n to ln ln n / ln 2 + O(1) above the mean.
    TwoChoices,
    /// Least utilization factor first.
    SortUf,
    /// Smooth weighted round robin: over time each bin gets items in proportion to its weight.
    RoundRobinWeight,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{replicas} replica(s) of {size} asked for, but only {fitting} bin(s) have room")]
    NotEnoughBins { replicas: usize, size: u64, fitting: usize },
}

pub struct Distributor {
    strategy: Strategy,
    rng: StdRng,
    /// ROUND_ROBIN: the id after which the next pick starts.
    last: Option<NodeId>,
    /// ROUND_ROBIN_WEIGHT: each bin's running credit.
    credit: std::collections::BTreeMap<NodeId, i64>,
}

impl Distributor {
    pub fn new(strategy: Strategy, seed: u64) -> Distributor {
        Distributor { strategy, rng: StdRng::seed_from_u64(seed), last: None, credit: Default::default() }
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Choose `replicas` distinct bins with room for an item of `size`. The bins' `used` is
    /// not changed: the caller records the placement.
    pub fn place(&mut self, bins: &[Bin], size: u64, replicas: usize) -> Result<Vec<NodeId>, PlacementError> {
        let mut candidates: Vec<&Bin> = bins.iter().filter(|b| b.fits(size)).collect();
        if candidates.len() < replicas {
            return Err(PlacementError::NotEnoughBins { replicas, size, fitting: candidates.len() });
        }
        candidates.sort_by_key(|b| b.id);
        let mut chosen = Vec::with_capacity(replicas);
        for _ in 0..replicas {
            let i = self.pick(&candidates);
            chosen.push(candidates.remove(i).id);
        }
        Ok(chosen)
    }

    /// Index into `candidates` (non-empty, sorted by id).
    fn pick(&mut self, candidates: &[&Bin]) -> usize {
        match self.strategy {
            Strategy::RoundRobin => {
                let i = match self.last {
                    Some(last) => candidates.iter().position(|b| b.id > last).unwrap_or(0),
                    None => 0,
                };
                self.last = Some(candidates[i].id);
                i
            }
            Strategy::Random => self.rng.random_range(0..candidates.len()),
            Strategy::TwoChoices => {
                let a = self.rng.random_range(0..candidates.len());
                if candidates.len() == 1 {
                    return a;
                }
                let mut b = self.rng.random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                if candidates[b].uf_less_than(candidates[a]) { b } else { a }
            }
            Strategy::SortUf => {
                let mut best = 0;
                for (i, c) in candidates.iter().enumerate().skip(1) {
                    if c.uf_less_than(candidates[best]) {
                        best = i;
                    }
                }
                best
            }
            Strategy::RoundRobinWeight => {
                let total: i64 = candidates.iter().map(|b| i64::from(b.weight)).sum();
                let mut best = 0;
                for (i, c) in candidates.iter().enumerate() {
                    let credit = self.credit.entry(c.id).or_insert(0);
                    *credit += i64::from(c.weight);
                    if *credit > self.credit[&candidates[best].id] {
                        best = i;
                    }
                }
                *self.credit.get_mut(&candidates[best].id).expect("credited above") -= total;
                best
            }
        }
    }
}

#[cfg(test)]
mod tests;
