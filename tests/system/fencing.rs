//! The store's fence, end to end in one hive: when a newer manager of a pool takes the pool's
//! fence (as an instance taking the pool over does), the old manager cannot write any more. Its
//! next commit is refused whole, the caller gets a 503 naming why, nothing of it is stored, and
//! the manager stops; here, as the only instance, it then starts again under its own lease.

use std::time::Duration;

use crate::support::{TestApp, until};

#[tokio::test]
async fn a_manager_whose_fence_was_taken_writes_nothing_more() {
    let app = TestApp::spawn().await;
    app.post_ok("/set-pool-size/2/4/600000").await;
    let batch: u64 = app.post_ok("/prepare-batch/0/https%3A%2F%2Fexample.org").await.parse().unwrap();
    app.until_status("two FREE VMs", |s| crate::support::in_state(s, 3).len() == 2).await;

    // A successor takes the fence, as a pool's new holder does before it loads the pool.
    let store = app.hive.store().clone();
    let before = store.load_pools().await.unwrap().into_iter().find(|p| p.name == "default").unwrap().snapshot;
    store.take_fence("default", 0).await.expect("take the fence");

    let r = app.post(&format!("/lock/{batch}")).await;
    assert_eq!(r.status(), 503, "the old manager's lock cannot be committed");
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("newer manager"), "the error says why: {body}");
    let after = store.load_pools().await.unwrap().into_iter().find(|p| p.name == "default").unwrap().snapshot;
    assert_eq!(after.handles, before.handles, "no handle was stored");
    assert_eq!(after.next_handle, before.next_handle, "no handle id was used up in the store");

    // The only instance still holds the lease: its manager comes back, takes the fence again
    // and serves.
    let handle: u64 = until("locks work again", Duration::from_secs(20), || async {
        let r = app.post(&format!("/lock/{batch}")).await;
        if r.status() == 200 { r.text().await.ok()?.trim().parse().ok() } else { None }
    })
    .await;
    let stored = store.load_pools().await.unwrap().into_iter().find(|p| p.name == "default").unwrap().snapshot;
    assert!(stored.handles.iter().any(|h| h.id == handle), "the new manager's handle is stored");
    app.stop().await;
}
