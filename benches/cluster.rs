//! The cluster load tool: vmcloud cycles against real `hive up` processes (N instances of one
//! hive) and real `hive node --driver sim` agents (A of them, each connected to every instance).
//! The instances share a store (a fresh SQLite file for N = 1, or an empty Postgres database)
//! and, with Postgres, one Redis: the instance holding the pool's lease runs its manager, the
//! others forward to it. With the pool at V VMs, C clients share M cycles of `POST /lock/<b>` →
//! `GET /handle-status/<h>` until assigned → `POST /release/<h>`, each request to a random instance.
//!
//! The agents' simulator takes 100 ms to prepare and 100 ms to clean up a VM (fixed timings), so
//! the batch keeps READY VMs waiting (vmcloud's warm path: a lock is assigned in its own commit)
//! and V is large enough for the clean-up → prepare pipeline (~0.2 s per VM) to keep some in
//! stock. `--path over-lock` locks a batch of size 0 instead: that measures the 100 ms prepare.
//!
//! No VM may be held by two handles at once: the clients track the VMs they hold and a monitor
//! checks `/all-status` snapshots. Exits non-zero if a cycle failed, a handle got no VM within
//! 10 s, or a check broke. Children are killed on exit (drop guards; PR_SET_PDEATHSIG if killed).
//!
//! `cargo bench --bench cluster -- [--instances N --database sqlite|postgres --database-url URL
//! --redis-url URL --clients C --cycles M --agents A --vms V --path ready|over-lock]` (defaults
//! N=1, sqlite, C=8, M=2000, A=2, V=400). Without `--bench` (as `cargo test --benches` runs it)
//! it is a smoke test needing no server: N=1, SQLite, C=2, M=20, A=1, V=10.
//! `scripts/bench-cluster.sh` runs the rows of BENCHMARKS.md and the raw baselines.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use parking_lot::Mutex;
use rand::Rng;
use serde_json::Value;

const TOKEN: &str = "cluster-bench-admin-token";
/// A cycle whose handle is not assigned within this long counts as failed.
const ASSIGN_DEADLINE: Duration = Duration::from_secs(10);
/// Pause after a handle-status that is not assigned yet: bounds the polling load, and is the
/// resolution of lock-to-assigned on the paths that wait.
const POLL_PAUSE: Duration = Duration::from_millis(2);
/// How often the monitor checks an `/all-status` snapshot while cycles run.
const MONITOR_EVERY: Duration = Duration::from_millis(250);
/// vmcloud's VM state codes.
const FREE: u64 = 3;
const READY: u64 = 4;
const OCCUPIED: u64 = 5;

struct Args {
    instances: usize,
    postgres: bool,
    database_url: Option<String>,
    redis_url: Option<String>,
    clients: usize,
    cycles: usize,
    agents: usize,
    vms: u32,
    /// READY VMs wait in the batch (default), or `--path over-lock`: a batch of size 0.
    ready: bool,
    bench: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let (clients, cycles, agents, vms) = if bench { (8, 2_000, 2, 400) } else { (2, 20, 1, 10) };
    let mut a =
        Args { instances: 1, postgres: false, database_url: None, redis_url: None, clients, cycles, agents, vms, ready: true, bench };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| anyhow!("{flag} needs a value"));
        let count = |v: String| -> anyhow::Result<usize> {
            let n: usize = v.parse().with_context(|| format!("{flag} {v:?}"))?;
            ensure!(n > 0, "{flag} must be at least 1");
            Ok(n)
        };
        match flag.as_str() {
            "--instances" => a.instances = count(value()?)?,
            "--clients" => a.clients = count(value()?)?,
            "--cycles" => a.cycles = count(value()?)?,
            "--agents" => a.agents = count(value()?)?,
            "--vms" => a.vms = count(value()?)? as u32,
            "--database-url" => a.database_url = Some(value()?),
            "--redis-url" => a.redis_url = Some(value()?),
            "--database" => match value()?.as_str() {
                "sqlite" => a.postgres = false,
                "postgres" => a.postgres = true,
                other => bail!("--database {other:?}: use sqlite or postgres"),
            },
            "--path" => a.ready = value()? != "over-lock",
            _ => {} // `--bench`, test-harness flags and filters: not ours.
        }
    }
    if a.postgres {
        ensure!(a.database_url.is_some(), "--database postgres needs --database-url (an empty database)");
        ensure!(a.instances == 1 || a.redis_url.is_some(), "several instances need --redis-url");
    } else {
        ensure!(a.instances == 1, "SQLite serves one instance only: use --database postgres");
        ensure!(a.database_url.is_none() && a.redis_url.is_none(), "--database-url and --redis-url go with --database postgres");
    }
    Ok(a)
}

