//! The database goes away under load. A real `hive up` (two simulated nodes) keeps its state in
//! a PostgreSQL cluster the test owns; clients lock and release while the test stops the
//! server. Calls that need the store then fail fast with 503 and a JSON error naming the
//! database, `/readyz` says so, nothing is half-applied, and when the server returns the hive
//! resumes by itself: every handle a client was given still answers, no VM is held twice.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

use crate::agents::Proc;
use crate::servers::OwnPostgres;
use crate::support::{hive_bin, spawn_hive, until};

struct Hive {
    _proc: Proc,
    base: String,
    c: reqwest::Client,
}

impl Hive {
    fn start(dir: &std::path::Path, database_url: &str) -> Hive {
        let (child, base) = spawn_hive(
            Command::new(hive_bin())
                .args(["up", "--listen", "127.0.0.1:0", "--sim-nodes", "2", "--data-dir"])
                .arg(dir)
                .env("HIVE_DATABASE_URL", database_url)
                .env("HIVE_POOL__PING_INTERVAL_MS", "200")
                .env("RUST_LOG", "error"),
        );
        let c = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");
        Hive { _proc: Proc { child }, base, c }
    }

    async fn post(&self, path: &str) -> Result<(u16, String), reqwest::Error> {
        let r = self.c.post(format!("{}{path}", self.base)).send().await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    async fn get(&self, path: &str) -> Result<(u16, Value), reqwest::Error> {
        let r = self.c.get(format!("{}{path}", self.base)).send().await?;
        let s = r.status().as_u16();
        Ok((s, r.json().await.unwrap_or(Value::Null)))
    }
}

#[tokio::test]
async fn postgres_stopping_under_load_gives_fast_503s_and_the_hive_recovers_by_itself() {
    let mut pg = OwnPostgres::start();
    pg.create_db("hive");
    let dir = tempfile::tempdir().unwrap();
    let hive = Arc::new(Hive::start(dir.path(), &pg.url("hive")));
    assert_eq!(hive.post("/set-pool-size/4/8/600000").await.unwrap().0, 200);
    let batch = hive.post("/prepare-batch/0/https%3A%2F%2Fexample.org").await.unwrap().1;

    // Load: lock, wait for the VM, release; every handle the hive acknowledged is recorded.
    // handle → whether the client's release of it was acknowledged.
    let given = Arc::new(Mutex::new(BTreeMap::<u64, bool>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (hive, given, stop, batch) = (hive.clone(), given.clone(), stop.clone(), batch.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((200, h)) = hive.post(&format!("/lock/{batch}")).await else { continue };
                let h: u64 = h.trim().parse().expect("a handle id");
                given.lock().insert(h, false);
                if let Ok((200, _)) = hive.post(&format!("/release/{h}")).await {
                    given.lock().insert(h, true);
                }
            }
        }));
    }
    until("some cycles ran", Duration::from_secs(30), || async { (given.lock().len() >= 10).then_some(()) }).await;

    pg.stop();
    // A call that must be durable fails fast, names the database, and changes nothing.
    let t = Instant::now();
    let (status, body) = until("a lock is refused with 503", Duration::from_secs(30), || async {
        let (s, b) = hive.post(&format!("/lock/{batch}")).await.ok()?;
        (s == 503).then_some((s, b))
    })
    .await;
    let refused_after = t.elapsed();
    assert_eq!(status, 503);
    let body: Value = serde_json::from_str(&body).expect("a JSON error");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default().to_lowercase();
    assert!(message.contains("database"), "the error names the cause: {body}");
    let t = Instant::now();
    let (s, _) = hive.post(&format!("/lock/{batch}")).await.unwrap();
    assert_eq!(s, 503);
    assert!(t.elapsed() < Duration::from_secs(5), "a refusal while the database is down took {:?}", t.elapsed());
    let (s, ready) = hive.get("/readyz").await.unwrap();
    assert_eq!(s, 503, "/readyz reports the outage: {ready}");
    eprintln!("first 503 {refused_after:?} after the stop");

    pg.resume();
    until("the hive is ready again", Duration::from_secs(60), || async { (hive.get("/readyz").await.ok()?.0 == 200).then_some(()) }).await;
    until("locks succeed again", Duration::from_secs(60), || async {
        let (s, h) = hive.post(&format!("/lock/{batch}")).await.ok()?;
        (s == 200).then(|| given.lock().insert(h.trim().parse().expect("id"), false))
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    // Every handle a client was given and did not release is still there and answers.
    let all = hive.get("/all-status").await.unwrap().1;
    let handles: BTreeSet<u64> = all["handles"].as_array().expect("handles").iter().filter_map(|h| h["handle"].as_u64()).collect();
    let kept: Vec<u64> = given.lock().iter().filter(|(_, released)| !**released).map(|(h, _)| *h).collect();
    assert!(!kept.is_empty(), "the last lock is held");
    for h in kept {
        assert!(handles.contains(&h), "handle {h} was given to a client and is gone: {all}");
        let (s, v) = hive.get(&format!("/handle-status/{h}")).await.unwrap();
        assert!(s == 200 && v.get("assigned").is_some(), "handle {h}: {s} {v}");
    }
    let mut held = BTreeSet::new();
    for h in all["handles"].as_array().unwrap() {
        if let Some(vm) = h["vmid"].as_u64() {
            assert!(held.insert(vm), "VM {vm} held by two handles: {all}");
        }
    }
}
