//! Criterion benchmarks of one vmcloud cycle: lock → assigned → release.
//!
//! - `pool/handle_cycle`: through a `PoolHandle` of a real hive (actors, group-commit writer, a
//!   SQLite file in WAL mode with synchronous=FULL, instant simulated hypervisor); no HTTP.
//! - `pool/domain_cycle`: the pure `PoolState` machine alone, with effects carried out at once,
//!   so the cost of the rules can be set against the cost of the actor + store shell.
//!
//! Both start from a warm pool of 30 FREE VMs and lock a batch of size 0 (an "over-lock"): the
//! lock raises demand by one, a FREE VM is prepared for it and assigned.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
mod support;

use support::{POOL_SIZE, config, until_free};

use guaca_hive::actors::pool::PoolHandle;
use guaca_hive::app::Hive;
use guaca_hive::domain::pool::{PoolRules, PoolSize, PoolState};
use guaca_hive::domain::vm::VmState;
use guaca_hive::domain::{BatchId, Millis};
use tempfile::TempDir;

/// A started hive with a warm pool of 30 FREE VMs and a batch of size 0 to over-lock.
async fn warm_hive(data_dir: &TempDir) -> (Hive, PoolHandle, BatchId) {
    let hive = Hive::start(config(data_dir)).await.expect("hive starts");
    let pool = hive.pool("default").expect("default pool");
    pool.set_size(POOL_SIZE, POOL_SIZE, 60_000).await.expect("set size");
    until_free(&pool, POOL_SIZE as usize, Duration::from_secs(30)).await.expect("warm pool");
    let batch = pool.prepare_batch(0, "http://bench.invalid/").await.expect("batch");
    (hive, pool, batch)
}

fn handle_cycle(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = TempDir::new().expect("tempdir");
    let (hive, pool, batch) = rt.block_on(warm_hive(&dir));

    let mut group = c.benchmark_group("pool");
    group.measurement_time(Duration::from_secs(5)).sample_size(30);
    group.bench_function("handle_cycle", |b| {
        b.to_async(&rt).iter(|| async {
            let h = pool.lock(batch).await.expect("lock");
            let view = pool.wait_assigned(h, Duration::from_secs(5)).await.expect("handle status");
            assert!(view.vm.is_some(), "handle {h} got no VM within 5 s");
            pool.release(h).await.expect("release");
            black_box(view);
        })
    });
    group.finish();

    rt.block_on(async {
        // Every VM comes back FREE: the cycles left nothing behind.
        until_free(&pool, POOL_SIZE as usize, Duration::from_secs(10)).await.expect("pool warm again");
        hive.stop().await;
    });
}

// ---- the pure machine ----------------------------------------------------------------------

const T0: Millis = 1_000_000;

/// Every pending effect carried out at once; time stands still at `T0`, so no timeout fires
/// however long the benchmark runs.
fn settle(p: &mut PoolState) {
    p.settle_instantly(T0);
}

fn domain_cycle(c: &mut Criterion) {
    let mut p = PoolState::new(PoolRules::default(), PoolSize::default());
    p.set_size(POOL_SIZE, POOL_SIZE, 60_000, T0).expect("size");
    settle(&mut p);
    let batch = p.prepare_batch(0, "http://bench.invalid/".into(), T0).expect("batch");
    settle(&mut p);
    assert_eq!(p.vms().filter(|v| v.state == VmState::Free).count(), POOL_SIZE as usize);
    p.take_dirty();

    let mut group = c.benchmark_group("pool");
    group.measurement_time(Duration::from_secs(5)).sample_size(30);
    group.bench_function("domain_cycle", |b| {
        b.iter(|| {
            let h = p.lock(batch, T0).expect("lock");
            settle(&mut p);
            let vm = p.handle(h).and_then(|h| h.vm);
            assert!(vm.is_some(), "handle {h} got no VM");
            p.release(h, T0).expect("release");
            settle(&mut p);
            // The shell takes the changed rows after every event; so does the benchmark.
            black_box(p.take_dirty());
            black_box(vm)
        })
    });
    group.finish();
    p.check_invariants().expect("invariants hold after the benchmark");
}

criterion_group!(benches, handle_cycle, domain_cycle);
criterion_main!(benches);
