//! One scenario per vmcloud rule (specs/vmcloud.md), through the HTTP API.

use std::time::Duration;

use guaca_hive::domain::pool::Timeouts;
use guaca_hive::drivers::sim::SimTimings;
use serde_json::json;

use crate::support::{TestApp, batch, in_state, until, vm_count};

const FREE: u64 = 3;
const READY: u64 = 4;
const OCCUPIED: u64 = 5;

#[tokio::test]
async fn pool_grows_to_min_and_no_further() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/3/5/60000").await;
    let s = app.until_status("three FREE VMs", |s| in_state(s, FREE).len() == 3).await;
    assert_eq!(vm_count(&s), 3);
    assert_eq!(s["poolSize"], json!({"min": 3, "max": 5, "linger": 60000}));
    // The rules settle: a later look still shows exactly min.
    assert_eq!(vm_count(&app.all_status().await), 3);
    app.stop().await;
}

#[tokio::test]
async fn free_vms_above_min_are_killed_after_linger() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/3/5/60000").await;
    app.until_status("three FREE VMs", |s| in_state(s, FREE).len() == 3).await;
    app.post_ok("/set-pool-size/1/5/800").await;
    // Linger counts from when each VM became FREE: the first kill may not come earlier
    // than the first of those moments plus linger.
    let pool = app.hive.pool("default").unwrap();
    let first_free = pool.status().await.unwrap().vms.iter().map(|v| v.since).min().unwrap();
    let first_drop = until("first lingering VM killed", Duration::from_secs(10), || async {
        let n = vm_count(&app.all_status().await);
        (n < 3).then(|| app.hive.now())
    })
    .await;
    assert!(first_drop >= first_free + 800, "killed {} ms after becoming FREE, before linger", first_drop - first_free);
    let s = app.until_status("shrunk to min", |s| vm_count(s) == 1).await;
    assert_eq!(in_state(&s, FREE).len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn max_caps_the_pool_and_extra_preparations_wait_in_the_queue() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/0/2/60000").await;
    let b: u64 = app.post_ok("/prepare-batch/5/http%3A%2F%2Fexample.org").await.parse().unwrap();
    let s = app.until_status("two READY VMs", |s| in_state(s, READY).len() == 2).await;
    assert_eq!(vm_count(&s), 2, "never above max");
    assert_eq!(s["preps"], json!([b, b, b]), "three preparations wait");
    assert_eq!(batch(&s, b).unwrap()["data"]["home_page"], "http://example.org", "homepage URL-decoded");
    app.stop().await;
}

