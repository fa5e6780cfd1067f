//! Operations: what `grafana/` and `deploy/` promise, checked against the real tools. Debian's
//! `prometheus` (from `scripts/test-deps.sh`) scrapes a real `hive up` every second, and every
//! query of the Grafana dashboard must return data through Prometheus's HTTP API; `promtool`
//! accepts deploy's Prometheus config; the dashboard names only metrics `src/metrics.rs`
//! declares; every example hive config loads through the real config loader.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use guaca_hive::config::HiveConfig;
use serde_json::Value;

use crate::agents::Proc;
use crate::support::{hive_bin, spawn_hive, until};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// A Prometheus tool from Debian's `prometheus` package.
fn tool(name: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(name);
    assert!(path.exists(), "{name} is missing: run scripts/test-deps.sh (it installs Debian's prometheus package)");
    path
}

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana/dashboards/guaca-hive.json")).expect("the dashboard is JSON")
}

/// Every target's `expr` in the dashboard, panels inside rows included.
fn exprs(d: &Value) -> Vec<String> {
    fn walk(panels: &Value, out: &mut Vec<String>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(t["expr"].as_str().expect("a target without expr").to_string());
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// An expression as Grafana would send it: dashboard variables at their "All" value, Grafana's
/// interval variables at a window that holds many 1-second scrapes.
fn concrete(expr: &str, d: &Value) -> String {
    let mut e = expr.replace("$__rate_interval", "30s").replace("$__interval", "5s").replace("$__range", "5m");
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().expect("a variable's name");
        e = e
            .replace(&format!("${{{name}}}"), v["allValue"].as_str().unwrap_or(".*"))
            .replace(&format!("${name}"), v["allValue"].as_str().unwrap_or(".*"));
    }
    assert!(!e.contains('$'), "an unknown dashboard variable is left in {e}");
    e
}

/// The `hive_…` metric names an expression selects.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("hive_") {
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboard_uses_only_metric_names_the_code_declares() {
    let d = dashboard();
    let declared = read("src/metrics.rs");
    let is_declared = |n: &str| declared.contains(&format!("\"{n}\""));
    let exprs = exprs(&d);
    assert!(exprs.len() >= 10, "the dashboard has only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "query {e} names no hive_ metric");
        for n in names {
            // Histograms and summaries are exported as `_bucket`, `_sum` and `_count` series.
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| n.strip_suffix(s).filter(|b| is_declared(b)));
            let base = base.map(str::to_string).unwrap_or(n.clone());
            assert!(is_declared(&base), "the dashboard uses {n}, which src/metrics.rs does not declare (in {e})");
            used.insert(base);
        }
    }
    for family in [
        "hive_vms",
        "hive_pool_size",
        "hive_lock_to_assigned_seconds",
        "hive_nodes",
        "hive_node_cache_reads_total",
        "hive_http_requests_total",
        "hive_store_commits_total",
        "hive_instantiation_seconds",
        "hive_actor_restarts_total",
    ] {
        assert!(used.contains(family), "the dashboard has no panel on {family}");
    }
    // Every panel and target reads the provisioned data source, by its uid.
    let provisioned = read("grafana/provisioning/datasources/prometheus.yaml");
    assert!(provisioned.contains("uid: prometheus") && provisioned.contains("type: prometheus"));
    let text = read("grafana/dashboards/guaca-hive.json");
    assert!(!text.contains("${DS_"), "the dashboard refers to an import-time data source variable");
}

