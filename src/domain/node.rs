//! A node's life as a pure state machine: registering → ready → cordoned/draining → suspect →
//! dead. Inputs are heartbeats, active health-check results, (dis)connection and admin
//! actions, each with the time `now`; `state` and `next_deadline` say what the node is and
//! when to look again. No clocks, no I/O: the `NodeActor` feeds it and acts on transitions.
//!
//! Liveness comes from the agent: a node silent for `suspect_after_ms` is suspect, for
//! `dead_after_ms` dead. Dead is sticky until the agent connects again and re-registers.
//! A node run in-process (`local`) has no agent; its active checks are its heartbeats.

use serde::{Deserialize, Serialize};

use super::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Connected, not yet reconciled with what the hive stored (or not yet connected since
    /// the hive started).
    Registering,
    Ready,
    /// No new VMs; the VMs there stay.
    Cordoned,
    /// No new VMs; idle VMs leave (and are replaced elsewhere), users' VMs stay until released.
    Draining,
    /// Missed heartbeats or failed a health check: no new VMs, no new users on its VMs.
    Suspect,
    /// Silent for too long: its VMs have left the pools.
    Dead,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Registering => "registering",
            NodeState::Ready => "ready",
            NodeState::Cordoned => "cordoned",
            NodeState::Draining => "draining",
            NodeState::Suspect => "suspect",
            NodeState::Dead => "dead",
        }
    }

    /// May the scheduler place a new VM here?
    pub fn accepts_vms(self) -> bool {
        self == NodeState::Ready
    }

    /// What the pools must do with the VMs on a node in this state.
    pub fn vm_policy(self) -> NodeUse {
        match self {
            NodeState::Ready | NodeState::Cordoned => NodeUse::Normal,
            NodeState::Registering | NodeState::Suspect => NodeUse::Hold,
            NodeState::Draining => NodeUse::Drain,
            NodeState::Dead => NodeUse::Lost,
        }
    }
}

/// A pool's view of a node: what may happen to the VMs it runs there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeUse {
    Normal,
    /// Keep the VMs, but hand none of them to a new user.
    Hold,
    /// Kill the VMs no user holds; the others leave when released.
    Drain,
    /// The node is gone: every VM on it is lost.
    Lost,
}

/// Who lends the node: a participant's own computer, or elastic cloud capacity that the
/// scheduler uses only when no participant fits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeClass {
    #[default]
    Participant,
    Cloud,
}

impl NodeClass {
    pub fn name(self) -> &'static str {
        match self {
            NodeClass::Participant => "participant",
            NodeClass::Cloud => "cloud",
        }
    }

    pub fn parse(s: &str) -> Option<NodeClass> {
        match s {
            "participant" => Some(NodeClass::Participant),
            "cloud" => Some(NodeClass::Cloud),
            _ => None,
        }
    }
}

/// A node's score in 0..=1: health history (half), end-user ratings (three tenths, with a
/// prior of two 3-star ratings so one review does not decide), recent failures (the rest).
pub fn score(uptime: f64, ratings: u64, stars: u64, recent_failures: u32) -> f64 {
    let rating = (stars as f64 + 6.0) / (ratings as f64 + 2.0) / 5.0;
    let failures = 1.0 / (1.0 + f64::from(recent_failures));
    (0.5 * uptime + 0.3 * rating + 0.2 * failures).clamp(0.0, 1.0)
}

/// Administrative intent, independent of liveness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Active,
    Cordoned,
    Draining,
}

