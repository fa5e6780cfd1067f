//! `TestApp`: a hive on port 0 with a fresh data directory, and helpers to talk to it.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use guaca_hive::app::Hive;
use guaca_hive::config::HiveConfig;
use guaca_hive::domain::pool::{PoolSize, Timeouts};
use guaca_hive::drivers::sim::SimTimings;
use serde_json::Value;

pub const ADMIN: &str = "test-admin-token";

/// Poll `f` every 10 ms until it yields `Some`, failing the test after `within`.
pub async fn until<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval, bounded by the deadline
    }
}

pub struct Builder {
    cfg: HiveConfig,
    dir: Option<tempfile::TempDir>,
}

impl Builder {
    pub fn timings(mut self, t: SimTimings) -> Self {
        self.cfg.sim.timings = t;
        self
    }
    pub fn timeouts(mut self, t: Timeouts) -> Self {
        self.cfg.pool.timeouts_ms = t;
        self
    }
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.cfg.supervision.max_restarts = n;
        self
    }
    /// Change any other part of the test config (node counts, cloud capacity, placement).
    pub fn configure(mut self, f: impl FnOnce(&mut HiveConfig)) -> Self {
        f(&mut self.cfg);
        self
    }
    pub async fn spawn(self) -> TestApp {
        let dir = self.dir.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
        let mut cfg = self.cfg;
        cfg.data_dir = dir.path().to_path_buf();
        let hive = Hive::start(cfg.clone()).await.expect("hive starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(guaca_hive::http::serve(hive.clone(), listener, async move {
            let _ = rx.await;
        }));
        TestApp { base, client: reqwest::Client::new(), hive, cfg, dir: Some(dir), stop: Some(tx), server }
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub hive: Hive,
    cfg: HiveConfig,
    dir: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

/// Test defaults: fast simulated VMs, fast pings, a 1 s health timeout, an empty default pool.
pub fn test_config() -> HiveConfig {
    let mut cfg = HiveConfig::default();
    cfg.admin_token = Some(ADMIN.to_string().into());
    cfg.sim.nodes = 2;
    cfg.sim.cores = 16;
    cfg.sim.timings = SimTimings { create_ms: 1, boot_ms: 5, prepare_ms: 2, cleanup_ms: 2, failure_rate: 0.0 };
    cfg.pool.ping_interval_ms = 50;
    cfg.pool.timeouts_ms = Timeouts { healthy: 1_000, ..Timeouts::default() };
    cfg.pool.default_size = PoolSize { min: 0, max: 10, linger: 60_000 };
    cfg.call_timeout_ms = 5_000;
    cfg
}

impl TestApp {
    pub fn builder() -> Builder {
        Builder { cfg: test_config(), dir: None }
    }

    pub async fn spawn() -> TestApp {
        Self::builder().spawn().await
    }

    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.client.post(format!("{}{path}", self.base)).send().await.expect("request")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.base)).send().await.expect("request")
    }

    /// POST that must succeed; returns the body text.
    pub async fn post_ok(&self, path: &str) -> String {
        let r = self.post(path).await;
        let status = r.status();
        let body = r.text().await.expect("body");
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    pub async fn json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("json")
    }

    pub async fn all_status(&self) -> Value {
        self.json("/all-status").await
    }

    /// Poll `/all-status` until `pred` holds; returns that status.
    pub async fn until_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        until(what, Duration::from_secs(10), || async {
            let s = self.all_status().await;
            pred(&s).then_some(s)
        })
        .await
    }

    /// Size the default pool to min/max (linger 60 s), prepare a batch of one and lock it;
    /// returns (batch, handle, vmid) once the handle holds its VM.
    pub async fn held_vm(&self, min: u32, max: u32) -> (u64, u64, u64) {
        self.post_ok(&format!("/set-pool-size/{min}/{max}/60000")).await;
        let b: u64 = self.post_ok("/prepare-batch/1/h").await.parse().expect("batch id");
        let (h, vm) = self.lock_assigned(b).await;
        (b, h, vm)
    }

    /// Lock `batch` and wait until the handle is assigned; returns (handle, vmid).
    pub async fn lock_assigned(&self, batch: u64) -> (u64, u64) {
        let h: u64 = self.post_ok(&format!("/lock/{batch}")).await.parse().expect("handle id");
        let vm = until("handle assigned", Duration::from_secs(10), || async {
            let s = self.json(&format!("/handle-status/{h}")).await;
            s["vmid"].as_u64()
        })
        .await;
        (h, vm)
    }

    pub async fn stop(mut self) {
        self.shut().await;
    }

    async fn shut(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.server).await;
        self.hive.stop().await;
    }

    /// Stop gracefully and start again on the same data directory and config.
    pub async fn restart(mut self) -> TestApp {
        self.shut().await;
        Builder { cfg: self.cfg.clone(), dir: self.dir.take() }.spawn().await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.server.abort();
    }
}

/// VMs of a status body in state `code`.
pub fn in_state(s: &Value, code: u64) -> Vec<u64> {
    s["vms"].as_array().expect("vms").iter().filter(|v| v["state"] == code).map(|v| v["vmid"].as_u64().expect("vmid")).collect()
}

pub fn vm_count(s: &Value) -> usize {
    s["vms"].as_array().expect("vms").len()
}

pub fn batch(s: &Value, id: u64) -> Option<&Value> {
    s["batches"].as_array().expect("batches").iter().find(|b| b["id"] == id)
}

/// Path of the `hive` binary built for these tests.
pub fn hive_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hive"))
}

/// Start the real `hive` binary as `cmd` describes (stdout piped) and answer the child with the
/// base URL it printed ("listening on …").
pub fn spawn_hive(cmd: &mut std::process::Command) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::inherit()).spawn().expect("start hive");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    for line in out.lines() {
        if let Some(url) = line.expect("stdout line").strip_prefix("listening on ") {
            return (child, url.trim().to_string());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the hive did not say where it listens");
}

/// One JSON request: `method url` with an optional bearer token and body; answers the status
/// and the body as JSON (`Null` when empty, a string when it is not JSON).
pub async fn send_json(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
    token: Option<&str>,
) -> (reqwest::StatusCode, Value) {
    let mut req = client.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status();
    let text = r.text().await.expect("body");
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
}
