//! The Postgres store under the real server: `hive serve` with `HIVE_DATABASE_URL=postgres://…`
//! on a fresh database of the machine's Postgres, one `hive node` agent (simulated hypervisor)
//! giving it capacity. A client sizes the pool, prepares a batch and locks a VM; the hive is
//! killed with SIGKILL and started again on the same database, and the handle, its VM and the
//! batch are all still there, read back from Postgres (the data directory holds no SQLite file).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection, Row};

use crate::agents::{Hive, Proc, join_token};
use crate::support::{hive_bin, spawn_hive, until};

/// The machine's server, as `scripts/test-deps.sh` sets it up (trust auth on loopback).
const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const ADMIN_TOKEN: &str = "pg-test-admin-token";
const BEAT_MS: u64 = 400;

/// A database of the test's own, dropped (with any open connection) when the test ends.
struct TestDb {
    url: String,
    name: String,
}

impl TestDb {
    async fn create() -> TestDb {
        let name = format!("hive_t_{:016x}", rand::random::<u64>());
        let mut admin = PgConnection::connect(PG_ADMIN_URL)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Postgres at {PG_ADMIN_URL} ({e}); run scripts/test-deps.sh to install and start it"));
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create the test database");
        let _ = admin.close().await;
        TestDb { url: format!("postgres://postgres@127.0.0.1:5432/{name}"), name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Its own thread and runtime: drop cannot await, and may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let mut admin = PgConnection::connect(PG_ADMIN_URL).await?;
                admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await.map(|_| ())
            })
        })
        .join();
    }
}

fn serve(dir: &Path, listen: &str, db: &TestDb) -> Hive {
    let (child, base) = spawn_hive(
        Command::new(hive_bin())
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir)
            .env("HIVE_DATABASE_URL", &db.url)
            .env("HIVE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HIVE_NODE__HEARTBEAT_MS", BEAT_MS.to_string())
            .env("HIVE_NODE__SUSPECT_AFTER_MS", (BEAT_MS * 3 / 2).to_string())
            .env("HIVE_NODE__DEAD_AFTER_MS", (BEAT_MS * 5 / 2).to_string())
            .env("HIVE_POOL__PING_INTERVAL_MS", "200")
            .env("RUST_LOG", "warn"),
    );
    Hive { proc: Proc { child }, base, token: ADMIN_TOKEN.into() }
}

fn agent(hive: &str, token: &str, dir: &Path) -> Proc {
    let child = Command::new(hive_bin())
        .args(["node", "--hive", hive, "--cores", "4", "--ram-mb", "8192", "--disk-mb", "100000", "--name", "pg-agent", "--data-dir"])
        .arg(dir)
        .env("HIVE_NODE_TOKEN", token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start agent");
    Proc { child }
}

/// GET as JSON; `Null` while the hive cannot be reached (it may be restarting: callers poll).
async fn get(c: &reqwest::Client, hive: &Hive, path: &str) -> Value {
    match c.get(format!("{}{path}", hive.base)).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

async fn post(c: &reqwest::Client, hive: &Hive, path: &str) -> String {
    let r = c.post(format!("{}{path}", hive.base)).send().await.expect("request");
    assert!(r.status().is_success(), "POST {path}: {}", r.status());
    r.text().await.expect("body")
}

#[tokio::test]
async fn serve_on_postgres_keeps_handles_and_batches_across_kill_9() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hive_dir = dir.path().join("hive");
    let c = reqwest::Client::new();
    let mut hive = serve(&hive_dir, "127.0.0.1:0", &db);
    let jt = join_token(&c, &hive).await;
    let _agent = agent(&hive.base, &jt, &dir.path().join("agent"));
    until("the agent's node is ready", Duration::from_secs(60), || async {
        let n = get(&c, &hive, "/api/v1/nodes").await;
        n.as_array().is_some_and(|n| n.len() == 1 && n[0]["state"] == "ready").then_some(())
    })
    .await;

    post(&c, &hive, "/set-pool-size/1/2/600000").await;
    let b: u64 = post(&c, &hive, "/prepare-batch/1/https%3A%2F%2Fexample.org").await.parse().expect("batch id");
    let h: u64 = post(&c, &hive, &format!("/lock/{b}")).await.parse().expect("handle id");
    let before = until("the handle is assigned", Duration::from_secs(30), || async {
        let s = get(&c, &hive, &format!("/handle-status/{h}")).await;
        (s["assigned"] == true).then_some(s)
    })
    .await;
    let vm = before["vmid"].as_u64().expect("an assigned handle names its VM");

    // The rows are in Postgres, and nothing went to a SQLite file on the side.
    let mut pg = PgConnection::connect(&db.url).await.expect("connect to the test database");
    let row = sqlx::query("SELECT vm_id FROM handles WHERE pool = 'default' AND id = $1")
        .bind(h as i64)
        .fetch_one(&mut pg)
        .await
        .expect("the handle's row is in Postgres");
    assert_eq!(row.try_get::<Option<i64>, _>("vm_id").expect("vm_id"), Some(vm as i64));
    assert!(!hive_dir.join("hive.db").exists(), "no SQLite store next to Postgres");
    let _ = pg.close().await;

    // SIGKILL: no shutdown path runs. Start again on the same address, so the agent reconnects.
    let listen = hive.base.trim_start_matches("http://").to_string();
    hive.proc.child.kill().expect("kill -9 the hive");
    hive.proc.child.wait().expect("reap the hive");
    hive = serve(&hive_dir, &listen, &db);

    let after = until("the handle answers after the restart", Duration::from_secs(30), || async {
        let s = get(&c, &hive, &format!("/handle-status/{h}")).await;
        (s["assigned"] == true).then_some(s)
    })
    .await;
    assert_eq!(after["vmid"], before["vmid"], "the handle keeps its VM");
    let status = get(&c, &hive, "/all-status").await;
    let batches = status["batches"].as_array().expect("batches");
    assert!(batches.iter().any(|x| x["id"] == b), "batch {b} survived: {status}");
    // The restarted hive keeps counting from the stored ids: a new lock gets a new handle.
    let h2: u64 = post(&c, &hive, &format!("/lock/{b}")).await.parse().expect("handle id");
    assert!(h2 > h, "handle ids are not reused ({h2} after {h})");
}
