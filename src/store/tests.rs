//! Store behaviour through the public interface (`open` + `Store`), each test run twice by
//! `each_store!`: on a real SQLite file in a temporary directory and on a fresh database of the
//! local Postgres server.

use super::test_stores::{Backend, each_store};
use super::*;
use crate::domain::pool::{Batch, Handle, PendingLock, PoolSize, PoolSnapshot};
use crate::domain::vm::{Placement, Vm, VmAddress, VmState};

fn vm(id: u64, state: VmState, batch: Option<u64>) -> Vm {
    let placed = state != VmState::Creating;
    Vm {
        id,
        state,
        since: 1_000 + id,
        contact: 2_000 + id,
        batch,
        placement: placed.then(|| Placement { node: id % 3 + 1, domain: format!("hive-vm-{id}") }),
        address: if state.is_stable() || state == VmState::Wait {
            VmAddress {
                ip: format!("10.0.0.{id}"),
                public_ip: format!("203.0.113.{id}"),
                vnc_port: 5900 + id as u16,
                vnc_passwd: format!("pw{id}"),
            }
        } else {
            VmAddress::default()
        },
        op: id * 10,
    }
}

/// A pool with a VM in every state, a batch being prepared, a cancelled batch, two pending
/// locks and two assigned handles (one with an expiry).
fn sample() -> PoolSnapshot {
    let mut vms: Vec<Vm> = VmState::ALL.iter().enumerate().map(|(i, s)| vm(i as u64 + 1, *s, None)).collect();
    vms[2].batch = Some(1); // WAIT, being prepared
    vms[4].batch = Some(1); // READY
    PoolSnapshot {
        size: PoolSize { min: 2, max: 10, linger: 60_000 },
        next_vm: 9,
        next_batch: 3,
        next_handle: 5,
        preps: vec![1],
        pending: vec![PendingLock { batch: 1, handle: 3 }, PendingLock { batch: 1, handle: 4 }],
        vms,
        batches: vec![
            Batch {
                id: 1,
                size: 2,
                profile_name: "batch-1".into(),
                home_page: "https://example.org/".into(),
                vms: vec![5, 3],
                mark_delete: false,
            },
            Batch { id: 2, size: 0, profile_name: "batch-2".into(), home_page: String::new(), vms: vec![], mark_delete: true },
        ],
        handles: vec![
            Handle { id: 1, batch: 2, vm: Some(6), expires_at: Some(90_000), created_at: 50_000 },
            Handle { id: 2, batch: 1, vm: Some(4), expires_at: None, created_at: 51_000 },
            Handle { id: 3, batch: 1, vm: None, expires_at: None, created_at: 52_000 },
            Handle { id: 4, batch: 1, vm: None, expires_at: Some(u64::MAX), created_at: 53_000 },
        ],
    }
}

fn stored(name: &str, snapshot: PoolSnapshot) -> StoredPool {
    StoredPool { name: name.into(), snapshot }
}

each_store! {
    #[tokio::test]
    async fn snapshot_round_trips(s) {
        let store = s.store.clone();
        assert_eq!(store.kind(), match s.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        });
        store.ping().await.expect("ping");
        assert_eq!(store.load_pools().await.expect("load"), vec![]);

        let snap = sample();
        // Written out of name order: loading sorts pools by name.
        store.apply(&Change::snapshot("zeta", &PoolSnapshot::default())).await.expect("apply");
        store.apply(&Change::snapshot("alpha", &snap)).await.expect("apply");
        let loaded = store.load_pools().await.expect("load");
        assert_eq!(loaded, vec![stored("alpha", snap.clone()), stored("zeta", PoolSnapshot::default())]);

        // Upserts overwrite every column, including back to NULL.
        let mut changed = snap;
        changed.size.max = 12;
        changed.preps.clear();
        changed.pending.remove(0);
        changed.vms[3].state = VmState::Error;
        changed.vms[3].placement = None;
        changed.vms[3].batch = Some(2);
        changed.batches[0].vms = vec![3];
        changed.handles[0].expires_at = None;
        changed.handles[2].vm = Some(8);
        store.apply(&Change::snapshot("alpha", &changed)).await.expect("apply");
        let loaded = store.load_pools().await.expect("load");
        assert_eq!(loaded[0], stored("alpha", changed));
    }
}

each_store! {
    #[tokio::test]
    async fn row_deletes_remove_only_their_row(s) {
        let store = s.store.clone();
        let mut snap = sample();
        store.apply(&Change::snapshot("p", &snap)).await.expect("apply");
        store
            .apply(&[
                Change::VmDeleted { pool: "p".into(), id: 8 },
                Change::BatchDeleted { pool: "p".into(), id: 2 },
                Change::HandleDeleted { pool: "p".into(), id: 1 },
                Change::VmDeleted { pool: "p".into(), id: 999 }, // absent: not an error
            ])
            .await
            .expect("deletes");
        snap.vms.retain(|v| v.id != 8);
        snap.batches.retain(|b| b.id != 2);
        snap.handles.retain(|h| h.id != 1);
        assert_eq!(store.load_pools().await.expect("load"), vec![stored("p", snap)]);
    }
}

