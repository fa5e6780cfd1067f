//! Durability across a hard kill: the real `hive` binary is started on a data directory,
//! given batches, handles and an assignment, killed with SIGKILL, and started again.
//! Everything a client was told must still be there.

use std::process::{Child, Command};
use std::time::Duration;

use serde_json::{Value, json};

use guaca_hive::drivers::{Hypervisor, VmSpec};

use crate::support::{TestApp, hive_bin, in_state, spawn_hive, until};

struct Proc {
    child: Child,
    base: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &std::path::Path) -> Proc {
    let (child, base) = spawn_hive(
        Command::new(hive_bin())
            .args(["up", "--listen", "127.0.0.1:0", "--sim-nodes", "2", "--data-dir"])
            .arg(dir)
            .env("HIVE_SIM__TIMINGS__CREATE_MS", "1")
            .env("HIVE_SIM__TIMINGS__BOOT_MS", "5")
            .env("HIVE_SIM__TIMINGS__PREPARE_MS", "1")
            .env("HIVE_SIM__TIMINGS__CLEANUP_MS", "1")
            .env("HIVE_POOL__PING_INTERVAL_MS", "100")
            .env("RUST_LOG", "warn"),
    );
    Proc { child, base }
}

async fn post(c: &reqwest::Client, base: &str, path: &str) -> String {
    let r = c.post(format!("{base}{path}")).send().await.expect("request");
    assert!(r.status().is_success(), "POST {path}: {}", r.status());
    r.text().await.expect("body")
}

async fn get(c: &reqwest::Client, base: &str, path: &str) -> Value {
    c.get(format!("{base}{path}")).send().await.expect("request").json().await.expect("json")
}

#[tokio::test]
async fn state_survives_kill_9_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let p = start(dir.path());
    post(&c, &p.base, "/set-pool-size/1/2/60000").await;
    let b: u64 = post(&c, &p.base, "/prepare-batch/2/https%3A%2F%2Fexample.org%2Fstart").await.parse().unwrap();
    let h1: u64 = post(&c, &p.base, &format!("/lock/{b}")).await.parse().unwrap();
    let assigned = until("h1 assigned", Duration::from_secs(10), || async {
        let s = get(&c, &p.base, &format!("/handle-status/{h1}")).await;
        (s["assigned"] == true).then_some(s)
    })
    .await;
    post(&c, &p.base, &format!("/renew-expire/{h1}/3600000")).await;
    let assigned = {
        let mut a = assigned;
        a["expires"] = json!(true);
        a["expireTime"] = get(&c, &p.base, &format!("/handle-status/{h1}")).await["expireTime"].clone();
        a
    };
    // Two more locks on a batch whose last VM is READY: one is assigned, one stays pending
    // (pool at max 2 with both VMs taken).
    let h2: u64 = post(&c, &p.base, &format!("/lock/{b}")).await.parse().unwrap();
    let h3: u64 = post(&c, &p.base, &format!("/lock/{b}")).await.parse().unwrap();
    until("h2 assigned", Duration::from_secs(10), || async {
        (get(&c, &p.base, &format!("/handle-status/{h2}")).await["assigned"] == true).then_some(())
    })
    .await;
    let before = get(&c, &p.base, "/all-status").await;
    assert_eq!(before["pendingLocks"], json!([{"batchId": b, "handle": h3}]));

    // SIGKILL: no shutdown path runs.
    let mut p = p;
    p.child.kill().expect("kill -9");
    p.child.wait().expect("reaped");
    drop(p);

    let q = start(dir.path());
    let after_h1 = get(&c, &q.base, &format!("/handle-status/{h1}")).await;
    assert_eq!(after_h1, assigned, "the same handle answers with the same VM, address and password");
    let after = get(&c, &q.base, "/all-status").await;
    assert_eq!(after["poolSize"], before["poolSize"]);
    assert_eq!(after["batches"], before["batches"]);
    assert_eq!(after["handles"], before["handles"]);
    assert_eq!(after["pendingLocks"], before["pendingLocks"]);
    assert_eq!(after["vms"], before["vms"], "stable VMs keep their ids, states and addresses");
    // Counters continue: the next ids are new ones.
    let h4: u64 = post(&c, &q.base, &format!("/lock/{b}")).await.parse().unwrap();
    assert_eq!(h4, h3 + 1);
    let b2: u64 = post(&c, &q.base, "/prepare-batch/0/x").await.parse().unwrap();
    assert_eq!(b2, b + 1);
    // The restarted hive still pings the re-attached VMs: they outlive the health timeout.
    post(&c, &q.base, &format!("/release/{h2}")).await;
    let freed = until("released VM cleaned and reused", Duration::from_secs(10), || async {
        let s = get(&c, &q.base, &format!("/handle-status/{h3}")).await;
        s["vmid"].as_u64()
    })
    .await;
    assert!(freed > 0);
}

#[tokio::test]
async fn bad_config_is_reported_with_every_problem_and_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(hive_bin())
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("HIVE_POOL__MAX_CAP", "0")
        .env("HIVE_VM__CORES", "0")
        .output()
        .expect("run hive");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pool.max_cap") && err.contains("vm.cores"), "{err}");
}

#[tokio::test]
async fn restart_keeps_known_vms_and_destroys_orphans() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/2/4/60000").await;
    let before = app.until_status("two FREE", |s| in_state(s, 3).len() == 2).await;
    // A domain the hypervisor holds but no pool recorded (as if created just before a crash).
    let spec = VmSpec { name: "stray".into(), template: "desktop".into(), cores: 1, ram_mb: 256, disk_mb: 256 };
    let orphan = app.hive.sim(1).unwrap().create(&spec).await.unwrap();
    let app = app.restart().await;
    assert!(!app.hive.sim(1).unwrap().domains().contains(&orphan), "the orphan is destroyed at start");
    let after = app.all_status().await;
    assert_eq!(after["vms"], before["vms"], "the pool's VMs are re-attached, not rebuilt");
    let used: u32 = app.hive.nodes().await.unwrap().iter().map(|n| n.vms).sum();
    assert_eq!(used, 2, "their capacity is claimed again");
    app.stop().await;
}

#[tokio::test]
async fn sigint_shuts_the_binary_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path());
    let c = reqwest::Client::new();
    assert_eq!(get(&c, &p.base, "/healthz").await["status"], "ok");
    let pid = p.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = until("hive exits after SIGINT", Duration::from_secs(15), || {
        let exited = p.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "clean exit, got {status}");
}
