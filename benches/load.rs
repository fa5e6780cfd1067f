//! The load tool: vmcloud cycles over real HTTP against an in-process hive, compared with a
//! trivial warp route served by the same process on the same runtime.
//!
//! C clients (one keep-alive `reqwest::Client` each) share N cycles of
//! `POST /lock/<batch>` → `GET /handle-status/<h>` until assigned → `POST /release/<h>`, on a
//! warm pool of 30 FREE VMs (instant simulated hypervisor, a real SQLite file). Then the same C
//! clients send exactly as many `GET /ping` requests as the cycles used, and the two request
//! rates are compared. While the cycles run, no VM may be held by two handles at once.
//!
//! `cargo bench --bench load [-- --clients C --cycles N]` measures (defaults C=8, N=2000);
//! `-- --database-url postgres://…/<empty db>` keeps the state in Postgres instead.
//! Without `--bench` (as `cargo test --benches` runs it) it is a smoke test: C=2, N=20, and it
//! exits non-zero unless every cycle completed with a VM and the invariant held.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
mod support;

use support::{POOL_SIZE, config, until_free, until_state};

use guaca_hive::actors::pool::PoolHandle;
use guaca_hive::app::Hive;
use guaca_hive::config::HiveConfig;
use guaca_hive::domain::BatchId;
use guaca_hive::domain::pool::PoolState;
use guaca_hive::domain::vm::VmState;
use parking_lot::Mutex;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::watch;
use warp::Filter;

/// A cycle whose handle is not assigned within this long counts as failed.
const ASSIGN_DEADLINE: Duration = Duration::from_secs(5);
/// How often the monitor checks the pool's invariants on a snapshot while cycles run.
const MONITOR_EVERY: Duration = Duration::from_millis(25);
/// Size of the batch of `--ready` runs: the largest a client may prepare.
const READY_BATCH: u32 = 1000;

struct Args {
    clients: usize,
    cycles: usize,
    /// `--ready`: lock a batch whose READY VMs wait for it (vmcloud's warm path: assigned in
    /// the lock's own commit). Default: over-lock a batch of size 0 (each lock prepares a VM).
    ready: bool,
    /// `--bench` was passed (by `cargo bench`): measure; otherwise smoke-test.
    bench: bool,
    /// `--database-url URL`: keep the state there (an empty Postgres database) instead of a
    /// fresh SQLite file.
    database_url: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let ready = argv.iter().any(|a| a == "--ready");
    // A ready batch lasts `READY_BATCH` locks (each lock lowers its size by one).
    let (mut clients, mut cycles) = if bench { (8, if ready { 900 } else { 2_000 }) } else { (2, 20) };
    let mut database_url = None;
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "--database-url" {
            database_url = Some(it.next().ok_or_else(|| anyhow!("--database-url needs a value"))?.clone());
            continue;
        }
        let mut value = |name: &str| -> anyhow::Result<usize> {
            let v = it.next().ok_or_else(|| anyhow!("{name} needs a value"))?;
            let n: usize = v.parse().with_context(|| format!("{name} {v:?}"))?;
            if n == 0 {
                bail!("{name} must be at least 1");
            }
            Ok(n)
        };
        match a.as_str() {
            "--clients" => clients = value("--clients")?,
            "--cycles" => cycles = value("--cycles")?,
            _ => {} // `--bench`, test-harness flags and filters: not ours.
        }
    }
    if ready && cycles + clients > READY_BATCH as usize - POOL_SIZE as usize {
        bail!("--ready allows at most {} cycles", READY_BATCH as usize - POOL_SIZE as usize - clients);
    }
    Ok(Args { clients, cycles, ready, bench, database_url })
}