fn main() {
    let code = match parse_args().and_then(|args| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(run(args))
    }) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("cluster: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

// ---- processes -------------------------------------------------------------------------------

/// A child process, killed and reaped when dropped (also while unwinding from a panic).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd` so that it also dies if this process is killed before its guards run.
/// Called from the main thread only: the signal is tied to the thread that forks.
fn spawn(cmd: &mut Command) -> anyhow::Result<Proc> {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(Proc(cmd.spawn().with_context(|| format!("start {:?}", cmd.get_program()))?))
}

/// `hive up` instance `i`; answers its guard and the base URL it printed.
fn start_hive(a: &Args, dir: &std::path::Path, i: usize) -> anyhow::Result<(Proc, String)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hive"));
    cmd.args(["up", "--listen", "127.0.0.1:0", "--sim-nodes", "0", "--data-dir"])
        .arg(dir.join(format!("hive-{i}")))
        .env("HIVE_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "error")
        // The pool holds V VMs (above the default cap of 30), and a READY batch lasts the run.
        .env("HIVE_POOL__MAX_CAP", a.vms.to_string())
        .env("HIVE_POOL__MAX_BATCH", batch_size(a).max(1000).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(url) = &a.database_url {
        cmd.env("HIVE_DATABASE_URL", url);
    }
    if let Some(url) = &a.redis_url {
        cmd.env("HIVE_COORD__REDIS_URL", url);
    }
    let mut proc = spawn(&mut cmd)?;
    let mut out = BufReader::new(proc.0.stdout.take().context("stdout")?);
    let mut line = String::new();
    while out.read_line(&mut line)? > 0 {
        if let Some(url) = line.trim().strip_prefix("listening on ") {
            let url = url.to_string();
            // Keep reading, so that a late line never meets a closed pipe.
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return Ok((proc, url));
        }
        line.clear();
    }
    bail!("hive instance {i} did not say where it listens")
}

/// Agent `i`, joined with a fresh token and connected to every instance. Each agent could hold
/// the whole pool alone (cores, and RAM and disk for one-core 1 GiB VMs with 8 GiB disks).
async fn start_agent(a: &Args, http: &reqwest::Client, bases: &[String], dir: &std::path::Path, i: usize) -> anyhow::Result<Proc> {
    let r = http.post(format!("{}/api/v1/nodes/join-tokens", bases[i % bases.len()])).bearer_auth(TOKEN).send().await?;
    let body: Value = r.error_for_status()?.json().await?;
    let token = body["token"].as_str().ok_or_else(|| anyhow!("no join token in {body}"))?.to_string();
    let cores = a.vms.max(64);
    spawn(
        Command::new(env!("CARGO_BIN_EXE_hive"))
            .args(["node", "--hive", &bases.join(","), "--driver", "sim", "--name", &format!("bench-{i}")])
            .args(["--cores", &cores.to_string(), "--ram-mb", &(u64::from(cores) * 4096).to_string()])
            .args(["--disk-mb", &(u64::from(cores) * 16_384).max(1_000_000).to_string(), "--data-dir"])
            .arg(dir.join(format!("agent-{i}")))
            .env("HIVE_NODE_TOKEN", token)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
}

/// READY path: one batch that lasts the warm-up and the run and still holds V VMs at the end.
fn batch_size(a: &Args) -> u32 {
    if a.ready { a.vms + (warm_up(a) + a.cycles) as u32 } else { 0 }
}

fn warm_up(a: &Args) -> usize {
    a.clients * a.instances * 2
}

// ---- talking to the instances ------------------------------------------------------------------

fn client() -> anyhow::Result<reqwest::Client> {
    // No proxy from the environment: the instances are on loopback.
    Ok(reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?)
}

/// The instances' base URLs, shared by the client tasks.
type Bases = Arc<Vec<String>>;

fn pick(bases: &[String]) -> &str {
    &bases[rand::rng().random_range(0..bases.len())]
}

async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let r = http.get(url).send().await?;
    let s = r.status();
    let text = r.text().await?;
    ensure!(s.is_success(), "GET {url}: {s} {text}");
    serde_json::from_str(&text).with_context(|| format!("GET {url}: {text:?}"))
}

async fn post(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let r = http.post(url).send().await?;
    let (s, text) = (r.status(), r.text().await?);
    ensure!(s.is_success(), "POST {url}: {s} {text}");
    Ok(text)
}

/// Poll `f` (every 100 ms, a bound on load) until it yields `Some`, failing after `within`.
async fn until<T, F: Future<Output = anyhow::Result<Option<T>>>>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!(" (last error: {e:#})"),
        }
        ensure!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}{last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count_state(status: &Value, code: u64) -> usize {
    status["vms"].as_array().map_or(0, |v| v.iter().filter(|v| v["state"] == code).count())
}

/// The pool invariants an `/all-status` snapshot shows: no VM held by two handles, and an
/// OCCUPIED VM held by exactly one handle.
fn snapshot_violations(status: &Value) -> Vec<String> {
    let mut held: HashMap<u64, Vec<u64>> = HashMap::new();
    for h in status["handles"].as_array().into_iter().flatten() {
        if let (Some(vm), Some(id)) = (h["vmid"].as_u64(), h["handle"].as_u64()) {
            held.entry(vm).or_default().push(id);
        }
    }
    let mut bad: Vec<String> =
        held.iter().filter(|(_, hs)| hs.len() > 1).map(|(vm, hs)| format!("vm {vm} held by handles {hs:?} in one snapshot")).collect();
    for v in status["vms"].as_array().into_iter().flatten().filter(|v| v["state"] == OCCUPIED) {
        let vm = v["vmid"].as_u64().unwrap_or(0);
        if held.get(&vm).is_none_or(|hs| hs.len() != 1) {
            bad.push(format!("OCCUPIED vm {vm} held by {:?}", held.get(&vm)));
        }
    }
    bad
}

// ---- the cycle ---------------------------------------------------------------------------------

/// VMs the clients hold right now (from seeing "assigned" until sending the release).
#[derive(Default)]
struct Held {
    by_vm: Mutex<HashMap<u64, u64>>,
    violations: Mutex<Vec<String>>,
}

#[derive(Default)]
struct Stats {
    latencies: Vec<Duration>,
    polls: u64,
    requests: u64,
    forwarded: u64,
    failures: Vec<String>,
}

/// One request of a cycle to a random instance: its body, counted in `st`.
async fn call(http: &reqwest::Client, post: bool, bases: &[String], path: &str, st: &mut Stats) -> anyhow::Result<String> {
    let url = format!("{}{path}", pick(bases));
    let r = if post { http.post(&url) } else { http.get(&url) }.send().await?;
    st.requests += 1;
    st.forwarded += u64::from(r.headers().contains_key("x-hive-served-by"));
    let (s, text) = (r.status(), r.text().await?);
    ensure!(s.is_success(), "{url}: {s} {text}");
    Ok(text)
}

async fn one_cycle(http: &reqwest::Client, bases: &[String], batch: u64, held: &Held, st: &mut Stats) -> anyhow::Result<()> {
    let sent = Instant::now();
    let text = call(http, true, bases, &format!("/lock/{batch}"), st).await?;
    let handle: u64 = text.trim().parse().with_context(|| format!("lock answered {text:?}"))?;
    let vm = loop {
        let text = call(http, false, bases, &format!("/handle-status/{handle}"), st).await?;
        st.polls += 1;
        let status: Value = serde_json::from_str(&text).with_context(|| format!("handle-status {handle}: {text:?}"))?;
        if status["assigned"] == true {
            break status["vmid"].as_u64().ok_or_else(|| anyhow!("handle {handle}: assigned without a vmid: {status}"))?;
        }
        ensure!(sent.elapsed() < ASSIGN_DEADLINE, "handle {handle} not assigned within {ASSIGN_DEADLINE:?}");
        tokio::time::sleep(POLL_PAUSE).await;
    };
    st.latencies.push(sent.elapsed());
    if let Some(other) = held.by_vm.lock().insert(vm, handle) {
        held.violations.lock().push(format!("vm {vm} assigned to handle {handle} while handle {other} held it"));
    }
    // Until the release is sent this handle certainly holds the VM; after it, not any more.
    held.by_vm.lock().remove(&vm);
    call(http, true, bases, &format!("/release/{handle}"), st).await?;
    Ok(())
}

/// C clients share `total` cycles; answers their merged stats and the wall time.
async fn run_cycles(clients: usize, bases: &Bases, batch: u64, total: usize, held: &Arc<Held>) -> anyhow::Result<(Stats, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let https = (0..clients).map(|_| client()).collect::<anyhow::Result<Vec<_>>>()?;
    let started = Instant::now();
    let tasks: Vec<_> = https
        .into_iter()
        .map(|http| {
            let (bases, next, held) = (bases.clone(), next.clone(), held.clone());
            tokio::spawn(async move {
                let mut st = Stats::default();
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    if let Err(e) = one_cycle(&http, &bases, batch, &held, &mut st).await {
                        st.failures.push(format!("{e:#}"));
                    }
                }
                st
            })
        })
        .collect();
    let mut all = Stats::default();
    for t in tasks {
        let st = t.await?;
        all.latencies.extend(st.latencies);
        (all.polls, all.requests, all.forwarded) = (all.polls + st.polls, all.requests + st.requests, all.forwarded + st.forwarded);
        all.failures.extend(st.failures);
    }
    Ok((all, started.elapsed()))
}

