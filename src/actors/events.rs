//! Per-handle event windows for `/last-event-id` and the `/fetch-events` long poll.
//!
//! Each handle has a list of `{time, data}` with ids counting up from 0. Events older than a
//! minute are pruned once the oldest is over two minutes old (the original's rule). A new event
//! wakes every waiting long poll. Windows live in memory: after a restart, handles that the store
//! brought back get fresh, empty windows. A window outlives its handle by two minutes so that
//! a client can still read the event that ended it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::domain::{HandleId, Millis};

const KEEP_MS: Millis = 60_000;
const PRUNE_AFTER_MS: Millis = 120_000;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub time: Millis,
    pub data: Value,
}

#[derive(Default)]
struct Window {
    /// Id of `events[0]`.
    first_id: i64,
    events: VecDeque<Event>,
    closed_at: Option<Millis>,
}

impl Window {
    fn last_id(&self) -> i64 {
        self.first_id + self.events.len() as i64 - 1
    }
}

#[derive(Default)]
struct Windows {
    open: HashMap<HandleId, Window>,
    /// Handles whose window was closed, oldest first: pruning pops from the front instead of
    /// scanning every window on every event.
    closed: VecDeque<(Millis, HandleId)>,
}

#[derive(Clone)]
pub struct EventHub {
    windows: Arc<Mutex<Windows>>,
    wake: Arc<watch::Sender<u64>>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub { windows: Arc::default(), wake: Arc::new(watch::channel(0).0) }
    }
}

impl EventHub {
    pub fn open(&self, handle: HandleId) {
        self.windows.lock().open.entry(handle).or_default();
    }

    pub fn push(&self, handle: HandleId, data: Value, now: Millis) {
        {
            let mut w = self.windows.lock();
            let win = w.open.entry(handle).or_default();
            win.events.push_back(Event { time: now, data });
            if win.events.front().is_some_and(|e| now.saturating_sub(e.time) > PRUNE_AFTER_MS) {
                while win.events.front().is_some_and(|e| now.saturating_sub(e.time) > KEEP_MS) {
                    win.events.pop_front();
                    win.first_id += 1;
                }
            }
            while let Some(&(at, h)) = w.closed.front() {
                if now.saturating_sub(at) <= PRUNE_AFTER_MS {
                    break;
                }
                w.closed.pop_front();
                // Only if it is still closed since then (an id is never reused, but be exact).
                if w.open.get(&h).is_some_and(|win| win.closed_at == Some(at)) {
                    w.open.remove(&h);
                }
            }
        }
        self.wake.send_modify(|n| *n += 1);
    }

    /// The handle has ended; its window stays readable for two minutes.
    pub fn close(&self, handle: HandleId, now: Millis) {
        let mut w = self.windows.lock();
        if let Some(win) = w.open.get_mut(&handle) {
            win.closed_at = Some(now);
            w.closed.push_back((now, handle));
        }
    }

    /// `None` for a handle without a window; `Some(-1)` when it has no events yet.
    pub fn last_id(&self, handle: HandleId) -> Option<i64> {
        self.windows.lock().open.get(&handle).map(Window::last_id)
    }

    /// Events with an id above `after`, waiting up to `wait` for the first one.
    /// `None` if the handle has no window.
    pub async fn fetch(&self, handle: HandleId, after: i64, wait: Duration) -> Option<(i64, Vec<Event>)> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.wake.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let w = self.windows.lock();
                let win = w.open.get(&handle)?;
                let last = win.last_id();
                if last > after {
                    let skip = (after + 1 - win.first_id).max(0) as usize;
                    return Some((last, win.events.iter().skip(skip).cloned().collect()));
                }
                if tokio::time::Instant::now() >= deadline {
                    return Some((after.max(last), Vec::new()));
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                // Deadline passed: loop once more to answer with what is there.
                continue;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test(start_paused = true)]
    async fn ids_count_up_and_long_poll_wakes_on_push() {
        let hub = EventHub::default();
        assert_eq!(hub.last_id(1), None);
        hub.open(1);
        assert_eq!(hub.last_id(1), Some(-1));
        let h2 = hub.clone();
        let poll = tokio::spawn(async move { h2.fetch(1, -1, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        hub.push(1, json!({"type":"assigned"}), 10);
        let (last, evs) = poll.await.unwrap().unwrap();
        assert_eq!(last, 0);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].time, 10);
        hub.push(1, json!({"n":2}), 11);
        assert_eq!(hub.fetch(1, 0, Duration::ZERO).await.unwrap().1[0].data, json!({"n":2}));
    }

    #[tokio::test(start_paused = true)]
    async fn empty_poll_times_out_with_the_same_id() {
        let hub = EventHub::default();
        hub.open(3);
        let (last, evs) = hub.fetch(3, -1, Duration::from_secs(5)).await.unwrap();
        assert_eq!((last, evs.len()), (-1, 0));
        assert!(hub.fetch(99, -1, Duration::ZERO).await.is_none());
    }

    #[test]
    fn old_events_are_pruned_once_the_oldest_passes_two_minutes() {
        let hub = EventHub::default();
        hub.push(1, json!(0), 0);
        hub.push(1, json!(1), 70_000);
        assert_eq!(hub.windows.lock().open[&1].events.len(), 2, "oldest only 70 s old");
        hub.push(1, json!(2), 121_000);
        let w = hub.windows.lock();
        assert_eq!(w.open[&1].events.len(), 2, "the 0 s event (over a minute old) is gone");
        assert_eq!(w.open[&1].first_id, 1);
        assert_eq!(w.open[&1].last_id(), 2);
    }

    #[test]
    fn closed_windows_are_dropped_two_minutes_after_closing() {
        let hub = EventHub::default();
        hub.open(1);
        hub.open(2);
        hub.close(1, 1_000);
        hub.push(3, json!(0), 121_000);
        assert!(hub.last_id(1).is_some(), "exactly two minutes: still readable");
        hub.push(3, json!(1), 121_001);
        assert_eq!(hub.last_id(1), None, "gone after two minutes");
        assert_eq!(hub.last_id(2), Some(-1), "open windows stay");
    }
}