fn main() {
    let code = match parse_args().and_then(|args| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(run(args))
    }) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("load: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

// ---- set-up ----------------------------------------------------------------------------------

/// The hive's routes and the trivial route, each on its own 127.0.0.1:0 listener.
struct Servers {
    hive: Hive,
    pool: PoolHandle,
    hive_url: String,
    ping_url: String,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start(data_dir: &TempDir, database_url: Option<String>) -> anyhow::Result<Servers> {
    let hive = Hive::start(HiveConfig { database_url, ..config(data_dir) }).await?;
    let pool = hive.pool("default")?;
    pool.set_size(POOL_SIZE, POOL_SIZE, 60_000).await?;
    until_free(&pool, POOL_SIZE as usize, Duration::from_secs(30)).await.map_err(|e| anyhow!(e))?;

    let (stop, stopped) = watch::channel(false);
    let shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let hive_listener = TcpListener::bind("127.0.0.1:0").await?;
    let ping_listener = TcpListener::bind("127.0.0.1:0").await?;
    let hive_url = format!("http://{}", hive_listener.local_addr()?);
    let ping_url = format!("http://{}/ping", ping_listener.local_addr()?);
    let ping = warp::path!("ping").and(warp::get()).map(|| "pong");
    let tasks = vec![
        tokio::spawn(guaca_hive::http::serve(hive.clone(), hive_listener, shutdown(stopped.clone()))),
        tokio::spawn(warp::serve(ping).incoming(ping_listener).graceful(shutdown(stopped)).run()),
    ];
    Ok(Servers { hive, pool, hive_url, ping_url, stop, tasks })
}

fn client() -> anyhow::Result<reqwest::Client> {
    // No proxy from the environment: the servers are on loopback.
    Ok(reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1).build()?)
}

// ---- the vmcloud cycle -------------------------------------------------------------------------

/// VMs each client holds right now (between seeing "assigned" and sending the release).
#[derive(Default)]
struct Held {
    by_vm: Mutex<HashMap<u64, u64>>,
    violations: Mutex<Vec<String>>,
}

#[derive(Default)]
struct CycleStats {
    latencies: Vec<Duration>,
    polls: u64,
    failures: Vec<String>,
}

impl CycleStats {
    fn merge(&mut self, other: CycleStats) {
        self.latencies.extend(other.latencies);
        self.polls += other.polls;
        self.failures.extend(other.failures);
    }
}

struct Cycle {
    lock_to_assigned: Duration,
    polls: u64,
}

async fn one_cycle(http: &reqwest::Client, base: &str, batch: BatchId, held: &Held) -> anyhow::Result<Cycle> {
    let sent = Instant::now();
    let text = http.post(format!("{base}/lock/{batch}")).send().await?.error_for_status()?.text().await?;
    let handle: u64 = text.trim().parse().with_context(|| format!("lock answered {text:?}"))?;
    let mut polls = 0;
    let vmid = loop {
        let status: serde_json::Value = http.get(format!("{base}/handle-status/{handle}")).send().await?.error_for_status()?.json().await?;
        polls += 1;
        if status["assigned"] == true {
            break status["vmid"].as_u64().ok_or_else(|| anyhow!("handle {handle}: assigned without a vmid: {status}"))?;
        }
        if sent.elapsed() > ASSIGN_DEADLINE {
            bail!("handle {handle} not assigned within {ASSIGN_DEADLINE:?} ({polls} polls)");
        }
    };
    let lock_to_assigned = sent.elapsed();
    // From seeing "assigned" until the release is sent, this handle certainly holds the VM.
    if let Some(other) = held.by_vm.lock().insert(vmid, handle) {
        held.violations.lock().push(format!("vm {vmid} assigned to handle {handle} while handle {other} held it"));
    }
    held.by_vm.lock().remove(&vmid);
    http.post(format!("{base}/release/{handle}")).send().await?.error_for_status()?;
    Ok(Cycle { lock_to_assigned, polls })
}

/// Take cycles from `next` until `total` have been started.
async fn cycle_client(
    http: reqwest::Client,
    base: Arc<str>,
    batch: BatchId,
    next: Arc<AtomicUsize>,
    total: usize,
    held: Arc<Held>,
) -> (reqwest::Client, CycleStats) {
    let mut stats = CycleStats::default();
    while next.fetch_add(1, Ordering::Relaxed) < total {
        match one_cycle(&http, &base, batch, &held).await {
            Ok(c) => {
                stats.latencies.push(c.lock_to_assigned);
                stats.polls += c.polls;
            }
            Err(e) => stats.failures.push(format!("{e:#}")),
        }
    }
    (http, stats)
}

async fn run_cycles(
    clients: Vec<reqwest::Client>,
    base: &str,
    batch: BatchId,
    total: usize,
    held: &Arc<Held>,
) -> anyhow::Result<(Vec<reqwest::Client>, CycleStats, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let base: Arc<str> = base.into();
    let started = Instant::now();
    let tasks: Vec<_> =
        clients.into_iter().map(|http| tokio::spawn(cycle_client(http, base.clone(), batch, next.clone(), total, held.clone()))).collect();
    let mut stats = CycleStats::default();
    let mut back = Vec::new();
    for t in tasks {
        let (http, s) = t.await?;
        back.push(http);
        stats.merge(s);
    }
    Ok((back, stats, started.elapsed()))
}

// ---- the trivial route -------------------------------------------------------------------------

async fn ping_client(http: reqwest::Client, url: Arc<str>, next: Arc<AtomicUsize>, total: usize, bad: Arc<AtomicU64>) -> reqwest::Client {
    while next.fetch_add(1, Ordering::Relaxed) < total {
        let ok = match http.get(&*url).send().await {
            Ok(r) if r.status().is_success() => r.text().await.is_ok_and(|b| b == "pong"),
            _ => false,
        };
        if !ok {
            bad.fetch_add(1, Ordering::Relaxed);
        }
    }
    http
}

/// Send `total` requests to the trivial route from `clients`; the wall time and failures.
async fn run_pings(clients: Vec<reqwest::Client>, url: &str, total: usize) -> anyhow::Result<(Vec<reqwest::Client>, Duration, u64)> {
    let (next, bad, url) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicU64::new(0)), Arc::<str>::from(url));
    let started = Instant::now();
    let tasks: Vec<_> =
        clients.into_iter().map(|http| tokio::spawn(ping_client(http, url.clone(), next.clone(), total, bad.clone()))).collect();
    let mut back = Vec::new();
    for t in tasks {
        back.push(t.await?);
    }
    Ok((back, started.elapsed(), bad.load(Ordering::Relaxed)))
}

