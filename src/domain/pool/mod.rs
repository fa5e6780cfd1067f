//! The vmcloud pool as a pure state machine.
//!
//! Callers feed it API calls, driver results and timer ticks, each with the time `now`; every
//! call runs the rules of `specs/vmcloud.md` until none fires (see `rules.rs`) and leaves behind
//! effects (boot, prepare, clean up, kill, notify) and the set of rows that changed. Nothing here
//! does I/O or reads a clock, so the same rules run in the actor, in unit tests and in proptest.
//!
//! Invariants (checked by `check_invariants`, driven by the property tests):
//! a VM belongs to at most one batch and the batch lists it back; a handle holds at most one VM
//! and no VM is held by two handles; an OCCUPIED VM is held by exactly one handle.

mod instant;
mod invariants;
mod moves;
pub use moves::MoveStarted;
#[cfg(test)]
mod moves_tests;
mod results;
mod rules;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::node::NodeUse;
use super::vm::{Placement, Vm, VmState};
use super::{BatchId, HandleId, Millis, NodeId, VmId};

/// `{min, max, linger}`; `linger` in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSize {
    pub min: u32,
    pub max: u32,
    pub linger: u64,
}

/// Per-state time since the last successful contact after which a VM is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    pub creating: Millis,
    pub booting: Millis,
    /// FREE, READY and OCCUPIED: time without a successful health ping.
    pub healthy: Millis,
    pub wait: Millis,
    pub error: Millis,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { creating: 10_000, booting: 240_000, healthy: 20_000, wait: 30_000, error: 0 }
    }
}

/// Rules that are not part of the wire format but tune the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolRules {
    pub timeouts: Timeouts,
    /// Largest `max` a client may ask for; larger requests are clamped and the clamp reported.
    pub max_cap: u32,
    /// Largest batch a client may prepare (the queue holds one entry per VM to prepare).
    pub max_batch: u32,
    /// After a boot fails, wait this long (doubling per failure, up to `boot_backoff_max`)
    /// before booting again, so an unavailable hypervisor is not hammered in a tight loop.
    pub boot_backoff: Millis,
    pub boot_backoff_max: Millis,
    /// A user's session ends this long after its VM was handed over (0: never), with a
    /// `session-ending` event `session_warning` before.
    pub max_session: Millis,
    pub session_warning: Millis,
}

impl Default for PoolRules {
    fn default() -> Self {
        PoolRules {
            timeouts: Timeouts::default(),
            max_cap: 30,
            max_batch: 1000,
            boot_backoff: 500,
            boot_backoff_max: 30_000,
            max_session: 5 * 3600 * 1000,
            session_warning: 5 * 60 * 1000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub id: BatchId,
    pub size: u32,
    pub profile_name: String,
    pub home_page: String,
    pub vms: Vec<VmId>,
    pub mark_delete: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    pub id: HandleId,
    pub batch: BatchId,
    pub vm: Option<VmId>,
    pub expires_at: Option<Millis>,
    pub created_at: Millis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLock {
    pub batch: BatchId,
    pub handle: HandleId,
}

/// Why a handle ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandleEnd {
    Released,
    Expired,
    VmLost,
    /// The session reached the pool's maximum duration.
    MaxDuration,
}

/// Work the shell must carry out. Results come back as calls (`booted`, `prepared`, …)
/// carrying the same `op` number; a result with another number is stale and ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Boot {
        vm: VmId,
        op: u64,
    },
    Prepare {
        vm: VmId,
        op: u64,
        batch: BatchId,
        home_page: String,
        profile_name: String,
    },
    Cleanup {
        vm: VmId,
        op: u64,
    },
    /// The VM has left the pool; destroy it wherever it runs.
    Kill {
        vm: VmId,
        placement: Option<Placement>,
    },
    /// A domain exists that no VM of the pool refers to (created for a VM killed meanwhile):
    /// destroy it. The VM's session, if any, is not touched.
    Destroy {
        vm: VmId,
        placement: Placement,
    },
    Assigned {
        handle: HandleId,
        vm: VmId,
        locked_at: Millis,
    },
    HandleEnded {
        handle: HandleId,
        why: HandleEnd,
    },
    /// The session will be ended at `ends_at` (maximum duration): tell its user.
    SessionEnding {
        handle: HandleId,
        ends_at: Millis,
    },
    /// Move the VM's domain to node `to` (cold: stop, copy, start there; `live`: migrate it
    /// running); report with `moved` or `move_failed`.
    Move {
        vm: VmId,
        op: u64,
        from: Placement,
        to: NodeId,
        live: bool,
    },
    /// A user's time on a VM ended (released, expired or lost): a row of the rewards ledger.
    Served {
        handle: HandleId,
        vm: VmId,
        node: NodeId,
        from: Millis,
        to: Millis,
    },
}

