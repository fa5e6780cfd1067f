//! Bandwidth limits: a token bucket (bytes per second, with a burst) shared by every transfer of
//! a node in one direction; a node has one for upload and one for download. Transfers pay for
//! their bytes in chunks. A payment that overdraws the bucket is still taken at once (the bucket
//! goes into debt) and its payer sleeps until the refill has covered the debt, so payers are
//! served in arrival order, late wake-ups do not lose throughput, and N transfers paying in equal
//! chunks share the rate equally. `Bandwidth::unlimited()` never waits. Time is tokio's, so tests
//! can run it on a paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimiterError {
    #[error("a bandwidth limit must be at least 1 byte per second")]
    ZeroRate,
}

/// A cloneable handle on one shared bucket (or on none: unlimited).
#[derive(Clone, Debug, Default)]
pub struct Bandwidth {
    bucket: Option<Arc<Bucket>>,
    paid: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Negative while payers wait: the debt they have reserved.
    tokens: f64,
    at: Instant,
}

impl Bandwidth {
    pub fn unlimited() -> Bandwidth {
        Bandwidth::default()
    }

    /// `bytes_per_sec` sustained; up to `burst` bytes may go at once after an idle spell.
    pub fn new(bytes_per_sec: u64, burst: u64) -> Result<Bandwidth, LimiterError> {
        if bytes_per_sec == 0 {
            return Err(LimiterError::ZeroRate);
        }
        let burst = burst.max(1) as f64;
        let state = Mutex::new(State { tokens: burst, at: Instant::now() });
        Ok(Bandwidth { bucket: Some(Arc::new(Bucket { rate: bytes_per_sec as f64, burst, state })), paid: Arc::default() })
    }

    /// `None` is unlimited; otherwise the rate with a burst of 50 ms worth (at least 64 KiB), enough
    /// to absorb the timer's millisecond rounding without letting a transfer run far ahead.
    pub fn capped(bytes_per_sec: Option<u64>) -> Result<Bandwidth, LimiterError> {
        match bytes_per_sec {
            None => Ok(Bandwidth::unlimited()),
            Some(rate) => Bandwidth::new(rate, (rate / 20).max(64 * 1024)),
        }
    }

    /// Bytes per second, or `None` when unlimited.
    pub fn rate(&self) -> Option<u64> {
        self.bucket.as_ref().map(|b| b.rate as u64)
    }

    /// Bytes paid for so far through this bucket (all clones), limited or not.
    pub fn total(&self) -> u64 {
        self.paid.load(Ordering::Relaxed)
    }

    /// Pay for `bytes`; returns when the rate allows them to have passed.
    pub async fn consume(&self, bytes: u64) {
        self.paid.fetch_add(bytes, Ordering::Relaxed);
        let Some(bucket) = &self.bucket else { return };
        let wait = bucket.reserve(bytes as f64, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

impl Bucket {
    /// Take `bytes` now; how long until the bucket is out of debt again.
    fn reserve(&self, bytes: f64, now: Instant) -> Duration {
        let mut s = self.state.lock();
        let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.rate).min(self.burst);
        s.at = now;
        s.tokens -= bytes;
        if s.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-s.tokens / self.rate) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let bw = Bandwidth::unlimited();
        let t0 = Instant::now();
        for _ in 0..1000 {
            bw.consume(1 << 30).await;
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(bw.total(), 1000 << 30);
        assert_eq!(bw.rate(), None);
    }

    #[test]
    fn zero_rate_is_refused() {
        assert_eq!(Bandwidth::new(0, 10).unwrap_err(), LimiterError::ZeroRate);
        assert_eq!(Bandwidth::capped(Some(0)).unwrap_err(), LimiterError::ZeroRate);
        assert_eq!(Bandwidth::capped(Some(1_000_000)).unwrap().rate(), Some(1_000_000));
    }

    #[tokio::test(start_paused = true)]
    async fn the_burst_is_free_then_the_rate_holds() {
        let bw = Bandwidth::new(100_000, 20_000).unwrap();
        let t0 = Instant::now();
        bw.consume(20_000).await;
        assert_eq!(t0.elapsed(), Duration::ZERO, "the burst passes at once");
        for _ in 0..10 {
            bw.consume(10_000).await;
        }
        // 100 kB beyond the burst at 100 kB/s: one second, not less.
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(999) && took <= Duration::from_millis(1010), "took {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_refills_no_more_than_the_burst() {
        let bw = Bandwidth::new(1000, 500).unwrap();
        bw.consume(500).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        bw.consume(1500).await;
        // 500 from the (capped) refill, 1000 more at 1000 B/s.
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_transfers_share_the_cap_fairly() {
        let bw = Bandwidth::new(1_000_000, 16_384).unwrap();
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let bw = bw.clone();
                tokio::spawn(async move {
                    for _ in 0..100 {
                        bw.consume(10_000).await;
                    }
                    t0.elapsed()
                })
            })
            .collect();
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        // 4 MB at 1 MB/s: about four seconds for everyone. A transfer that got more than its share
        // would have finished well before the others (alone at the full rate: after one second).
        let (first, last) = (done.iter().min().unwrap(), done.iter().max().unwrap());
        assert!(*last >= Duration::from_millis(3_980) && *last <= Duration::from_millis(4_050), "last finished at {last:?}");
        assert!(first.as_secs_f64() >= 0.95 * last.as_secs_f64(), "finish times {done:?}");
        assert_eq!(bw.total(), 4_000_000);
    }
}
