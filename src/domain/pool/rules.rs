//! The seven vmcloud rules, evaluated in order until none fires (specs/vmcloud.md).
//! Each rule function takes at most one action and returns whether it did; `run` starts over
//! from rule 1 after every action, exactly as the original's evaluation loop did.

use super::{HandleEnd, PoolState};
use crate::domain::node::NodeUse;
use crate::domain::vm::VmState;
use crate::domain::{BatchId, Millis, VmId};

impl PoolState {
    pub(crate) fn run(&mut self, now: Millis) {
        self.passes += 1;
        // A backoff that has passed is over (the failure count stays, for doubling); kept, it
        // would be a deadline in the past and make the shell's timer fire without end.
        if now >= self.boot_not_before {
            self.boot_not_before = 0;
        }
        // Every action removes work (a VM killed, a queue entry used, …) or moves a VM forward,
        // so the loop ends; the bound only turns a bug into a visible stop instead of a hang.
        for _ in 0..100_000 {
            let fired = self.rule_pool(now)
                || self.rule_preparation(now)
                || self.rule_lock(now)
                || self.rule_balance(now)
                || self.rule_timeouts(now)
                || self.rule_batch_cleanup()
                || self.rule_handle_expiry(now);
            if !fired {
                return;
            }
        }
        debug_assert!(false, "pool rules did not settle");
    }

    /// Rule 1: grow to `min`, shrink lingering FREE VMs above `min`, hold `max`.
    fn rule_pool(&mut self, now: Millis) -> bool {
        let count = self.vms.len() as u64;
        let PoolSizeLocal { min, max, linger } = self.size.into();
        if count < min {
            return self.boot_one(now);
        }
        if count > min {
            let lingering = self.first_vm(|v| v.state == VmState::Free && now.saturating_sub(v.since) > linger);
            if let Some(vm) = lingering {
                self.kill(vm, now);
                return true;
            }
        }
        if count > max {
            let victim = self.first_vm(|v| v.state == VmState::Booting).or_else(|| self.first_vm(|v| v.state == VmState::Free));
            if let Some(vm) = victim {
                self.kill(vm, now);
                return true;
            }
        }
        false
    }

    /// Rule 2: prepare FREE VMs for queued batches; requeue batches that lost a VM;
    /// boot more when the queue outruns what is already booting.
    fn rule_preparation(&mut self, now: Millis) -> bool {
        // (a) Queue not empty and a FREE VM: prepare it for the batch at the front.
        if let (Some(front), Some(free)) =
            (self.preps.front().copied(), self.first_vm(|v| v.state == VmState::Free && self.node_use_of(v) == NodeUse::Normal))
        {
            self.preps.pop_front();
            if self.batches.contains_key(&front) {
                self.prepare_vm(free, front, now);
            }
            return true;
        }
        // (b) A batch VM that is gone or in ERROR leaves the batch; the batch goes back to the
        // front of the queue.
        let lost = self
            .batches
            .values()
            .find_map(|b| b.vms.iter().find(|vm| self.vms.get(vm).is_none_or(|v| v.state == VmState::Error)).map(|vm| (b.id, *vm)));
        if let Some((batch, vm)) = lost {
            self.batches.get_mut(&batch).expect("found above").vms.retain(|v| *v != vm);
            if let Some(v) = self.vms.get_mut(&vm) {
                v.batch = None;
                self.dirty.vms.insert(vm);
            }
            self.preps.push_front(batch);
            self.dirty.batches.insert(batch);
            return true;
        }
        // (c) Nothing FREE: boot when the queue outruns what is already starting.
        if self.preps.is_empty() {
            return false;
        }
        let count = self.vms.len() as u64;
        let starting = self.vms.values().filter(|v| matches!(v.state, VmState::Creating | VmState::Booting)).count();
        if count < u64::from(self.size.max) && self.preps.len() > starting {
            return self.boot_one(now);
        }
        false
    }