// ---- the invariant monitor ------------------------------------------------------------------

/// Check the pool's invariants (no VM held by two handles, …) on snapshots until `stop`.
async fn monitor(pool: PoolHandle, mut stop: watch::Receiver<bool>) -> (u64, Vec<String>) {
    let (mut checks, mut broken) = (0, Vec::new());
    loop {
        match pool.status().await {
            Ok(snap) => {
                checks += 1;
                // `restore` only re-marks unstable VMs as ERROR; handles and batches are as stored.
                let state = PoolState::restore(HiveConfig::default().pool_rules(), snap, 0);
                if let Err(e) = state.check_invariants() {
                    broken.push(e);
                }
            }
            Err(e) => broken.push(format!("status: {e}")),
        }
        if tokio::time::timeout(MONITOR_EVERY, stop.wait_for(|s| *s)).await.is_ok() {
            return (checks, broken);
        }
    }
}

// ---- where the time goes ---------------------------------------------------------------------

/// The store writer's own metrics (`hive_store_commit_*`), read from the hive's recorder.
#[derive(Default)]
struct StoreCommits {
    count: f64,
    seconds: f64,
    changes: f64,
}

impl StoreCommits {
    fn read(hive: &Hive) -> StoreCommits {
        let Some(text) = hive.metrics().map(|m| m.render()) else { return StoreCommits::default() };
        // Sum over label sets; a metric that is not there (yet) counts as 0.
        let value = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        StoreCommits {
            count: value("hive_store_commit_seconds_count"),
            seconds: value("hive_store_commit_seconds_sum"),
            changes: value("hive_store_commit_changes_sum"),
        }
    }

    fn since(&self, before: &StoreCommits) -> StoreCommits {
        StoreCommits { count: self.count - before.count, seconds: self.seconds - before.seconds, changes: self.changes - before.changes }
    }
}