impl AdminState {
    pub fn name(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Cordoned => "cordoned",
            AdminState::Draining => "draining",
        }
    }

    pub fn parse(s: &str) -> Option<AdminState> {
        match s {
            "active" => Some(AdminState::Active),
            "cordoned" => Some(AdminState::Cordoned),
            "draining" => Some(AdminState::Draining),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeTimings {
    pub heartbeat_ms: Millis,
    pub suspect_after_ms: Millis,
    pub dead_after_ms: Millis,
}

impl Default for NodeTimings {
    fn default() -> Self {
        // Suspect after one and a half missed beats, dead after two and a half: a killed
        // agent is declared dead within three heartbeat intervals.
        NodeTimings { heartbeat_ms: 5_000, suspect_after_ms: 7_500, dead_after_ms: 12_500 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeHealth {
    timings: NodeTimings,
    local: bool,
    pub admin: AdminState,
    connected: bool,
    reconciled: bool,
    last_seen: Millis,
    check_failed: bool,
    dead: bool,
    /// Health history: checks and heartbeat windows that passed / failed (for the score).
    pub ok_count: u64,
    pub fail_count: u64,
}

impl NodeHealth {
    /// A node the hive knows of at `now`: a local one is ready at once; a remote one is
    /// registering until its agent connects and is reconciled.
    pub fn new(timings: NodeTimings, local: bool, admin: AdminState, now: Millis) -> NodeHealth {
        NodeHealth {
            timings,
            local,
            admin,
            connected: local,
            reconciled: local,
            last_seen: now,
            check_failed: false,
            dead: false,
            ok_count: 0,
            fail_count: 0,
        }
    }

    pub fn state(&self, now: Millis) -> NodeState {
        if self.dead {
            return NodeState::Dead;
        }
        if !self.reconciled {
            return NodeState::Registering;
        }
        let silent = !self.local && now.saturating_sub(self.last_seen) >= self.timings.suspect_after_ms;
        if self.check_failed || !self.connected || silent {
            return NodeState::Suspect;
        }
        match self.admin {
            AdminState::Active => NodeState::Ready,
            AdminState::Cordoned => NodeState::Cordoned,
            AdminState::Draining => NodeState::Draining,
        }
    }

    /// The agent connected (again). A dead node comes back through registration.
    pub fn connected(&mut self, now: Millis) {
        self.connected = true;
        self.reconciled = false;
        self.dead = false;
        self.check_failed = false;
        self.last_seen = now;
    }

    /// The hive has compared the agent's domains with its own records.
    pub fn reconciled(&mut self, now: Millis) {
        if self.connected {
            self.reconciled = true;
            self.last_seen = now;
        }
    }

    pub fn disconnected(&mut self) {
        if !self.local {
            self.connected = false;
        }
    }

    pub fn heartbeat(&mut self, now: Millis) {
        if self.connected && !self.dead {
            self.last_seen = self.last_seen.max(now);
            self.ok_count += 1;
        }
    }

    pub fn checked(&mut self, ok: bool, now: Millis) {
        if !self.connected || self.dead {
            return; // a check of a node with no agent says nothing new
        }
        self.check_failed = !ok;
        if ok {
            if self.local {
                self.heartbeat(now);
            }
        } else {
            self.fail_count += 1;
        }
    }

    /// Advance time: a node silent past `dead_after_ms` becomes dead. True if it just died.
    pub fn tick(&mut self, now: Millis) -> bool {
        if self.dead || self.local {
            return false;
        }
        if now.saturating_sub(self.last_seen) >= self.timings.dead_after_ms {
            self.dead = true;
            self.connected = false;
            self.fail_count += 1;
            return true;
        }
        false
    }

    /// When the state may next change with no input (suspect, then dead), if ever.
    pub fn next_deadline(&self, now: Millis) -> Option<Millis> {
        if self.dead || self.local {
            return None;
        }
        let suspect = self.last_seen.saturating_add(self.timings.suspect_after_ms);
        let dead = self.last_seen.saturating_add(self.timings.dead_after_ms);
        Some(if suspect > now { suspect } else { dead })
    }

    /// Fraction of health observations that passed, with a prior of one pass (new nodes
    /// start near 1, and one failure does not sink a node).
    pub fn uptime(&self) -> f64 {
        (self.ok_count as f64 + 1.0) / ((self.ok_count + self.fail_count) as f64 + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> NodeTimings {
        NodeTimings { heartbeat_ms: 100, suspect_after_ms: 150, dead_after_ms: 250 }
    }

    #[test]
    fn remote_node_registers_then_is_ready() {
        let mut h = NodeHealth::new(t(), false, AdminState::Active, 0);
        assert_eq!(h.state(0), NodeState::Registering);
        h.connected(10);
        assert_eq!(h.state(10), NodeState::Registering);
        h.reconciled(20);
        assert_eq!(h.state(20), NodeState::Ready);
        assert!(h.state(20).accepts_vms());
    }

    #[test]
    fn silence_makes_suspect_then_dead_within_three_beats() {
        let mut h = NodeHealth::new(t(), false, AdminState::Active, 0);
        h.connected(0);
        h.reconciled(0);
        h.heartbeat(100);
        assert_eq!(h.state(200), NodeState::Ready);
        assert_eq!(h.next_deadline(200), Some(250));
        assert_eq!(h.state(250), NodeState::Suspect);
        assert!(!h.tick(300));
        assert_eq!(h.next_deadline(300), Some(350));
        assert!(h.tick(350), "dead 2.5 beats after the last heartbeat");
        assert_eq!(h.state(350), NodeState::Dead);
        assert!(!h.tick(400), "dies once");
        h.heartbeat(400);
        assert_eq!(h.state(400), NodeState::Dead, "a heartbeat on a dead link does not revive it");
        h.connected(500);
        h.reconciled(500);
        assert_eq!(h.state(500), NodeState::Ready);
    }

    #[test]
    fn a_disconnect_is_suspect_at_once_but_not_dead() {
        let mut h = NodeHealth::new(t(), false, AdminState::Active, 0);
        h.connected(0);
        h.reconciled(0);
        h.disconnected();
        assert_eq!(h.state(1), NodeState::Suspect);
        assert!(!h.tick(100));
        h.connected(120);
        h.reconciled(121);
        assert_eq!(h.state(121), NodeState::Ready);
    }

    #[test]
    fn admin_states_and_vm_policy() {
        let mut h = NodeHealth::new(t(), true, AdminState::Cordoned, 0);
        assert_eq!(h.state(0), NodeState::Cordoned);
        assert!(!h.state(0).accepts_vms());
        h.admin = AdminState::Draining;
        assert_eq!(h.state(0).vm_policy(), NodeUse::Drain);
        h.checked(false, 1);
        assert_eq!(h.state(1), NodeState::Suspect, "health beats admin intent");
        assert_eq!(NodeState::Dead.vm_policy(), NodeUse::Lost);
    }

    #[test]
    fn score_rewards_health_and_ratings() {
        let fresh = score(1.0, 0, 0, 0);
        assert!(score(1.0, 10, 50, 0) > fresh, "five stars raise it");
        assert!(score(1.0, 10, 10, 0) < fresh, "one star lowers it");
        assert!(score(0.5, 0, 0, 0) < fresh);
        assert!(score(1.0, 0, 0, 3) < fresh);
        assert!((0.0..=1.0).contains(&score(0.0, 100, 100, 100)));
    }

    #[test]
    fn local_nodes_live_on_checks_and_never_die_of_silence() {
        let mut h = NodeHealth::new(t(), true, AdminState::Active, 0);
        assert_eq!(h.state(0), NodeState::Ready);
        assert!(!h.tick(10_000));
        assert_eq!(h.next_deadline(10_000), None);
        h.checked(true, 10_000);
        assert_eq!(h.state(10_000), NodeState::Ready);
        assert!(h.uptime() > 0.99);
    }
}
