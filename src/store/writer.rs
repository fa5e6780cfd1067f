//! Group commit. One background task owns every write: it takes the first queued request, drains
//! whatever else is already queued (up to `MAX_GROUP`), applies them all in ONE `Store::apply`
//! (one transaction, one fsync), and only then calls each request's callback. N concurrent
//! writers cost about one commit, and a caller hears back only once its change is durable.
//!
//! Guarantees: requests are applied in submission order; every callback runs exactly once (with
//! `WriterGone` if the task has stopped); if a group fails on a statement (`StoreError::Query`),
//! its requests are retried one by one, in order, so one bad request does not fail its neighbours.
//!
//! Fences: a writer of several requests in a row (a pool manager) passes the same `Fence` with
//! each. The first failure sets it, and every later request carrying it is answered `Fenced`
//! without touching the database, so nothing built on a lost change is ever committed.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::{Change, Store, StoreError};

/// Most requests folded into one transaction.
const MAX_GROUP: usize = 512;

/// Runs on the writer task once the request's changes are committed (or have failed).
pub type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Shared by a sequence of requests that build on each other; set by the first failure.
pub type Fence = Arc<AtomicBool>;

/// Cloneable handle to the writer task. The task ends when the last handle is dropped, after
/// answering everything already submitted.
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::UnboundedSender<Request>,
    store: Arc<dyn Store>,
}

impl StoreWriter {
    /// Start the writer task on the current tokio runtime (panics outside one, like `tokio::spawn`).
    pub fn spawn(store: Arc<dyn Store>) -> StoreWriter {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store.clone(), rx));
        StoreWriter { tx, store }
    }

    /// Non-blocking; safe to call from inside an actor handler. `done` runs on the writer task
    /// after commit, so it must be quick (send a message, complete a oneshot).
    pub fn submit(&self, changes: Vec<Change>, done: Box<dyn FnOnce(Result<(), StoreError>) + Send>) {
        // If the task has stopped, the request comes back inside the error and dropping it
        // answers `WriterGone`.
        let _ = self.tx.send(Request { changes, fence: None, done: Some(done) });
    }

    /// Like `submit`, for one of a sequence of dependent requests sharing `fence`: once any of
    /// them fails, the fence is set and the rest are answered `Fenced`, unapplied.
    pub fn submit_fenced(&self, changes: Vec<Change>, fence: Fence, done: Done) {
        let _ = self.tx.send(Request { changes, fence: Some(fence), done: Some(done) });
    }

    /// Submit and wait until the changes are durable.
    pub async fn write(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(
            changes,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.await.unwrap_or(Err(StoreError::WriterGone))
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

struct Request {
    changes: Vec<Change>,
    fence: Option<Fence>,
    done: Option<Done>,
}

impl Request {
    fn fenced(&self) -> bool {
        self.fence.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
    }

    fn answer(mut self, result: Result<(), StoreError>) {
        if result.is_err() {
            if let Some(f) = &self.fence {
                f.store(true, Ordering::SeqCst);
            }
        }
        if let Some(done) = self.done.take() {
            call(done, result);
        }
    }
}

/// A request dropped unanswered (task stopped, runtime shutting down) still hears back.
impl Drop for Request {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            call(done, Err(StoreError::WriterGone));
        }
    }
}

/// A panicking callback is the caller's bug; it must not take every other writer down.
fn call(done: Done, result: Result<(), StoreError>) {
    if catch_unwind(AssertUnwindSafe(|| done(result))).is_err() {
        tracing::error!("store writer callback panicked");
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    // `recv_many` waits for one request, then takes whatever else is queued, up to the limit.
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        commit(store.as_ref(), &mut group).await;
    }
}

async fn commit(store: &dyn Store, group: &mut Vec<Request>) {
    let mut all = Vec::new();
    let mut parts: Vec<(Range<usize>, Request)> = Vec::with_capacity(group.len());
    for mut req in group.drain(..) {
        if req.fenced() {
            req.answer(Err(StoreError::Fenced));
            continue;
        }
        let start = all.len();
        all.append(&mut req.changes);
        parts.push((start..all.len(), req));
    }
    let started = std::time::Instant::now();
    let merged = last_write_per_row(&all);
    let result = store.apply(merged.as_deref().unwrap_or(&all)).await;
    if !all.is_empty() {
        crate::metrics::store_commit(result.is_ok(), all.len(), started.elapsed().as_secs_f64());
    }
    match result {
        Err(StoreError::Query(e)) if parts.len() > 1 => {
            tracing::warn!(requests = parts.len(), error = %e, "group commit failed; applying requests one by one");
            for (range, req) in parts {
                if req.fenced() {
                    req.answer(Err(StoreError::Fenced));
                    continue;
                }
                let result = store.apply(&all[range]).await;
                req.answer(result);
            }
        }
        result => {
            for (_, req) in parts {
                req.answer(result.clone());
            }
        }
    }
}