// ---- the run ---------------------------------------------------------------------------------

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Ok(true) when every cycle completed and no invariant broke.
async fn run(args: Args) -> anyhow::Result<bool> {
    let Args { clients: c, cycles: n, ready, bench, database_url } = args;
    // In the system's temporary directory ($TMPDIR): point it at a tmpfs to see the run
    // without the cost of fsync.
    let dir = TempDir::new()?;
    let servers = start(&dir, database_url.clone()).await?;
    let batch = servers.pool.prepare_batch(if ready { READY_BATCH } else { 0 }, "http://bench.invalid/").await?;
    let held = Arc::new(Held::default());
    let mut clients = (0..c).map(|_| client()).collect::<anyhow::Result<Vec<_>>>()?;

    // Warm-up (not measured): open every client's keep-alive connection to both servers.
    let (back, warm, _) = run_cycles(clients, &servers.hive_url, batch, c, &held).await?;
    if let Some(e) = warm.failures.first() {
        bail!("warm-up cycle failed: {e}");
    }
    let (back, _, _) = run_pings(back, &servers.ping_url, c).await?;
    clients = back;
    let warm_state = if ready { VmState::Ready } else { VmState::Free };
    until_state(&servers.pool, warm_state, POOL_SIZE as usize, Duration::from_secs(10)).await.map_err(|e| anyhow!(e))?;

    let (stop_monitor, monitor_stop) = watch::channel(false);
    let watcher = tokio::spawn(monitor(servers.pool.clone(), monitor_stop));
    let before = StoreCommits::read(&servers.hive);
    let (back, stats, cycle_wall) = run_cycles(clients, &servers.hive_url, batch, n, &held).await?;
    let commits = StoreCommits::read(&servers.hive).since(&before);
    let _ = stop_monitor.send(true);
    let (checks, mut broken) = watcher.await?;

    let completed = stats.latencies.len();
    let cycle_requests = 2 * completed + stats.polls as usize;
    let (_, ping_wall, ping_failures) = run_pings(back, &servers.ping_url, cycle_requests).await?;

    // Every VM comes back FREE, and the final state keeps the invariants too.
    if ready {
        servers.pool.cancel_batch(batch).await?;
    }
    until_free(&servers.pool, POOL_SIZE as usize, Duration::from_secs(10)).await.map_err(|e| anyhow!(e))?;
    let last = PoolState::restore(HiveConfig::default().pool_rules(), servers.pool.status().await?, 0);
    if let Err(e) = last.check_invariants() {
        broken.push(format!("after the run: {e}"));
    }
    broken.extend(held.violations.lock().iter().cloned());

    let mut lat = stats.latencies.clone();
    lat.sort();
    let cycles_per_s = completed as f64 / cycle_wall.as_secs_f64();
    let cycle_rps = cycle_requests as f64 / cycle_wall.as_secs_f64();
    let ping_rps = cycle_requests as f64 / ping_wall.as_secs_f64();
    let ratio = cycle_rps / ping_rps;
    let p99 = percentile(&lat, 99.0);
    let mean_polls = stats.polls as f64 / completed.max(1) as f64;

    println!();
    let mode = if bench { "bench" } else { "smoke" };
    let path = if ready { "READY VMs waiting in the batch" } else { "over-lock: each lock prepares a VM" };
    println!("### load: {c} clients, {n} cycles ({mode}; {path}), data in {}", dir.path().display());
    println!();
    println!("| metric | value |");
    println!("|---|---|");
    println!("| cycles completed / failed | {completed} / {} |", stats.failures.len());
    println!("| cycle wall time (s) | {:.3} |", cycle_wall.as_secs_f64());
    println!("| cycles/s | {cycles_per_s:.1} |");
    println!("| HTTP requests during cycles (2 x cycles + polls) | {cycle_requests} |");
    println!("| HTTP requests/s during cycles | {cycle_rps:.1} |");
    println!("| trivial route: same request count, wall time (s) | {:.3} |", ping_wall.as_secs_f64());
    println!("| trivial route requests/s | {ping_rps:.1} |");
    println!("| ratio (cycle request rate / trivial rate) | {ratio:.3} |");
    println!("| lock-to-assigned p50 (ms) | {} |", ms(percentile(&lat, 50.0)));
    println!("| lock-to-assigned p99 (ms) | {} |", ms(p99));
    println!("| lock-to-assigned max (ms) | {} |", ms(lat.last().copied().unwrap_or_default()));
    println!("| mean handle-status polls per cycle | {mean_polls:.2} |");
    if commits.count > 0.0 {
        println!(
            "| store group commits during cycles (per cycle) | {:.0} ({:.2}) |",
            commits.count,
            commits.count / completed.max(1) as f64
        );
        println!(
            "| mean commit time (ms) / row changes per commit | {:.3} / {:.1} |",
            commits.seconds / commits.count * 1e3,
            commits.changes / commits.count
        );
        println!("| store writer busy (commit time / cycle wall time) | {:.0} % |", commits.seconds / cycle_wall.as_secs_f64() * 100.0);
    }
    println!("| invariant checks on snapshots / violations | {checks} / {} |", broken.len());
    println!();
    if bench {
        println!("aim (a) ratio >= 0.50: {}", if ratio >= 0.5 { "met" } else { "NOT met" });
        println!("aim (b) p99 lock-to-assigned < 5 ms: {}", if p99 < Duration::from_millis(5) { "met" } else { "NOT met" });
    } else {
        println!("smoke run: checks completion and invariants only; timings of a debug build mean nothing");
    }

    let mut ok = true;
    for f in stats.failures.iter().take(5) {
        eprintln!("failed cycle: {f}");
        ok = false;
    }
    if completed != n {
        eprintln!("only {completed} of {n} cycles completed");
        ok = false;
    }
    for b in &broken {
        eprintln!("invariant broken: {b}");
        ok = false;
    }
    if ping_failures > 0 {
        eprintln!("{ping_failures} trivial-route requests failed");
        ok = false;
    }

    let _ = servers.stop.send(true);
    for t in servers.tasks {
        let _ = t.await;
    }
    servers.hive.stop().await;
    Ok(ok)
}