each_store! {
    #[tokio::test]
    async fn pool_delete_removes_the_pool_and_its_rows(s) {
        let store = s.store.clone();
        store.apply(&Change::snapshot("gone", &sample())).await.expect("apply");
        store.apply(&Change::snapshot("kept", &sample())).await.expect("apply");
        store.apply(&[Change::PoolDeleted { pool: "gone".into() }]).await.expect("delete");
        assert_eq!(store.load_pools().await.expect("load"), vec![stored("kept", sample())]);

        // Re-creating the pool starts empty: no orphan rows came back.
        store.apply(&Change::snapshot("gone", &PoolSnapshot::default())).await.expect("apply");
        let loaded = store.load_pools().await.expect("load");
        assert_eq!(loaded[0], stored("gone", PoolSnapshot::default()));
    }
}

each_store! {
    #[tokio::test]
    async fn apply_is_all_or_nothing(s) {
        let store = s.store.clone();
        let mut changes = Change::snapshot("p", &sample());
        changes.push(Change::Node(node(1)));
        changes.push(Change::Vm { pool: "no-such-pool".into(), vm: vm(1, VmState::Free, None) });
        let err = store.apply(&changes).await.expect_err("foreign key violation");
        assert!(matches!(err, StoreError::Query(_)), "{err:?}");
        assert_eq!(store.load_pools().await.expect("load"), vec![]);
        assert_eq!(store.load_nodes().await.expect("load"), vec![]);
    }
}

each_store! {
    #[tokio::test]
    async fn data_survives_reopen(s) {
        let store = s.store.clone();
        store.apply(&Change::snapshot("p", &sample())).await.expect("apply");
        store.apply(&[Change::Node(node(4))]).await.expect("apply");
        drop(store);
        let url = &s.url;

        // Opening directly runs the migrations again, which must be a no-op.
        match s.backend {
            Backend::Sqlite => {
                let direct = SqliteStore::open(url).await.expect("reopen");
                assert_eq!(direct.load_pools().await.expect("load"), vec![stored("p", sample())]);
                direct.close().await;
            }
            Backend::Postgres => {
                let direct = PostgresStore::open(url).await.expect("reopen");
                assert_eq!(direct.load_pools().await.expect("load"), vec![stored("p", sample())]);
                direct.close().await;
            }
        }

        let again = open(url).await.expect("reopen");
        assert_eq!(again.load_pools().await.expect("load"), vec![stored("p", sample())]);
        assert_eq!(again.load_nodes().await.expect("load"), vec![node(4)]);
    }
}

fn node(id: u64) -> NodeRecord {
    NodeRecord {
        id,
        name: format!("node-{id}"),
        driver: "sim".into(),
        cores: 16,
        ram_mb: 65_536,
        disk_mb: 1 << 40,
        address: format!("192.0.2.{id}:7070"),
        state: "ready".into(),
        created_at: 1_700_000_000_000 + id,
        remote: id % 2 == 0,
        class: "participant".into(),
        admin: "active".into(),
        credential_hash: (id % 2 == 0).then(|| format!("{id:064x}")),
    }
}

each_store! {
    #[tokio::test]
    async fn nodes_round_trip(s) {
        let store = s.store.clone();
        store.apply(&[Change::Node(node(3)), Change::Node(node(1)), Change::Node(node(2))]).await.expect("apply");
        assert_eq!(store.load_nodes().await.expect("load"), vec![node(1), node(2), node(3)]);

        let mut drained = node(2);
        drained.state = "draining".into();
        drained.cores = 8;
        store.apply(&[Change::Node(drained.clone()), Change::NodeDeleted { id: 3 }]).await.expect("apply");
        assert_eq!(store.load_nodes().await.expect("load"), vec![node(1), drained]);
    }
}

each_store! {
    #[tokio::test]
    async fn a_node_row_write_keeps_the_admin_state_set_through_another_instance(s) {
        let store = s.store.clone();
        // A new row takes the record's admin state.
        let mut born_cordoned = node(5);
        born_cordoned.admin = "cordoned".into();
        store.apply(&[Change::Node(node(4)), Change::Node(born_cordoned)]).await.expect("apply");
        // Instance A cordons node 4; instance B, which has not seen it yet, writes the node's
        // state with its stale "active": the cordon stays.
        store.apply(&[Change::NodeAdmin { id: 4, admin: "cordoned".into() }]).await.expect("cordon");
        let mut stale = node(4);
        stale.state = "degraded".into();
        store.apply(&[Change::Node(stale.clone())]).await.expect("state write");
        let loaded = store.load_nodes().await.expect("load");
        let four = loaded.iter().find(|n| n.id == 4).expect("node 4");
        assert_eq!((four.admin.as_str(), four.state.as_str()), ("cordoned", "degraded"));
        assert_eq!(loaded.iter().find(|n| n.id == 5).expect("node 5").admin, "cordoned");

        // In one group the admin change lands after an upsert of the same node, whatever
        // their order, and the writer's merge of repeated rows keeps both.
        store.apply(&[Change::NodeAdmin { id: 4, admin: "draining".into() }, Change::Node(stale.clone()), Change::Node(node(1))]).await.expect("group");
        let four = store.load_nodes().await.expect("load").into_iter().find(|n| n.id == 4).expect("node 4");
        assert_eq!(four.admin, "draining");
        // An admin change of a node that is gone changes nothing.
        store.apply(&[Change::NodeAdmin { id: 99, admin: "cordoned".into() }]).await.expect("no row");
        assert!(store.load_nodes().await.expect("load").iter().all(|n| n.id != 99));
    }
}