    /// Rule 3: satisfy pending locks in order; delete assigned handles whose VM left the pool.
    fn rule_lock(&mut self, now: Millis) -> bool {
        let found = self.pending.iter().enumerate().find_map(|(i, p)| {
            let b = self.batches.get(&p.batch)?;
            self.handles.get(&p.handle)?;
            let vm = b
                .vms
                .iter()
                .find(|vm| self.vms.get(vm).is_some_and(|v| v.state == VmState::Ready && self.node_use_of(v) == NodeUse::Normal))?;
            Some((i, *p, *vm))
        });
        if let Some((i, p, vm)) = found {
            self.pending.remove(i);
            let b = self.batches.get_mut(&p.batch).expect("found above");
            b.vms.retain(|v| *v != vm);
            self.dirty.batches.insert(p.batch);
            let v = self.vms.get_mut(&vm).expect("found above");
            v.batch = None;
            v.enter(VmState::Occupied, now);
            self.dirty.vms.insert(vm);
            let h = self.handles.get_mut(&p.handle).expect("found above");
            h.vm = Some(vm);
            let locked_at = h.created_at;
            self.dirty.handles.insert(p.handle);
            self.effects.push(super::Effect::Assigned { handle: p.handle, vm, locked_at });
            return true;
        }
        let orphan = self.handles.values().find(|h| h.vm.is_some_and(|vm| !self.vms.contains_key(&vm))).map(|h| h.id);
        if let Some(h) = orphan {
            self.end_handle(h, HandleEnd::VmLost, now);
            return true;
        }
        false
    }

