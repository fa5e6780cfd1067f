//! Registration storm: N lightweight agents (client tasks in this process, speaking the real
//! agent protocol over real WebSockets) join a real `hive serve` process at once and then
//! heartbeat every second. Measures the time until the hive lists all N nodes ready, and the
//! hive process's CPU and memory (from /proc) while they heartbeat.
//!
//! Baselines, measured in the same run against the same hive: the time for the same N clients
//! to make one plain `GET /healthz` each, all at once (the cost of N requests with no actor or
//! store work), and the hive's memory before any agent joined.
//!
//! `cargo bench --bench storm [-- --agents N --seconds S]` (defaults N=1000, S=10). Without
//! `--bench` (as `cargo test --all-targets` runs it) it is a smoke test with N=20, S=2 that
//! exits non-zero unless every agent became ready.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use guaca_hive::agent::proto::{AgentMsg, CmdOk, Command as Cmd, Hello, HiveMsg, HostStats, Offer, PROTOCOL_VERSION};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "storm-bench-admin-token";

struct HiveProc(Child);

impl Drop for HiveProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn raise_fd_limit() {
    // SAFETY: plain libc calls on a struct we own.
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn start_hive(dir: &std::path::Path) -> anyhow::Result<(HiveProc, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hive"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("HIVE_ADMIN_TOKEN", TOKEN)
        .env("HIVE_NODE__HEARTBEAT_MS", "1000")
        .env("HIVE_NODE__SUSPECT_AFTER_MS", "3000")
        .env("HIVE_NODE__DEAD_AFTER_MS", "5000")
        .env("HIVE_POOL__DEFAULT_SIZE__MIN", "0")
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start hive")?;
    let out = BufReader::new(child.stdout.take().context("stdout")?);
    for line in out.lines() {
        if let Some(url) = line?.strip_prefix("listening on ") {
            return Ok((HiveProc(child), url.trim().to_string()));
        }
    }
    bail!("the hive did not say where it listens")
}

/// (CPU seconds used, resident MB) of a process, from /proc.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (ticks / 100.0, rss_kb / 1024.0)
}

/// One agent: join with a token, connect, hello, then heartbeat every second and answer the
/// hive's health checks until `stop`.
async fn agent(base: String, join: String, i: usize, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{base}/api/v1/nodes/register"))
        .bearer_auth(&join)
        .json(&serde_json::json!({"name": format!("storm-{i}")}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("register: {}", r.status());
    }
    let credential = r.json::<Value>().await?["credential"].as_str().ok_or(anyhow!("no credential"))?.to_string();
    let mut req = format!("{}/api/v1/agent", base.replacen("http", "ws", 1)).into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {credential}").parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    let (mut tx, mut rx) = ws.split();
    let hello = AgentMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        name: format!("storm-{i}"),
        offer: Offer { cores: 8, ram_mb: 16_384, disk_mb: 100_000 },
        driver: "sim".into(),
        addresses: vec!["127.0.0.1".into()],
        domains: vec![],
        images: vec![],
        peer_url: None,
        behind_nat: false,
    });
    tx.send(Message::text(serde_json::to_string(&hello)?)).await?;
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut stop = stop;
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                seq += 1;
                let hb = AgentMsg::Heartbeat { seq, stats: HostStats::default(), cache: None, stock: Default::default(), scratch_free: None };
                tx.send(Message::text(serde_json::to_string(&hb)?)).await?;
            }
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(HiveMsg::Command { id, cmd }) = serde_json::from_str::<HiveMsg>(&t) {
                        let result = match cmd { Cmd::List => Ok(CmdOk::Domains(vec![])), _ => Ok(CmdOk::Done) };
                        tx.send(Message::text(serde_json::to_string(&AgentMsg::Reply { id, result })?)).await?;
                    }
                }
                Some(Ok(_)) => {}
                _ => bail!("connection closed"),
            },
            _ = stop.changed() => return Ok(()),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let arg = |name: &str, default: usize| -> anyhow::Result<usize> {
        match argv.iter().position(|a| a == name) {
            Some(i) => argv.get(i + 1).ok_or(anyhow!("{name} needs a value"))?.parse().context(name.to_string()),
            None => Ok(default),
        }
    };
    let n = arg("--agents", if bench { 1000 } else { 20 })?;
    let secs = arg("--seconds", if bench { 10 } else { 2 })? as u64;
    raise_fd_limit();
    let dir = tempfile::tempdir()?;
    let (hive, base) = start_hive(dir.path())?;
    let pid = hive.0.id();
    let c = reqwest::Client::new();

    // Baseline: N clients, one plain GET each, all at once.
    let t = Instant::now();
    let gets: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (reqwest::Client::new(), format!("{base}/healthz"));
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().is_success()) })
        })
        .collect();
    for g in gets {
        if !g.await?? {
            bail!("healthz failed");
        }
    }
    let baseline = t.elapsed();
    let (_, rss_idle) = usage(pid);

    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        let r: Value = c.post(format!("{base}/api/v1/nodes/join-tokens")).bearer_auth(TOKEN).send().await?.json().await?;
        tokens.push(r["token"].as_str().ok_or(anyhow!("no token: {r}"))?.to_string());
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let (cpu0, _) = usage(pid);
    let agents: Vec<_> = tokens.into_iter().enumerate().map(|(i, t)| tokio::spawn(agent(base.clone(), t, i, stop_rx.clone()))).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready_after = loop {
        let nodes: Value = c.get(format!("{base}/api/v1/nodes")).send().await?.json().await?;
        let ready = nodes.as_array().map(|a| a.iter().filter(|n| n["state"] == "ready").count()).unwrap_or(0);
        if ready == n {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {n} agents ready after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // a poll interval, not synchronisation
    };
    let (cpu1, _) = usage(pid);
    // Steady state: everyone heartbeats once a second.
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await; // the measured window itself
    let (cpu2, rss) = usage(pid);
    let window = t.elapsed().as_secs_f64();
    let nodes: Value = c.get(format!("{base}/api/v1/nodes")).send().await?.json().await?;
    let still_ready = nodes.as_array().map(|a| a.iter().filter(|n| n["state"] == "ready").count()).unwrap_or(0);
    let _ = stop_tx.send(true);
    for a in agents {
        a.await??;
    }
    if still_ready != n {
        bail!("{still_ready} of {n} nodes ready during the heartbeat window");
    }
    let cpu_join = cpu1 - cpu0;
    let cpu_beat = (cpu2 - cpu1) / window;
    println!("registration storm: {n} agents, heartbeat 1 s (hive serve in its own process)");
    println!(
        "  all ready after          {:>9.3} s   ({:.1}x the baseline of {n} plain GETs: {:.3} s)",
        ready_after.as_secs_f64(),
        ready_after.as_secs_f64() / baseline.as_secs_f64(),
        baseline.as_secs_f64()
    );
    println!("  hive CPU while joining   {:>9.3} s   ({:.2} ms per agent)", cpu_join, cpu_join * 1000.0 / n as f64);
    println!("  hive CPU while beating   {:>9.1} %   of one core ({:.3} ms per heartbeat)", cpu_beat * 100.0, cpu_beat * 1000.0 / n as f64);
    println!(
        "  hive memory              {:>9.1} MB  ({:.2}x the idle hive's {:.1} MB; {:.1} KB per agent)",
        rss,
        rss / rss_idle,
        rss_idle,
        (rss - rss_idle) * 1024.0 / n as f64
    );
    drop(hive);
    Ok(())
}
