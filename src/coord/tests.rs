//! One suite for both coordinators: each test runs against the in-process one (expiry driven by
//! a manual clock) and against a real `redis-server` this test starts on a free loopback port
//! (expiry by a short TTL and polling with a deadline). The Redis-only tests stop and restart
//! their server to check fast failure and recovery.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::*;

/// A private `redis-server` on a loopback port, killed on drop.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let mut s = RedisServer { port, child: None };
        s.restart();
        s
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Start (again) on the same port and wait until it answers PING.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}); install it with scripts/test-deps.sh"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer within 10 s", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Backend {
    name: &'static str,
    coord: Arc<dyn Coordinator>,
    clock: Option<ManualClock>,
    _server: Option<RedisServer>,
}

impl Backend {
    /// Let `d` pass for leases: the manual clock jumps; for Redis real time passes.
    async fn pass(&self, d: Duration) {
        match &self.clock {
            Some(c) => c.advance(d),
            None => tokio::time::sleep(d).await,
        }
    }
}

/// Each coordinator, fresh. The Redis one gets a generous op timeout: these tests are about
/// correctness on a busy machine, not speed (the failure test uses the default).
fn backends() -> Vec<Backend> {
    let clock = ManualClock::default();
    let local = Backend { name: "local", coord: Arc::new(LocalCoordinator::with_clock(clock.clone())), clock: Some(clock), _server: None };
    let server = RedisServer::start();
    let coord = RedisCoordinator::new(&server.url(), Duration::from_secs(2)).expect("redis coordinator");
    let redis = Backend { name: "redis", coord: Arc::new(coord), clock: None, _server: Some(server) };
    vec![local, redis]
}

