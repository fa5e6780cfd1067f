//! Which node converts a migration's disks: the up node, accepting migrations and not tried
//! before, with the most free conversion space, provided that covers what the job needs
//! (ties: lowest id, so the choice is deterministic). When none fits the answer says why, so
//! an operator knows whether to free space, start a node, or give up.

use crate::domain::NodeId;

/// A node as the scheduler sees it, from its agent's latest report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerCandidate {
    pub node: NodeId,
    pub free_conversion_bytes: u64,
    pub up: bool,
    /// Not cordoned or draining, and runs a migration worker.
    pub accepts_migrations: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoWorker {
    #[error("no node is up and accepting migrations")]
    NoneUp,
    #[error("every node that is up has already failed this migration ({tried} attempt(s))")]
    AllTried { tried: usize },
    #[error("not enough conversion space: the best node, {best_node}, has {best_free} bytes free; the job needs {needed}")]
    NotEnoughSpace { best_node: NodeId, best_free: u64, needed: u64 },
}

impl NoWorker {
    /// Could waiting help (a node may come up or free space), as opposed to every candidate
    /// having been tried?
    pub fn may_change(&self) -> bool {
        !matches!(self, NoWorker::AllTried { .. })
    }
}

pub fn choose_worker(candidates: &[WorkerCandidate], needed_bytes: u64, tried: &[NodeId]) -> Result<NodeId, NoWorker> {
    let up: Vec<&WorkerCandidate> = candidates.iter().filter(|c| c.up && c.accepts_migrations).collect();
    if up.is_empty() {
        return Err(NoWorker::NoneUp);
    }
    let fresh: Vec<&WorkerCandidate> = up.into_iter().filter(|c| !tried.contains(&c.node)).collect();
    // Most free space first, then lowest id.
    let best = fresh
        .iter()
        .min_by_key(|c| (std::cmp::Reverse(c.free_conversion_bytes), c.node))
        .ok_or(NoWorker::AllTried { tried: tried.len() })?;
    if best.free_conversion_bytes < needed_bytes {
        return Err(NoWorker::NotEnoughSpace { best_node: best.node, best_free: best.free_conversion_bytes, needed: needed_bytes });
    }
    Ok(best.node)
}