/// Rows changed since the last `take_dirty`; the shell persists them before answering.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub vms: BTreeSet<VmId>,
    pub batches: BTreeSet<BatchId>,
    pub handles: BTreeSet<HandleId>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.batches.is_empty() && self.handles.is_empty()
    }
}

/// A refused request. Nothing has changed when one of these is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolInputError {
    #[error("no batch {0}")]
    UnknownBatch(BatchId),
    #[error("no handle {0}")]
    UnknownHandle(HandleId),
    #[error("no VM {0} in this pool")]
    UnknownVm(VmId),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// What `set_size` did: the size in force and whether `max` was clamped to the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resized {
    pub size: PoolSize,
    pub clamped_from: Option<u32>,
}

/// Everything that survives a restart, as the store holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSnapshot {
    pub size: PoolSize,
    pub next_vm: VmId,
    pub next_batch: BatchId,
    pub next_handle: HandleId,
    pub preps: Vec<BatchId>,
    pub pending: Vec<PendingLock>,
    pub vms: Vec<Vm>,
    pub batches: Vec<Batch>,
    pub handles: Vec<Handle>,
}

#[derive(Clone, Debug)]
pub struct PoolState {
    pub(crate) rules: PoolRules,
    pub(crate) size: PoolSize,
    pub(crate) vms: BTreeMap<VmId, Vm>,
    pub(crate) batches: BTreeMap<BatchId, Batch>,
    pub(crate) preps: VecDeque<BatchId>,
    pub(crate) handles: BTreeMap<HandleId, Handle>,
    pub(crate) pending: VecDeque<PendingLock>,
    pub(crate) next_vm: VmId,
    pub(crate) next_batch: BatchId,
    pub(crate) next_handle: HandleId,
    next_op: u64,
    pub(crate) boot_failures: u32,
    pub(crate) boot_not_before: Millis,
    pub(crate) effects: Vec<Effect>,
    pub(crate) dirty: Dirty,
    pub(crate) passes: u64,
    /// Nodes whose VMs may not be used as usual (suspect, draining, dead). Not stored: the
    /// node registry tells a pool again when it starts.
    pub(crate) node_use: BTreeMap<NodeId, NodeUse>,
    /// Sessions already warned that they reach the maximum duration (not stored: after a
    /// restart a user may be warned twice, never not at all).
    pub(crate) warned: BTreeSet<HandleId>,
    /// VMs on their way to another node (in WAIT meanwhile). Not stored: a restart fails the
    /// move like any step in flight.
    pub(crate) moves: BTreeMap<VmId, moves::Moving>,
    /// OCCUPIED VMs moved live: their clean snapshot stayed behind, so they are replaced, not cleaned, once released.
    pub(crate) moved_live: BTreeSet<VmId>,
}

impl PoolState {
    pub fn new(rules: PoolRules, size: PoolSize) -> PoolState {
        PoolState {
            rules,
            size,
            vms: BTreeMap::new(),
            batches: BTreeMap::new(),
            preps: VecDeque::new(),
            handles: BTreeMap::new(),
            pending: VecDeque::new(),
            next_vm: 1,
            next_batch: 1,
            next_handle: 1,
            next_op: 1,
            boot_failures: 0,
            boot_not_before: 0,
            effects: Vec::new(),
            dirty: Dirty::default(),
            passes: 0,
            node_use: BTreeMap::new(),
            warned: BTreeSet::new(),
            moves: BTreeMap::new(),
            moved_live: BTreeSet::new(),
        }
    }