#[tokio::test]
async fn open_rejects_unknown_schemes_and_memory() {
    for url in ["mysql://x/y", "no-scheme-here", "sqlite::memory:", "sqlite://", "postgres://db:notaport/hive"] {
        let err = open(url).await.err().unwrap_or_else(|| panic!("{url} opened"));
        assert!(matches!(err, StoreError::BadUrl(_)), "{url}: {err:?}");
    }
    let err = open("mysql://x/y").await.err().expect("refused");
    assert!(err.to_string().contains("postgres://"), "names what is supported: {err}");
}

#[tokio::test]
async fn an_unreachable_postgres_is_unavailable_and_names_the_server() {
    // Nothing listens on port 1; the password never shows in the error.
    let err = open("postgresql://hive:s3cret@127.0.0.1:1/hive").await.err().expect("refused");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:1/hive"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

#[test]
fn postgres_server_states_are_unavailable_and_statement_errors_are_not() {
    for code in ["08006", "08001", "08P01", "57P01", "57P02", "57P03", "53300", "53100"] {
        assert!(is_unavailable_sqlstate(code), "{code}");
    }
    for code in ["23503", "23505", "42P01", "40001", "57014", "22021"] {
        assert!(!is_unavailable_sqlstate(code), "{code}");
    }
}

#[tokio::test]
async fn open_reports_a_missing_directory() {
    let err = open("sqlite:///nonexistent-dir/x.db").await.err().expect("refused");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("/nonexistent-dir"), "{err}");
}

each_store! {
    #[tokio::test]
    async fn a_group_that_repeats_a_row_applies_in_order(s) {
        let store = s.store.clone();
        store.apply(&Change::snapshot("p", &PoolSnapshot::default())).await.expect("pool");
        let p = || "p".to_string();
        store
            .apply(&[
                Change::Vm { pool: p(), vm: vm(1, VmState::Free, None) },
                Change::Vm { pool: p(), vm: vm(2, VmState::Free, None) },
                Change::Vm { pool: p(), vm: vm(1, VmState::Error, None) },
                Change::VmDeleted { pool: p(), id: 2 },
                Change::Vm { pool: p(), vm: vm(2, VmState::Ready, None) },
            ])
            .await
            .expect("apply");
        let vms = &store.load_pools().await.expect("load")[0].snapshot.vms;
        let states: Vec<(u64, VmState)> = vms.iter().map(|v| (v.id, v.state)).collect();
        assert_eq!(states, vec![(1, VmState::Error), (2, VmState::Ready)]);
    }
}

each_store! {
    #[tokio::test]
    async fn a_large_group_spans_several_statements(s) {
        let store = s.store.clone();
        let snap = PoolSnapshot { vms: (1..=1203).map(|i| vm(i, VmState::Free, None)).collect(), ..PoolSnapshot::default() };
        store.apply(&Change::snapshot("big", &snap)).await.expect("apply");
        assert_eq!(store.load_pools().await.expect("load")[0].snapshot.vms.len(), 1203);
    }
}

each_store! {
    #[tokio::test]
    async fn a_superseded_fence_voids_the_whole_transaction(s) {
        let store = s.store.clone();
        store.apply(&Change::snapshot("p", &PoolSnapshot::default())).await.expect("pool");
        let old = store.take_fence("p", 3).await.expect("take");
        assert_eq!(old, 3, "the first epoch is the lease's token");
        let fenced = |epoch| vec![Change::Fence { pool: "p".into(), epoch }, Change::Vm { pool: "p".into(), vm: vm(7, VmState::Free, None) }];
        store.apply(&fenced(old)).await.expect("the current epoch writes");

        // A successor with a smaller lease token (a reset lease counter) still rises past it.
        let new = store.take_fence("p", 1).await.expect("take again");
        assert_eq!(new, old + 1);
        let mut stale = fenced(old);
        stale.push(Change::Vm { pool: "p".into(), vm: vm(8, VmState::Free, None) });
        assert_eq!(store.apply(&stale).await, Err(StoreError::Superseded("p".into())));
        let ids: Vec<u64> = store.load_pools().await.expect("load")[0].snapshot.vms.iter().map(|v| v.id).collect();
        assert_eq!(ids, vec![7], "nothing of the stale transaction was written");
        store.apply(&fenced(new)).await.expect("the new epoch writes");
        assert_eq!(store.pool_names().await.expect("names"), vec!["p".to_string()]);
        // Another pool's fence is its own.
        assert_eq!(store.take_fence("q", 9).await.expect("q"), 9);
    }
}