/// Check `/all-status` snapshots from random instances until `stop`; (checks, violations).
async fn monitor(http: reqwest::Client, bases: Bases, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    let (mut checks, mut broken) = (0, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        match get_json(&http, &format!("{}/all-status", pick(&bases))).await {
            Ok(s) => {
                checks += 1;
                broken.extend(snapshot_violations(&s));
            }
            Err(e) => broken.push(format!("all-status: {e:#}")),
        }
        tokio::time::sleep(MONITOR_EVERY).await;
    }
    (checks, broken)
}

// ---- where the time goes -----------------------------------------------------------------------

/// CPU seconds (user + system) of a process, from /proc (0 when it is gone).
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// CPU seconds of every process whose name starts with `comm` (Postgres backends, redis-server).
fn cpu_of_named(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(comm)))
        .map(cpu_of)
        .sum()
}

/// (busy, total) jiffies of the whole machine, from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// CPU seconds so far of each hive instance, and of [the agents, Postgres, Redis, this tool];
/// and the machine's (busy, total) jiffies.
fn cpu_now(hives: &[Proc], agents: &[Proc]) -> (Vec<f64>, [f64; 4], (f64, f64)) {
    let tool = cpu_of(std::process::id());
    let others = [agents.iter().map(|p| cpu_of(p.0.id())).sum(), cpu_of_named("postgres"), cpu_of_named("redis-server"), tool];
    (hives.iter().map(|p| cpu_of(p.0.id())).collect(), others, machine_cpu())
}