    /// Rebuild from the store after a restart. As in the original, VMs that were not
    /// FREE, READY or OCCUPIED become ERROR (and are killed on the next pass); stable VMs get
    /// a fresh health window, since nobody could ping them while the hive was down.
    pub fn restore(rules: PoolRules, snap: PoolSnapshot, now: Millis) -> PoolState {
        let mut s = PoolState::new(rules, snap.size);
        s.next_vm = snap.next_vm.max(1);
        s.next_batch = snap.next_batch.max(1);
        s.next_handle = snap.next_handle.max(1);
        s.preps = snap.preps.into();
        // A pending lock is kept only with its pending handle (a store written by an older or
        // interrupted hive must not make the rules trip over a dangling reference).
        let pending_handles: BTreeMap<HandleId, BatchId> =
            snap.handles.iter().filter(|h| h.vm.is_none()).map(|h| (h.id, h.batch)).collect();
        s.pending = snap.pending.into_iter().filter(|p| pending_handles.get(&p.handle) == Some(&p.batch)).collect();
        for (h, b) in &pending_handles {
            if !s.pending.iter().any(|p| p.handle == *h) {
                s.pending.push_back(PendingLock { batch: *b, handle: *h });
            }
        }
        s.batches = snap.batches.into_iter().map(|b| (b.id, b)).collect();
        s.handles = snap.handles.into_iter().map(|h| (h.id, h)).collect();
        for mut vm in snap.vms {
            if vm.state.is_stable() {
                vm.contact = now;
            } else {
                vm.enter(VmState::Error, now);
                s.dirty.vms.insert(vm.id);
            }
            s.vms.insert(vm.id, vm);
        }
        s
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        PoolSnapshot {
            size: self.size,
            next_vm: self.next_vm,
            next_batch: self.next_batch,
            next_handle: self.next_handle,
            preps: self.preps.iter().copied().collect(),
            pending: self.pending.iter().copied().collect(),
            vms: self.vms.values().cloned().collect(),
            batches: self.batches.values().cloned().collect(),
            handles: self.handles.values().cloned().collect(),
        }
    }

    // ---- reads -------------------------------------------------------------------------