/// A group often rewrites the same rows (the pool row after every event, a VM on each step of
/// its way). Each row's final change is what the group commits; it takes the place of the row's
/// first change, so a row is never written before one it depends on (a pool before its VMs).
/// `None` when nothing repeats, or when the group deletes a pool (then order is kept as is).
fn last_write_per_row(all: &[Change]) -> Option<Vec<Change>> {
    let mut last = std::collections::HashMap::with_capacity(all.len());
    for (i, c) in all.iter().enumerate() {
        last.insert(c.row()?, i);
    }
    if last.len() == all.len() {
        return None;
    }
    let mut seen = std::collections::HashSet::with_capacity(last.len());
    let merged = all
        .iter()
        .filter_map(|c| {
            let key = c.row().expect("checked above");
            seen.insert(key).then(|| all[last[&key]].clone())
        })
        .collect();
    Some(merged)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::domain::pool::PoolSize;
    use crate::domain::vm::Vm;
    use crate::store::test_stores::{TestStore, each_store};
    use crate::store::{NodeRecord, StoredPool};

    /// Counts `apply` calls on the way to a real store.
    struct Counting {
        inner: Arc<dyn Store>,
        applies: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for Counting {
        async fn load_pools(&self) -> Result<Vec<StoredPool>, StoreError> {
            self.inner.load_pools().await
        }
        async fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
            self.inner.load_nodes().await
        }
        async fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
            self.applies.fetch_add(1, Ordering::SeqCst);
            self.inner.apply(changes).await
        }
        async fn take_fence(&self, pool: &str, floor: u64) -> Result<u64, StoreError> {
            self.inner.take_fence(pool, floor).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        fn kind(&self) -> &'static str {
            "counting"
        }
    }

    fn counting(t: &TestStore) -> Arc<Counting> {
        Arc::new(Counting { inner: t.store.clone(), applies: AtomicUsize::new(0) })
    }

    fn pool(name: &str) -> Change {
        Change::Pool {
            pool: name.into(),
            size: PoolSize { min: 0, max: 5, linger: 0 },
            next_vm: 1,
            next_batch: 1,
            next_handle: 1,
            preps: vec![],
            pending: vec![],
        }
    }

    fn vm(pool: &str, id: u64) -> Change {
        Change::Vm { pool: pool.into(), vm: Vm::new(id, 1_000) }
    }

    async fn vm_ids(store: &dyn Store, name: &str) -> Vec<u64> {
        let pools = store.load_pools().await.expect("load");
        let p = pools.iter().find(|p| p.name == name).expect("pool present");
        p.snapshot.vms.iter().map(|v| v.id).collect()
    }

    each_store! {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_writers_share_commits(ts) {
            let store = counting(&ts);
            let writer = StoreWriter::spawn(store.clone());
            writer.write(vec![pool("g")]).await.expect("pool row");
            let before = store.applies.load(Ordering::SeqCst);

            let mut tasks = Vec::new();
            for t in 0..50u64 {
                let writer = writer.clone();
                tasks.push(tokio::spawn(async move {
                    let mut answers = Vec::new();
                    for i in 0..4u64 {
                        let (tx, rx) = oneshot::channel();
                        writer.submit(vec![vm("g", t * 4 + i + 1)], Box::new(move |r| drop(tx.send(r))));
                        answers.push(rx);
                    }
                    for rx in answers {
                        rx.await.expect("callback ran").expect("write ok");
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }

            let applies = store.applies.load(Ordering::SeqCst) - before;
            assert!(applies < 200, "200 submissions took {applies} commits; expected grouping");
            assert_eq!(vm_ids(store.as_ref(), "g").await, (1..=200).collect::<Vec<_>>());
        }
    }

    each_store! {
        #[tokio::test]
        async fn requests_apply_in_submission_order(ts) {
            let store = counting(&ts);
            let writer = StoreWriter::spawn(store.clone());
            writer.write(vec![pool("p")]).await.expect("pool row");
            // `join!` polls its futures in order, so the three are submitted in this order.
            let upsert = writer.write(vec![vm("p", 7)]);
            let delete = writer.write(vec![Change::VmDeleted { pool: "p".into(), id: 7 }]);
            let keep = writer.write(vec![vm("p", 8)]);
            let (a, b, c) = tokio::join!(upsert, delete, keep);
            a.and(b).and(c).expect("writes ok");
            assert_eq!(vm_ids(store.as_ref(), "p").await, vec![8]);
        }
    }

    // On a current-thread runtime the writer cannot run until the test yields, so all three
    // submissions land in one group; the bad one must fail alone.
    each_store! {
        #[tokio::test]
        async fn a_bad_request_fails_alone(ts) {
            let store = counting(&ts);
            let writer = StoreWriter::spawn(store.clone());
            let ok1 = writer.write(vec![pool("p")]);
            let bad = writer.write(vec![vm("nope", 1)]);
            let ok2 = writer.write(vec![vm("p", 1)]);
            let (ok1, bad, ok2) = tokio::join!(ok1, bad, ok2);
            assert_eq!(ok1, Ok(()));
            assert!(matches!(bad, Err(StoreError::Query(_))), "{bad:?}");
            assert_eq!(ok2, Ok(()));
            assert_eq!(store.applies.load(Ordering::SeqCst), 4, "one group commit, then three retries");
            assert_eq!(vm_ids(store.as_ref(), "p").await, vec![1]);
            assert!(store.load_pools().await.expect("load").iter().all(|p| p.name != "nope"));
        }
    }

    each_store! {
        #[tokio::test]
        async fn after_a_fenced_failure_the_rest_of_the_sequence_is_not_written(ts) {
            let store = counting(&ts);
            let writer = StoreWriter::spawn(store.clone());
            writer.write(vec![pool("p")]).await.unwrap();
            let fence = Fence::default();
            let (tx, mut rx) = mpsc::unbounded_channel();
            for changes in [vec![vm("nope", 1)], vec![vm("p", 2)], vec![]] {
                let tx = tx.clone();
                writer.submit_fenced(
                    changes,
                    fence.clone(),
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                );
            }
            assert!(matches!(rx.recv().await, Some(Err(StoreError::Query(_)))));
            assert_eq!(rx.recv().await, Some(Err(StoreError::Fenced)), "built on the failed change: not written");
            assert_eq!(rx.recv().await, Some(Err(StoreError::Fenced)), "even an empty barrier is refused");
            assert!(vm_ids(store.as_ref(), "p").await.is_empty());
            // Requests without that fence still go through.
            writer.write(vec![vm("p", 3)]).await.unwrap();
            assert_eq!(vm_ids(store.as_ref(), "p").await, vec![3]);
        }
    }

    #[test]
    fn a_group_writes_each_row_once_with_its_last_value_in_its_first_place() {
        let p1 = pool("p");
        let merged =
            last_write_per_row(&[p1.clone(), vm("p", 1), vm("p", 2), Change::VmDeleted { pool: "p".into(), id: 1 }, p1.clone()]).unwrap();
        assert_eq!(merged, vec![p1.clone(), Change::VmDeleted { pool: "p".into(), id: 1 }, vm("p", 2)]);
        assert_eq!(last_write_per_row(&[p1.clone(), vm("p", 1)]), None, "nothing repeats");
        assert_eq!(
            last_write_per_row(&[p1.clone(), Change::PoolDeleted { pool: "p".into() }, p1]),
            None,
            "order kept around a pool deletion"
        );
    }

    struct Panicking;

    #[async_trait::async_trait]
    impl Store for Panicking {
        async fn load_pools(&self) -> Result<Vec<StoredPool>, StoreError> {
            Ok(vec![])
        }
        async fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
            Ok(vec![])
        }
        async fn apply(&self, _: &[Change]) -> Result<(), StoreError> {
            panic!("simulated store bug")
        }
        async fn take_fence(&self, _: &str, floor: u64) -> Result<u64, StoreError> {
            Ok(floor)
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn kind(&self) -> &'static str {
            "panicking"
        }
    }

    #[tokio::test]
    async fn a_stopped_writer_answers_writer_gone() {
        let writer = StoreWriter::spawn(Arc::new(Panicking));
        assert_eq!(writer.write(vec![]).await, Err(StoreError::WriterGone));
        writer.tx.closed().await;
        let answer = Arc::new(parking_lot::Mutex::new(None));
        let slot = answer.clone();
        writer.submit(vec![], Box::new(move |r| *slot.lock() = Some(r)));
        assert_eq!(*answer.lock(), Some(Err(StoreError::WriterGone)), "answered at once");
    }
}