const METRICS: [&str; 5] = [
    "hive_store_commit_seconds_count",
    "hive_store_commit_seconds_sum",
    "hive_store_commit_changes_sum",
    "hive_coord_op_seconds_count",
    "hive_coord_op_seconds_sum",
];

/// Each of `METRICS` summed over its label sets and over every instance.
async fn metrics(http: &reqwest::Client, bases: &[String]) -> [f64; 5] {
    let mut out = [0.0; 5];
    for b in bases {
        let Ok(r) = http.get(format!("{b}/metrics")).send().await else { continue };
        for l in r.text().await.unwrap_or_default().lines() {
            for (o, name) in out.iter_mut().zip(METRICS) {
                if l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')) {
                    *o += l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                }
            }
        }
    }
    out
}

/// Median round trip (ms) of `n` `GET /handle-status/1` to `base` in turn, with no other load:
/// the cost of one request, and with `base` not running the pool, of the forwarding hop.
async fn probe(http: &reqwest::Client, base: &str, n: usize) -> f64 {
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let sent = Instant::now();
        if let Ok(r) = http.get(format!("{base}/handle-status/1")).send().await {
            let _ = r.bytes().await;
        }
        t.push(sent.elapsed());
    }
    t.sort();
    percentile(&t, 50.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize; // nearest rank
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

// ---- the run -----------------------------------------------------------------------------------

/// Ok(true) when every cycle completed and no check broke.
async fn run(a: Args) -> anyhow::Result<bool> {
    let dir = tempfile::TempDir::new()?;
    let http = client()?;
    let started: Vec<(Proc, String)> = (0..a.instances).map(|i| start_hive(&a, dir.path(), i)).collect::<anyhow::Result<_>>()?;
    let (hives, bases): (Vec<Proc>, Vec<String>) = started.into_iter().unzip();
    let mut agents = Vec::new();
    for i in 0..a.agents {
        agents.push(start_agent(&a, &http, &bases, dir.path(), i).await?);
    }
    for b in &bases {
        until(&format!("{} agents ready on {b}", a.agents), Duration::from_secs(60), || async {
            let nodes = get_json(&http, &format!("{b}/api/v1/nodes")).await?;
            let nodes = nodes.as_array().cloned().unwrap_or_default();
            Ok((nodes.len() == a.agents && nodes.iter().all(|n| n["state"] == "ready" && n["connected"] != false)).then_some(()))
        })
        .await?;
    }

    let bases = Arc::new(bases);
    let v = a.vms as usize;
    post(&http, &format!("{}/set-pool-size/{v}/{v}/600000", bases[0])).await?;
    let all_status = || async { get_json(&http, &format!("{}/all-status", pick(&bases))).await };
    until(&format!("{v} FREE VMs"), Duration::from_secs(180), || async {
        Ok((count_state(&all_status().await?, FREE) >= v).then_some(()))
    })
    .await?;
    let b = post(&http, &format!("{}/prepare-batch/{}/http%3A%2F%2Fbench.invalid%2F", pick(&bases), batch_size(&a))).await?;
    let batch: u64 = b.trim().parse().with_context(|| format!("prepare-batch answered {b:?}"))?;
    let warm = if a.ready { READY } else { FREE };
    let wait_warm =
        || until("a warm pool", Duration::from_secs(120), || async { Ok((count_state(&all_status().await?, warm) >= v).then_some(())) });
    wait_warm().await?;

    // Warm-up (not measured): opens connections and exercises every instance's forwarding.
    let held = Arc::new(Held::default());
    let (w, _) = run_cycles(a.clients, &bases, batch, warm_up(&a), &held).await?;
    if let Some(e) = w.failures.first() {
        bail!("warm-up cycle failed: {e}");
    }
    wait_warm().await?;
    let pool: Value = get_json(&http, &format!("{}/api/v1/pools/default", bases[0])).await?;
    let served_by = pool["served_by"].as_str().unwrap_or("?").to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(monitor(client()?, bases.clone(), stop.clone()));
    let (m0, c0) = (metrics(&http, &bases).await, cpu_now(&hives, &agents));
    let (st, wall) = run_cycles(a.clients, &bases, batch, a.cycles, &held).await?;
    let (c1, m1) = (cpu_now(&hives, &agents), metrics(&http, &bases).await);
    stop.store(true, Ordering::Relaxed);
    let (checks, mut broken) = watcher.await?;

    // Afterwards every VM comes back FREE and the last snapshot keeps the invariants too.
    if a.ready {
        post(&http, &format!("{}/cancel-batch/{batch}", bases[0])).await?;
    }
    let last = until("every VM FREE again", Duration::from_secs(60), || async {
        let s = all_status().await?;
        Ok((count_state(&s, FREE) == v).then_some(s))
    })
    .await?;
    broken.extend(snapshot_violations(&last).into_iter().map(|e| format!("after the run: {e}")));
    broken.extend(held.violations.lock().iter().cloned());
    let holder = served_by.trim_end_matches('/');
    let via = bases.iter().find(|b| b.as_str() != holder);
    let direct = probe(&http, holder, 200).await;
    let hop = match via {
        Some(b) => format!("{direct:.2} / {:.2}", probe(&http, b, 200).await),
        None => format!("{direct:.2} / -"),
    };

    let n = st.latencies.len();
    let mut lat = st.latencies.clone();
    lat.sort();
    let (secs, q) = (wall.as_secs_f64(), |p| percentile(&lat, p));
    let per = |x: f64| x / n.max(1) as f64 * 1e3; // per cycle, in ms
    let hive_ms: Vec<String> = c1.0.iter().zip(&c0.0).map(|(x, y)| format!("{:.2}", per(x - y))).collect();
    let other_ms: Vec<String> = c1.1.iter().zip(c0.1).map(|(x, y)| format!("{:.2}", per(x - y))).collect();
    let (busy, total) = (c1.2.0 - c0.2.0, c1.2.1 - c0.2.1);
    // Busy jiffies (1/100 s) not spent in the processes above: other users of the machine,
    // and kernel work no process is charged for (loopback networking in softirq, journaling).
    let ours: f64 = c1.0.iter().chain(&c1.1).sum::<f64>() - c0.0.iter().chain(&c0.1).sum::<f64>();
    let rest = per(busy / 100.0 - ours).max(0.0); // the two clocks tick apart: no negative noise
    let d: Vec<f64> = m1.iter().zip(m0).map(|(x, y)| x - y).collect();
    let db = if a.postgres { "postgres" } else { "sqlite" };
    let coord = if a.redis_url.is_some() { " + Redis" } else { "" };
    let path = if a.ready { "READY VMs waiting" } else { "over-lock: each lock prepares a VM" };
    let mode = if a.bench { "bench" } else { "smoke" };
    let fwd_pct = st.forwarded as f64 / st.requests.max(1) as f64 * 100.0;
    let mut rows = vec![
        ("cycles completed / failed", format!("{n} / {}", st.failures.len())),
        ("wall time (s)", format!("{secs:.3}")),
        ("cycles/s", format!("{:.1}", n as f64 / secs)),
        ("lock-to-assigned p50 / p99 / max (ms)", format!("{:.2} / {:.2} / {:.2}", q(50.0), q(99.0), q(100.0))),
        ("handle-status polls per cycle", format!("{:.2}", st.polls as f64 / n.max(1) as f64)),
        ("requests forwarded to the pool's instance", format!("{} of {} ({fwd_pct:.0} %)", st.forwarded, st.requests)),
        ("pool served by", served_by),
        ("machine CPU busy (all cores)", format!("{:.0} %", busy / total.max(1.0) * 100.0)),
        ("CPU ms per cycle: hive instance(s)", hive_ms.join(" / ")),
        ("CPU ms per cycle: agents / postgres / redis-server / this tool", other_ms.join(" / ")),
        ("CPU ms per cycle: everything else (other processes, kernel)", format!("{rest:.2}")),
    ];
    if d[0] > 0.0 {
        let (per_cycle, mean, rows_per) = (d[0] / n.max(1) as f64, d[1] / d[0] * 1e3, d[2] / d[0]);
        rows.push(("store commits per cycle / mean commit (ms) / rows per commit", format!("{per_cycle:.2} / {mean:.3} / {rows_per:.1}")));
        rows.push(("store writer busy (commit time / wall time)", format!("{:.0} %", d[1] / secs * 100.0)));
    }
    if d[3] > 0.0 {
        rows.push(("coordinator ops per cycle / mean op (ms)", format!("{:.2} / {:.3}", d[3] / n.max(1) as f64, d[4] / d[3] * 1e3)));
    }
    rows.push(("unloaded GET /handle-status: to the pool's instance / via another (ms, median of 200)", hop));
    rows.push(("invariant checks on snapshots / violations", format!("{checks} / {}", broken.len())));
    println!(
        "\n### cluster: {} instance(s), {db}{coord}, {} agent(s), {v} VMs, {} clients, {n} cycles ({mode}; {path})\n",
        a.instances, a.agents, a.clients
    );
    println!("| metric | value |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    let (rate, failed, bad) = (n as f64 / secs, st.failures.len(), broken.len());
    let (p50, p99) = (q(50.0), q(99.0));
    println!(
        "\nRESULT instances={} database={db} cycles_per_s={rate:.1} p50_ms={p50:.2} p99_ms={p99:.2} failed={failed} violations={bad}",
        a.instances
    );
    if !a.bench {
        println!("smoke run: checks completion and invariants only; timings of a debug build mean nothing");
    }

    st.failures.iter().take(5).for_each(|f| eprintln!("failed cycle: {f}"));
    broken.iter().for_each(|b| eprintln!("invariant broken: {b}"));
    drop((agents, hives)); // agents first: they would only reconnect in a loop
    Ok(st.failures.is_empty() && broken.is_empty() && n == a.cycles)
}