    pub fn size(&self) -> PoolSize {
        self.size
    }
    pub fn vm(&self, id: VmId) -> Option<&Vm> {
        self.vms.get(&id)
    }
    pub fn vms(&self) -> impl Iterator<Item = &Vm> {
        self.vms.values()
    }
    pub fn batch(&self, id: BatchId) -> Option<&Batch> {
        self.batches.get(&id)
    }
    pub fn batches(&self) -> impl Iterator<Item = &Batch> {
        self.batches.values()
    }
    pub fn handle(&self, id: HandleId) -> Option<&Handle> {
        self.handles.get(&id)
    }
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.handles.values()
    }
    pub fn preps(&self) -> impl Iterator<Item = &BatchId> {
        self.preps.iter()
    }
    pub fn pending(&self) -> impl Iterator<Item = &PendingLock> {
        self.pending.iter()
    }
    /// How many rule passes have run (for metrics).
    pub fn passes(&self) -> u64 {
        self.passes
    }

    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    // ---- API calls ---------------------------------------------------------------------

    pub fn set_size(&mut self, min: u32, max: u32, linger: u64, now: Millis) -> Result<Resized, PoolInputError> {
        if min > max {
            return Err(PoolInputError::Invalid { field: "min", reason: format!("min ({min}) is above max ({max})") });
        }
        let cap = self.rules.max_cap;
        let clamped_from = (max > cap).then_some(max);
        let max = max.min(cap);
        let min = min.min(max);
        self.size = PoolSize { min, max, linger };
        self.run(now);
        Ok(Resized { size: self.size, clamped_from })
    }

    pub fn prepare_batch(&mut self, size: u32, home_page: String, now: Millis) -> Result<BatchId, PoolInputError> {
        if size > self.rules.max_batch {
            return Err(PoolInputError::Invalid {
                field: "size",
                reason: format!("{size} is above the largest batch ({})", self.rules.max_batch),
            });
        }
        // A home page is a URL: no control characters (a NUL would not even fit in Postgres).
        if home_page.chars().any(char::is_control) {
            return Err(PoolInputError::Invalid { field: "home_page", reason: "must not contain control characters".into() });
        }
        let id = self.next_batch;
        self.next_batch += 1;
        let batch = Batch { id, size, profile_name: format!("batch-{id}"), home_page, vms: Vec::new(), mark_delete: false };
        self.batches.insert(id, batch);
        self.dirty.batches.insert(id);
        self.run(now);
        Ok(id)
    }

    /// Never fails for an existing batch (even a cancelled one not yet removed).
    pub fn lock(&mut self, batch: BatchId, now: Millis) -> Result<HandleId, PoolInputError> {
        let b = self.batches.get_mut(&batch).ok_or(PoolInputError::UnknownBatch(batch))?;
        if b.size > 0 {
            b.size -= 1;
            self.dirty.batches.insert(batch);
        }
        let id = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(id, Handle { id, batch, vm: None, expires_at: None, created_at: now });
        self.pending.push_back(PendingLock { batch, handle: id });
        self.dirty.handles.insert(id);
        self.run(now);
        Ok(id)
    }

    pub fn release(&mut self, handle: HandleId, now: Millis) -> Result<(), PoolInputError> {
        if !self.handles.contains_key(&handle) {
            return Err(PoolInputError::UnknownHandle(handle));
        }
        self.end_handle(handle, HandleEnd::Released, now);
        self.run(now);
        Ok(())
    }

    pub fn cancel_batch(&mut self, batch: BatchId, now: Millis) -> Result<(), PoolInputError> {
        let b = self.batches.get_mut(&batch).ok_or(PoolInputError::UnknownBatch(batch))?;
        b.size = 0;
        b.mark_delete = true;
        self.dirty.batches.insert(batch);
        self.run(now);
        Ok(())
    }

    pub fn renew_expire(&mut self, handle: HandleId, ms: u64, now: Millis) -> Result<Millis, PoolInputError> {
        let h = self.handles.get_mut(&handle).ok_or(PoolInputError::UnknownHandle(handle))?;
        let at = now.saturating_add(ms);
        h.expires_at = Some(at);
        self.dirty.handles.insert(handle);
        self.run(now);
        Ok(at)
    }

    /// Release every handle, cancel every batch, set the pool to 0/0/0.
    pub fn shutdown(&mut self, now: Millis) {
        let handles: Vec<HandleId> = self.handles.keys().copied().collect();
        for h in handles {
            self.end_handle(h, HandleEnd::Released, now);
        }
        for b in self.batches.values_mut() {
            b.size = 0;
            b.mark_delete = true;
            self.dirty.batches.insert(b.id);
        }
        self.size = PoolSize { min: 0, max: 0, linger: 0 };
        self.run(now);
    }

    // ---- helpers shared with the rules -------------------------------------------------

    pub(crate) fn vm_in(&mut self, vm: VmId, op: u64, state: VmState) -> Option<&mut Vm> {
        self.vms.get_mut(&vm).filter(|v| v.op == op && v.state == state)
    }

    pub(crate) fn new_op(&mut self) -> u64 {
        let op = self.next_op;
        self.next_op += 1;
        op
    }

    /// Put a VM into WAIT and ask the shell to clean it (it has left any batch).
    pub(crate) fn start_cleanup(&mut self, vm: VmId, now: Millis) {
        let op = self.new_op();
        if let Some(v) = self.vms.get_mut(&vm) {
            v.batch = None;
            v.op = op;
            v.enter(VmState::Wait, now);
            self.dirty.vms.insert(vm);
            self.effects.push(Effect::Cleanup { vm, op });
        }
    }

    pub(crate) fn boot_one(&mut self, now: Millis) -> bool {
        if now < self.boot_not_before {
            return false;
        }

        let id = self.next_vm;
        self.next_vm += 1;
        let op = self.new_op();
        let mut vm = Vm::new(id, now);
        vm.op = op;
        self.vms.insert(id, vm);
        self.dirty.vms.insert(id);
        self.effects.push(Effect::Boot { vm: id, op });
        true
    }

    pub(crate) fn prepare_vm(&mut self, vm: VmId, batch: BatchId, now: Millis) {
        let op = self.new_op();
        let b = self.batches.get_mut(&batch).expect("caller checked the batch");
        b.vms.push(vm);
        let (home_page, profile_name) = (b.home_page.clone(), b.profile_name.clone());
        self.dirty.batches.insert(batch);
        let v = self.vms.get_mut(&vm).expect("caller checked the VM");
        v.batch = Some(batch);
        v.op = op;
        v.enter(VmState::Wait, now);
        self.dirty.vms.insert(vm);
        self.effects.push(Effect::Prepare { vm, op, batch, home_page, profile_name });
    }

    /// A node's state changed (or is told again after a restart): VMs on a lost node leave
    /// the pool, idle VMs on a draining node leave, and VMs on a held node get no new users.
    pub fn set_node_use(&mut self, node: NodeId, usage: NodeUse, now: Millis) {
        if usage == NodeUse::Normal {
            self.node_use.remove(&node);
        } else {
            self.node_use.insert(node, usage);
        }
        self.run(now);
    }

    /// A node's agent reported the domains it holds (after it reconnected): VMs placed there
    /// whose domain it no longer has are gone, and their users lose them.
    pub fn domains_reported(&mut self, node: NodeId, held: &BTreeSet<String>, now: Millis) {
        let gone: Vec<VmId> = self
            .vms
            .values()
            .filter(|v| v.placement.as_ref().is_some_and(|p| p.node == node && !held.contains(&p.domain)))
            .map(|v| v.id)
            .collect();
        for vm in gone {
            self.kill(vm, now);
        }
        self.run(now);
    }

    /// How the pool may use this VM's node.
    pub(crate) fn node_use_of(&self, v: &Vm) -> NodeUse {
        v.placement.as_ref().and_then(|p| self.node_use.get(&p.node).copied()).unwrap_or(NodeUse::Normal)
    }

    /// Remove a VM from the pool at once (KILLING is never counted) and have it destroyed.
    pub(crate) fn kill(&mut self, vm: VmId, now: Millis) {
        if let Some(v) = self.vms.get(&vm) {
            if let Some(h) = self.handles.values().find(|h| h.vm == Some(vm)).map(|h| h.id) {
                self.served(h, v.id, now);
            }
        }
        if let Some(v) = self.vms.remove(&vm) {
            // A move in flight reports to a VM that is gone: its new domain is destroyed then.
            self.moves.remove(&vm);
            self.moved_live.remove(&vm);
            self.dirty.vms.insert(vm);
            self.effects.push(Effect::Kill { vm, placement: v.placement });
        }
    }

    /// The ledger row for a user's time on an OCCUPIED VM (entered when it was assigned).
    fn served(&mut self, handle: HandleId, vm: VmId, now: Millis) {
        if let Some(v) = self.vms.get(&vm).filter(|v| v.state == VmState::Occupied) {
            if let Some(p) = &v.placement {
                self.effects.push(Effect::Served { handle, vm, node: p.node, from: v.since, to: now });
            }
        }
    }

    pub(crate) fn end_handle(&mut self, handle: HandleId, why: HandleEnd, now: Millis) {
        let Some(h) = self.handles.remove(&handle) else { return };
        self.dirty.handles.insert(handle);
        match h.vm {
            Some(vm) => {
                self.served(handle, vm, now);
                self.vm_released(vm, now);
            }
            None => self.pending.retain(|p| p.handle != handle),
        }
        self.effects.push(Effect::HandleEnded { handle, why });
    }
}
