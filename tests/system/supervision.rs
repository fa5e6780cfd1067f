//! Supervision: a panicking SessionActor or PoolManager is restarted from the store and no
//! handle is lost; repeated failures escalate and stop the hive instead of looping forever.

use std::time::Duration;

use crate::support::{TestApp, until};

fn restarts(metrics: &str, actor: &str) -> u64 {
    let key = format!("hive_actor_restarts_total{{actor=\"{actor}\"}}");
    metrics.lines().find_map(|l| l.strip_prefix(&key).map(|v| v.trim().parse::<f64>().unwrap() as u64)).unwrap_or(0)
}

#[tokio::test]
async fn a_panicking_session_is_restarted_and_keeps_its_vm() {
    let app = TestApp::spawn().await;
    let (_, h, vm) = app.held_vm(1, 3).await;
    let before = restarts(&app.get("/metrics").await.text().await.unwrap(), "session");
    app.hive.pool("default").unwrap().inject_session_crash(vm);
    until("session restart counted", Duration::from_secs(5), || async {
        (restarts(&app.get("/metrics").await.text().await.unwrap(), "session") > before).then_some(())
    })
    .await;
    // Past two health timeouts (1 s each), the VM is still pinged by its new session.
    let t0 = std::time::Instant::now();
    until("two health timeouts passed with the handle intact", Duration::from_secs(10), || async {
        let s = app.json(&format!("/handle-status/{h}")).await;
        assert_eq!(s["vmid"], vm, "the handle kept its VM");
        (t0.elapsed() > Duration::from_millis(2_200)).then_some(())
    })
    .await;
    app.post_ok(&format!("/release/{h}")).await;
    app.until_status("cleaned by the restarted session", |s| crate::support::in_state(s, 3).contains(&vm)).await;
    app.stop().await;
}

#[tokio::test]
async fn a_panicking_pool_manager_is_rebuilt_from_the_store() {
    let app = TestApp::spawn().await;
    let (b, h1, vm) = app.held_vm(1, 1).await;
    let h2: u64 = app.post_ok(&format!("/lock/{b}")).await.parse().unwrap();
    let before = app.all_status().await;
    let pool = app.hive.pool("default").unwrap();
    pool.inject_crash();
    // Callers see at most a short wait: the handle survives in the supervisor's slot.
    until("pool answers again", Duration::from_secs(5), || async {
        let m = app.get("/metrics").await.text().await.unwrap();
        (restarts(&m, "pool_manager") >= 1).then_some(())
    })
    .await;
    let after = app.all_status().await;
    let used: u32 = app.hive.nodes().await.unwrap().iter().map(|n| n.vms).sum();
    assert_eq!(used as usize, after["vms"].as_array().unwrap().len(), "capacity claimed once per VM, not again on restart");
    assert_eq!(after["handles"], before["handles"]);
    assert_eq!(after["pendingLocks"], before["pendingLocks"]);
    assert_eq!(after["batches"], before["batches"]);
    assert_eq!(app.json(&format!("/handle-status/{h1}")).await["vmid"], vm);
    // It still works: releasing h1 lets the pending h2 take the cleaned VM.
    app.post_ok(&format!("/release/{h1}")).await;
    let got = until("h2 assigned after restart", Duration::from_secs(10), || async {
        app.json(&format!("/handle-status/{h2}")).await["vmid"].as_u64()
    })
    .await;
    assert_eq!(got, vm);
    app.stop().await;
}

#[tokio::test]
async fn repeated_pool_failures_escalate_and_stop_the_hive() {
    let app = TestApp::builder().max_restarts(2).spawn().await;
    let pool = app.hive.pool("default").unwrap();
    for n in 0..3 {
        until("pool running", Duration::from_secs(5), || async { pool.status().await.ok() }).await;
        pool.inject_crash();
        if n < 2 {
            until("restarted", Duration::from_secs(5), || async { pool.status().await.ok() }).await;
        }
    }
    tokio::time::timeout(Duration::from_secs(10), app.hive.stopped()).await.expect("the hive gives up after the third failure");
}