#[tokio::test]
async fn preparation_queue_is_first_in_first_out() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/0/1/60000").await;
    let a: u64 = app.post_ok("/prepare-batch/1/a").await.parse().unwrap();
    let b: u64 = app.post_ok("/prepare-batch/1/b").await.parse().unwrap();
    let s = app.until_status("first batch ready", |s| in_state(s, READY).len() == 1).await;
    assert_eq!(batch(&s, a).unwrap()["vms"].as_array().unwrap().len(), 1, "the first batch got the only VM");
    assert_eq!(s["preps"], json!([b]));
    // Lock and release a's VM: it is cleaned, then prepared for b (the queue's front).
    let (h, vm) = app.lock_assigned(a).await;
    app.post_ok(&format!("/release/{h}")).await;
    let s = app.until_status("b prepared", |s| batch(s, b).is_some_and(|x| !x["vms"].as_array().unwrap().is_empty())).await;
    assert_eq!(batch(&s, b).unwrap()["vms"], json!([vm]));
    assert_eq!(s["preps"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn over_locking_prepares_one_more_vm() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/0/5/60000").await;
    let b: u64 = app.post_ok("/prepare-batch/1/h").await.parse().unwrap();
    app.until_status("one READY", |s| in_state(s, READY).len() == 1).await;
    let (h1, vm1) = app.lock_assigned(b).await;
    let (h2, vm2) = app.lock_assigned(b).await;
    assert_ne!(h1, h2);
    assert_ne!(vm1, vm2, "the over-lock got its own VM");
    let s = app.all_status().await;
    assert_eq!(batch(&s, b).unwrap()["size"], 0);
    assert_eq!(in_state(&s, OCCUPIED).len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn release_cleans_the_vm_back_to_free_and_deletes_the_handle() {
    let app = TestApp::spawn().await;
    let (b, h, vm) = app.held_vm(1, 5).await;
    let status = app.json(&format!("/handle-status/{h}")).await;
    assert_eq!(status["vm"]["state"], OCCUPIED);
    assert_eq!(status["expires"], false);
    assert_eq!(status["expireTime"], json!(null));
    assert_eq!(app.post_ok(&format!("/release/{h}")).await, "");
    app.until_status("VM FREE again", |s| in_state(s, FREE).contains(&vm)).await;
    assert_eq!(app.get(&format!("/handle-status/{h}")).await.status(), 404);
    let s = app.all_status().await;
    assert_eq!(batch(&s, b).unwrap()["size"], 0, "release does not restore the batch size");
    app.stop().await;
}

#[tokio::test]
async fn cancel_batch_keeps_pending_locks_then_removes_the_batch() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/0/0/60000").await;
    let b: u64 = app.post_ok("/prepare-batch/1/h").await.parse().unwrap();
    let h: u64 = app.post_ok(&format!("/lock/{b}")).await.parse().unwrap();
    app.post_ok(&format!("/cancel-batch/{b}")).await;
    let s = app.all_status().await;
    assert_eq!(batch(&s, b).unwrap()["markDelete"], true);
    assert_eq!(s["pendingLocks"], json!([{"batchId": b, "handle": h}]));
    // Capacity arrives: the pending lock of the cancelled batch is still satisfied.
    app.post_ok("/set-pool-size/0/1/60000").await;
    let vm = until("pending lock assigned", Duration::from_secs(10), || async {
        app.json(&format!("/handle-status/{h}")).await["vmid"].as_u64()
    })
    .await;
    let s = app.until_status("cancelled batch removed", |s| batch(s, b).is_none()).await;
    assert_eq!(in_state(&s, OCCUPIED), vec![vm]);
    app.stop().await;
}

#[tokio::test]
async fn cancel_batch_cleans_unlocked_ready_vms() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/0/3/60000").await;
    let b: u64 = app.post_ok("/prepare-batch/2/h").await.parse().unwrap();
    app.until_status("two READY", |s| in_state(s, READY).len() == 2).await;
    app.post_ok(&format!("/cancel-batch/{b}")).await;
    let s = app.until_status("READY VMs cleaned to FREE and batch gone", |s| in_state(s, FREE).len() == 2 && batch(s, b).is_none()).await;
    assert!(in_state(&s, READY).is_empty());
    app.stop().await;
}

#[tokio::test]
async fn handle_expires_after_renew_expire() {
    let app = TestApp::spawn().await;
    let (_, h, vm) = app.held_vm(1, 5).await;
    assert_eq!(app.post_ok(&format!("/renew-expire/{h}/400")).await, "{}");
    let status = app.json(&format!("/handle-status/{h}")).await;
    assert_eq!(status["expires"], true);
    let at = status["expireTime"].as_u64().expect("expireTime");
    let now = app.hive.now();
    assert!(at > now && at <= now + 400, "expireTime {at} is about 400 ms after {now}");
    until("handle expired", Duration::from_secs(10), || async {
        (app.get(&format!("/handle-status/{h}")).await.status() == 404).then_some(())
    })
    .await;
    app.until_status("VM cleaned after expiry", |s| in_state(s, FREE).contains(&vm)).await;
    let ev = app.json(&format!("/fetch-events/{h}/-1")).await;
    let kinds: Vec<&str> = ev["newEvents"].as_array().unwrap().iter().map(|e| e["data"]["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["assigned", "expired"]);
    app.stop().await;
}

#[tokio::test]
async fn vm_whose_pings_fail_is_killed_and_its_handle_lost() {
    let app = TestApp::builder().timeouts(Timeouts { healthy: 600, ..Timeouts::default() }).spawn().await;
    let (_, h, vm) = app.held_vm(1, 5).await;
    let placement =
        app.hive.pool("default").unwrap().status().await.unwrap().vms.into_iter().find(|v| v.id == vm).unwrap().placement.unwrap();
    // Failure injection in the simulator: this VM stops answering health pings.
    app.hive.sim(placement.node).unwrap().fail_pings(&placement.domain, true);
    app.until_status("unhealthy VM killed", |s| !s["vms"].as_array().unwrap().iter().any(|v| v["vmid"] == vm)).await;
    until("handle gone", Duration::from_secs(5), || async {
        (app.get(&format!("/handle-status/{h}")).await.status() == 404).then_some(())
    })
    .await;
    let ev = app.json(&format!("/fetch-events/{h}/0")).await;
    assert_eq!(ev["newEvents"][0]["data"]["type"], "vm-lost");
    // The pool replaces it to stay at min, and the simulator no longer holds the dead domain.
    app.until_status("replacement booted", |s| in_state(s, FREE).len() == 1).await;
    until("domain destroyed", Duration::from_secs(5), || async {
        (!app.hive.sim(placement.node).unwrap().domains().contains(&placement.domain)).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn boot_failures_back_off_and_recover() {
    let app = TestApp::builder().timings(SimTimings { failure_rate: 1.0, ..SimTimings::instant() }).spawn().await;
    app.post_ok("/set-pool-size/2/5/60000").await;
    // Every create fails: the pool stays empty and does not spin.
    let passes_a = app.hive.pool("default").unwrap().status().await.unwrap();
    assert!(passes_a.vms.iter().all(|v| v.state.code() <= 1 || v.state.code() == 6));
    for n in 1..=2 {
        app.hive.sim(n).unwrap().set_timings(SimTimings::instant());
    }
    app.until_status("pool recovers once the hypervisor works", |s| in_state(s, FREE).len() == 2).await;
    app.stop().await;
}

#[tokio::test]
async fn long_poll_wakes_on_a_new_event() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/0/0/60000").await;
    let b: u64 = app.post_ok("/prepare-batch/1/h").await.parse().unwrap();
    let h: u64 = app.post_ok(&format!("/lock/{b}")).await.parse().unwrap();
    let last = app.get(&format!("/last-event-id/{h}")).await.text().await.unwrap();
    assert_eq!(last, "-1", "no events yet");
    let (client, url) = (app.client.clone(), format!("{}/fetch-events/{h}/-1", app.base));
    let started = std::time::Instant::now();
    let poll = tokio::spawn(async move { client.get(url).send().await.unwrap().json::<serde_json::Value>().await.unwrap() });
    app.post_ok("/set-pool-size/0/1/60000").await;
    let ev = poll.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "woken by the event, not by the 5 s timeout");
    assert_eq!(ev["lastId"], 0);
    assert_eq!(ev["newEvents"][0]["data"]["type"], "assigned");
    assert!(ev["newEvents"][0]["time"].as_u64().unwrap() > 1_600_000_000_000, "time is epoch ms");
    assert_eq!(app.get(&format!("/last-event-id/{h}")).await.text().await.unwrap(), "0");
    app.stop().await;
}

#[tokio::test]
async fn success_bodies_match_the_original_byte_for_byte() {
    let app = TestApp::spawn().await;
    assert_eq!(app.post_ok("/set-pool-size/0/0/60000").await, "");
    assert_eq!(app.post_ok("/prepare-batch/1/h").await, "1");
    assert_eq!(app.post_ok("/lock/1").await, "1");
    assert_eq!(app.get("/handle-status/1").await.text().await.unwrap(), r#"{"assigned":false}"#);
    assert_eq!(
        app.get("/all-status").await.text().await.unwrap(),
        concat!(
            r#"{"vms":[],"batches":[{"id":1,"size":0,"data":{"profile_name":"batch-1","home_page":"h"},"vms":[],"markDelete":false}],"#,
            r#""preps":[1],"handles":[{"handle":1,"assigned":false,"vmid":null}],"pendingLocks":[{"batchId":1,"handle":1}],"#,
            r#""poolSize":{"min":0,"max":0,"linger":60000}}"#
        )
    );
    assert_eq!(app.get("/last-event-id/1").await.text().await.unwrap(), "-1");
    assert_eq!(app.post_ok("/renew-expire/1/60000").await, "{}");
    assert_eq!(app.post_ok("/cancel-batch/1").await, "");
    assert_eq!(app.post_ok("/release/1").await, "");
    app.stop().await;
}