const TTL: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_acquire_renew_release() {
    for b in backends() {
        let c = &b.coord;
        assert_eq!(c.lease_holder("p").await.unwrap(), None, "{}", b.name);
        let a = c.acquire_lease("p", "hive-a", TTL).await.unwrap().expect("free pool");
        assert_eq!(c.lease_holder("p").await.unwrap(), Some(("hive-a".into(), a.token)), "{}", b.name);
        assert_eq!(c.acquire_lease("p", "hive-b", TTL).await.unwrap(), None, "{}: held by a", b.name);
        // A retry by the holder gets the same lease back.
        assert_eq!(c.acquire_lease("p", "hive-a", TTL).await.unwrap(), Some(a.clone()), "{}", b.name);
        // Renewed with a long TTL, the lease outlives its first TTL.
        c.renew_lease(&a, Duration::from_secs(60)).await.unwrap();
        b.pass(TTL + Duration::from_millis(200)).await;
        assert_eq!(c.acquire_lease("p", "hive-b", TTL).await.unwrap(), None, "{}: renewed", b.name);
        c.renew_lease(&a, TTL).await.unwrap();
        c.release_lease(&a).await.unwrap();
        assert_eq!(c.lease_holder("p").await.unwrap(), None, "{}", b.name);
        assert_eq!(c.renew_lease(&a, TTL).await, Err(CoordError::Lost), "{}: released", b.name);
        assert_eq!(c.release_lease(&a).await, Err(CoordError::Lost), "{}", b.name);
        let other = c.acquire_lease("p", "hive-b", TTL).await.unwrap().expect("released pool is free");
        assert!(other.token > a.token, "{}", b.name);
        c.ping().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_takes_a_pool_only_after_the_lease_expires() {
    for b in backends() {
        let c = &b.coord;
        let t0 = Instant::now();
        let a = c.acquire_lease("p", "hive-a", TTL).await.unwrap().expect("free pool");
        assert_eq!(c.acquire_lease("p", "hive-b", TTL).await.unwrap(), None, "{}", b.name);
        if let Some(clock) = &b.clock {
            clock.advance(TTL - Duration::from_millis(1));
            assert_eq!(c.acquire_lease("p", "hive-b", TTL).await.unwrap(), None, "local: 1 ms before expiry");
            clock.advance(Duration::from_millis(1));
        }
        let deadline = t0 + Duration::from_secs(10);
        let taken = loop {
            if let Some(l) = c.acquire_lease("p", "hive-b", TTL).await.unwrap() {
                break l;
            }
            assert!(Instant::now() < deadline, "{}: the lease never expired", b.name);
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if b.clock.is_none() {
            assert!(t0.elapsed() + Duration::from_millis(5) >= TTL, "redis: taken over after {:?}, before the TTL", t0.elapsed());
        }
        assert!(taken.token > a.token, "{}", b.name);
        assert_eq!(c.lease_holder("p").await.unwrap(), Some(("hive-b".into(), taken.token)), "{}", b.name);
        assert_eq!(c.renew_lease(&a, TTL).await, Err(CoordError::Lost), "{}: the old holder lost it", b.name);
        assert_eq!(c.release_lease(&a).await, Err(CoordError::Lost), "{}", b.name);
        assert_eq!(c.check_fence("p", a.token).await, Err(CoordError::Lost), "{}: stale token", b.name);
        c.check_fence("p", taken.token).await.unwrap();
        assert_eq!(c.lease_holder("p").await.unwrap(), Some(("hive-b".into(), taken.token)), "{}: untouched", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_rise_strictly_across_holders() {
    for b in backends() {
        let c = &b.coord;
        let mut last = 0;
        for (i, who) in ["hive-a", "hive-b", "hive-a", "hive-c", "hive-b"].iter().enumerate() {
            let l = c.acquire_lease("p", who, TTL).await.unwrap().expect("free pool");
            assert!(l.token > last, "{}: round {i}: {} after {last}", b.name, l.token);
            c.check_fence("p", l.token).await.unwrap();
            if last > 0 {
                assert_eq!(c.check_fence("p", last).await, Err(CoordError::Lost), "{}", b.name);
            }
            // Claims draw on the same counter, so one made under this lease is newer still.
            let claim = c.claim_vm("p", "vm-1", &format!("h{i}")).await.unwrap();
            assert!(claim.token > l.token, "{}", b.name);
            c.release_vm(&claim).await.unwrap();
            c.release_lease(&l).await.unwrap();
            last = claim.token;
        }
        // Pools count apart: another pool's tokens do not fence this one.
        let q = c.acquire_lease("q", "hive-a", TTL).await.unwrap().expect("free pool");
        assert_eq!(c.acquire_lease("q", "hive-b", TTL).await.unwrap(), None, "{}", b.name);
        c.check_fence("q", q.token).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_vm_is_refused_to_another_handle() {
    for b in backends() {
        let c = &b.coord;
        let c1 = c.claim_vm("p", "vm-1", "h1").await.unwrap();
        assert_eq!(c.claim_vm("p", "vm-1", "h2").await, Err(CoordError::Taken), "{}", b.name);
        assert_eq!(c.claim_vm("p", "vm-1", "h1").await.unwrap(), c1, "{}: a retry gets the same claim", b.name);
        assert_eq!(c.vm_holder("p", "vm-1").await.unwrap(), Some(("h1".into(), c1.token)), "{}", b.name);
        // Another VM, or the same name in another pool, is free.
        c.claim_vm("p", "vm-2", "h2").await.unwrap();
        c.claim_vm("q", "vm-1", "h2").await.unwrap();
        c.release_vm(&c1).await.unwrap();
        assert_eq!(c.vm_holder("p", "vm-1").await.unwrap(), None, "{}", b.name);
        let c2 = c.claim_vm("p", "vm-1", "h2").await.unwrap();
        assert!(c2.token > c1.token, "{}", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_claim_cannot_release_a_newer_one() {
    for b in backends() {
        let c = &b.coord;
        let old = c.claim_vm("p", "vm-1", "h1").await.unwrap();
        c.release_vm(&old).await.unwrap();
        // The same handle claims again: only the token tells the two claims apart.
        let new = c.claim_vm("p", "vm-1", "h1").await.unwrap();
        assert!(new.token > old.token, "{}", b.name);
        assert_eq!(c.release_vm(&old).await, Err(CoordError::Lost), "{}", b.name);
        assert_eq!(c.vm_holder("p", "vm-1").await.unwrap(), Some(("h1".into(), new.token)), "{}", b.name);
        assert_eq!(c.claim_vm("p", "vm-1", "h3").await, Err(CoordError::Taken), "{}", b.name);
        c.release_vm(&new).await.unwrap();
        assert_eq!(c.vm_holder("p", "vm-1").await.unwrap(), None, "{}", b.name);
    }
}

/// 8 tasks × 500 claim/release cycles on 20 VMs: a map under a mutex records who holds each
/// VM between a successful claim and its release; a second holder would find the slot taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_see_two_holders() {
    const TASKS: usize = 8;
    const ROUNDS: usize = 500;
    const VMS: usize = 20;
    for b in backends() {
        let held: Arc<parking_lot::Mutex<HashMap<usize, (String, u64)>>> = Default::default();
        let last_token: Arc<parking_lot::Mutex<HashMap<usize, u64>>> = Default::default();
        let (claimed, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (c, held, last_token) = (b.coord.clone(), held.clone(), last_token.clone());
            let (claimed, refused) = (claimed.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..ROUNDS {
                    let vm = rand::random_range(0..VMS);
                    let handle = format!("t{t}-{i}");
                    match c.claim_vm("p", &format!("vm-{vm}"), &handle).await {
                        Ok(claim) => {
                            let other = held.lock().insert(vm, (handle.clone(), claim.token));
                            assert!(other.is_none(), "vm-{vm} held by {other:?} and {handle} at once");
                            let prev = last_token.lock().insert(vm, claim.token).unwrap_or(0);
                            assert!(claim.token > prev, "vm-{vm}: token {} after {prev}", claim.token);
                            claimed.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            assert_eq!(held.lock().remove(&vm).map(|h| h.0), Some(handle));
                            c.release_vm(&claim).await.expect("the holder releases its own claim");
                        }
                        Err(CoordError::Taken) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => panic!("claim vm-{vm}: {e}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let (claimed, refused) = (claimed.load(Ordering::SeqCst), refused.load(Ordering::SeqCst));
        assert_eq!(claimed + refused, TASKS * ROUNDS, "{}", b.name);
        assert!(claimed >= VMS, "{}: only {claimed} claims succeeded", b.name);
        for vm in 0..VMS {
            assert_eq!(b.coord.vm_holder("p", &format!("vm-{vm}")).await.unwrap(), None, "{}: vm-{vm} left claimed", b.name);
        }
    }
}

fn assert_unavailable<T: std::fmt::Debug>(what: &str, started: Instant, r: Result<T, CoordError>) {
    let took = started.elapsed();
    match r {
        Err(CoordError::Unavailable(cause)) => assert!(cause.contains("redis"), "{what}: cause {cause:?} does not name redis"),
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
    assert!(took < Duration::from_secs(2), "{what} took {took:?} with Redis down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_fast_then_service_resumes_on_the_same_coordinator() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(crate::config::CoordConfig::default().op_timeout_ms);
    let c = RedisCoordinator::new(&server.url(), timeout).unwrap();
    c.ping().await.unwrap();
    let lease = c.acquire_lease("p", "hive-a", Duration::from_secs(60)).await.unwrap().expect("free pool");
    let claim = c.claim_vm("p", "vm-1", "h1").await.unwrap();

    server.stop();
    // Twice: the first round meets the dropped connection, the second the failed reconnects.
    for round in 0..2 {
        let t = Instant::now();
        assert_unavailable(&format!("ping #{round}"), t, c.ping().await);
        let t = Instant::now();
        assert_unavailable(&format!("acquire #{round}"), t, c.acquire_lease("p", "hive-b", TTL).await);
        let t = Instant::now();
        assert_unavailable(&format!("renew #{round}"), t, c.renew_lease(&lease, TTL).await);
        let t = Instant::now();
        assert_unavailable(&format!("holder #{round}"), t, c.lease_holder("p").await);
        let t = Instant::now();
        assert_unavailable(&format!("fence #{round}"), t, c.check_fence("p", lease.token).await);
        let t = Instant::now();
        assert_unavailable(&format!("claim #{round}"), t, c.claim_vm("p", "vm-2", "h2").await);
        let t = Instant::now();
        assert_unavailable(&format!("release #{round}"), t, c.release_vm(&claim).await);
    }

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.ping().await.is_err() {
        assert!(Instant::now() < deadline, "the coordinator did not reconnect within 10 s of Redis returning");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // This Redis kept no data: the lease and claim are gone, and tokens still rise past them.
    assert_eq!(c.renew_lease(&lease, TTL).await, Err(CoordError::Lost));
    let again = c.acquire_lease("p", "hive-b", TTL).await.unwrap().expect("pool free after the restart");
    assert!(again.token > lease.token && again.token > claim.token, "tokens went back: {} after {}", again.token, claim.token);
    let c2 = c.claim_vm("p", "vm-1", "h2").await.unwrap();
    assert!(c2.token > claim.token);
}

#[tokio::test]
async fn config_chooses_the_coordinator() {
    let mut cfg = crate::config::CoordConfig::default();
    assert_eq!(from_config(&cfg).unwrap().kind(), "local");
    cfg.redis_url = Some("redis://127.0.0.1:1/".to_string().into());
    assert_eq!(from_config(&cfg).unwrap().kind(), "redis", "building does not connect");
    cfg.redis_url = Some("redis://user:hunter2@[::1:bad/".to_string().into());
    match from_config(&cfg) {
        Err(e @ CoordError::Config(_)) => assert!(!e.to_string().contains("hunter2"), "the password leaked: {e}"),
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("a bad URL was accepted"),
    }
}

#[tokio::test]
async fn coord_config_is_validated_and_its_url_never_prints() {
    use crate::config::HiveConfig;
    let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    let c = HiveConfig::load(None, &env(&[("HIVE_COORD__REDIS_URL", "redis://:hunter2@127.0.0.1:6380/")])).unwrap();
    assert_eq!(from_config(&c.coord).unwrap().kind(), "redis");
    let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
    assert!(!shown.contains("hunter2"), "the Redis password printed");
    let e = HiveConfig::load(None, &env(&[("HIVE_COORD__OP_TIMEOUT_MS", "5000"), ("HIVE_COORD__REDIS_URL", "http://x")])).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("lease_ttl_ms") && msg.contains("coord.redis_url"), "{msg}");
}
