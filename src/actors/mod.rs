//! The actor tree. Every node, pool and VM session is a supervised ractor actor:
//!
//! ```text
//! HiveSupervisor                         (supervisor.rs: pools directory, restarts children)
//! ├── NodeRegistry ── NodeActor × nodes  (node.rs: capacity, placement, health)
//! └── PoolManager × pools                (pool.rs: the vmcloud rules of one pool)
//!     └── SessionActor × VMs             (session.rs: one VM's hypervisor work and pings)
//! ```
//!
//! Every supervisor overrides `handle_supervisor_evt` (ractor's default stops the parent when
//! any child ends): a failed child is restarted with its state reloaded from the store, at most
//! `max_restarts` times in `window_secs`; one more failure escalates to the supervisor's parent.
//! Callers never hold an `ActorRef`: each module exports a cloneable handle whose async methods
//! apply a timeout and turn a dead or restarting actor into an error. Handlers never block:
//! hypervisor calls and store writes run in tasks that report back as messages or callbacks.

pub mod events;
pub mod node;
pub mod pool;
pub mod session;
mod slot;
pub mod supervisor;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

pub use slot::{CallError, Slot};

use crate::domain::Millis;

/// Wall-clock milliseconds that follow tokio's clock, so tests with paused time see time move
/// only when they advance it. Read once at start, then derived from `Instant`.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_ms: Millis,
    base: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        let base_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0);
        Clock { base_ms, base: Instant::now() }
    }

    pub fn now(&self) -> Millis {
        self.base_ms + self.base.elapsed().as_millis() as Millis
    }

    /// The `Instant` at which the clock will read `at`.
    pub fn instant_at(&self, at: Millis) -> Instant {
        self.base + Duration::from_millis(at.saturating_sub(self.base_ms))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// At most `max` restarts of one child within `window`.
#[derive(Clone, Copy, Debug)]
pub struct RestartPolicy {
    pub max: u32,
    pub window: Duration,
}

/// Recent restarts per child key; decides whether one more is allowed.
#[derive(Debug, Default)]
pub struct RestartLog {
    recent: HashMap<String, VecDeque<Instant>>,
}

impl RestartLog {
    /// Records a failure of `key`; true if it may be restarted, false if it must escalate.
    pub fn allow(&mut self, key: &str, policy: RestartPolicy) -> bool {
        let now = Instant::now();
        let times = self.recent.entry(key.to_string()).or_default();
        while times.front().is_some_and(|t| now.duration_since(*t) > policy.window) {
            times.pop_front();
        }
        if times.len() as u32 >= policy.max {
            return false;
        }
        times.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn restart_log_escalates_after_max_in_window_and_forgets_old_ones() {
        let policy = RestartPolicy { max: 2, window: Duration::from_secs(10) };
        let mut log = RestartLog::default();
        assert!(log.allow("a", policy));
        assert!(log.allow("a", policy));
        assert!(!log.allow("a", policy), "third failure within the window escalates");
        assert!(log.allow("b", policy), "children are counted apart");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(log.allow("a", policy), "old restarts fall out of the window");
    }

    #[tokio::test(start_paused = true)]
    async fn clock_follows_tokio_time() {
        let c = Clock::new();
        let t0 = c.now();
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(c.now() - t0, 1500);
    }
}