    /// Rule 4: per batch, make supply (VMs + queue entries) meet demand (size + pending locks).
    fn rule_balance(&mut self, now: Millis) -> bool {
        let mut action = None;
        for b in self.batches.values() {
            let pending = self.pending.iter().filter(|p| p.batch == b.id).count() as u64;
            let queued = self.preps.iter().filter(|q| **q == b.id).count() as u64;
            let demand = u64::from(b.size) + pending;
            let supply = b.vms.len() as u64 + queued;
            if demand < supply {
                action = Some(if queued > 0 {
                    Balance::Unqueue(b.id)
                } else if let Some(vm) = b.vms.iter().find(|vm| self.vms.get(vm).is_some_and(|v| v.state == VmState::Wait)) {
                    Balance::Drop(b.id, *vm)
                } else {
                    Balance::CleanFirst(b.id, b.vms[0])
                });
                break;
            }
            if demand > supply {
                action = Some(Balance::Queue(b.id));
                break;
            }
        }
        let Some(action) = action else { return false };
        match action {
            Balance::Unqueue(batch) => {
                let last = self.preps.iter().rposition(|q| *q == batch).expect("queued > 0");
                self.preps.remove(last);
            }
            Balance::Drop(batch, vm) => {
                // Its preparation is still running; when it ends, `prepared` cleans it up.
                self.batches.get_mut(&batch).expect("found above").vms.retain(|v| *v != vm);
                self.dirty.batches.insert(batch);
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.batch = None;
                    self.dirty.vms.insert(vm);
                }
            }
            Balance::CleanFirst(batch, vm) => {
                self.batches.get_mut(&batch).expect("found above").vms.retain(|v| *v != vm);
                self.dirty.batches.insert(batch);
                self.start_cleanup(vm, now);
            }
            Balance::Queue(batch) => self.preps.push_back(batch),
        }
        true
    }

    /// Rule 5: kill a VM that has gone too long without a successful contact, or whose node
    /// is lost, or that idles on a draining node.
    fn rule_timeouts(&mut self, now: Millis) -> bool {
        let t = self.rules.timeouts;
        let expired = self.first_vm(|v| {
            // A moving VM is the mover's: it always reports, within its own deadline.
            if self.moves.contains_key(&v.id) {
                return false;
            }
            let gone = match self.node_use_of(v) {
                NodeUse::Lost => true,
                NodeUse::Drain => v.state != VmState::Occupied,
                NodeUse::Normal | NodeUse::Hold => false,
            };
            gone || timeout_for(&t, v.state).is_some_and(|limit| now.saturating_sub(v.contact) >= limit)
        });
        match expired {
            Some(vm) => {
                self.kill(vm, now);
                true
            }
            None => false,
        }
    }

    /// Rule 6: remove a cancelled batch once nothing refers to it.
    fn rule_batch_cleanup(&mut self) -> bool {
        let done = self
            .batches
            .values()
            .find(|b| b.mark_delete && b.size == 0 && b.vms.is_empty() && !self.pending.iter().any(|p| p.batch == b.id))
            .map(|b| b.id);
        match done {
            Some(id) => {
                self.batches.remove(&id);
                self.preps.retain(|q| *q != id);
                self.dirty.batches.insert(id);
                true
            }
            None => false,
        }
    }

    /// Rule 7: release handles whose expiry has passed.
    /// Also ends a session that reached the maximum duration, warning its user once
    /// `session_warning` before (not part of vmcloud: an orchestrator's guard).
    fn rule_handle_expiry(&mut self, now: Millis) -> bool {
        let expired = self.handles.values().find(|h| h.expires_at.is_some_and(|at| at <= now)).map(|h| h.id);
        if let Some(h) = expired {
            self.end_handle(h, HandleEnd::Expired, now);
            return true;
        }
        let mut warn = None;
        for h in self.handles.values() {
            let Some(ends_at) = self.session_end(h) else { continue };
            if ends_at <= now {
                let id = h.id;
                self.end_handle(id, HandleEnd::MaxDuration, now);
                self.warned.remove(&id);
                return true;
            }
            if warn.is_none() && ends_at.saturating_sub(self.rules.session_warning) <= now && !self.warned.contains(&h.id) {
                warn = Some((h.id, ends_at));
            }
        }
        if let Some((handle, ends_at)) = warn {
            self.warned.insert(handle);
            self.effects.push(super::Effect::SessionEnding { handle, ends_at });
            return true;
        }
        false
    }

    /// When an assigned session must end (`max_session` after its VM was handed over).
    pub fn session_end(&self, h: &super::Handle) -> Option<Millis> {
        if self.rules.max_session == 0 {
            return None;
        }
        let vm = self.vms.get(&h.vm?).filter(|v| v.state == VmState::Occupied)?;
        Some(vm.since.saturating_add(self.rules.max_session))
    }

    /// The earliest time at which a rule could fire with no other event: the shell sets one
    /// timer for it instead of ticking every second.
    pub fn next_deadline(&self) -> Option<Millis> {
        let t = self.rules.timeouts;
        let mut next: Option<Millis> = None;
        let mut consider = |at: Millis| next = Some(next.map_or(at, |n| n.min(at)));
        for v in self.vms.values().filter(|v| !self.moves.contains_key(&v.id)) {
            if let Some(limit) = timeout_for(&t, v.state) {
                consider(v.contact.saturating_add(limit));
            }
        }
        if self.vms.len() as u64 > u64::from(self.size.min) {
            for v in self.vms.values().filter(|v| v.state == VmState::Free) {
                consider(v.since.saturating_add(self.size.linger).saturating_add(1));
            }
        }
        for at in self.handles.values().filter_map(|h| h.expires_at) {
            consider(at);
        }
        for h in self.handles.values() {
            if let Some(ends_at) = self.session_end(h) {
                consider(ends_at);
                if !self.warned.contains(&h.id) {
                    consider(ends_at.saturating_sub(self.rules.session_warning));
                }
            }
        }
        let wants_boot = (self.vms.len() as u64) < u64::from(self.size.min) || !self.preps.is_empty();
        if wants_boot && self.boot_not_before > 0 {
            consider(self.boot_not_before);
        }
        next
    }

    fn first_vm(&self, pred: impl Fn(&crate::domain::vm::Vm) -> bool) -> Option<VmId> {
        self.vms.values().find(|v| pred(v)).map(|v| v.id)
    }
}

enum Balance {
    Unqueue(BatchId),
    Drop(BatchId, VmId),
    CleanFirst(BatchId, VmId),
    Queue(BatchId),
}

struct PoolSizeLocal {
    min: u64,
    max: u64,
    linger: u64,
}

impl From<super::PoolSize> for PoolSizeLocal {
    fn from(s: super::PoolSize) -> Self {
        PoolSizeLocal { min: s.min.into(), max: s.max.into(), linger: s.linger }
    }
}

fn timeout_for(t: &super::Timeouts, state: VmState) -> Option<Millis> {
    match state {
        VmState::Creating => Some(t.creating),
        VmState::Booting => Some(t.booting),
        VmState::Free | VmState::Ready | VmState::Occupied => Some(t.healthy),
        VmState::Wait => Some(t.wait),
        VmState::Error => Some(t.error),
        VmState::Killing => None,
    }
}