#[test]
fn promtool_accepts_the_deploy_prometheus_config() {
    let out = Command::new(tool("promtool")).args(["check", "config"]).arg(repo("deploy/prometheus.yml")).output().expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `KEY=value` lines of an env file (comments and blanks skipped).
fn env_file(rel: &str) -> Vec<(String, String)> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{rel}: not KEY=value: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn example_configs_load_through_the_config_loader() {
    let dir = repo("deploy/config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("deploy/config").map(|e| e.expect("entry").path()).collect();
    files.retain(|p| p.extension().is_some_and(|x| x == "toml"));
    assert!(files.len() >= 2, "expected several example configs in deploy/config, found {files:?}");
    for f in &files {
        HiveConfig::load(Some(f), &[]).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    // The multi-instance config with its secrets from the example env file: Postgres and Redis.
    let cfg = HiveConfig::load(Some(&dir.join("hive.toml")), &env_file("deploy/hive.env.example")).expect("hive.toml + hive.env.example");
    assert!(cfg.database_url().starts_with("postgres://"), "HIVE_DATABASE_URL did not reach database_url");
    assert!(cfg.coord.redis_url.is_some(), "HIVE_COORD__REDIS_URL did not reach coord.redis_url");
    assert!(cfg.admin_token.is_some(), "HIVE_ADMIN_TOKEN did not reach admin_token");
    assert_eq!(cfg.listen.port(), 8080, "compose and prometheus.yml expect the hives on :8080");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Prometheus's instant query; answers the `data.result` array.
async fn query(c: &reqwest::Client, prom: &str, q: &str) -> Vec<Value> {
    let r = c.get(format!("{prom}/api/v1/query")).query(&[("query", q)]).send().await.expect("query prometheus");
    let body: Value = r.json().await.expect("prometheus answers JSON");
    assert_eq!(body["status"], "success", "query {q}: {body}");
    body["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Size the pool, prepare a batch and take and release `n` handles; a 404 on top.
async fn traffic(c: &reqwest::Client, base: &str, n: usize) -> usize {
    let post = |path: String| {
        let c = c.clone();
        let url = format!("{base}{path}");
        async move {
            let r = c.post(&url).send().await.expect("request");
            assert!(r.status().is_success(), "POST {url}: {}", r.status());
            r.text().await.expect("body")
        }
    };
    post("/set-pool-size/2/4/60000".into()).await;
    let batch: u64 = post("/prepare-batch/2/home".into()).await.parse().expect("batch id");
    for _ in 0..n {
        let h: u64 = post(format!("/lock/{batch}")).await.parse().expect("handle id");
        until("handle assigned", Duration::from_secs(20), || async {
            let s: Value = c.get(format!("{base}/handle-status/{h}")).send().await.ok()?.json().await.ok()?;
            s["vmid"].as_u64()
        })
        .await;
        post(format!("/release/{h}")).await;
    }
    let missing = c.get(format!("{base}/handle-status/999999")).send().await.expect("request");
    assert_eq!(missing.status(), 404);
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let prometheus = tool("prometheus");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (child, base) = spawn_hive(
        Command::new(hive_bin())
            .args(["up", "--listen", "127.0.0.1:0", "--sim-nodes", "2", "--data-dir"])
            .arg(tmp.path().join("hive"))
            .env("HIVE_POOL__PING_INTERVAL_MS", "200")
            .env("RUST_LOG", "warn"),
    );
    let _hive = Proc { child };
    let c = reqwest::Client::new();
    let mut locks = traffic(&c, &base, 3).await;

    let target = base.trim_start_matches("http://").to_string();
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: hive\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .expect("write prometheus.yml");
    let port = free_port();
    let prom = format!("http://127.0.0.1:{port}");
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start prometheus");
    let _prom = Proc { child };

    until("prometheus scrapes the hive", Duration::from_secs(30), || async {
        let r = c.get(format!("{prom}/api/v1/query")).query(&[("query", "up{job=\"hive\"}")]).send().await.ok()?;
        let body: Value = r.json().await.ok()?;
        (body["data"]["result"][0]["value"][1] == "1").then_some(())
    })
    .await;
    // Traffic while Prometheus watches, so rates and quantiles have something to show.
    locks += traffic(&c, &base, 3).await;

    let d = dashboard();
    let mut pending: Vec<String> = exprs(&d).iter().map(|e| concrete(e, &d)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() && tokio::time::Instant::now() < deadline {
        let mut left = Vec::new();
        for q in pending {
            if query(&c, &prom, &q).await.is_empty() {
                left.push(q);
            }
        }
        pending = left;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await; // poll interval, bounded by the deadline
        }
    }
    assert!(pending.is_empty(), "dashboard queries without data after 30 s:\n  {}", pending.join("\n  "));

    // And the data is the hive's: every lock is counted, and it was a route template, not a path.
    let counted = query(&c, &prom, "sum(hive_locks_total)").await;
    let n: f64 = counted[0]["value"][1].as_str().expect("a value").parse().expect("a number");
    assert!(n >= locks as f64, "hive_locks_total is {n}, after {locks} locks");
    let routes = query(&c, &prom, "count by (route) (hive_http_requests_total)").await;
    let routes: BTreeSet<&str> = routes.iter().filter_map(|r| r["metric"]["route"].as_str()).collect();
    assert!(routes.contains("/lock") && routes.contains("/handle-status"), "routes: {routes:?}");
    assert!(routes.iter().all(|r| !r.chars().any(|c| c.is_ascii_digit())), "an id in a route label: {routes:?}");
}
